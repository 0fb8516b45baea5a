"""Compile-only measurement of a (train) step: memory, residuals, FLOPs.

:func:`analyze` jit-lowers-compiles a function on abstract inputs
(``jax.ShapeDtypeStruct``; nothing is allocated) and returns a :class:`Report`:

- **memory** from XLA's ``compiled.memory_analysis()`` (per device, bytes);
- **residuals**: what the forward pass keeps for the backward pass, one
  :class:`ResidualRow` per checkpoint name (or producing op) with its per-layer
  shape, bytes, memory kind (device or host) and how many layers it repeats for;
- **FLOPs** counted over the traced program with every ``scan`` iteration
  counted (XLA's ``cost_analysis()`` counts a while-loop body once).

How residuals are found: see :mod:`remat._residuals`.

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
import functools
import hashlib
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core as jcore
from rich.console import Group
from rich.table import Table

from remat._jaxpr import CALL_BODY, CHECKPOINT, checkpoint_names, nbytes, walk
from remat._residuals import ResidualRow, count_dots, residual_rows
from remat.apply import without_remat

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
      notes: caveats on this measurement (fallbacks, uncounted loops, a
        residual saving the compiled memory does not show).
      saving_unconfirmed: against its baseline (the step with no
        ``jax.checkpoint``), the compiled ``temp_bytes`` fall by less than half
        the residual bytes this report claims to save, or the peak is higher:
        XLA did not do what the residual rows suggest (see ``notes``).
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
    saving_unconfirmed: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-able Python values (rows as dicts, tuples as lists)."""
        d = dataclasses.asdict(self)
        d["residuals"] = [{**r, "shape": list(r["shape"])} for r in d["residuals"]]
        d["checkpoint_names"] = list(self.checkpoint_names)
        d["notes"] = list(self.notes)
        return d

    def with_baseline(self, baseline: Report | int) -> Report:
        """This report measured against the same step with no ``jax.checkpoint``
        at all, given as its :class:`Report` or its FLOPs (int).

        Fills ``recompute_flops`` / ``recompute_overhead``. With a Report whose
        memory comes from ``memory_analysis`` on both sides, also checks the
        claim of the residual rows against the compiler: when the compiled
        ``temp_bytes`` fall by less than half the residual bytes (device and
        host) this report saves, or the peak is higher than the baseline's,
        a note says so and ``saving_unconfirmed`` is set.
        """
        base_flops = baseline if isinstance(baseline, int) else baseline.flops
        r = dataclasses.replace(self, recompute_flops=self.flops - base_flops,
                                recompute_overhead=self.flops / base_flops - 1.0)
        if isinstance(baseline, int) or None in (self.temp_bytes, baseline.temp_bytes):
            return r
        notes = []
        claimed = (baseline.residual_bytes + baseline.host_residual_bytes
                   - self.residual_bytes - self.host_residual_bytes)
        saved = baseline.temp_bytes - self.temp_bytes  # type: ignore[operator]
        if claimed > 0 and saved < claimed / 2:
            notes.append(f"the residuals shrink by {format_bytes(claimed)} against no remat, but the "
                         f"compiled temporaries by {format_bytes(saved)} only: XLA did not realise the "
                         "saving (e.g. values recomputed for a group of layers are held while it is "
                         "differentiated, or XLA merged an unrolled loop's recomputation away)")
        if self.peak_bytes > baseline.peak_bytes:
            notes.append(f"the peak is {format_bytes(self.peak_bytes - baseline.peak_bytes)} higher than "
                         "with no remat at all")
        return dataclasses.replace(r, notes=(*r.notes, *notes), saving_unconfirmed=bool(notes))

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


# -- FLOPs ---------------------------------------------------------------------
_ELEMENTWISE = frozenset("""
    add add_any sub mul div rem neg max min abs sign pow integer_pow square sqrt rsqrt cbrt
    exp exp2 expm1 log log1p tanh logistic sin cos tan asin acos atan atan2 sinh cosh asinh
    acosh atanh erf erfc erf_inv lgamma digamma igamma floor ceil round nextafter
""".split())
_REDUCTIONS = frozenset("""
    reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin
    cumsum cumprod cummax cummin cumlogsumexp
""".split())


def _eqn_flops(eqn: Any) -> int:
    prim = eqn.primitive.name
    if prim == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval
        return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in lc)
    if prim == "conv_general_dilated":
        rhs = eqn.invars[1].aval
        out_feat = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
        return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs.shape) // out_feat
    if prim in _ELEMENTWISE:
        return math.prod(eqn.outvars[0].aval.shape)
    if prim in _REDUCTIONS:
        return math.prod(eqn.invars[0].aval.shape)
    return 0


def count_flops(jaxpr: jcore.Jaxpr | jcore.ClosedJaxpr) -> tuple[int, tuple[str, ...]]:
    """FLOPs of a jaxpr with every ``scan`` iteration counted (see the module doc).

    Args:
      jaxpr: e.g. ``jax.make_jaxpr(step)(*args)``.

    Returns:
      ``(flops, notes)``: the count (int, FLOPs) and caveats (a ``while_loop``
      counted once).
    """
    total, notes = 0, set()
    for s in walk(jaxpr, into=lambda e: e.primitive.name != "cond"):
        prim = s.eqn.primitive.name
        if prim == "cond":  # the most expensive branch
            branches = [count_flops(b) for b in s.eqn.params["branches"]]
            total += s.scope.trips * max(f for f, _ in branches)
            notes.update(n for _, ns in branches for n in ns)
        else:
            total += s.scope.trips * _eqn_flops(s.eqn)
        if prim == "while":
            notes.add("a while_loop (unknown trip count) is counted once")
    return total, tuple(sorted(notes))


def _cse_notes(jaxpr: jcore.Jaxpr) -> list[str]:
    """A note when a ``jax.checkpoint`` with ``prevent_cse=False`` is not the
    body of a ``scan`` (calls such as ``jit`` in between do not count): only a
    scan keeps XLA from merging its recomputation into the forward pass."""
    loose = 0
    for s in walk(jaxpr):
        if s.eqn.primitive.name in CHECKPOINT and s.eqn.params.get("prevent_cse") is False:
            outer = [e for e in s.scope.enclosing if e.primitive.name not in CALL_BODY or
                     e.primitive.name in CHECKPOINT]
            loose += not (outer and outer[-1].primitive.name == "scan")
    if not loose:
        return []
    return [f"{loose} jax.checkpoint(prevent_cse=False) outside a scan body: XLA's common-subexpression "
            "elimination can merge the recomputation into the forward pass, so it may save no memory; "
            "use prevent_cse=True outside lax.scan"]


def count_checkpoints(jaxpr: jcore.Jaxpr | jcore.ClosedJaxpr) -> int:
    """How many ``jax.checkpoint`` equations a jaxpr holds, sub-jaxprs included."""
    return sum(s.eqn.primitive.name in CHECKPOINT for s in walk(jaxpr))


_MEMORY_FIELDS = ("temp", "argument", "output", "alias", "host_temp")


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """``{"temp": ..., "argument": ..., "output": ..., "alias": ..., "host_temp": ...}``
    (bytes per device) from ``compiled.memory_analysis()``, or None where the
    backend gives none: it raises, returns None, or returns all zeros (some
    backends do; a compiled step never needs zero bytes)."""
    try:
        mem = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, jax.errors.JaxRuntimeError):
        return None
    fields = None if mem is None else {k: int(getattr(mem, f"{k}_size_in_bytes", 0)) for k in _MEMORY_FIELDS}
    return fields if fields and any(fields.values()) else None


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
    notes: tuple[str, ...] = ()

    @functools.cached_property
    def program(self) -> str:
        """A hash of the lowered program: equal for steps that compile alike."""
        return hashlib.sha256(self.lowered.as_text(debug_info=False).encode()).hexdigest()


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
    notes = [*notes_t, *t.notes]
    dots, batched = count_dots(jaxpr)
    dots_kept = sum(r.count * r.layers for r in rows if r.from_dot)
    residual_bytes = sum(r.size_bytes for r in rows if r.memory_kind == "device")
    host_residual_bytes = sum(r.size_bytes for r in rows if r.memory_kind == "host")
    backend = jax.default_backend()

    mem = compiled_memory(compiled)
    fields: dict[str, int | None]
    if mem is not None:
        fields = dict(mem)
        peak = fields["argument"] + fields["output"] + fields["temp"] - fields["alias"]  # type: ignore[operator]
        peak_source = "memory_analysis"
        if host_residual_bytes and not fields["host_temp"]:
            notes.append(f"the {backend} backend reports no host memory (host_temp_bytes=0); "
                         f"the offloaded residuals total {format_bytes(host_residual_bytes)} "
                         "(host_residual_bytes)")
    else:
        in_bytes = sum(nbytes(a) for a in closed.in_avals)
        out_bytes = sum(nbytes(a) for a in closed.out_avals)
        fields = {"temp": None, "argument": in_bytes, "output": out_bytes, "alias": None, "host_temp": None}
        peak = in_bytes + out_bytes + residual_bytes
        peak_source = "residual estimate"
        notes.append(f"the {backend} backend gives no memory_analysis() (or all zeros): peak_bytes = "
                     "arguments + outputs + device residuals, a lower bound")
    notes += _cse_notes(jaxpr)
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
        checkpoint_names=tuple(sorted(checkpoint_names(jaxpr))),
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


def trace_without_remat(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any],
                        donate_argnums: int | Sequence[int] = ()) -> _Traced:
    """Trace ``fn`` with every checkpoint that ``remat`` applies removed
    (:func:`remat.apply.without_remat`): the baseline of every overhead.

    ``fn`` is traced through a fresh wrapper, so JAX's tracing cache cannot
    hand back the program traced with remat."""
    with without_remat():
        t = _trace(lambda *a, **k: fn(*a, **k), args, kwargs, "no remat", donate_argnums)
    if n := count_checkpoints(t.traced.jaxpr):
        t.notes = (f"the baseline still holds {n} jax.checkpoint that remat did not apply and cannot remove "
                   "(or traced before, and cached by JAX); overheads and savings are against it",)
    return t


def analyze(fn: Callable[..., Any], *args: Any, label: str | None = None,
            donate_argnums: int | Sequence[int] = (), baseline: Report | int | str | None = "no_remat",
            compiler_options: dict[str, Any] | None = None, **kwargs: Any) -> Report:
    """Measure ``fn(*args, **kwargs)`` compile-only: memory, residuals, FLOPs.

    ``jax.jit(fn, donate_argnums=...).trace(*args, **kwargs)``, then
    ``.lower().compile()`` on the default backend; nothing runs and, with
    ``jax.ShapeDtypeStruct`` arguments, nothing is allocated. Residuals and
    FLOPs come from the traced jaxpr (see the module doc), memory from
    ``compiled.memory_analysis()``.

    The baseline is the same function with no ``jax.checkpoint``: traced
    again with every checkpoint that ``remat`` applies removed
    (:func:`remat.apply.without_remat`) and compiled too, unless it lowers to
    the same program. Overheads are against it, and the claimed residual
    saving is checked against the compiled memory (:meth:`Report.with_baseline`).
    Checkpoints applied with ``jax.checkpoint`` or ``nn.remat`` directly
    stay in the baseline, and a note says so.

    Args:
      fn: the function to measure, typically a train step that computes
        gradients (``remat.step.make_train_step``); the residual rows are empty
        for a function without a backward pass.
      *args: arrays or ``jax.ShapeDtypeStruct`` pytrees (e.g. the abstract
        state from ``jax.eval_shape(remat.step.init_train_state, ...)``).
      label: a name for the report (default: ``fn.__name__``).
      donate_argnums: arguments whose buffers the outputs may reuse (the train
        state), so that ``alias_bytes`` and ``peak_bytes`` are as in training.
      baseline: ``"no_remat"`` (the default, see above); the baseline's
        :class:`Report` or FLOPs (int) if you measured it already; or None
        for no baseline (``recompute_overhead`` stays None).
      compiler_options: XLA options for ``Lowered.compile``; None means
        :func:`default_compiler_options` (fast compile on CPU).
      **kwargs: keyword arguments of ``fn``.

    Returns:
      A :class:`Report` (per device).

    Raises:
      ValueError: ``baseline`` is a string other than ``"no_remat"``.
      TypeError: ``baseline`` is of another type.
      Whatever tracing or compiling ``fn`` raises (a shape error, a policy
      naming a checkpoint name the model does not emit, ...).
    """
    if isinstance(baseline, str) and baseline != "no_remat":
        raise ValueError(f"baseline={baseline!r}: valid are 'no_remat', a Report, an int (FLOPs) or None")
    if baseline is not None and not isinstance(baseline, Report | int | str):
        raise TypeError(f"baseline must be 'no_remat', a Report, an int (FLOPs) or None, "
                        f"got {type(baseline).__name__}")
    t = _trace(fn, args, kwargs, label, donate_argnums)
    report = _report(t, *_compile(t, compiler_options))
    if baseline == "no_remat":
        b = trace_without_remat(fn, args, kwargs, donate_argnums)
        baseline = report if b.program == t.program else _report(b, *_compile(b, compiler_options))
    if baseline is not None:
        report = report.with_baseline(baseline)
    return report
