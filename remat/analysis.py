"""Compile-only measurement of a (train) step: memory, residuals, FLOPs.

:func:`analyze` jit-lowers-compiles a function on abstract inputs
(``jax.ShapeDtypeStruct``; nothing is allocated) and returns a :class:`Report`:

- **memory** from XLA's ``compiled.memory_analysis()`` (per device, bytes);
- **residuals**: what the forward pass keeps for the backward pass, one
  :class:`ResidualRow` per checkpoint name (or producing op) with its per-layer
  shape, bytes, memory kind (device or host) and how many layers it repeats for;
- **FLOPs** counted over the traced program with every ``scan`` iteration
  counted (XLA's ``cost_analysis()`` counts a while-loop body once).

How residuals are found (backend independent). JAX's
``jax.ad_checkpoint.print_saved_residuals`` differentiates a function itself and
reports a value saved inside ``lax.scan`` only as "output of scan", names lost.
We instead read the jaxpr of the step as traced: JAX's AD marks every equation
of a backward pass with a ``transpose`` transform on its name stack, so a
*residual* is a value produced by a forward equation and consumed by a
backward one (inputs of the step, such as parameters, are not residuals).
Each residual is then followed back to the equation that made it, through
``jit`` / ``closed_call`` / ``remat`` bodies and into ``scan`` bodies (each
scan level multiplies "layers" by its length), past ``device_put`` (the move
to host memory of an offload policy) and ``reduce_precision``, to a
``checkpoint_name`` (its name) or another op (its primitive and source line).
A value stacked by the layer scan that is the scan's own carry is the layer
input. A value made from the step inputs by data movement alone (a slice,
transpose or cast of the parameters) is a view of the arguments, not an
activation, and is left out. JAX drops from the backward pass what it does not
read (dead-code elimination), so a value whose only use is an addition (e.g. a
layer's last projection, ``mlpwo``) is never a residual, whatever the policy
says. Values that an inner checkpoint saves while a group of layers is
recomputed during the backward pass (nested remat) are transient and are not
residuals here; they appear in ``temp_bytes``.

How FLOPs are counted (backend independent, trip-count exact). Over the
jaxpr, recursively through every sub-jaxpr: ``dot_general`` costs
``2 * prod(output shape) * prod(contracting sizes)``; ``conv_general_dilated``
``2 * prod(output shape) * prod(kernel shape) / output features``; every
elementwise arithmetic op (transcendentals included) one FLOP per output
element; every reduction one per input element. A ``scan`` body counts
``length`` times, each ``cond`` its most expensive branch, a ``while_loop``
(unknown trip count) once, with a note. Recomputation is visible in the jaxpr
(the ``remat`` equations of the backward pass), so ``recompute_flops`` is the
difference to the same step without remat.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore
from rich.console import Group
from rich.table import Table

from remat import _compat
from remat.apply import jaxpr_names

__all__ = [
    "FAST_CPU_COMPILE", "Report", "ResidualRow", "analyze", "count_flops", "default_compiler_options",
    "format_bytes", "format_flops", "parse_bytes", "residual_rows",
]

# -- sizes ---------------------------------------------------------------------
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str) -> int:
    """A size with its unit, e.g. ``"40GiB"``, ``"1.5 GB"``, ``"512MiB"``, ``"100B"``, in bytes.

    Units: B, kB/MB/GB/TB (powers of 1000) and KiB/MiB/GiB/TiB (powers of
    1024), case-insensitive. A bare number is rejected: say the unit.

    Raises:
      ValueError: no number, no unit or an unknown unit (the message lists the valid units).
    """
    m = _SIZE_RE.match(text)
    valid = "B, kB, MB, GB, TB, KiB, MiB, GiB, TiB"
    if not m or not m.group(2):
        raise ValueError(f"invalid size {text!r}: write a number and a unit, e.g. 40GiB; units: {valid}")
    unit = m.group(2).lower()
    if unit not in _UNITS:
        raise ValueError(f"unknown size unit {m.group(2)!r} in {text!r}; valid: {valid}")
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float | None) -> str:
    """``n`` bytes in binary units, e.g. ``"1.50 GiB"``; ``"-"`` for None."""
    if n is None:
        return "-"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_flops(n: float | None) -> str:
    """``n`` FLOPs in decimal units, e.g. ``"99.06 TFLOP"``; ``"-"`` for None."""
    if n is None:
        return "-"
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} FLOP"


# -- the report ----------------------------------------------------------------
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
      from_dot: the value is a matmul (``dot_general``) output.
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


@dataclasses.dataclass(frozen=True)
class Report:
    """What a compiled step costs, per device, measured without running it.

    Memory fields come from XLA's ``compiled.memory_analysis()`` and are None
    where the backend does not report them (then ``peak_source`` says which
    fallback gave ``peak_bytes``); residual and FLOP fields come from the
    jaxpr (see the module doc) and do not depend on the backend.

    Attributes:
      label: what was measured, e.g. a policy spec.
      backend: ``jax.default_backend()``, e.g. ``"cpu"``, ``"gpu"``, ``"tpu"``.
      device_kind: e.g. ``"cpu"``, ``"NVIDIA H100 80GB HBM3"``.
      jax_version: ``jax.__version__``.
      temp_bytes: XLA temporaries (activations, residuals, workspace).
      argument_bytes: the inputs (parameters, optimizer state, batch).
      output_bytes: the outputs.
      alias_bytes: outputs that reuse a donated input's buffer.
      host_temp_bytes: temporaries in host memory (offloaded residuals); 0 on
        backends that do not account for host memory (CPU), see
        ``host_residual_bytes``.
      peak_bytes: ``argument + output + temp - alias``; if the backend reports
        no memory analysis, ``argument + output + residual_bytes`` (a lower
        bound) computed from the abstract values.
      peak_source: ``"memory_analysis"`` or ``"residual estimate"``.
      residual_bytes: device residuals, summed over ``residuals``.
      host_residual_bytes: host (offloaded) residuals, summed over ``residuals``.
      residuals: the rows, largest first.
      flops: FLOPs of one call, every scan iteration counted.
      recompute_flops: ``flops - flops(no remat)``; None without a baseline.
      recompute_overhead: ``flops / flops(no remat) - 1``; None without a baseline.
      dots_forward: matmuls of the forward pass (layers counted).
      dots_forward_batched: of those, matmuls with batch dimensions (attention's
        ``q k^T`` and ``p v``), which a ``dots:no_batch`` rule never keeps.
      dots_kept: matmul outputs kept as residuals (layers counted).
      checkpoint_names: every ``checkpoint_name`` the step emits, sorted.
      trace_seconds: tracing the step to a jaxpr and lowering it to StableHLO.
      compile_seconds: XLA compiling.
      notes: caveats on this measurement (fallbacks, uncounted loops).
    """

    label: str
    backend: str
    device_kind: str
    jax_version: str
    temp_bytes: int | None
    argument_bytes: int | None
    output_bytes: int | None
    alias_bytes: int | None
    host_temp_bytes: int | None
    peak_bytes: int
    peak_source: str
    residual_bytes: int
    host_residual_bytes: int
    residuals: tuple[ResidualRow, ...]
    flops: int
    recompute_flops: int | None
    recompute_overhead: float | None
    dots_forward: int
    dots_forward_batched: int
    dots_kept: int
    checkpoint_names: tuple[str, ...]
    trace_seconds: float
    compile_seconds: float
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-able Python values (rows as dicts, tuples as lists)."""
        d = dataclasses.asdict(self)
        d["residuals"] = [{**r, "shape": list(r["shape"])} for r in d["residuals"]]
        d["checkpoint_names"] = list(self.checkpoint_names)
        d["notes"] = list(self.notes)
        return d

    def with_baseline(self, baseline_flops: int) -> Report:
        """This report with ``recompute_flops`` / ``recompute_overhead`` against
        ``baseline_flops`` (the FLOPs of the same step without remat)."""
        return dataclasses.replace(
            self, recompute_flops=self.flops - baseline_flops,
            recompute_overhead=self.flops / baseline_flops - 1.0)

    def summary_table(self) -> Table:
        """A two-column rich table of the memory and compute figures."""
        t = Table(title=f"remat inspect: {self.label}", show_header=False)
        t.add_column("figure", style="bold")
        t.add_column("value", justify="right")
        rows = [
            ("peak", format_bytes(self.peak_bytes) + ("" if self.peak_source == "memory_analysis"
                                                      else f" ({self.peak_source})")),
            ("  arguments", format_bytes(self.argument_bytes)),
            ("  outputs", format_bytes(self.output_bytes)),
            ("  temporaries", format_bytes(self.temp_bytes)),
            ("  aliased (donated)", format_bytes(self.alias_bytes)),
            ("host temporaries", format_bytes(self.host_temp_bytes)),
            ("residuals on device", format_bytes(self.residual_bytes)),
            ("residuals on host", format_bytes(self.host_residual_bytes)),
            ("FLOPs", format_flops(self.flops)),
            ("recompute FLOPs", format_flops(self.recompute_flops)),
            ("recompute overhead", "-" if self.recompute_overhead is None
             else f"{self.recompute_overhead:+.1%}"),
            ("matmuls kept", f"{self.dots_kept} of {self.dots_forward} "
                             f"({self.dots_forward_batched} with batch dims)"),
            ("checkpoint names", ", ".join(self.checkpoint_names) or "-"),
            ("backend", f"{self.backend} ({self.device_kind}), jax {self.jax_version}"),
            ("trace / compile", f"{self.trace_seconds:.2f} s / {self.compile_seconds:.2f} s"),
        ]
        for k, v in rows:
            t.add_row(k, v)
        return t

    def residual_table(self) -> Table:
        """A rich table of the residual rows: name x layers, shape, bytes, memory kind."""
        t = Table(title="residuals kept for the backward pass (per device)")
        for col, just in (("name", "left"), ("source", "left"), ("per-layer shape", "left"),
                          ("dtype", "left"), ("count", "right"), ("layers", "right"),
                          ("bytes", "right"), ("memory", "left")):
            t.add_column(col, justify=just, overflow="fold")
        for r in self.residuals:
            t.add_row(r.name, r.source, "[" + ", ".join(map(str, r.shape)) + "]", r.dtype,
                      str(r.count), str(r.layers), format_bytes(r.size_bytes), r.memory_kind)
        return t

    def __rich__(self) -> Group:
        parts: list[Any] = [self.summary_table(), self.residual_table()]
        parts += [f"[yellow]note:[/] {n}" for n in self.notes]
        return Group(*parts)


# -- jaxpr walking --------------------------------------------------------------
_CALL_BODY = {"jit": "jaxpr", "pjit": "jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr",
              "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
              "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
              "custom_vjp_call_jaxpr": "fun_jaxpr"}
"""Call-like primitives whose body is inlined when following values."""
_LOOK_THROUGH = {"device_put", "reduce_precision", "copy", "copy_p", "optimization_barrier"}
"""Ops that move or re-tag a value without computing a new one."""

_DATA_MOVEMENT = frozenset("""
    slice dynamic_slice reshape squeeze expand_dims transpose broadcast_in_dim convert_element_type
    concatenate pad rev copy copy_p device_put reduce_precision
""".split())
"""Ops that only move or cast data (a residual made by these from the step
inputs alone is a view of the inputs, not an activation)."""

_ELEMENTWISE = frozenset("""
    add add_any sub mul div rem neg max min abs sign pow integer_pow square sqrt rsqrt cbrt
    exp exp2 expm1 log log1p tanh logistic sin cos tan asin acos atan atan2 sinh cosh asinh
    acosh atanh erf erfc erf_inv lgamma digamma igamma floor ceil round nextafter
""".split())
_REDUCTIONS = frozenset("""
    reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin
    cumsum cumprod cummax cummin cumlogsumexp reduce_precision_sum
""".split())


def _body(eqn: Any) -> jcore.Jaxpr | None:
    key = _CALL_BODY.get(eqn.primitive.name)
    if key is None or key not in eqn.params:
        return None
    j = eqn.params[key]
    return j.jaxpr if isinstance(j, jcore.ClosedJaxpr) else j


def _open(j: Any) -> jcore.Jaxpr:
    return j.jaxpr if isinstance(j, jcore.ClosedJaxpr) else j


def _nbytes(aval: Any) -> int:
    return int(math.prod(aval.shape)) * np.dtype(aval.dtype).itemsize


class _Graph:
    """A jaxpr with call-like bodies inlined: for each value, the equation that
    produced it and whether that equation is in a backward pass.

    A value is keyed ``(context, var)``: each inlined call gets its own
    context, since one body (a cached jitted function) may be called twice.
    """

    def __init__(self, jaxpr: jcore.Jaxpr):
        self.jaxpr = jaxpr
        self.alias: dict[tuple[int, Any], tuple[int, Any] | None] = {}
        self.producer: dict[tuple[int, Any], tuple[Any, int, bool, int]] = {}
        self.backward_inputs: list[tuple[int, Any]] = []
        self.forward_nodes: list[Any] = []
        self.tagged: dict[tuple[int, Any], str] = {}  # value -> the checkpoint name tagging it
        self._contexts = 0
        self._derived: dict[tuple[int, Any], bool] = {}
        self._walk(jaxpr, 0, transposed=False)

    def canon(self, ctx: int, v: Any) -> tuple[int, Any] | None:
        """The key of the value ``v`` of context ``ctx`` after inlining; None for a literal."""
        key: tuple[int, Any] | None = None if isinstance(v, jcore.Literal) else (ctx, v)
        while key is not None and key in self.alias:
            key = self.alias[key]
        return key

    def _walk(self, jaxpr: jcore.Jaxpr, ctx: int, transposed: bool) -> None:
        for eqn in jaxpr.eqns:
            t = transposed or _compat.is_transposed(eqn)
            body = _body(eqn)
            if body is not None and len(body.invars) == len(eqn.invars):
                self._contexts += 1
                inner_ctx = self._contexts
                for inner, outer in zip(body.invars, eqn.invars, strict=True):
                    self.alias[(inner_ctx, inner)] = self.canon(ctx, outer)
                self._walk(body, inner_ctx, t)
                for inner, outer in zip(body.outvars, eqn.outvars, strict=True):
                    self.alias[(ctx, outer)] = self.canon(inner_ctx, inner)
                continue
            for i, v in enumerate(eqn.outvars):
                self.producer[(ctx, v)] = (eqn, i, t, ctx)
            name = _compat.eqn_checkpoint_name(eqn)
            if name is not None and (k := self.canon(ctx, eqn.invars[0])) is not None:
                self.tagged[k] = name
            if t:
                self.backward_inputs.extend(k for v in eqn.invars if (k := self.canon(ctx, v)) is not None)
            else:
                self.forward_nodes.append(eqn)

    def from_dot(self, key: tuple[int, Any] | None) -> bool:
        """True when a value is a matmul (``dot_general``) output, possibly
        reshaped, transposed, cast or tagged on the way (an einsum's output)."""
        while key is not None and key in self.producer:
            eqn, _, _, ctx = self.producer[key]
            prim = eqn.primitive.name
            if prim == "dot_general":
                return True
            if prim not in _DATA_MOVEMENT and _compat.eqn_checkpoint_name(eqn) is None:
                return False
            key = self.canon(ctx, eqn.invars[0])
        return False

    def input_derived(self, key: tuple[int, Any] | None) -> bool:
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


class _Tracer:
    """Follows a residual back to its producing op (one graph per scan body)."""

    def __init__(self) -> None:
        self._graphs: dict[int, _Graph] = {}

    def graph(self, jaxpr: jcore.Jaxpr) -> _Graph:
        g = self._graphs.get(id(jaxpr))
        if g is None:
            g = self._graphs[id(jaxpr)] = _Graph(jaxpr)
        return g

    def origin(self, g: _Graph, key: tuple[int, Any] | None, dims: tuple[int, ...] = ()) -> _Origin | None:
        """None for a literal or a step input (a parameter, the batch): not a residual."""
        if key is None or key not in g.producer:
            return None
        eqn, idx, _, ctx = g.producer[key]
        prim = eqn.primitive.name
        name = _compat.eqn_checkpoint_name(eqn)
        if name is not None:
            return _Origin(name, "checkpoint_name", dims, g.from_dot(key))
        if key in g.tagged:  # a matmul output tagged by checkpoint_name, kept by a dots rule
            return _Origin(g.tagged[key], "checkpoint_name", dims, g.from_dot(key))
        if prim in _LOOK_THROUGH:
            return self.origin(g, g.canon(ctx, eqn.invars[min(idx, len(eqn.invars) - 1)]), dims)
        if prim == "scan" and idx >= eqn.params["num_carry"]:
            n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
            body = _open(eqn.params["jaxpr"])
            bg = self.graph(body)
            inner = bg.canon(0, body.outvars[idx])
            if inner is not None and inner[0] == 0 and inner[1] in body.invars:
                k = body.invars.index(inner[1])
                if n_consts <= k < n_consts + n_carry:
                    return _Origin("layer input", "scan carry", (*dims, eqn.params["length"]), False)
                if k >= n_consts + n_carry:  # a slice of a scanned-over input, re-stacked
                    return self.origin(g, g.canon(ctx, eqn.invars[k]), dims)
            else:
                return self.origin(bg, inner, (*dims, eqn.params["length"]))
        return _Origin(prim, _compat.source_line(eqn) or "-", dims, g.from_dot(key))


def count_flops(jaxpr: jcore.Jaxpr | jcore.ClosedJaxpr) -> tuple[int, tuple[str, ...]]:
    """FLOPs of a jaxpr with every ``scan`` iteration counted (see the module doc).

    Args:
      jaxpr: e.g. ``jax.make_jaxpr(step)(*args)``.

    Returns:
      ``(flops, notes)``: the count (int, FLOPs) and caveats (a ``while_loop``
      counted once).
    """
    notes: set[str] = set()

    def walk(j: jcore.Jaxpr) -> int:
        total = 0
        for eqn in j.eqns:
            prim = eqn.primitive.name
            if prim == "dot_general":
                (lc, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval
                total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in lc)
            elif prim == "conv_general_dilated":
                rhs = eqn.invars[1].aval
                out_feat = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
                total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs.shape) // out_feat
            elif prim in _ELEMENTWISE:
                total += math.prod(eqn.outvars[0].aval.shape)
            elif prim in _REDUCTIONS:
                total += math.prod(eqn.invars[0].aval.shape)
            elif prim == "scan":
                total += eqn.params["length"] * walk(_open(eqn.params["jaxpr"]))
            elif prim == "cond":
                total += max(walk(_open(b)) for b in eqn.params["branches"])
            elif prim == "while":
                notes.add("a while_loop (unknown trip count) is counted once")
                total += walk(_open(eqn.params["body_jaxpr"])) + walk(_open(eqn.params["cond_jaxpr"]))
            else:
                total += sum(walk(_open(s)) for s in jcore.jaxprs_in_params(eqn.params))
        return total

    return walk(_open(jaxpr)), tuple(sorted(notes))


def _count_dots(eqns: Iterable[Any], mult: int = 1) -> tuple[int, int]:
    """(matmuls, matmuls with batch dims) in ``eqns`` and their bodies, scans counted."""
    dots = batched = 0
    for eqn in eqns:
        prim = eqn.primitive.name
        if prim == "dot_general":
            dots += mult
            batched += mult if eqn.params["dimension_numbers"][1][0] else 0
            continue
        m = mult * (eqn.params["length"] if prim == "scan" else 1)
        for sub in jcore.jaxprs_in_params(eqn.params):
            d, b = _count_dots(_open(sub).eqns, m)
            dots, batched = dots + d, batched + b
    return dots, batched


def residual_rows(jaxpr: jcore.Jaxpr | jcore.ClosedJaxpr) -> tuple[ResidualRow, ...]:
    """The residuals of a traced step that contains its own backward pass.

    Args:
      jaxpr: the jaxpr of a function that computes gradients (e.g. a train
        step calling ``jax.grad``), from ``jax.make_jaxpr`` or
        ``jax.jit(f).trace(...).jaxpr``.

    Returns:
      One :class:`ResidualRow` per (name or source op, per-layer shape, dtype,
      memory kind, layers), largest first; empty when nothing is differentiated.
    """
    tracer = _Tracer()
    g = tracer.graph(_open(jaxpr))
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
        key = (o.name, o.source, shape, str(np.dtype(aval.dtype)),
               "host" if _compat.on_host(aval) else "device", math.prod(o.layer_dims), o.from_dot)
        entry = groups.setdefault(key, [0, 0])
        entry[0] += 1
        entry[1] += _nbytes(aval)
    rows = [ResidualRow(name=k[0], source=k[1], shape=k[2], dtype=k[3], memory_kind=k[4], layers=k[5],
                        count=c, size_bytes=b, from_dot=k[6])
            for k, (c, b) in groups.items()]
    return tuple(sorted(rows, key=lambda r: (-r.size_bytes, r.name)))


def _memory(compiled: Any) -> Any:
    try:
        return compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, jax.errors.JaxRuntimeError):
        return None


FAST_CPU_COMPILE: dict[str, Any] = {"xla_backend_optimization_level": 0,
                                    "xla_cpu_use_fusion_emitters": False}
"""XLA options :func:`analyze` uses on the CPU backend unless told otherwise:
LLVM optimisation off and the classic (non-MLIR) fusion emitters. Buffer
assignment, hence every memory figure, is unchanged (checked on the Llama 3 8B
train step: temp bytes equal to within 128 B) while compiling is 6-8x faster;
the executable is only measured, never run."""


def default_compiler_options() -> dict[str, Any]:
    """:data:`FAST_CPU_COMPILE` on the CPU backend, no options elsewhere."""
    return dict(FAST_CPU_COMPILE) if jax.default_backend() == "cpu" else {}


@dataclasses.dataclass
class _Traced:
    """A traced and lowered step waiting for its compile (see :func:`_trace`)."""

    traced: Any
    lowered: Any
    label: str
    trace_seconds: float


def _trace(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], label: str | None,
           donate_argnums: int | Sequence[int]) -> _Traced:
    t0 = time.perf_counter()
    traced = jax.jit(fn, donate_argnums=donate_argnums).trace(*args, **kwargs)
    lowered = traced.lower()
    return _Traced(traced, lowered, label or getattr(fn, "__name__", "fn"), time.perf_counter() - t0)


def _compile(t: _Traced, compiler_options: dict[str, Any] | None) -> tuple[Any, float]:
    """Compile a lowered step; safe in a worker thread (XLA releases the GIL),
    so a sweep overlaps the compile of one policy with the trace of the next."""
    t0 = time.perf_counter()
    compiled = t.lowered.compile(default_compiler_options() if compiler_options is None else compiler_options)
    return compiled, time.perf_counter() - t0


def _report(t: _Traced, compiled: Any, compile_seconds: float) -> Report:
    closed = t.traced.jaxpr
    jaxpr = closed.jaxpr
    rows = residual_rows(jaxpr)
    flops, notes_t = count_flops(jaxpr)
    notes = list(notes_t)
    dots, batched = _count_dots(_Graph(jaxpr).forward_nodes)
    dots_kept = sum(r.count * r.layers for r in rows if r.from_dot)
    residual_bytes = sum(r.size_bytes for r in rows if r.memory_kind == "device")
    host_residual_bytes = sum(r.size_bytes for r in rows if r.memory_kind == "host")
    backend = jax.default_backend()

    mem = _memory(compiled)
    fields: dict[str, int | None]
    if mem is not None:
        fields = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in
                  ("temp", "argument", "output", "alias", "host_temp")}
        peak = fields["argument"] + fields["output"] + fields["temp"] - fields["alias"]  # type: ignore[operator]
        peak_source = "memory_analysis"
        if host_residual_bytes and not fields["host_temp"]:
            notes.append(f"the {backend} backend reports no host memory (host_temp_bytes=0); "
                         f"the offloaded residuals total {format_bytes(host_residual_bytes)} "
                         "(host_residual_bytes)")
    else:
        in_bytes = sum(_nbytes(a) for a in closed.in_avals)
        out_bytes = sum(_nbytes(a) for a in closed.out_avals)
        fields = {"temp": None, "argument": in_bytes, "output": out_bytes, "alias": None, "host_temp": None}
        peak = in_bytes + out_bytes + residual_bytes
        peak_source = "residual estimate"
        notes.append(f"the {backend} backend gives no memory_analysis(): peak_bytes = "
                     "arguments + outputs + device residuals, a lower bound")
    if dots and batched == dots:
        notes.append(f"every one of the {dots} forward matmuls has batch dimensions: a dots:no_batch "
                     "rule keeps none of them (an outer vmap or batched expert einsums?)")

    return Report(
        label=t.label, backend=backend, device_kind=jax.devices()[0].device_kind,
        jax_version=jax.__version__,
        temp_bytes=fields["temp"], argument_bytes=fields["argument"], output_bytes=fields["output"],
        alias_bytes=fields["alias"], host_temp_bytes=fields["host_temp"],
        peak_bytes=peak, peak_source=peak_source,
        residual_bytes=residual_bytes, host_residual_bytes=host_residual_bytes, residuals=rows,
        flops=flops, recompute_flops=None, recompute_overhead=None,
        dots_forward=dots, dots_forward_batched=batched, dots_kept=dots_kept,
        checkpoint_names=tuple(sorted(frozenset().union(*jaxpr_names(jaxpr)))),
        trace_seconds=t.trace_seconds, compile_seconds=compile_seconds, notes=tuple(notes))


def compile_and_analyze(fn: Callable[..., Any], *args: Any, label: str | None = None,
                        donate_argnums: int | Sequence[int] = (),
                        compiler_options: dict[str, Any] | None = None, **kwargs: Any) -> tuple[Any, Report]:
    """Compile ``fn`` once and measure it: ``(compiled, report)``.

    For a step that is both measured and run (``remat train``): the
    ``jax.stages.Compiled`` executable runs on concrete arguments of the
    traced shapes, and the :class:`Report` is what :func:`analyze` gives for
    the same compile. Arguments as for :func:`analyze`; pass
    ``compiler_options={}`` for XLA's defaults (fast execution) rather than
    the fast-compile options that None selects.
    """
    t = _trace(fn, args, kwargs, label, donate_argnums)
    compiled, compile_seconds = _compile(t, compiler_options)
    return compiled, _report(t, compiled, compile_seconds)


def analyze(fn: Callable[..., Any], *args: Any, label: str | None = None,
            donate_argnums: int | Sequence[int] = (), baseline: Report | int | None = None,
            compiler_options: dict[str, Any] | None = None, **kwargs: Any) -> Report:
    """Measure ``fn(*args, **kwargs)`` compile-only: memory, residuals, FLOPs.

    ``jax.jit(fn, donate_argnums=...).trace(*args, **kwargs)``, then
    ``.lower().compile()`` on the default backend; nothing runs and, with
    ``jax.ShapeDtypeStruct`` arguments, nothing is allocated. Residuals and
    FLOPs come from the traced jaxpr (see the module doc), memory from
    ``compiled.memory_analysis()``.

    Args:
      fn: the function to measure, typically a train step that computes
        gradients (``remat.step.make_train_step``); the residual rows are empty
        for a function without a backward pass.
      *args: arrays or ``jax.ShapeDtypeStruct`` pytrees (e.g. the abstract
        state from ``jax.eval_shape(remat.step.init_train_state, ...)``).
      label: a name for the report (default: ``fn.__name__``).
      donate_argnums: arguments whose buffers the outputs may reuse (the train
        state), so that ``alias_bytes`` and ``peak_bytes`` are as in training.
      baseline: the same step without remat, as its :class:`Report` or its
        FLOPs (int), to fill ``recompute_flops`` / ``recompute_overhead``.
      compiler_options: XLA options for ``Lowered.compile``; None means
        :func:`default_compiler_options` (fast compile on CPU).
      **kwargs: keyword arguments of ``fn``.

    Returns:
      A :class:`Report` (per device).

    Raises:
      TypeError: ``baseline`` is neither a Report, an int nor None.
      Whatever tracing or compiling ``fn`` raises (a shape error, a policy
      naming a checkpoint name the model does not emit, ...).
    """
    if baseline is not None and not isinstance(baseline, Report | int):
        raise TypeError(f"baseline must be a Report, an int (FLOPs) or None, got {type(baseline).__name__}")
    _, report = compile_and_analyze(fn, *args, label=label, donate_argnums=donate_argnums,
                                    compiler_options=compiler_options, **kwargs)
    if baseline is not None:
        report = report.with_baseline(baseline.flops if isinstance(baseline, Report) else baseline)
    return report
