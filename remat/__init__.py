"""remat: named, checked, measured rematerialization policies for JAX and Flax.

``remat.policies`` holds the policy value type, spec strings and presets.
"""

from remat import policies
from remat.policies import Policy

__all__ = ["Policy", "policies"]
__version__ = "0.1.0"
