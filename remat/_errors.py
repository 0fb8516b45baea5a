"""The base class of every error ``remat`` raises for bad input."""

from __future__ import annotations

__all__ = ["RematError"]


class RematError(ValueError):
    """Bad input to ``remat``: an unknown policy, a spec that does not parse, a
    checkpoint name a model never emits, a policy the backend or JAX mode
    cannot do, bad shapes or settings. A ``ValueError``, so existing
    ``except ValueError`` keeps working; the ``remat`` command prints its
    message on one line (exit status 2)."""
