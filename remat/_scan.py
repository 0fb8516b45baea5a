"""``remat.scan_layers``: a stack of identical layers, scanned, each layer
rematerialized by a policy, with optional nested (sqrt-N) checkpointing.

Which policy applies where: the *layer* policy decides what each
layer keeps for its own backward pass. With ``groups=(G, K)`` a second,
outer level checkpoints each group of K layers with "full" remat: the
forward pass keeps only the G group inputs; the backward pass re-runs one
group at a time, keeping that group's K layer inputs plus what the layer
policy saves, and then differentiates each layer. Activation memory is
O(G + K) layer inputs instead of O(L) (Chen et al. 2016, "Training Deep
Nets with Sublinear Memory Cost"), for one extra forward pass of the
layers. The layer policy is never overridden by the group level.

Both levels are direct bodies of a ``lax.scan``, so they use
``prevent_cse=False``: scan already keeps XLA from merging the recomputation
into the forward pass, and the CSE barriers would only cost speed (JAX doc,
``jax.checkpoint``: "in some settings, like when used inside a lax.scan,
this CSE prevention mechanism is unnecessary").
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from remat import _compat
from remat._apply import (
    Probe,
    abstract,
    check_target,
    label,
    module_fields,
    module_probe,
    remat_disabled,
    traced_flag_hint,
    validate_once,
    validation_key,
)
from remat._call import ArgSplitter
from remat._errors import RematError
from remat.policies import Policy, get

_compat.hide_frames(__file__)

Groups = tuple[int, int] | Literal["sqrt"] | None
"""``None`` (one scan), ``(G, K)`` with ``G * K == num_layers``, or ``"sqrt"``."""
PolicyArg = str | Policy | Callable[..., Any] | Sequence[tuple[int, "str | Policy | Callable[..., Any]"]]
"""One policy for every layer (a spec, a :class:`Policy` or a JAX policy
callable), or ``(num_layers_i, policy_i)`` segments."""


@dataclasses.dataclass(frozen=True)
class PolicyPart:
    """One policy of a policy argument, as :func:`policy_parts` normalises it.

    Attributes:
      num_layers: how many consecutive layers it covers; None for a single
        policy of a stack whose size :func:`policy_parts` was not given.
      policy: the resolved :class:`Policy`.
      label: how messages name it: the user's own string, else the
        canonical spec (:func:`remat._apply.label`).
    """

    num_layers: int | None
    policy: Policy
    label: str


SEGMENT_SEPARATOR = ";"
"""Separates the segments of a policy string: ``"8x minimal; 24x full"``."""


def is_segment_text(policy: object) -> bool:
    """True for a policy string with segments (``"8x minimal; 24x full"``)."""
    return isinstance(policy, str) and SEGMENT_SEPARATOR in policy


def policy_parts(policy: PolicyArg, num_layers: int | None = None) -> tuple[PolicyPart, ...]:
    """The one normalisation of a policy argument: one :class:`PolicyPart`
    for a single policy (a spec without segments, a :class:`Policy` or a JAX
    policy callable), covering ``num_layers``; else one per segment, in
    order, from a sequence of ``(num_layers_i, policy_i)`` or a string such
    as ``"8x minimal; 24x full"`` (:func:`parse_segments`), whose counts,
    given ``num_layers``, must be positive and add up to it.

    >>> [(p.num_layers, p.label) for p in policy_parts("8x minimal; 24x full")]
    [(8, 'minimal'), (24, 'full')]

    Raises:
      RematError: a malformed segment string (:func:`parse_segments`);
        with ``num_layers``, segment counts that are not positive or do not
        add up to it.
      UnknownPolicyError, PolicySpecError, TypeError: the errors of
        :func:`get` for a policy (``None`` included).
    """
    if is_segment_text(policy):
        policy = parse_segments(policy)  # type: ignore[arg-type]
    if policy is None or isinstance(policy, (str, Policy)) or callable(policy):
        return (PolicyPart(num_layers, get(policy), label(policy)),)  # type: ignore[arg-type]  # get(None) raises
    parts = tuple(PolicyPart(n, get(p), label(p)) for n, p in policy)
    counts = [p.num_layers for p in parts]
    if num_layers is not None and (any(not isinstance(n, int) or n < 1 for n in counts)
                                   or sum(counts) != num_layers):  # type: ignore[arg-type]
        raise RematError(f"policy segments {counts} must be positive and add up to num_layers={num_layers}")
    return parts


@dataclasses.dataclass(frozen=True)
class ScanOps:
    """What :meth:`Segment.scan` needs of one Flax API: its remat and its scan
    of a scan body ``(..., carry, ...) -> (carry, per_layer)`` (linen's lifted
    ``nn.remat``/``nn.scan`` on functions of a module, or ``jax.checkpoint``/
    ``lax.scan`` on functions of the split NNX state).

    Attributes:
      checkpoint: ``checkpoint(body, jax_policy) -> body``: the body
        rematerialized with that JAX policy, ``prevent_cse=False`` (the
        module doc says why).
      scan: ``scan(body, length) -> body``: ``length`` steps of ``body`` as
        one body, its scanned inputs and outputs with a leading ``[length]`` axis.
    """

    checkpoint: Callable[[Callable[..., Any], Any], Callable[..., Any]]
    scan: Callable[[Callable[..., Any], int], Callable[..., Any]]


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of consecutive layers scanned together.

    Attributes:
      num_layers: how many layers.
      policy: the per-layer policy.
      groups: ``(G, K)`` for nested checkpointing (``G * K == num_layers``), or None.
      label: how messages name the policy (:attr:`PolicyPart.label`).
    """

    num_layers: int
    policy: Policy
    groups: tuple[int, int] | None
    label: str

    def scan(self, layer: Callable[..., Any], ops: ScanOps) -> Callable[..., Any]:
        """The scan of this segment, for either Flax API: ``layer`` (one
        layer, a scan body ``(..., carry, ...) -> (carry, per_layer)``) under
        this segment's policy (as it is under ``"none"``), scanned over
        ``num_layers`` layers; with ``groups=(G, K)``, G steps of a group that
        is K layer steps under "full" remat (module doc). The result is a
        scan body of the same arguments, whose scanned inputs and outputs
        have a leading ``[num_layers]`` axis, or ``[G, K]`` with groups.
        """
        body = layer if self.policy.is_none else ops.checkpoint(layer, self.policy.to_jax())
        if self.groups is None:
            return ops.scan(body, self.num_layers)
        g, k = self.groups
        return ops.scan(ops.checkpoint(ops.scan(body, k), jax.checkpoint_policies.nothing_saveable), g)


def check_num_layers(num_layers: object) -> None:
    """Raise :class:`RematError` unless ``num_layers`` is a positive int."""
    if not isinstance(num_layers, int) or num_layers < 1:
        raise RematError(f"num_layers must be a positive int, got {num_layers!r}")


def factorizations(n: int) -> list[tuple[int, int]]:
    """Every ``(G, K)`` with ``G * K == n``.

    >>> factorizations(6)
    [(1, 6), (2, 3), (3, 2), (6, 1)]
    """
    return [(g, n // g) for g in range(1, n + 1) if n % g == 0]


def plan(num_layers: int, policy: PolicyArg = "full", groups: Groups = None) -> tuple[Segment, ...]:
    """Split a stack into the segments that :func:`scan_layers` scans.

    ``groups="sqrt"`` picks ``K = round(sqrt(n))`` and ``G = n // K`` per
    policy segment; the ``n - G*K`` remaining layers (fewer than K; e.g. for a
    prime count) form one more ungrouped segment.

    Raises:
      ValueError: a non-positive layer count, segments that do not add up to
        ``num_layers``, or ``groups`` that do not factor the stack (the
        message lists the valid factorizations); a bad policy
        (:func:`policy_parts`).
    """
    check_num_layers(num_layers)
    parts = policy_parts(policy, num_layers)
    segments: list[Segment] = []
    for part in parts:
        n, p = part.num_layers, part.policy
        if groups is None:
            segments.append(Segment(n, p, None, part.label))
        elif groups == "sqrt":
            k = max(1, round(math.sqrt(n)))
            g = n // k
            segments.append(Segment(g * k, p, (g, k), part.label))
            if n - g * k:
                segments.append(Segment(n - g * k, p, None, part.label))
        else:
            valid = ", ".join(map(str, factorizations(n)))
            if (not isinstance(groups, tuple) or len(groups) != 2
                    or not all(isinstance(v, int) and v >= 1 for v in groups)
                    or groups[0] * groups[1] != n or len(parts) > 1):
                raise RematError(
                    f"groups={groups!r} must be (G, K) with G * K == {n} layers (one policy "
                    f"segment), or 'sqrt'; valid: {valid}")
            segments.append(Segment(n, p, groups, part.label))
    return tuple(segments)


def parse_segments(text: str) -> list[tuple[int, str]]:
    """``"COUNTx SPEC; COUNTx SPEC; ..."`` -> ``[(COUNT, SPEC), ...]``: the
    first ``COUNT`` layers under one policy, the next under another (what
    ``remat tune`` writes, and ``--policy`` and ``TrainConfig.policy`` take).

    >>> parse_segments("8x minimal; 24x full")
    [(8, 'minimal'), (24, 'full')]

    Raises:
      RematError: a part that is not ``COUNTx SPEC``, naming it.
    """
    out = []
    for part in text.split(SEGMENT_SEPARATOR):
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\S.*?)\s*", part)
        if not m:
            raise RematError(f"policy segment {part.strip()!r} in {text!r}: write COUNTx SPEC, "
                             f"e.g. '8x minimal; 24x full'")
        out.append((int(m[1]), m[2]))
    return out


def policy_names(policy: PolicyArg) -> frozenset[str]:
    """Every checkpoint name a policy (or its segments) saves or offloads."""
    return frozenset().union(*(p.policy.names for p in policy_parts(policy)))


def parse_groups(text: str) -> str | tuple[int, int]:
    """``"sqrt"`` or ``"G,K"`` (two positive integers) from the command line.

    Raises:
      ValueError: anything else, naming the text and the valid forms.
    """
    if text == "sqrt":
        return text
    parts = text.split(",")
    if len(parts) == 2 and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        return int(parts[0]), int(parts[1])
    raise RematError(f"--groups {text!r}: valid forms are 'sqrt' or 'G,K' (positive integers, G*K = layers)")


def _map_leaves(fn: Any, tree: Any) -> Any:
    """Apply ``fn(array, names_or_None) -> (array, names)`` to every leaf,
    keeping logical-partitioning boxes (``nn.Partitioned``) intact."""

    def leaf(x: Any) -> Any:
        if isinstance(x, nn.Partitioned):
            value, names = fn(x.value, x.names)
            return x.replace(value=value, names=names)
        return fn(x, None)[0]

    return jax.tree.map(leaf, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _to_segments(stored: Any, segments: tuple[Segment, ...]) -> dict[str, Any]:
    """``[L, ...]`` parameters -> ``{"segment_i": [G, K, ...] or [n, ...]}``."""
    if not stored:
        return {}
    out, start = {}, 0
    for i, seg in enumerate(segments):
        shape = seg.groups or (seg.num_layers,)

        def cut(x: Any, names: Any, start: int = start, seg: Segment = seg, shape: tuple = shape) -> Any:
            x = jax.lax.slice_in_dim(x, start, start + seg.num_layers).reshape(*shape, *x.shape[1:])
            return x, names and (*("layers",) * (len(shape) - 1), *names)

        out[f"segment_{i}"] = _map_leaves(cut, stored)
        start += seg.num_layers
    return out


def _from_segments(inner: dict[str, Any], segments: tuple[Segment, ...]) -> Any:
    """The inverse of :func:`_to_segments`."""
    if not inner:
        return {}
    parts = []
    for i, seg in enumerate(segments):
        lead = len(seg.groups or (seg.num_layers,))

        def flat(x: Any, names: Any, lead: int = lead, n: int = seg.num_layers) -> Any:
            return x.reshape(n, *x.shape[lead:]), names and ("layers", *names[lead:])

        parts.append(_map_leaves(flat, inner[f"segment_{i}"]))
    if len(parts) == 1:
        return parts[0]

    def cat(*xs: Any) -> Any:
        if isinstance(xs[0], nn.Partitioned):
            return xs[0].replace(value=jnp.concatenate([x.value for x in xs]))
        return jnp.concatenate(xs)

    return jax.tree.map(cat, *parts, is_leaf=lambda x: isinstance(x, nn.Partitioned))


@dataclasses.dataclass(frozen=True)
class LayerScan:
    """The core of a layer scan, for linen's :func:`scan_layers` and
    :func:`remat.nnx.scan_layers` alike: the checks when the class is made,
    the split of a call's arguments, the check of each segment's policy at
    first trace, and which segments a call scans (each segment's scan:
    :meth:`Segment.scan`). What differs between the APIs (how the block's
    state is split, probed and scanned) each one passes in.

    Attributes:
      num_layers: L, the number of layers.
      segments: the plan (:func:`plan`).
      orig: the block's ``__call__``.
      splitter: how its calls are split into static and traced arguments.
      carry_name: its first argument after ``self``, the carry.
      where: the block, for messages.
      broadcast_argnames: as given.
    """

    num_layers: int
    segments: tuple[Segment, ...]
    orig: Any
    splitter: ArgSplitter
    carry_name: str
    where: str
    broadcast_argnames: tuple[str, ...]

    @classmethod
    def of(cls, block_cls: type, num_layers: int, policy: PolicyArg, groups: Groups,
           static_argnames: Sequence[str], broadcast_argnames: Sequence[str], *,
           base: type = nn.Module, api: str = "remat.scan_layers") -> LayerScan:
        """Check and plan (errors as :func:`scan_layers`; ``block_cls`` must
        subclass ``base``, else :class:`remat.RematTargetError` names ``api``)."""
        check_target(block_cls, base, api)
        segments = plan(num_layers, policy, groups)
        orig = block_cls.__call__
        where = f"module {block_cls.__name__}"
        splitter = ArgSplitter(orig, static_argnames, where=where, method=True)
        ArgSplitter(orig, broadcast_argnames, where=where, method=True, kind="broadcast")
        return cls(num_layers, segments, orig, splitter, list(inspect.signature(orig).parameters)[1], where,
                   tuple(broadcast_argnames))

    def split(self, module: Any, args: tuple, kwargs: dict) -> tuple[dict[str, Any], Any, dict[str, Any]]:
        """A call's ``(static, carry, broadcast)`` arguments.

        Raises:
          TypeError: an argument neither static nor broadcast, or an unhashable static value.
        """
        static, dynamic = self.splitter.split_named((module, *args), kwargs)
        if self.carry_name not in dynamic:
            raise TypeError(f"{self.where}: the carry {self.carry_name!r} was not passed")
        x = dynamic.pop(self.carry_name)
        unknown = sorted(set(dynamic) - set(self.broadcast_argnames))
        if unknown:
            raise TypeError(
                f"{self.where}: argument(s) {', '.join(unknown)} are neither static nor broadcast; "
                "name them in static_argnames (Python constants) or broadcast_argnames (arrays)")
        return static, x, dynamic

    def validate(self, owner: type, static: dict[str, Any], state_key: Hashable, x: Any,
                 bcast: dict[str, Any], probe: Probe, inputs: Any) -> None:
        """Check each segment's policy on one layer (:func:`validate_once`,
        owned by the block class ``owner``), once per policy, static values,
        ``state_key`` (what of the layer's state the check depends on) and
        shapes of the carry ``x`` and the ``bcast`` arguments: ``probe`` runs
        one layer on ``inputs`` (abstract), whose first outputs are the carry.

        Raises:
          MissingCheckpointNameError, NeverKeptError, ScanCarryOffloadError,
          OffloadUnsupportedError: see :func:`validate_once`.
        """
        for seg in self.segments:
            key = validation_key(seg.policy, tuple(sorted(static.items())), state_key, (x, bcast))
            validate_once(seg.policy, owner, key, probe, inputs, self.where, seg.label,
                          carry_outputs=len(jax.tree.leaves(x)))

    def segments_to_run(self, *, flat: bool = False) -> tuple[Segment, ...]:
        """The segments a call scans: the plan, or, with ``flat`` (linen's
        ``init``) or inside :func:`remat.without_remat`, one segment of
        every layer without remat."""
        if flat or remat_disabled():
            return (Segment(self.num_layers, get("none"), None, "none"),)
        return self.segments

    def traced_hint(self, bcast: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
        """:func:`traced_flag_hint` for a call whose traced arguments are the
        carry and ``bcast``."""
        return traced_flag_hint(self.where, [self.carry_name, *bcast])


def scan_layers(block_cls: type[nn.Module], *, num_layers: int, policy: PolicyArg = "full",
                groups: Groups = None, static_argnames: Sequence[str] = (),
                broadcast_argnames: Sequence[str] = (),
                split_rngs: Sequence[str] = ("params", "dropout")) -> type[nn.Module]:
    """A linen module class that applies ``block_cls`` ``num_layers`` times,
    as a ``lax.scan`` over layers, each layer rematerialized by ``policy``.

    The block is written as a plain layer, ``__call__(self, x, ...) -> x`` with
    the output of the same shape and dtype as ``x`` (no scan plumbing: the
    carry adapter is added here). The returned class takes the block's own
    constructor attributes and is called like the block::

        Stack = remat.scan_layers(Block, num_layers=32, policy="minimal",
                                  groups="sqrt", static_argnames=("deterministic",))
        y_BxTxD = Stack(config=cfg, name="layers")(x_BxTxD, deterministic=True)

    Parameters, and every other variable collection the block makes
    (``batch_stats``, ``intermediates`` from ``sow``, ...; mutable ones are
    returned updated, as with ``nn.scan``), are the block's tree with a
    leading ``[num_layers]`` axis on every leaf (logical axis name
    ``"layers"``), whatever the grouping or segmentation; ``init`` gives the
    same values for every ``groups`` and ``policy``, and one set of parameters
    gives the same loss and gradients under each of them (with dropout off:
    with dropout on, each grouping draws its own per-layer masks, the same
    under every policy).

    Args:
      block_cls: a linen module class; its first argument after ``self`` is
        the carry ``x``.
      num_layers: L, the number of layers (>= 1).
      policy: a policy for every layer (name, spec or :class:`Policy`), or a
        sequence of ``(num_layers_i, policy_i)`` segments that add up to L,
        e.g. ``[(20, "full"), (12, "minimal")]``; each segment is scanned
        separately.
      groups: nested checkpointing, see the module doc: ``(G, K)`` or
        ``"sqrt"``; memory O(G + K) layer inputs instead of O(L).
      static_argnames: block arguments that are Python constants at trace
        time (e.g. ``"deterministic"``); hashable values only.
      broadcast_argnames: block arguments (arrays) passed unchanged to every
        layer, e.g. an attention mask. Every other argument must be static.
      split_rngs: RNG streams split per layer (each layer gets its own
        dropout mask); other streams are shared by all layers.

    Raises:
      RematTargetError: ``block_cls`` is not a linen module class.
      ValueError: bad ``num_layers``/``groups``/segments (see :func:`plan`), a
        static or broadcast name that is not a parameter of the block.
      MissingCheckpointNameError: at first trace, a name the policy saves or
        offloads that the block never emits.
      NeverKeptError: at first trace, none of a segment policy's names is
        ever kept for the backward pass.
      ScanCarryOffloadError: at first trace, the policy offloads the name
        that tags the block's output (the scan carry, which the scan keeps).
      TypeError: at call time, an argument that is neither static nor
        broadcast, or an unhashable static value.
    """
    spec = LayerScan.of(block_cls, num_layers, policy, groups, static_argnames, broadcast_argnames)
    orig = spec.orig
    rngs = {r: True for r in split_rngs}
    ops = ScanOps(
        checkpoint=lambda f, pol: nn.remat(f, policy=pol, prevent_cse=False),
        scan=lambda f, n: nn.scan(f, variable_axes={True: 0}, split_rngs=rngs, in_axes=nn.broadcast, length=n,
                                  metadata_params={nn.PARTITION_NAME: "layers"}))

    class ScannedLayers(block_cls):  # type: ignore[valid-type, misc]
        def setup(self) -> None:
            """Nothing: the block's own ``setup`` runs in each scanned layer
            (``segment_i``), not on the stack, whose variables are the
            stacked ones (a parameter made in the block's ``setup`` would
            otherwise be looked up at the stack's scope with the stack's shape)."""

        @nn.compact
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            static, x, dynamic = spec.split(self, args, kwargs)
            fields = module_fields(self, block_cls)
            spec.validate(block_cls, static, tuple(sorted(fields.items())), x, dynamic,
                          module_probe(block_cls, fields, lambda m, d: orig(m, **static, **d)),
                          abstract({spec.carry_name: x, **dynamic}))
            # Initialise as one flat scan, so the initial parameters are the same
            # whatever the grouping and segmentation (and no remat is traced for init);
            # without_remat() gets the same flat scan.
            segs = spec.segments_to_run(flat=self.is_initializing())

            def layer(mdl: nn.Module, carry: Any, b: dict) -> tuple[Any, None]:
                return orig(mdl, carry, **static, **b), None

            def run(mdl: nn.Module, x: Any, bcast: dict) -> Any:
                for i, seg in enumerate(segs):
                    child = block_cls(**fields, parent=mdl, name=f"segment_{i}")
                    x = seg.scan(layer, ops)(child, x, bcast)[0]
                return x

            mapped = nn.map_variables(
                run, True, init=self.is_initializing(), mutable=True,
                trans_in_fn=lambda v: {c: _to_segments(t, segs) for c, t in v.items()},
                trans_out_fn=lambda v: {c: _from_segments(t, segs) for c, t in v.items()})
            with spec.traced_hint(dynamic):
                return mapped(self, x, dynamic)

    ScannedLayers.__name__ = ScannedLayers.__qualname__ = f"Scanned{block_cls.__name__}"
    return ScannedLayers
