"""Residuals: the values a step's forward pass keeps for its backward pass,
found in the traced jaxpr of a step that computes gradients.

How (backend independent). JAX's ``jax.ad_checkpoint.print_saved_residuals``
differentiates a function itself and reports a value saved inside ``lax.scan``
only as "output of scan", names lost. We instead read the jaxpr of the step as
traced: JAX's AD marks every equation of a backward pass with a ``transpose``
transform on its name stack, so a *residual* is a value produced by a forward
equation and consumed by a backward one (inputs of the step, such as
parameters, are not residuals). Each residual is then followed back to the
equation that made it, through ``jit`` / ``closed_call`` / ``remat`` bodies and
into ``scan`` bodies (each scan level multiplies "layers" by its length), past
``device_put`` (the move to host memory of an offload policy) and
``reduce_precision``, to a ``checkpoint_name`` (its name) or another op (its
primitive and source line). A value stacked by the layer scan that is the
scan's own carry is the layer input. A value made from the step inputs by data
movement alone (a slice, transpose or cast of the parameters) is a view of the
arguments, not an activation, and is left out. JAX drops from the backward pass
what it does not read (dead-code elimination), so a value whose only use is an
addition (e.g. a layer's last projection, ``mlpwo``) is never a residual,
whatever the policy says. Values that an inner checkpoint saves while a group
of layers is recomputed during the backward pass (nested remat) are transient
and are not residuals here; they appear in ``temp_bytes``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from jax.extend import core as jcore

from remat import _compat
from remat._jaxpr import call_body, nbytes, open_jaxpr, sub_jaxprs, walk

_compat.hide_frames(__file__)

__all__ = ["ResidualRow", "host_traffic", "output_names", "residual_rows"]

_LOOK_THROUGH = {"device_put", "reduce_precision", "copy", "copy_p", "optimization_barrier"}
"""Ops that move or re-tag a value without computing a new one."""

_RETAG = frozenset({"sharding_constraint", *_LOOK_THROUGH})
"""Ops between a value and its checkpoint name that do not change it: a
value a dots rule keeps before them still carries the name."""

_DATA_MOVEMENT = frozenset("""
    slice dynamic_slice reshape squeeze expand_dims transpose broadcast_in_dim convert_element_type
    concatenate pad rev copy copy_p device_put reduce_precision sharding_constraint
""".split())
"""Ops that only move or cast data (a residual made by these from the step
inputs alone is a view of the inputs, not an activation)."""


@dataclasses.dataclass(frozen=True)
class ResidualRow:
    """One kind of residual: values the forward pass keeps for the backward pass.

    Attributes:
      name: the checkpoint name (``jax.ad_checkpoint.checkpoint_name``), or for an
        unnamed value ``"layer input"`` (the carry of the layer scan) or the
        producing primitive, e.g. ``"exp"``.
      source: ``"checkpoint_name"``, ``"scan carry"``, or the user source line
        of the producing op.
      shape: per-layer shape, e.g. ``(B, T, D)``.
      dtype: e.g. ``"bfloat16"``.
      memory_kind: ``"device"`` or ``"host"`` (offloaded to ``pinned_host``).
      layers: how many layers (scan iterations, all nesting levels) it repeats
        for; 1 outside any scan.
      count: how many values of this kind each layer keeps.
      size_bytes: ``count * layers * prod(shape) * itemsize``.
      from_dot: the value is a matmul (``dot_general``) output, possibly
        followed by a bias add, cast, reshape, sharding constraint or tag.
      gathered: the value is replicated along a mesh axis that what it is
        made from (by elementwise ops and moves, since the last sharding
        constraint) was sharded on: it is saved after an all-gather, at more
        bytes per device than needed (save the value before the gather). A
        matmul or reduction output is not flagged: replicating its partial
        sums is an all-reduce that cannot be saved earlier.
      device_bytes: ``size_bytes`` per device under the value's sharding: the
        sharding constraint it carries (a tagged value of the models), or
        that of the nearest constrained value it is computed from elementwise
        (XLA propagates shardings that way); ``size_bytes`` when none is found
        or without a mesh.
    """

    name: str
    source: str
    shape: tuple[int, ...]
    dtype: str
    memory_kind: str
    layers: int
    count: int
    size_bytes: int
    from_dot: bool
    device_bytes: int = 0
    gathered: bool = False

    def __post_init__(self) -> None:
        if not self.device_bytes:
            object.__setattr__(self, "device_bytes", self.size_bytes)


Key = tuple[int, Any]
"""A value after inlining: ``(context, var)``."""


class _Graph:
    """A jaxpr with call-like bodies inlined: for each value, the equation that
    produced it and whether that equation is in a backward pass.

    A value is keyed ``(context, var)``: each inlined call gets its own
    context, since one body (a cached jitted function) may be called twice.
    """

    def __init__(self, jaxpr: jcore.Jaxpr):
        self.jaxpr = jaxpr
        self.alias: dict[Key, Key | None] = {}
        self.producer: dict[Key, tuple[Any, int, bool, int]] = {}
        self.backward_inputs: list[Key] = []
        self.tagged: dict[Key, str] = {}  # value -> the checkpoint name tagging it
        self._derived: dict[Key, bool] = {}
        self._divisors: dict[Key, int] = {}
        self._gathered: set[Key] = set()
        self._contracted: set[Key] = set()  # made by a contraction since the last constraint
        self.outer: Callable[[Key], int] | None = None  # the split of a body input, from the enclosing graph
        transposed = {0: False}
        for step in walk(jaxpr, into=lambda e: call_body(e) is not None):
            eqn, ctx = step.eqn, step.scope.ctx
            t = transposed[ctx] or _compat.is_transposed(eqn)
            body = call_body(eqn)
            if body is not None:
                inner = next(s.ctx for (j, _), s in zip(sub_jaxprs(eqn), step.inner, strict=True)
                             if j is body)
                transposed[inner] = t
                for iv, ov in zip(body.invars, eqn.invars, strict=True):
                    self.alias[(inner, iv)] = self.canon(ctx, ov)
                for iv, ov in zip(body.outvars, eqn.outvars, strict=True):
                    self.alias[(ctx, ov)] = self.canon(inner, iv)
                continue
            for i, v in enumerate(eqn.outvars):
                self.producer[(ctx, v)] = (eqn, i, t, ctx)
            name = _compat.eqn_checkpoint_name(eqn)
            k = self.canon(ctx, eqn.invars[0]) if name is not None else None
            while k is not None:  # the tagged value, and what it is a sharding constraint or move of
                self.tagged[k] = name
                p = self.producer.get(k)
                if p is None or p[0].primitive.name not in _RETAG:
                    break
                k = self.canon(p[3], p[0].invars[0])
            if t:
                self.backward_inputs.extend(k for v in eqn.invars if (k := self.canon(ctx, v)) is not None)

    def canon(self, ctx: int, v: Any) -> Key | None:
        """The key of the value ``v`` of context ``ctx`` after inlining; None for a literal.

        An alias may point at a body's output that is only produced later in
        the walk, so keys are resolved when read, not when recorded."""
        key: Key | None = None if isinstance(v, jcore.Literal) else (ctx, v)
        while key is not None and key in self.alias:
            key = self.alias[key]
        return key

    def from_dot(self, key: Key | None) -> bool:
        """True when a value is a matmul (``dot_general``) output, possibly
        followed by a bias add, reshape, transpose, cast, sharding constraint
        or tag (an einsum's or a ``Dense`` layer's output)."""
        while key is not None and key in self.producer:
            eqn, _, _, ctx = self.producer[key]
            prim = eqn.primitive.name
            if prim == "dot_general":
                return True
            keys = [self.canon(ctx, v) for v in eqn.invars]
            if prim in ("add", "add_any") and len(keys) == 2 and any(map(self.input_derived, keys)):
                key = keys[1] if self.input_derived(keys[0]) else keys[0]  # a bias add
                continue
            if prim not in _DATA_MOVEMENT and _compat.eqn_checkpoint_name(eqn) is None:
                return False
            key = keys[0]
        return False

    def divisor(self, key: Key | None) -> int:
        """In how many pieces a value is split across devices (an estimate
        that follows XLA's sharding propagation): the sharding constraint it
        carries, else the largest split among the operands it is computed from
        that share its leading (batch) dimension; a value entering a scan body
        takes its operand's split in the enclosing program (:attr:`outer`);
        1 when no constrained value is found."""
        if key is None:
            return 1
        if key not in self._divisors:
            self._divisors[key] = 1  # a guard while this value is resolved
            self._divisors[key] = self._divisor(key)
        return self._divisors[key]

    def _divisor(self, key: Key) -> int:
        if key not in self.producer:
            return self.outer(key) if self.outer is not None and key[0] == 0 else 1
        eqn, _, _, ctx = self.producer[key]
        shape = getattr(key[1].aval, "shape", ())
        if eqn.primitive.name == "sharding_constraint":
            pieces = math.prod(eqn.params["sharding"].shard_shape(shape))
            d = max(1, math.prod(shape) // max(1, pieces))
            operand = self.canon(ctx, eqn.invars[0])
            if self.divisor(operand) > d and operand not in self._contracted:
                self._gathered.add(key)  # a reduction's partial sums are all-reduced, not gathered
            return d
        if not shape:
            return 1
        operands = [k for v in eqn.invars if (k := self.canon(ctx, v)) is not None
                    and getattr(k[1].aval, "shape", ())[:1] == shape[:1]]
        best = max(operands, key=self.divisor, default=None)
        if best is None:
            return 1
        if best in self._gathered:
            self._gathered.add(key)
        prim = eqn.primitive.name
        if best in self._contracted or prim == "dot_general" or prim.startswith("reduce_"):
            self._contracted.add(key)
        return self.divisor(best)

    def gathered(self, key: Key | None) -> bool:
        """The value is replicated along a mesh axis its inputs were sharded
        on (a sharding constraint that gathers, or a value computed from one)."""
        self.divisor(key)
        return key in self._gathered

    def input_derived(self, key: Key | None) -> bool:
        """True when a value is a step input or made from step inputs by data
        movement only (slice, reshape, cast, ...): a view of the parameters or
        the batch, not an activation."""
        if key is None or key not in self.producer:
            return True
        if key not in self._derived:
            eqn, _, _, ctx = self.producer[key]
            self._derived[key] = eqn.primitive.name in _DATA_MOVEMENT and all(
                self.input_derived(self.canon(ctx, v)) for v in eqn.invars)
        return self._derived[key]


@dataclasses.dataclass(frozen=True)
class _Origin:
    name: str
    source: str
    layer_dims: tuple[int, ...]
    from_dot: bool
    divisor: int = 1
    gathered: bool = False


class _Tracer:
    """Follows a residual back to its producing op (one graph per scan body)."""

    def __init__(self) -> None:
        self._graphs: dict[int, _Graph] = {}

    def graph(self, jaxpr: jcore.Jaxpr) -> _Graph:
        g = self._graphs.get(id(jaxpr))
        if g is None:
            g = self._graphs[id(jaxpr)] = _Graph(jaxpr)
        return g

    def origin(self, g: _Graph, key: Key | None, dims: tuple[int, ...] = ()) -> _Origin | None:
        """None for a literal or a step input (a parameter, the batch): not a residual."""
        if key is None or key not in g.producer:
            return None
        eqn, idx, _, ctx = g.producer[key]
        prim = eqn.primitive.name
        name = _compat.eqn_checkpoint_name(eqn)
        if name is not None:
            return _Origin(name, "checkpoint_name", dims, g.from_dot(key), g.divisor(key), g.gathered(key))
        if key in g.tagged:  # a matmul output tagged by checkpoint_name, kept by a dots rule
            return _Origin(g.tagged[key], "checkpoint_name", dims, g.from_dot(key), g.divisor(key),
                           g.gathered(key))
        if prim in _LOOK_THROUGH:
            return self.origin(g, g.canon(ctx, eqn.invars[min(idx, len(eqn.invars) - 1)]), dims)
        if prim == "scan" and idx >= eqn.params["num_carry"]:
            n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
            body = open_jaxpr(eqn.params["jaxpr"])
            bg = self.graph(body)
            if bg.outer is None:
                operand = dict(zip(body.invars, eqn.invars, strict=True))
                bg.outer = lambda k, g=g, ctx=ctx, operand=operand: (
                    g.divisor(g.canon(ctx, operand[k[1]])) if k[1] in operand else 1)
            inner = bg.canon(0, body.outvars[idx])
            if inner is not None and inner[0] == 0 and inner[1] in body.invars:
                k = body.invars.index(inner[1])
                if n_consts <= k < n_consts + n_carry:
                    return _Origin("layer input", "scan carry", (*dims, eqn.params["length"]), False,
                                   g.divisor(g.canon(ctx, eqn.invars[k])))
                if k >= n_consts + n_carry:  # a slice of a scanned-over input, re-stacked
                    return self.origin(g, g.canon(ctx, eqn.invars[k]), dims)
            else:
                return self.origin(bg, inner, (*dims, eqn.params["length"]))
        return _Origin(prim, _compat.source_line(eqn) or "-", dims, g.from_dot(key), g.divisor(key),
                       g.gathered(key))


def residual_rows(jaxpr: jcore.Jaxpr | jcore.ClosedJaxpr) -> tuple[ResidualRow, ...]:
    """The residuals of a traced step that contains its own backward pass.

    Args:
      jaxpr: the jaxpr of a function that computes gradients (e.g. a train
        step calling ``jax.grad``), from ``jax.make_jaxpr`` or
        ``jax.jit(f).trace(...).jaxpr``.

    A step whose whole forward and backward pass runs in a ``scan`` body
    (gradient accumulation over micro-batches) keeps its residuals within
    each iteration: they are those of the body, for one micro-batch.

    Returns:
      One :class:`ResidualRow` per (name or source op, per-layer shape, dtype,
      memory kind, layers), largest first; empty when nothing is differentiated.
    """
    rows = _rows(open_jaxpr(jaxpr))
    if rows:
        return rows
    scans = [s.eqn for s in walk(open_jaxpr(jaxpr), into=lambda e: call_body(e) is not None)
             if s.eqn.primitive.name == "scan"]
    return tuple(sorted((r for e in scans for r in residual_rows(e.params["jaxpr"])),
                        key=lambda r: (-r.size_bytes, r.name)))


def _rows(jaxpr: jcore.Jaxpr) -> tuple[ResidualRow, ...]:
    tracer = _Tracer()
    g = tracer.graph(jaxpr)
    seen: set[Any] = set()
    groups: dict[tuple, list[int]] = {}
    for key in g.backward_inputs:
        if key in seen or g.input_derived(key) or g.producer[key][2]:
            continue  # already counted, a view of the step inputs, or made by the backward pass
        seen.add(key)
        o = tracer.origin(g, key)
        if o is None:
            continue
        aval = key[1].aval
        shape = tuple(aval.shape[len(o.layer_dims):])
        row = (o.name, o.source, shape, str(np.dtype(aval.dtype)),
               "host" if _compat.on_host(aval) else "device", math.prod(o.layer_dims), o.from_dot, o.gathered)
        entry = groups.setdefault(row, [0, 0, 0])
        entry[0] += 1
        entry[1] += nbytes(aval)
        entry[2] += nbytes(aval) // o.divisor
    rows = [ResidualRow(name=k[0], source=k[1], shape=k[2], dtype=k[3], memory_kind=k[4], layers=k[5],
                        count=c, size_bytes=b, from_dot=k[6], device_bytes=d, gathered=k[7])
            for k, (c, b, d) in groups.items()]
    return tuple(sorted(rows, key=lambda r: (-r.size_bytes, r.name)))


def host_traffic(jaxpr: jcore.Jaxpr | jcore.ClosedJaxpr) -> int:
    """Bytes that cross between device and host memory in one call of a
    traced step (global, over all devices): every ``device_put`` that moves a
    value to or from host memory, times the trip count of its enclosing
    scans. An offloaded residual crosses twice (to host in the forward pass,
    back in the backward pass), wherever it is made: in the layer scan, or
    while a group of layers is recomputed in the backward pass (nested
    remat), where it is a transient of the group and no residual row."""
    total = 0
    for step in walk(jaxpr):
        if step.eqn.primitive.name == "device_put":
            for i, o in zip(step.eqn.invars, step.eqn.outvars, strict=False):
                if _compat.on_host(getattr(i, "aval", None)) != _compat.on_host(o.aval):
                    total += nbytes(o.aval) * step.scope.trips
    return total


def output_names(jaxpr: jcore.Jaxpr | jcore.ClosedJaxpr) -> tuple[str | None, ...]:
    """For each output of a jaxpr, the checkpoint name that tags it (looking
    through moves and casts of the tagged value), or None."""
    g = _Graph(open_jaxpr(jaxpr))
    out = []
    for v in open_jaxpr(jaxpr).outvars:
        key, name = g.canon(0, v), None
        while key is not None and key in g.producer:
            eqn, _, _, ctx = g.producer[key]
            name = _compat.eqn_checkpoint_name(eqn)
            if name is not None or eqn.primitive.name not in _LOOK_THROUGH:
                break
            key = g.canon(ctx, eqn.invars[0])
        out.append(name)
    return tuple(out)
