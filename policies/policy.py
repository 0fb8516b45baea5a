"""The :class:`Policy` value type: what a remat policy saves, offloads or recomputes."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable
from typing import Any, Literal

import jax
from jax.ad_checkpoint import Offloadable, Recompute, Saveable

from remat import _compat
from remat._errors import RematError

_compat.hide_frames(__file__)

DotsRule = Literal["all", "no_batch"]
"""Which matmul (``dot_general``) outputs a rule covers: ``"all"`` as JAX's
``dots_saveable``, ``"no_batch"`` as ``dots_with_no_batch_dims_saveable``."""

_DOTS_RULES = ("all", "no_batch")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
OFFLOAD_SRC = "device"
OFFLOAD_DST = "pinned_host"


def _names(field: str, value: Iterable[str]) -> frozenset[str]:
    if isinstance(value, str):
        raise TypeError(
            f"Policy.{field} takes a collection of checkpoint names, got the string "
            f"{value!r}; write {field}=({value!r},)")
    names = frozenset(value)
    for n in sorted(names):
        if not isinstance(n, str) or not _NAME_RE.match(n):
            raise RematError(
                f"invalid checkpoint name {n!r} in Policy.{field}: a name is a letter or "
                "'_' followed by letters, digits, '_', '.' or '-'")
    return names


@dataclasses.dataclass(frozen=True, kw_only=True)
class Policy:
    """A remat policy: for each residual, save it on device, offload it to host
    memory, or recompute it in the backward pass.

    A frozen, hashable value; equal policies are equal whatever way they were
    written. Build one from a spec string with :func:`remat.policies.get`; its
    ``str()`` is the canonical spec and round-trips (``get(str(p)) == p``).

    Attributes:
      save: checkpoint names (``jax.ad_checkpoint.checkpoint_name``) kept in
        device memory.
      offload: checkpoint names moved to ``pinned_host`` memory after the
        forward pass and back for the backward pass.
      dots: also keep matmul outputs: ``"all"`` (JAX's ``dots_saveable``) or
        ``"no_batch"`` (``dots_with_no_batch_dims_saveable``: only matmuls
        without batch dimensions, i.e. weight projections, not attention).
      offload_dots: offload matmul outputs instead, by the same rules
        (``"no_batch"`` is JAX's ``offload_dot_with_no_batch_dims``).
      remat: ``False`` is the policy ``"none"``: no ``jax.checkpoint`` at all,
        every residual kept. ``Policy()`` (the default) is ``"full"``:
        recompute everything, keep only the inputs of the checkpointed function.

    Raises:
      ValueError: a name both saved and offloaded, matmuls both saved and
        offloaded, an unknown dots rule, an invalid name, or ``remat=False``
        combined with anything else.
      TypeError: a bare string where a collection of names is expected.
    """

    save: frozenset[str] = frozenset()
    offload: frozenset[str] = frozenset()
    dots: DotsRule | None = None
    offload_dots: DotsRule | None = None
    remat: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "save", _names("save", self.save))
        object.__setattr__(self, "offload", _names("offload", self.offload))
        for field in ("dots", "offload_dots"):
            rule = getattr(self, field)
            if rule is not None and rule not in _DOTS_RULES:
                raise RematError(
                    f"invalid Policy.{field}={rule!r}; valid: None, 'all', 'no_batch'")
        both = self.save & self.offload
        if both:
            raise RematError(
                "checkpoint name(s) both saved and offloaded: "
                f"{', '.join(sorted(both))}; a residual is either kept on device or "
                "moved to host, choose one")
        if self.dots is not None and self.offload_dots is not None:
            raise RematError(
                f"matmul outputs both saved (dots={self.dots!r}) and offloaded "
                f"(offload_dots={self.offload_dots!r}); choose one")
        if not self.remat and (self.save or self.offload or self.dots or self.offload_dots):
            raise RematError(
                "the policy 'none' (remat=False) keeps every residual and cannot be "
                f"combined with other terms: {self._terms()}")

    # -- derived views ---------------------------------------------------------
    @property
    def is_none(self) -> bool:
        """True for ``"none"``: no rematerialization at all."""
        return not self.remat

    @property
    def is_full(self) -> bool:
        """True for ``"full"``: rematerialize everything, save nothing."""
        return self.remat and not (self.save or self.offload or self.dots or self.offload_dots)

    @property
    def names(self) -> frozenset[str]:
        """Every checkpoint name the policy saves or offloads."""
        return self.save | self.offload

    @property
    def offloads(self) -> bool:
        """True when the policy moves anything to host memory."""
        return bool(self.offload or self.offload_dots)

    def on_device(self) -> Policy:
        """The same policy with every offloaded value kept on device instead:
        the explicit fallback for a backend without ``pinned_host`` memory."""
        return dataclasses.replace(self, save=self.save | self.offload, offload=frozenset(),
                                   dots=self.dots or self.offload_dots, offload_dots=None)

    def without_offload(self) -> Policy:
        """The same policy with every offloaded value recomputed instead (the
        other explicit fallback when a backend cannot offload)."""
        return dataclasses.replace(self, offload=frozenset(), offload_dots=None)

    def __or__(self, other: Policy) -> Policy:
        """The union of two policies: each residual that either keeps.
        ``p + q`` is the same, as ``+`` in a spec string.

        Raises:
          ValueError: when one side is ``"none"`` and the other is not, or the
            union saves and offloads the same name.
        """
        if not isinstance(other, Policy):
            return NotImplemented
        if self.is_none or other.is_none:
            if self == other:
                return self
            raise RematError(
                f"the policy 'none' cannot be combined with {str(other if self.is_none else self)!r}")
        order = (None, "no_batch", "all")
        return Policy(
            save=self.save | other.save,
            offload=self.offload | other.offload,
            dots=max(self.dots, other.dots, key=order.index),
            offload_dots=max(self.offload_dots, other.offload_dots, key=order.index),
        )

    __add__ = __or__

    # -- spec string -----------------------------------------------------------
    def _terms(self) -> list[str]:
        terms = []
        if self.save:
            terms.append("save:" + ",".join(sorted(self.save)))
        if self.offload:
            terms.append("offload:" + ",".join(sorted(self.offload)))
        for field in ("dots", "offload_dots"):
            rule = getattr(self, field)
            if rule is not None:
                terms.append(field if rule == "all" else f"{field}:{rule}")
        return terms

    def __str__(self) -> str:
        """The canonical spec, e.g. ``"save:out_proj + offload:mlpwo + dots:no_batch"``."""
        if self.is_none:
            return "none"
        return " + ".join(self._terms()) or "full"

    # -- JAX -------------------------------------------------------------------
    def to_jax(self) -> Callable[..., Any]:
        """The policy callable for ``jax.checkpoint(policy=...)``.

        Returns JAX's own hashable policy objects wherever one expresses the
        policy (``nothing_saveable``, ``save_only_these_names``,
        ``save_and_offload_only_these_names``, ``dots_saveable``,
        ``dots_with_no_batch_dims_saveable``, ``offload_dot_with_no_batch_dims``,
        ``everything_saveable`` for ``"none"``), since JAX's remat engine caches
        on them; any other combination becomes a hashable callable that returns
        JAX's three-way answers (``Saveable``, ``Offloadable(device ->
        pinned_host)``, ``Recompute``). See the JAX doc "Gradient checkpointing
        with jax.checkpoint".

        Raises:
          UnsupportedJaxModeError: JAX's ``jax_remat3`` mode is on and the
            policy offloads or needs a callable of its own: that engine keeps
            nothing for either (measured with jax 0.10), i.e. it would
            silently recompute everything.
        """
        result = _to_jax(self)
        if jax.config.jax_remat3 and (self.offloads or isinstance(result, _ThreeWay)):
            what = "offloads to host" if self.offloads else "needs a policy callable of its own"
            raise UnsupportedJaxModeError(
                f"remat policy {str(self)!r} {what}, and JAX's 'jax_remat3' mode is on: that engine "
                "keeps nothing for such a policy (silently full remat). Turn it off with "
                "jax.config.update('jax_remat3', False), or use a policy of names or of one dots rule "
                f"kept on device (e.g. {str(self.on_device())!r}, Policy.on_device()).")
        return result


@functools.cache
def _to_jax(p: Policy) -> Callable[..., Any]:
    """One JAX policy object per :class:`Policy` value: JAX's checkpoint
    caches on the policy's identity, and some of JAX's policy builders
    (``save_and_offload_only_these_names``) return a new closure each call."""
    cp = jax.checkpoint_policies
    if p.is_none:
        return cp.everything_saveable
    if p.is_full:
        return cp.nothing_saveable
    if p.dots is None and p.offload_dots is None:
        if not p.offload:
            return cp.save_only_these_names(*sorted(p.save))
        return cp.save_and_offload_only_these_names(
            names_which_can_be_saved=sorted(p.save), names_which_can_be_offloaded=sorted(p.offload),
            offload_src=OFFLOAD_SRC, offload_dst=OFFLOAD_DST)
    if not (p.save or p.offload):
        if p.dots is not None:
            return cp.dots_saveable if p.dots == "all" else cp.dots_with_no_batch_dims_saveable
        if p.offload_dots == "no_batch":
            return cp.offload_dot_with_no_batch_dims(OFFLOAD_SRC, OFFLOAD_DST)
    return _ThreeWay(p)


class UnsupportedJaxModeError(RematError):
    """A policy meets a JAX mode that would silently drop it (``jax_remat3``)."""


@dataclasses.dataclass(frozen=True)
class _ThreeWay:
    """A hashable ``jax.checkpoint`` policy for combinations JAX has no object for."""

    policy: Policy

    def __call__(self, prim: Any, *args: Any, **params: Any) -> Any:
        p, cp = self.policy, jax.checkpoint_policies
        offloadable = Offloadable(src=OFFLOAD_SRC, dst=OFFLOAD_DST)
        # JAX's own name and dot predicates, so no private primitive is touched.
        if cp.save_only_these_names(*p.save)(prim, *args, **params):
            return Saveable
        if cp.save_only_these_names(*p.offload)(prim, *args, **params):
            return offloadable
        for rule, answer in ((p.dots, Saveable), (p.offload_dots, offloadable)):
            if rule is not None:
                test = cp.dots_saveable if rule == "all" else cp.dots_with_no_batch_dims_saveable
                if test(prim, *args, **params):
                    return answer
        return Recompute
