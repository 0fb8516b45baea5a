"""Compile-only measurement of a (train) step: memory, residuals, FLOPs.

:func:`analyze` jit-lowers-compiles a function on abstract inputs
(``jax.ShapeDtypeStruct``; nothing is allocated) and returns a :class:`Report`:

- **memory** from XLA's ``compiled.memory_analysis()`` (per device, bytes);
- **the peak by term**: what is live at the memory peak, from the buffer
  assignment XLA dumps while compiling (:mod:`remat._buffers`), attributed to
  parameters, optimizer state, gradients, residuals, the loss head, ...
  (:func:`remat._memory.peak_terms`);
- **residuals**: what the forward pass keeps for the backward pass, one
  :class:`ResidualRow` per checkpoint name (or producing op) with its per-layer
  shape, bytes, memory kind (device or host) and how many layers it repeats for;
- **FLOPs** counted over the traced program with every ``scan`` iteration
  counted (XLA's ``cost_analysis()`` counts a while-loop body once).

How residuals are found: :mod:`remat._residuals`; FLOPs: :mod:`remat._flops`;
memory: :mod:`remat._memory`; the report: :mod:`remat._report`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from remat import _cache, _compat
from remat._apply import collect_notes, without_remat
from remat._buffers import PeakDump, read_dump
from remat._errors import DumpFormatError, RematError
from remat._flops import count_dots, count_flops
from remat._format import format_bytes
from remat._jaxpr import CALL_BODY, CHECKPOINT, checkpoint_names, nbytes, walk
from remat._memory import PEAK_BUFFERS, advice, compiled_memory, default_compiler_options, peak_terms
from remat._report import Compute, HostTraffic, Memory, PeakBreakdown, Report, Residuals
from remat._residuals import host_traffic, residual_rows

_compat.hide_frames(__file__)

__all__ = ["Figures", "OutOfMemory", "Traced", "analyze", "compile_and_analyze", "compile_figures",
           "compile_traced", "count_checkpoints", "device_bytes", "measure", "out_of_memory", "trace",
           "trace_without_remat"]


@dataclasses.dataclass(frozen=True)
class OutOfMemory:
    """A compile the backend refused for lack of device memory: on TPU a
    step that does not fit is a compile error (``RESOURCE_EXHAUSTED``), not
    a figure. Read from libtpu's message by :func:`out_of_memory`.

    Attributes:
      needed_bytes: what the message says the step needs, bytes per device.
      available_bytes: what it says is available, bytes per device.
      temporaries_only: ``needed_bytes`` counts the HLO temporaries alone
        (libtpu's "total memory required for HLO temporaries (X) exceeds
        available HBM (Y)"), not the arguments; False for "Used X of Y hbm".
      message: the message's first line.
    """

    needed_bytes: int
    available_bytes: int
    temporaries_only: bool
    message: str


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = r"([\d.]+)([KMGTP]?)"
_OUT_OF_MEMORY = (
    (re.compile(rf"memory required for HLO temporaries \({_SIZE}\) exceeds available HBM \({_SIZE}\)"), True),
    (re.compile(rf"Used {_SIZE} of {_SIZE} hbm"), False),
)
"""libtpu's out-of-memory messages (sizes in binary units: the v5p's
"available HBM (95.74G)" is 95.74 GiB of its 96 GiB)."""


def out_of_memory(error: BaseException) -> OutOfMemory | None:
    """The :class:`OutOfMemory` a compile error states, or None for any other error."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    for pattern, temporaries in _OUT_OF_MEMORY:
        if m := pattern.search(text):
            needed, available = (round(float(m[i]) * _UNITS[m[i + 1]]) for i in (1, 3))
            return OutOfMemory(needed, available, temporaries, text.strip().splitlines()[0])
    return None


@dataclasses.dataclass(frozen=True)
class Figures:
    """What the analysis keeps of one compile (:func:`compile_figures`; stored
    by :mod:`remat._cache` across runs).

    Attributes:
      memory: :func:`remat._memory.compiled_memory` of the executable
        (bytes per device), None where the backend gives none or the compile
        failed for lack of memory.
      devices: how many devices the program spans.
      out_of_memory: the backend's refusal, where it refused.
    """

    memory: dict[str, int] | None
    devices: int
    out_of_memory: OutOfMemory | None = None

    @classmethod
    def of(cls, compiled: Any) -> Figures:
        """The figures of a ``jax.stages.Compiled`` executable."""
        devices = max((len(s.device_set) for s in jax.tree.leaves(compiled.input_shardings)), default=1)
        return cls(compiled_memory(compiled), devices)


def cse_notes(jaxpr: jcore.Jaxpr) -> list[str]:
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


@dataclasses.dataclass
class Traced:
    """A traced and lowered step waiting for its compile (see :func:`trace`)."""

    traced: Any
    lowered: Any
    label: str
    trace_seconds: float
    notes: tuple[str, ...] = ()
    device: Any = None
    """A device the step is compiled for: its arguments' (a target's
    compile-only device under a target mesh), else JAX's default device."""
    devices: int = 1
    """How many devices its arguments span."""
    argument_bytes: int = 0
    """Its arguments' bytes per device (each one's shard under its sharding)."""
    roles: dict[str, str] = dataclasses.field(default_factory=dict)
    """Each argument's role by JAX's argument name (a workload's labels;
    empty: by path, :func:`remat._memory.argument_role`)."""

    @property
    def platform(self) -> str:
        """``"cpu"``, ``"gpu"``, ...: the platform the step is compiled for."""
        return self.device.platform

    @functools.cached_property
    def program(self) -> str:
        """A hash of the lowered program: equal for steps that compile alike."""
        return hashlib.sha256(self.lowered.as_text(debug_info=False).encode()).hexdigest()


def trace(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], label: str | None,
          donate_argnums: int | Sequence[int], out_shardings: Any = None) -> Traced:
    """``jax.jit(fn).trace(...).lower()``, timed; ``out_shardings`` (None:
    the compiler's choice) pins the outputs' shardings, e.g. a train state's
    to its input's under a mesh."""
    t0 = time.perf_counter()
    pinned = {} if out_shardings is None else {"out_shardings": out_shardings}
    with collect_notes() as notes:  # a policy remat cannot check (a JAX callable) says so
        traced = jax.jit(fn, donate_argnums=donate_argnums, **pinned).trace(*args, **kwargs)
    lowered = traced.lower()
    shardings = [getattr(x, "sharding", None) for x in jax.tree.leaves((args, kwargs))]
    devices = max((len(sh.device_set) for sh in shardings if sh is not None), default=1)
    return Traced(traced, lowered, label or getattr(fn, "__name__", "fn"), time.perf_counter() - t0,
                  tuple(notes), device=argument_device((args, kwargs)), devices=devices,
                  argument_bytes=device_bytes((args, kwargs)))


def device_bytes(tree: Any) -> int:
    """Bytes per device of the arrays (or ``jax.ShapeDtypeStruct``) in a
    pytree: each one's shard under its sharding, the whole array without one."""
    total = 0
    for x in jax.tree.leaves(tree):
        if hasattr(x, "shape"):
            sharding = getattr(x, "sharding", None)
            shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
            total += math.prod(shape) * x.dtype.itemsize
    return total


def argument_device(tree: Any) -> Any:
    """A device of the first argument placed on one (a ``jax.Array`` or a
    ``jax.ShapeDtypeStruct`` with a sharding), else ``jax.devices()[0]``:
    what a step with those arguments is compiled for."""
    for x in jax.tree.leaves(tree):
        devices = getattr(getattr(x, "sharding", None), "device_set", None)
        if devices:
            return min(devices, key=lambda d: d.id)
    return jax.devices()[0]


def compile_traced(t: Traced, compiler_options: dict[str, Any] | None) -> tuple[Any, float, PeakDump | str]:
    """Compile a lowered step; safe in a worker thread (XLA releases the GIL),
    so a sweep overlaps the compile of one policy with the trace of the next.

    XLA dumps the compiled module's buffer assignment into a temporary
    directory (``xla_dump_to``; into yours if the options name one), read
    by :func:`remat._buffers.read_dump`.

    Returns:
      ``(compiled, compile_seconds, dump)``: ``dump`` is what is live at the
      memory peak, or a sentence saying why there is none.
    """
    options = dict(default_compiler_options(t.platform) if compiler_options is None else compiler_options)
    with contextlib.ExitStack() as stack:
        if "xla_dump_to" not in options:
            options["xla_dump_to"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="remat-xla-"))
        t0 = time.perf_counter()
        compiled = t.lowered.compile(options)
        seconds = time.perf_counter() - t0
        try:
            dump: PeakDump | str = read_dump(options["xla_dump_to"], t.platform)
        except DumpFormatError as e:
            dump = f"XLA's buffer-assignment dump could not be read ({e})"
    return compiled, seconds, dump


def compile_figures(t: Traced,
                    compiler_options: dict[str, Any] | None) -> tuple[Figures, float, PeakDump | str]:
    """:func:`compile_traced` for measurement: the :class:`Figures` of the
    compile, its time and its dump, from the cache of earlier runs when the
    same program was compiled the same way (:mod:`remat._cache`; the time
    is then the original compile's). A compile the backend refuses for lack
    of memory (:func:`out_of_memory`) is a result, not an error. Safe in a
    worker thread, as :func:`compile_traced`.

    Raises:
      Whatever else the compile raises.
    """
    options = dict(default_compiler_options(t.platform) if compiler_options is None else compiler_options)
    key = _cache.compile_key(t.lowered.as_text(debug_info=True), options, t.device, t.devices)
    if (hit := _cache.load(key)) is not None:
        f = hit["figures"]
        oom = f["out_of_memory"] and OutOfMemory(**f["out_of_memory"])
        return Figures(f["memory"], f["devices"], oom), hit["seconds"], hit["dump"]
    t0 = time.perf_counter()
    try:
        compiled, seconds, dump = compile_traced(t, options)
        figures = Figures.of(compiled)
    except jax.errors.JaxRuntimeError as e:
        if (oom := out_of_memory(e)) is None:
            raise
        figures, seconds, dump = Figures(None, t.devices, oom), time.perf_counter() - t0, oom.message
    _cache.store(key, dataclasses.asdict(figures), seconds, dump)
    return figures, seconds, dump


def _peak_fields(dump: PeakDump | str, rows: Sequence[Any], closed: Any, peak: int, temp: int,
                 devices: int, roles: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The Report's peak-by-term fields and notes (:func:`remat._memory.peak_terms`)."""
    if isinstance(dump, str):
        return {}, [f"no peak breakdown by term: {dump}"]
    weights = [a.shape for a in closed.in_avals if jnp.issubdtype(a.dtype, jnp.floating)]
    terms, by_name, buffers, host = peak_terms(dump, rows, weights, temp, roles)
    notes = []
    total = sum(terms.values())
    if abs(total - peak) > 0.01 * peak:
        notes.append(f"the peak's terms from XLA's buffer assignment sum to {format_bytes(total)}, not to "
                     f"peak_bytes {format_bytes(peak)}: the breakdown is off by more than 1%")
    notes += advice(terms, peak, devices)
    fields = {"peak_terms": tuple((k, v) for k, v in terms.items() if v),
              "peak_residuals": tuple(sorted(by_name.items(), key=lambda kv: -kv[1])),
              "peak_buffers": tuple(buffers[:PEAK_BUFFERS]), "host_peak_bytes": host}
    return fields, notes


def measure(t: Traced, compiled: Any, compile_seconds: float, dump: PeakDump | str = "not dumped") -> Report:
    """The :class:`Report` of a traced and compiled step (see :func:`analyze`):
    ``compiled`` is the executable or its :class:`Figures`. A compile refused
    for lack of memory gives a report that does not fit: ``peak_bytes`` is
    what the backend's message says is needed (plus the arguments where it
    counts the temporaries only), ``limit_bytes`` what it says is available,
    ``peak_source`` ``"out-of-memory error"``, and a note quotes the message."""
    figures = compiled if isinstance(compiled, Figures) else Figures.of(compiled)
    closed = t.traced.jaxpr
    jaxpr = closed.jaxpr
    rows = residual_rows(jaxpr)
    flops, notes_t = count_flops(jaxpr)
    notes = [*notes_t, *t.notes]
    dots, batched = count_dots(jaxpr)
    dots_kept = sum(r.count * r.layers for r in rows if r.from_dot)
    residual_bytes = sum(r.device_bytes for r in rows if r.memory_kind == "device")
    host_residual_bytes = sum(r.device_bytes for r in rows if r.memory_kind == "host")
    backend = t.platform

    mem = figures.memory
    oom = figures.out_of_memory
    fields: dict[str, int | None]
    limit = None
    if oom is not None:
        fields = {"temp": oom.needed_bytes if oom.temporaries_only else None, "argument": t.argument_bytes,
                  "output": None, "alias": None, "host_temp": None}
        peak = oom.needed_bytes + (t.argument_bytes if oom.temporaries_only else 0)
        peak_source = "out-of-memory error"
        limit = oom.available_bytes
        what = ("for its temporaries (peak_bytes adds the arguments)" if oom.temporaries_only else "in all")
        notes.append(f"does not fit: the {backend} compiler refused the step, which needs "
                     f"{format_bytes(oom.needed_bytes)} {what} of {format_bytes(oom.available_bytes)} "
                     f"available ({oom.message})")
    elif mem is not None:
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
    devices = figures.devices
    host_size = sum(r.size_bytes for r in rows if r.memory_kind == "host")
    per_device = host_residual_bytes / host_size if host_size else 1 / devices
    host_transfer_bytes = round(host_traffic(jaxpr) * per_device)
    peak_fields: dict[str, Any] = {}
    if mem is not None:
        peak_fields, peak_notes = _peak_fields(dump, rows, closed, peak, mem["temp"], devices, t.roles)
        notes += peak_notes
    notes += cse_notes(jaxpr)
    if gathered := sorted({r.name for r in rows if r.gathered}):
        notes.append(f"saved after an all-gather (replicated on a mesh axis their inputs were sharded on): "
                     f"{', '.join(gathered)}; tag and save the value before the gather")
    if dots and batched == dots:
        notes.append(f"every one of the {dots} forward matmuls has batch dimensions: a dots:no_batch "
                     "rule keeps none of them (an outer vmap or batched expert einsums?)")

    return Report(
        label=t.label, backend=backend, device_kind=t.device.device_kind, jax_version=jax.__version__,
        memory=Memory(temp_bytes=fields["temp"], argument_bytes=fields["argument"],
                      output_bytes=fields["output"], alias_bytes=fields["alias"],
                      host_temp_bytes=fields["host_temp"], peak_bytes=peak, peak_source=peak_source,
                      limit_bytes=limit),
        saved=Residuals(residuals=rows, residual_bytes=residual_bytes,
                        host_residual_bytes=host_residual_bytes,
                        checkpoint_names=tuple(sorted(checkpoint_names(jaxpr))), dots_forward=dots,
                        dots_forward_batched=batched, dots_kept=dots_kept),
        compute=Compute(flops=flops), breakdown=PeakBreakdown(**peak_fields),
        host_traffic=HostTraffic(host_transfer_bytes=host_transfer_bytes),
        trace_seconds=t.trace_seconds, compile_seconds=compile_seconds, notes=tuple(notes), devices=devices)


def compile_and_analyze(fn: Callable[..., Any], *args: Any, label: str | None = None,
                        donate_argnums: int | Sequence[int] = (),
                        compiler_options: dict[str, Any] | None = None, out_shardings: Any = None,
                        **kwargs: Any) -> tuple[Any, Report]:
    """Compile ``fn`` once and measure it: ``(compiled, report)``.

    For a step that is both measured and run (``remat train``): the
    ``jax.stages.Compiled`` executable runs on concrete arguments of the
    traced shapes, and the :class:`Report` is what :func:`analyze` gives for
    the same compile. Arguments as for :func:`analyze`; pass
    ``compiler_options={}`` for XLA's defaults (fast execution) rather than
    the fast-compile options that None selects.
    """
    t = trace(fn, args, kwargs, label, donate_argnums, out_shardings)
    compiled, compile_seconds, dump = compile_traced(t, compiler_options)
    return compiled, measure(t, compiled, compile_seconds, dump)


def trace_without_remat(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any],
                        donate_argnums: int | Sequence[int] = (), out_shardings: Any = None) -> Traced:
    """Trace ``fn`` with every checkpoint that ``remat`` applies removed
    (:func:`remat.without_remat`): the baseline of every overhead.

    ``fn`` is traced through a fresh wrapper, so JAX's tracing cache cannot
    hand back the program traced with remat."""
    with without_remat():
        t = trace(lambda *a, **k: fn(*a, **k), args, kwargs, "no remat", donate_argnums, out_shardings)
    if n := count_checkpoints(t.traced.jaxpr):
        t.notes = (f"the baseline still holds {n} jax.checkpoint that remat did not apply and cannot remove "
                   "(or traced before, and cached by JAX); overheads and savings are against it",)
    return t


def analyze(fn: Callable[..., Any], *args: Any, label: str | None = None,
            donate_argnums: int | Sequence[int] = (), baseline: Report | int | str | None = "no_remat",
            compiler_options: dict[str, Any] | None = None, out_shardings: Any = None,
            **kwargs: Any) -> Report:
    """Measure ``fn(*args, **kwargs)`` compile-only: memory, residuals, FLOPs.

    ``jax.jit(fn, donate_argnums=...).trace(*args, **kwargs)``, then
    ``.lower().compile()`` for the devices the arguments are placed on (a
    target's compile-only devices, e.g. ``remat.target_mesh("h100",
    {"fsdp": 8})``, else the default backend); nothing runs and, with
    ``jax.ShapeDtypeStruct`` arguments, nothing is allocated. Residuals and
    FLOPs come from the traced jaxpr (see the module doc), memory from
    ``compiled.memory_analysis()``.

    The baseline is the same function with no ``jax.checkpoint``: traced
    again with every checkpoint that ``remat`` applies removed
    (:func:`remat.without_remat`) and compiled too, unless it lowers to
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
        :func:`remat._memory.default_compiler_options` of the step's platform
        (fast compile on CPU; XLA:GPU's own rematerialization pass off).
      out_shardings: as ``jax.jit``'s (None: the compiler's choice); under a
        mesh, pin a donated train state to its input shardings.
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
        raise RematError(f"baseline={baseline!r}: valid are 'no_remat', a Report, an int (FLOPs) or None")
    if baseline is not None and not isinstance(baseline, Report | int | str):
        raise TypeError(f"baseline must be 'no_remat', a Report, an int (FLOPs) or None, "
                        f"got {type(baseline).__name__}")
    t = trace(fn, args, kwargs, label, donate_argnums, out_shardings)
    report = measure(t, *compile_figures(t, compiler_options))
    if baseline == "no_remat":
        b = trace_without_remat(fn, args, kwargs, donate_argnums, out_shardings)
        baseline = report if b.program == t.program else measure(b, *compile_figures(b, compiler_options))
    if baseline is not None:
        report = report.with_baseline(baseline)
    return report
