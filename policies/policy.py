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
from remat._errors import PolicyNotTextError, RematError, UnsupportedJaxModeError

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
      everything: ``True`` is ``"everything_saveable"``: JAX's
        ``everything_saveable`` applied under ``jax.checkpoint``. It keeps
        what ``"none"`` keeps, but the function still runs as a checkpoint
        (JAX's rounding of its outputs, its residual logging), as
        ``jax.checkpoint(f, policy=jax.checkpoint_policies.everything_saveable)``
        does. A value of its own (``!= "none"``), printed
        ``everything_saveable``; under ``+`` it absorbs every term that keeps
        values on device and cannot be combined with offloads or ``"none"``.

    Raises:
      ValueError: a name both saved and offloaded, matmuls both saved and
        offloaded, an unknown dots rule, an invalid name, or ``remat=False``
        or ``everything=True`` combined with anything else.
      TypeError: a bare string where a collection of names is expected.
    """

    save: frozenset[str] = frozenset()
    offload: frozenset[str] = frozenset()
    dots: DotsRule | None = None
    offload_dots: DotsRule | None = None
    remat: bool = True
    everything: bool = False

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
        if self.everything and (not self.remat or self.save or self.offload or self.dots
                                or self.offload_dots):
            raise RematError(
                "the policy 'everything_saveable' (everything=True) keeps every residual and cannot be "
                f"combined with other terms: {'none' if not self.remat else self._terms()}")

    # -- derived views ---------------------------------------------------------
    @property
    def is_none(self) -> bool:
        """True for ``"none"``: no rematerialization at all."""
        return not self.remat

    @property
    def is_full(self) -> bool:
        """True for ``"full"``: rematerialize everything, save nothing."""
        return self.remat and not (self.save or self.offload or self.dots or self.offload_dots
                                   or self.everything)

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

        ``"everything_saveable"`` keeps every residual on device: its union
        with a policy that keeps values on device (names, matmuls, ``"full"``)
        is ``"everything_saveable"``.

        Raises:
          ValueError: when one side is ``"none"`` and the other is not, the
            union saves and offloads the same name, or ``"everything_saveable"``
            meets an offload.
          PolicyNotTextError: either side is an :class:`OpaquePolicy` (a JAX
            policy callable), which ``+`` cannot combine.
        """
        if not isinstance(other, Policy):
            return NotImplemented
        for side in (self, other):
            if isinstance(side, OpaquePolicy):
                raise PolicyNotTextError(
                    f"the JAX policy callable {side} cannot be combined with '+': remat cannot see "
                    "inside it. Write the whole policy as a spec string (e.g. 'save:NAME + dots'), or "
                    "combine JAX policies with jax.checkpoint_policies.save_from_both_policies")
        if self.is_none or other.is_none:
            if self == other:
                return self
            raise RematError(
                f"the policy 'none' cannot be combined with {str(other if self.is_none else self)!r}")
        if self.everything or other.everything:
            rest = other if self.everything else self
            if rest.offloads:
                raise RematError(
                    f"the policy 'everything_saveable' keeps every residual on device and cannot be "
                    f"combined with the offloads of {str(rest)!r}; valid: terms that keep values on "
                    "device (save:, dots, presets without offloads)")
            return Policy(everything=True)
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
        if self.everything:
            return "everything_saveable"
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
    if p.is_none or p.everything:
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


_OPAQUE_FORMS = ("jax.checkpoint_policies objects (dots_saveable, save_only_these_names(...), ...) and "
                 "policy callables fn(prim, *args, **params)")


def _closure(fn: Any) -> dict[str, Any]:
    """The closure variables of a function, by name (empty for other callables)."""
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    try:
        return dict(zip(code.co_freevars, (c.cell_contents for c in cells), strict=True))
    except ValueError:  # an empty cell
        return {}


def _jax_builder(fn: Any) -> str | None:
    """The name of the ``jax.checkpoint_policies`` builder that made the
    closure ``fn`` (``save_and_offload_only_these_names``, ...), else None."""
    qualname, module = getattr(fn, "__qualname__", ""), getattr(fn, "__module__", "")
    if module == _AD_CHECKPOINT and qualname.endswith(".<locals>.policy"):
        return qualname.split(".")[0]
    return None


_AD_CHECKPOINT = jax.checkpoint_policies.nothing_saveable.__module__


def _known(fn: Any) -> tuple[str, dict[str, Any]] | None:
    """What a JAX policy object means, where remat can read it: ``(how it
    prints, the equivalent Policy fields)``, or None for a callable remat
    cannot see into. JAX's policies are read from their public attributes
    (``SaveOnlyTheseNames.saveable_names``, ``DotsSaveable.only_if_no_batch_dims``)
    or, for the closures JAX builds (``save_and_offload_only_these_names``,
    ``offload_dot_with_no_batch_dims``, ``save_from_both_policies``), from
    their closure variables, named as in jax/_src/ad_checkpoint.py."""
    cp = jax.checkpoint_policies
    if fn is cp.everything_saveable:
        return "jax.checkpoint_policies.everything_saveable", {"everything": True}
    if fn is cp.nothing_saveable:
        return "jax.checkpoint_policies.nothing_saveable", {}
    if type(fn) is type(cp.dots_saveable):
        rule = "no_batch" if fn.only_if_no_batch_dims else "all"
        name = "dots_with_no_batch_dims_saveable" if rule == "no_batch" else "dots_saveable"
        return f"jax.checkpoint_policies.{name}", {"dots": rule}
    if type(fn) is type(cp.save_only_these_names()):
        names = sorted(fn.saveable_names)
        return (f"jax.checkpoint_policies.save_only_these_names({', '.join(map(repr, names))})",
                {"save": frozenset(names)})
    env, builder = _closure(fn), _jax_builder(fn)
    if builder == "save_and_offload_only_these_names" and env.get("offload_dst") == OFFLOAD_DST:
        save, offload = sorted(env["names_which_can_be_saved"]), sorted(env["names_which_can_be_offloaded"])
        return (f"jax.checkpoint_policies.save_and_offload_only_these_names("
                f"names_which_can_be_saved={save!r}, names_which_can_be_offloaded={offload!r})",
                {"save": frozenset(save), "offload": frozenset(offload)})
    if builder == "offload_dot_with_no_batch_dims" and env.get("offload_dst") == OFFLOAD_DST:
        return "jax.checkpoint_policies.offload_dot_with_no_batch_dims", {"offload_dots": "no_batch"}
    if builder == "save_from_both_policies":
        parts = [_known(env.get("policy_1")), _known(env.get("policy_2"))]
        if None in parts:
            return None
        (s1, f1), (s2, f2) = parts  # type: ignore[misc]
        if f1.get("everything") or f2.get("everything"):
            return f"jax.checkpoint_policies.save_from_both_policies({s1}, {s2})", {"everything": True}
        order = (None, "no_batch", "all")
        fields = {"save": f1.get("save", frozenset()) | f2.get("save", frozenset()),
                  "dots": max(f1.get("dots"), f2.get("dots"), key=order.index)}
        if f1.get("offload") or f2.get("offload") or f1.get("offload_dots") or f2.get("offload_dots"):
            return None  # JAX raises on the three-way answers of offloading policies here
        return f"jax.checkpoint_policies.save_from_both_policies({s1}, {s2})", fields
    return None


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class OpaquePolicy(Policy):
    """A JAX policy object or callable, applied as it is: ``jax.checkpoint``
    gets ``fn`` itself (:meth:`to_jax`), exactly as
    ``jax.checkpoint(f, policy=fn)`` does.

    :func:`remat.policies.get` makes one of any callable. Where remat can read
    the policy (JAX's ``jax.checkpoint_policies`` objects: ``dots_saveable``,
    ``save_only_these_names(...)``, ``save_and_offload_only_these_names(...)``,
    ``offload_dot_with_no_batch_dims(...)``, ``save_from_both_policies`` of
    those, ``everything_saveable``, ``nothing_saveable``), ``known`` is True
    and the inherited fields hold what it keeps, so its checkpoint names are
    checked (:func:`remat.checkpoint`'s ``MissingCheckpointNameError``, ...)
    and an offload is checked against the backend. A custom predicate
    (``fn(prim, *args, **params)``) cannot be checked: ``known`` is False, and
    the reports of :func:`remat.analyze`, :func:`remat.inspect_policy` and
    :func:`remat.sweep` carry a note saying so.

    Not text: ``+``, spec strings, ``--policy``, ``run.json``, ``remat tune``
    and the registry raise :class:`PolicyNotTextError`. Equal when ``fn`` is
    (JAX's dataclass policies compare by value, closures by identity).

    Attributes:
      fn: the callable, as given.
      known: whether the inherited fields say what it keeps.
      description: how it prints, e.g.
        ``"jax.checkpoint_policies.save_only_these_names('out_proj')"``.
    """

    fn: Callable[..., Any]
    known: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        # JAX accepts any string as a checkpoint name: no name syntax check here.
        object.__setattr__(self, "save", frozenset(self.save))
        object.__setattr__(self, "offload", frozenset(self.offload))

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> OpaquePolicy:
        """The opaque policy of a JAX policy object or callable.

        Raises:
          TypeError: ``fn`` is not callable.
        """
        if not callable(fn):
            raise TypeError(f"a JAX policy is a callable, got {fn!r}; valid: {_OPAQUE_FORMS}")
        known = _known(fn)
        if known is None:
            name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
            return cls(fn=fn, description=f"policy callable {name}")
        description, fields = known
        return cls(fn=fn, known=True, description=description, **fields)

    def _key(self) -> Any:
        try:
            hash(self.fn)
            return self.fn
        except TypeError:
            return id(self.fn)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OpaquePolicy):
            return False
        return self.fn is other.fn or (self._key() == other._key() and type(self.fn) is type(other.fn))

    def __hash__(self) -> int:
        return hash((OpaquePolicy, self._key()))

    @property
    def is_none(self) -> bool:
        """Always False: an opaque policy is applied under ``jax.checkpoint``."""
        return False

    @property
    def is_full(self) -> bool:
        """True for JAX's ``nothing_saveable``."""
        return self.fn is jax.checkpoint_policies.nothing_saveable

    def on_device(self) -> Policy:
        """Raises :class:`PolicyNotTextError`: remat cannot rewrite a JAX policy."""
        raise PolicyNotTextError(f"{self} cannot be rewritten by remat; build its on-device version with "
                                 "jax.checkpoint_policies.save_only_these_names(...)")

    without_offload = on_device

    def __str__(self) -> str:
        return self.description

    def to_jax(self) -> Callable[..., Any]:
        """``fn`` itself.

        Raises:
          UnsupportedJaxModeError: ``fn`` offloads (as far as remat can read
            it) and JAX's ``jax_remat3`` mode is on.
        """
        if jax.config.jax_remat3 and self.offloads:
            raise UnsupportedJaxModeError(
                f"remat policy {self} offloads to host, and JAX's 'jax_remat3' mode is on: that engine "
                "keeps nothing for such a policy (silently full remat). Turn it off with "
                "jax.config.update('jax_remat3', False).")
        return self.fn


def require_text(policy: Any, where: str) -> None:
    """Raise :class:`PolicyNotTextError` if ``policy`` (or a segment of it)
    is a callable or an :class:`OpaquePolicy` where ``where`` needs text.

    Raises:
      PolicyNotTextError: naming the callable, ``where`` and what to write instead.
    """
    parts = policy if isinstance(policy, (list, tuple)) else [policy]
    for p in parts:
        p = p[1] if isinstance(p, tuple) and len(p) == 2 else p
        if isinstance(p, OpaquePolicy) or (callable(p) and not isinstance(p, (str, Policy))):
            shown = p if isinstance(p, OpaquePolicy) else OpaquePolicy.of(p)
            raise PolicyNotTextError(
                f"{where} needs a policy as text (a preset name or spec string such as 'minimal' or "
                f"'save:out_proj + dots'), got the JAX policy callable {shown}; a callable can be "
                "passed to remat.checkpoint, remat.remat, remat.scan_layers, remat.nnx, analyze, "
                "inspect_policy and sweep from Python")
