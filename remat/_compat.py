"""The one module that touches private JAX internals (``jax._src``).

Everything else in ``remat`` imports these names from here, so a JAX upgrade
that moves them breaks one file.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import site
import sysconfig
from collections.abc import Sequence
from typing import Any

from jax._src import source_info_util, traceback_util
from jax._src.ad_checkpoint import (
    CheckpointName,  # the hi-primitive form of `checkpoint_name`
    call_hi_primitive_p,
    name_p,  # the primitive of `checkpoint_name`
)
from jax._src.core import MemorySpace

__all__ = ["api_boundary", "eqn_checkpoint_name", "hide_frames", "is_transposed", "is_user_file", "on_host",
           "source_line"]

LIBRARIES = ("jax", "jaxlib", "flax", "optax", "chex", "orbax", "remat", "remat.policies")
"""The packages whose frames are never the user's code: the JAX stack and
remat's own internals. ``remat.models`` is user code (a model you read)."""
USER_PACKAGES = ("remat.models",)
"""Packages that are user code even where they lie inside a library's folder."""


def eqn_checkpoint_name(eqn: Any) -> str | None:
    """The checkpoint name a jaxpr equation emits, or None if it emits none."""
    if eqn.primitive is name_p:
        return eqn.params["name"]
    if eqn.primitive is call_hi_primitive_p and isinstance(p := eqn.params.get("_prim"), CheckpointName):
        return p.name
    return None


def is_transposed(eqn: Any) -> bool:
    """True when a jaxpr equation belongs to a backward pass: JAX's AD puts a
    ``transpose`` transform on the name stack of every equation it transposes
    (the ``transpose(jvp(f))`` seen in XLA op metadata)."""
    return any(isinstance(s, source_info_util.Transform) and s.name == "transpose"
               for s in eqn.source_info.name_stack.stack)


def _package_dirs(names: Sequence[str]) -> tuple[str, ...]:
    """The folders of the importable packages ``names``, each ending in a separator."""
    dirs = []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.submodule_search_locations:
            dirs += [os.path.join(os.path.realpath(d), "") for d in spec.submodule_search_locations]
    return tuple(dirs)


@functools.cache
def _layout() -> dict[str, tuple[str, ...]]:
    """This interpreter's folders, by what they hold (see :func:`is_user_file`)."""
    stdlib = {sysconfig.get_path(k) for k in ("stdlib", "platstdlib")}
    sites = {sysconfig.get_path(k) for k in ("purelib", "platlib")} | set(site.getsitepackages())
    sites.add(site.getusersitepackages())
    real = lambda ps: tuple(os.path.join(os.path.realpath(p), "") for p in ps if p)
    return {"user": _package_dirs(USER_PACKAGES), "libraries": _package_dirs(LIBRARIES),
            "stdlib": real(stdlib), "sites": real(sites)}


def is_user_file(filename: str, *, user: Sequence[str], libraries: Sequence[str], stdlib: Sequence[str],
                 sites: Sequence[str]) -> bool:
    """Whether a source file is the user's code: inside a ``user`` folder,
    or else in no ``libraries`` folder, and not in the standard library
    (``stdlib`` folders less the ``sites`` folders under them: where packages
    are installed into the interpreter itself, its site-packages lies inside
    its standard library). Packages are told apart by where they are, never
    by a ``site-packages`` in the path, so the answer is the same in a venv,
    a system, a pyenv or a conda install. Folders end in a separator."""
    under = lambda dirs: any(filename.startswith(d) for d in dirs)
    if under(user):
        return True
    if under(libraries):
        return False
    return not (under(stdlib) and not under(sites))


@functools.cache
def _is_user(filename: str) -> bool:
    return is_user_file(os.path.realpath(filename), **_layout())


def source_line(eqn: Any) -> str:
    """``file:line (function)`` of the user code that created a jaxpr
    equation: its innermost frame that :func:`is_user_file` calls the user's
    (not in jax, jaxlib, flax, optax, chex, orbax, the standard library or
    remat's internals); ``""`` where there is none."""
    tb = eqn.source_info.traceback
    codes, lastis = tb.raw_frames() if tb else ([], [])
    for code, lasti in zip(codes, lastis, strict=True):
        if _is_user(code.co_filename):
            frame = source_info_util.raw_frame_to_frame(code, lasti)
            return f"{frame.file_name}:{frame.start_line} ({frame.function_name})"
    return ""


def on_host(aval: Any) -> bool:
    """True when an abstract value lives in host memory (``f32<host>[...]``,
    e.g. a residual offloaded to ``pinned_host``)."""
    return getattr(aval, "memory_space", None) == MemorySpace.Host


def hide_frames(path: str) -> None:
    """Leave the file ``path`` out of JAX-filtered tracebacks and out of the
    user frames JAX's source attribution looks for, as Flax does for its own
    modules (``flax.traceback_util.register_exclusion``). Called by each of
    remat's internal modules; never by ``remat.models``, which is code a user
    reads as their own model."""
    traceback_util.register_exclusion(path)
    source_info_util.register_exclusion(path)


def api_boundary(fn: Any) -> Any:
    """JAX's ``api_boundary``: an exception leaving ``fn`` has its traceback
    filtered (the frames of hidden files removed), as exceptions leaving
    ``jax.checkpoint`` do."""
    return traceback_util.api_boundary(fn)
