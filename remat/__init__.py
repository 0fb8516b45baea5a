"""remat: named, checked, measured rematerialization policies for JAX and Flax.

``remat.policies`` holds the policy value type, spec strings and presets and
needs only JAX; ``remat.checkpoint``, ``remat.remat`` and ``remat.scan_layers``
apply policies to functions and Flax modules; ``remat.analyze``,
``remat.inspect_policy`` and ``remat.sweep`` measure them compile-only;
``remat.tune`` picks the least-recompute configuration that fits a budget,
for a model preset or any :class:`remat.Workload` (your own train step);
``remat.nnx`` does the same for Flax NNX modules;
``remat.models`` are scan-over-layers transformers (linen and NNX), ``remat.step`` their
train step, ``remat.train`` trains one on real text, and ``remat.testing``
checks your own model.

Every name is imported on first use (PEP 562 module ``__getattr__``, made by
``lazy_loader`` from the one list of public names, ``__init__.pyi``), so
``import remat.policies`` loads JAX and nothing else. Importing ``remat``
sets, where the hardware is absent and unless already set, the environment
variables that keep JAX's CUDA plugin and libtpu from failing noisily when
JAX starts (:mod:`remat._environment`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

import lazy_loader

from remat import _environment

_environment.quiet_start()  # before JAX starts its backends: no CUDA or libtpu start-up noise where absent

_lazy_getattr, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)


def __getattr__(name: str) -> Any:
    if name == "TuneConfig":  # renamed SearchPoint: the old name warns, for one release
        return importlib.import_module("remat._tune").TuneConfig
    return _lazy_getattr(name)


__version__ = importlib.metadata.version("remat")  # one place: pyproject.toml
