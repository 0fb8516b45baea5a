"""A persistent cache of what a measured compile gives, across runs.

A compile for a big step takes minutes on a CPU host (an 8B train step for
a TPU or GPU target: about two), and a sweep or a tune repeats them run after
run. What the analysis keeps of a compile is small: ``memory_analysis()``'s
figures, the device count, the compile time and the values live at the peak
(:class:`remat._buffers.PeakDump`), or the out-of-memory verdict of a
compile the backend refused. This module stores exactly that, one JSON file
per compile, keyed by everything the compile depends on: the lowered program
with its debug info (source lines end up in the peak's buffers; they hold
the whole call stack, so the same step traced from another line of a script
is another key), the compile options, the device kind and count, the JAX,
jaxlib, libtpu and CUDA plugin versions, and the source of the dump's
reader (:mod:`remat._buffers`).

JAX's own persistent compilation cache (``jax_compilation_cache_dir``) is
not used for this: a cache hit there writes no buffer-assignment dump, and
the peak by term is read from that dump.

The cache lives in ``$REMAT_CACHE_DIR``, else ``$XDG_CACHE_HOME/remat``,
else ``~/.cache/remat``; ``REMAT_CACHE_DIR=""`` (empty) turns it off. A file
that does not read back (truncated, another format) is a miss, never an
error. Delete the folder to clear it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax

from remat import _buffers, _compat
from remat._buffers import LiveValue, PeakDump

_compat.hide_frames(__file__)

__all__ = ["CACHE_VAR", "cache_dir", "compile_key", "load", "store"]

CACHE_VAR = "REMAT_CACHE_DIR"
"""The environment variable naming the cache folder (empty: no cache)."""

_FORMAT = 1  # bump when what is stored changes
_READER = hashlib.sha256(Path(_buffers.__file__).read_bytes()).hexdigest()
"""The dump reader's own source: a change to how the dump is read is a miss."""


def cache_dir() -> Path | None:
    """The cache folder (see the module doc), or None when turned off."""
    if CACHE_VAR in os.environ:
        return Path(os.environ[CACHE_VAR]) if os.environ[CACHE_VAR] else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "remat"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def compile_key(program_text: str, options: dict[str, Any], device: Any, devices: int) -> str:
    """A hex digest of everything a compile's figures depend on.

    Args:
      program_text: the lowered program, debug info included
        (``lowered.as_text(debug_info=True)``).
      options: the compile options, less ``xla_dump_to`` (where the dump
        goes does not change it).
      device: a device compiled for (its platform and ``device_kind``).
      devices: how many devices the program spans.
    """
    compile_options = {k: str(v) for k, v in sorted(options.items()) if k != "xla_dump_to"}
    parts = [str(_FORMAT), _READER, program_text, json.dumps(compile_options),
             device.platform, device.device_kind, str(devices),
             jax.__version__, _version("jaxlib"), _version("libtpu"), _version("jax-cuda12-plugin")]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _dump_to_json(dump: PeakDump | str) -> Any:
    return dump if isinstance(dump, str) else dataclasses.asdict(dump)


def _dump_from_json(d: Any) -> PeakDump | str:
    if isinstance(d, str):
        return d
    return PeakDump(**{**d, "live": tuple(LiveValue(**v) for v in d["live"])})


def load(key: str) -> dict[str, Any] | None:
    """The entry stored under ``key`` (``{"figures": ..., "seconds": ...,
    "dump": PeakDump | str}``), or None: no cache, no entry, or an entry
    that does not read back."""
    folder = cache_dir()
    if folder is None:
        return None
    try:
        entry = json.loads((folder / f"{key}.json").read_text())
        return {**entry, "dump": _dump_from_json(entry["dump"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(key: str, figures: dict[str, Any], seconds: float, dump: PeakDump | str) -> None:
    """Store an entry under ``key``, atomically (written aside, then
    renamed), so a reader never sees half a file; a folder that cannot be
    written is skipped silently (the cache is an optimisation)."""
    folder = cache_dir()
    if folder is None:
        return
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"figures": figures, "seconds": seconds, "dump": _dump_to_json(dump)})
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:
            f.write(text)
        os.replace(f.name, folder / f"{key}.json")
