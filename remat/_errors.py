"""Every error and warning ``remat`` raises, in one place (as ``flax.errors``).

Each is built the same way: the message first, then the facts a caller may
act on as keyword-only fields, kept as attributes, e.g.
``NeverKeptError(message, names=frozenset({"mlpwo"}))``. Every error is a
:class:`RematError`, so a ``ValueError``: existing ``except ValueError``
keeps working, and the ``remat`` command prints its message on one line
(exit status 2). They are re-exported from ``remat`` (and the policy ones
from ``remat.policies``).

Pure Python: ``remat.policies`` imports it and needs JAX alone. The one
error that also subclasses a Flax class, :class:`RematTargetError`, is made
on first use (a module ``__getattr__``, PEP 562).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CorpusError",
    "DumpFormatError",
    "MissingCheckpointNameError",
    "NeverKeptError",
    "NeverKeptWarning",
    "NoMemoryAnalysisError",
    "OffloadUnsupportedError",
    "PolicyNotTextError",
    "PolicySpecError",
    "RematError",
    "RematTargetError",  # noqa: F822 (made on first use: the module __getattr__ below)
    "ScanCarryOffloadError",
    "UnknownPolicyError",
    "UnsupportedJaxModeError",
]


class RematError(ValueError):
    """Bad input to ``remat``: an unknown policy, a spec that does not parse, a
    checkpoint name a model never emits, a policy the backend or JAX mode
    cannot do, bad shapes or settings. The base of every error below.

    A backend's limitation counts as bad input too (:class:`OffloadUnsupportedError`,
    :class:`NoMemoryAnalysisError`): the same call is right on another
    backend or target, which is the caller's choice, and the message names
    the fix. A bug in ``remat`` is never a ``RematError``.
    """


# Policies: their names, spec strings and JAX modes (remat.policies).


class UnknownPolicyError(RematError):
    """Raised for a policy name that is not registered
    (:func:`remat.policies.get`, ``--policy``). The message lists close
    matches and every valid name. Fix the name, or register the policy with
    :func:`remat.policies.register`.

    Attributes:
      name: the unknown name.
    """

    def __init__(self, message: str, *, name: str):
        super().__init__(message)
        self.name = name


class PolicySpecError(RematError):
    """Raised for a policy spec string that does not parse. The message names
    the bad term, its 0-based character position in the spec and the
    grammar; fix the spec."""


class PolicyNotTextError(RematError, TypeError):
    """Raised where a policy must be text (a spec string, ``+``,
    ``--policy``, ``run.json``, ``remat tune``, the registry) but a JAX
    policy callable (a :class:`remat.OpaquePolicy`) was given. Give its
    spec string instead. Both a :class:`RematError` and a ``TypeError``."""


class UnsupportedJaxModeError(RematError):
    """Raised when a policy meets a JAX mode that would silently drop it
    (``jax_remat3``). Turn the mode off, or use no policy."""


# Applying policies (remat.checkpoint, remat.remat, remat.scan_layers, remat.nnx).


class MissingCheckpointNameError(RematError):
    """Raised when a function or module is first traced and its policy saves
    or offloads a checkpoint name that it never emits (a misspelt tag would
    otherwise mean "recompute everything"). Tag values with
    ``jax.ad_checkpoint.checkpoint_name``, or fix the policy.

    Attributes:
      missing: the policy's names that are never emitted.
      emitted: every checkpoint name the function emits.
    """

    def __init__(self, message: str, *, missing: frozenset[str], emitted: frozenset[str]):
        super().__init__(message)
        self.missing, self.emitted = missing, emitted


class NeverKeptError(RematError):
    """Raised when a policy's checkpoint names are emitted but none of them is
    kept: the backward pass never reads those values, so JAX drops them
    whatever the policy says (silently "full" remat). Tag and save a value the
    backward pass reads, e.g. a matmul output before its nonlinearity.

    Attributes:
      names: the policy's emitted names that are never kept.
    """

    def __init__(self, message: str, *, names: frozenset[str]):
        super().__init__(message)
        self.names = names


class NeverKeptWarning(UserWarning):
    """Warned when a checkpoint name the policy saves or offloads is emitted
    but never kept (the backward pass never reads it), while the policy's
    other names are. Drop the name from the policy, or tag another value."""


class ScanCarryOffloadError(RematError):
    """Raised when a layer-scan policy offloads the name that tags the block's
    output, which is the scan carry: the scan itself keeps it on device.
    Tag the block's input instead and offload that name."""


class OffloadUnsupportedError(RematError):
    """Raised when a policy offloads to ``pinned_host`` memory and the backend
    lacks it (or fails the offload probe). Use the policy's on-device form
    (:meth:`remat.Policy.on_device`), recompute instead, or measure on a
    target that offloads (``target="h100"``)."""


def _target_error() -> type[RematError]:
    import flax.errors  # a Flax base class: made on first use, so remat.policies needs JAX alone

    class RematTargetError(RematError, flax.errors.TransformTargetError):
        """Raised when a remat wrapper gets something other than what it wraps
        (a module instance, a bound method, a function, a class of the other
        Flax API). Also a ``flax.errors.TransformTargetError``, as
        ``nn.remat`` raises for a module instance; the message names what
        was passed and what to pass instead."""

        def __init__(self, message: str):
            Exception.__init__(self, message)  # without FlaxError's link to Flax's error page

    RematTargetError.__module__, RematTargetError.__qualname__ = __name__, "RematTargetError"
    return RematTargetError


# Measuring and training.


class NoMemoryAnalysisError(RematError):
    """Raised by :mod:`remat.testing` when the backend reports no compiled
    memory figures to compare (none, or all zeros). Compare on a backend
    that reports them, e.g. CPU or a deviceless GPU or TPU target."""


class DumpFormatError(RematError):
    """Raised when XLA's dump folder (``xla_dump_to``) lacks a file or section
    the peak reader expects (XLA changed its format, or the backend writes
    none). ``remat.analyze`` catches it and reports the peak without its
    terms."""


class CorpusError(RematError):
    """Raised by ``remat train`` for a data path that does not exist, a corpus
    with no bytes, a binary file, or a split too small for the requested
    windows. The message names the bad path or value."""


def __getattr__(name: str) -> Any:
    if name == "RematTargetError":
        globals()[name] = cls = _target_error()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
