"""remat: named, checked, measured rematerialization policies for JAX and Flax.

``remat.policies`` holds the policy value type, spec strings and presets;
``remat.checkpoint``, ``remat.remat`` and ``remat.scan_layers`` apply them.
"""

from remat import policies
from remat.apply import MissingCheckpointNameError, checkpoint, checkpoint_names, remat
from remat.policies import Policy
from remat.scan import scan_layers

__all__ = [
    "MissingCheckpointNameError",
    "Policy",
    "checkpoint",
    "checkpoint_names",
    "policies",
    "remat",
    "scan_layers",
]
__version__ = "0.1.0"
