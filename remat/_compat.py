"""The one module that touches private JAX internals (``jax._src``).

Everything else in ``remat`` imports these names from here, so a JAX upgrade
that moves them breaks one file.
"""

from __future__ import annotations

from typing import Any

from jax._src import source_info_util
from jax._src.ad_checkpoint import (
    CheckpointName,  # the hi-primitive form of `checkpoint_name`
    call_hi_primitive_p,
    name_p,  # the primitive of `checkpoint_name`
)
from jax._src.core import MemorySpace

__all__ = ["eqn_checkpoint_name", "is_transposed", "on_host", "source_line"]


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


def source_line(eqn: Any) -> str:
    """``file:line (function)`` of the user code that created a jaxpr equation."""
    return source_info_util.summarize(eqn.source_info)


def on_host(aval: Any) -> bool:
    """True when an abstract value lives in host memory (``f32<host>[...]``,
    e.g. a residual offloaded to ``pinned_host``)."""
    return getattr(aval, "memory_space", None) == MemorySpace.Host
