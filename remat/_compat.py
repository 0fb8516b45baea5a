"""The one module that touches private JAX internals (``jax._src``).

Everything else in ``remat`` imports these names from here, so a JAX upgrade
that moves them breaks one file.
"""

from __future__ import annotations

from jax._src.ad_checkpoint import (
    name_p,  # the primitive of `checkpoint_name`
    saved_residuals,  # (aval, source) pairs
)

__all__ = ["name_p", "saved_residuals"]
