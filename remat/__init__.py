"""remat: named, checked, measured rematerialization policies for JAX and Flax.

``remat.policies`` holds the policy value type, spec strings and presets;
``remat.checkpoint``, ``remat.remat`` and ``remat.scan_layers`` apply them;
``remat.analyze`` and ``remat.sweep`` measure them compile-only.
``remat.train`` (a module, imported on demand: it loads orbax) trains on real text
over ``remat.data`` byte corpora.
"""

from remat import policies, testing
from remat.analysis import Report, ResidualRow, analyze
from remat.apply import (
    MissingCheckpointNameError,
    NeverKeptError,
    NeverKeptWarning,
    OffloadUnsupportedError,
    ScanCarryOffloadError,
    checkpoint,
    checkpoint_names,
    remat,
)
from remat.data import CorpusError
from remat.policies import Policy
from remat.scan import scan_layers
from remat.sweep import SweepResult, plot_sweep, sweep

__all__ = [
    "CorpusError",
    "MissingCheckpointNameError",
    "NeverKeptError",
    "NeverKeptWarning",
    "OffloadUnsupportedError",
    "Policy",
    "Report",
    "ResidualRow",
    "ScanCarryOffloadError",
    "SweepResult",
    "analyze",
    "checkpoint",
    "checkpoint_names",
    "plot_sweep",
    "policies",
    "remat",
    "scan_layers",
    "sweep",
    "testing",
]
__version__ = "0.1.0"
