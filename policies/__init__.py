"""``remat.policies``: named, composable remat policies for ``jax.checkpoint``.

Needs only JAX. The :class:`Policy` value type, the spec-string grammar, the
registry of presets and the checkpoint-name vocabulary (:mod:`remat.policies.vocab`).
"""

from remat import _compat
from remat._errors import PolicyNotTextError, PolicySpecError, UnknownPolicyError, UnsupportedJaxModeError
from remat.policies import (
    presets as _presets,  # noqa: F401  (registers the presets)
    vocab,
)
from remat.policies.policy import (
    DotsRule,
    OpaquePolicy,
    Policy,
    require_text,
)
from remat.policies.registry import (
    describe,
    get,
    names,
    register,
)

_compat.hide_frames(__file__)

__all__ = [
    "DotsRule",
    "OpaquePolicy",
    "Policy",
    "PolicyNotTextError",
    "PolicySpecError",
    "UnknownPolicyError",
    "UnsupportedJaxModeError",
    "describe",
    "get",
    "names",
    "register",
    "require_text",
    "vocab",
]
