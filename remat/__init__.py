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

Every name is imported on first use (PEP 562 module ``__getattr__``), so
``import remat.policies`` loads JAX and nothing else. Importing ``remat``
sets, where the hardware is absent and unless already set, the environment
variables that keep JAX's CUDA plugin and libtpu from failing noisily when
JAX starts (:mod:`remat._environment`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

from remat import _environment

_environment.quiet_start()  # before JAX starts its backends: no CUDA or libtpu start-up noise where absent

if TYPE_CHECKING:
    from remat import models, nnx, policies, step, testing, train
    from remat._analysis import analyze
    from remat._apply import (
        MissingCheckpointNameError,
        NeverKeptError,
        NeverKeptWarning,
        OffloadUnsupportedError,
        RematTargetError,
        ScanCarryOffloadError,
        checkpoint,
        checkpoint_names,
        remat,
        without_remat,
    )
    from remat._data import CorpusError
    from remat._errors import RematError
    from remat._flax_workload import linen_workload, nnx_workload
    from remat._memory import PeakBuffer
    from remat._mesh import set_cpu_devices
    from remat._report import Report
    from remat._residuals import ResidualRow
    from remat._scan import scan_layers
    from remat._sweep import SweepResult, inspect_policy, plot_sweep, sweep, train_step_setup
    from remat._targets import TARGETS, Target, target_devices, target_mesh
    from remat._tune import TuneConfig, TuneResult, tune
    from remat._workload import Configuration, TrainStep, TrainStepSetup, Workload
    from remat.policies import (
        OpaquePolicy,
        Policy,
        PolicyNotTextError,
        PolicySpecError,
        UnknownPolicyError,
        UnsupportedJaxModeError,
    )

_EXPORTS = {
    "Configuration": "remat._workload",
    "CorpusError": "remat._data",
    "MissingCheckpointNameError": "remat._apply",
    "NeverKeptError": "remat._apply",
    "NeverKeptWarning": "remat._apply",
    "OffloadUnsupportedError": "remat._apply",
    "OpaquePolicy": "remat.policies",
    "PeakBuffer": "remat._memory",
    "Policy": "remat.policies",
    "PolicyNotTextError": "remat.policies",
    "PolicySpecError": "remat.policies",
    "RematError": "remat._errors",
    "RematTargetError": "remat._apply",
    "Report": "remat._report",
    "ResidualRow": "remat._residuals",
    "ScanCarryOffloadError": "remat._apply",
    "SweepResult": "remat._sweep",
    "TARGETS": "remat._targets",
    "Target": "remat._targets",
    "target_devices": "remat._targets",
    "target_mesh": "remat._targets",
    "TrainStep": "remat._workload",
    "TrainStepSetup": "remat._workload",
    "TuneConfig": "remat._tune",
    "TuneResult": "remat._tune",
    "UnknownPolicyError": "remat.policies",
    "UnsupportedJaxModeError": "remat.policies",
    "Workload": "remat._workload",
    "analyze": "remat._analysis",
    "checkpoint": "remat._apply",
    "checkpoint_names": "remat._apply",
    "inspect_policy": "remat._sweep",
    "linen_workload": "remat._flax_workload",
    "nnx_workload": "remat._flax_workload",
    "plot_sweep": "remat._sweep",
    "remat": "remat._apply",
    "scan_layers": "remat._scan",
    "set_cpu_devices": "remat._mesh",
    "sweep": "remat._sweep",
    "train_step_setup": "remat._sweep",
    "tune": "remat._tune",
    "without_remat": "remat._apply",
}
_SUBMODULES = ("models", "nnx", "policies", "step", "testing", "train")

__all__ = [
    "TARGETS",
    "Configuration",
    "CorpusError",
    "MissingCheckpointNameError",
    "NeverKeptError",
    "NeverKeptWarning",
    "OffloadUnsupportedError",
    "OpaquePolicy",
    "PeakBuffer",
    "Policy",
    "PolicyNotTextError",
    "PolicySpecError",
    "RematError",
    "RematTargetError",
    "Report",
    "ResidualRow",
    "ScanCarryOffloadError",
    "SweepResult",
    "Target",
    "TrainStep",
    "TrainStepSetup",
    "TuneConfig",
    "TuneResult",
    "UnknownPolicyError",
    "UnsupportedJaxModeError",
    "Workload",
    "analyze",
    "checkpoint",
    "checkpoint_names",
    "inspect_policy",
    "linen_workload",
    "models",
    "nnx",
    "nnx_workload",
    "plot_sweep",
    "policies",
    "remat",
    "scan_layers",
    "set_cpu_devices",
    "step",
    "sweep",
    "target_devices",
    "target_mesh",
    "testing",
    "train",
    "train_step_setup",
    "tune",
    "without_remat",
]
__version__ = importlib.metadata.version("remat")  # one place: pyproject.toml


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"remat.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    raise AttributeError(f"module 'remat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
