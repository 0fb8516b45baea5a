"""The :class:`Report` of a measured step, and its rendering (``__rich__``,
so the library returns values and a console draws them)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from remat import _compat
from remat._errors import RematError
from remat._format import format_bytes, format_flops
from remat._memory import PeakBuffer
from remat._residuals import ResidualRow

_compat.hide_frames(__file__)

if TYPE_CHECKING:
    from rich.console import Group
    from rich.table import Table

__all__ = ["HOST_LINK_BYTES_PER_S", "PEAK_FLOPS_PER_S", "Report", "render_text"]

HOST_LINK_BYTES_PER_S = 64e9
"""Default host-link bandwidth, bytes per second each way: PCIe Gen5 x16, as
an H200's (about 64 GB/s per direction)."""
PEAK_FLOPS_PER_S = 989e12
"""Default peak compute rate, FLOPs per second per device: an H200's dense
bf16 tensor-core rate (989 TFLOP/s)."""


@dataclasses.dataclass(frozen=True)
class Report:
    """What a compiled step costs, per device, measured without running it.

    Every ``*_bytes`` figure is per device (one SPMD partition); ``flops`` is
    the global count and ``flops_per_device`` each device's share.

    Memory fields come from XLA's ``compiled.memory_analysis()`` and are None
    where the backend does not report them (then ``peak_source`` says which
    fallback gave ``peak_bytes``); residual and FLOP fields come from the
    jaxpr (see the module doc) and do not depend on the backend.

    Attributes:
      label: what was measured, e.g. a policy spec.
      backend: the platform the step was compiled for (its arguments'
        devices), e.g. ``"cpu"``, ``"gpu"``, ``"tpu"``.
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
      peak_source: ``"memory_analysis"``, ``"residual estimate"`` or ``"out-of-memory error"``
        (a compile the backend refused: see ``notes``).
      residual_bytes: device residuals per device, summed over the rows'
        ``device_bytes``.
      host_residual_bytes: host (offloaded) residuals per device, likewise.
      host_transfer_bytes: bytes per device that cross the host link per
        step (:func:`remat._residuals.host_traffic`): each offloaded value
        goes to host in the forward pass and comes back in the backward pass,
        ``2 x host_residual_bytes`` for a layer scan; with nested groups the
        values a group offloads while it is recomputed count too (they are
        transients, no residual rows). Per device as the host residual rows
        are (from the jaxpr's sharding constraints), else divided evenly over
        the devices.
      residuals: the rows, largest first.
      flops: FLOPs of one call, every scan iteration counted, over all devices
        (the global count, e.g. about 6 x parameters x tokens for a train step).
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
      devices: how many devices the step runs on (its SPMD partitions).
      mesh: the device mesh, ``(axis, size)`` pairs (empty on one device).
      rules: the logical-axis rules used under the mesh.
      parameter_bytes, optimizer_bytes, batch_bytes: ``argument_bytes`` split
        per device into the parameters, the optimizer state and the batch
        (None when the step's arguments are not a train step's).
      peak_terms: the peak by term, ``(term, bytes per device)`` pairs in the
        order of :data:`remat._memory.TERMS` (zero terms left out): what is live
        at the peak, from XLA's buffer assignment (see
        :func:`remat._memory.peak_terms` for how each term is found); they sum
        to ``peak_bytes`` (a note says so when they do not, within 1%). Empty
        where the backend writes no buffer assignment (a note says why).
      peak_residuals: the ``residuals`` term by checkpoint name (or producing
        op), ``(name, bytes)`` pairs, largest first.
      peak_buffers: the largest buffers live at the peak (:class:`remat.PeakBuffer`).
      host_peak_bytes: bytes live in host memory at the peak (offloaded
        residuals), beside the terms, not in them; None without a breakdown.
      host_link_bytes_per_s: the host-link bandwidth, bytes per second each
        way, of ``transfer_seconds`` (default :data:`HOST_LINK_BYTES_PER_S`).
      peak_flops_per_s: the device's peak rate, FLOPs per second, of
        ``compute_seconds`` (default :data:`PEAK_FLOPS_PER_S`).
      target: the :data:`remat.TARGETS` name compiled for (``"cpu"``: this
        host's XLA:CPU, or a function measured outside a target).
      limit_bytes: the usable memory per device on the target
        (:meth:`remat.Target.usable_bytes`), or None where none is stated
        (``cpu``); see ``headroom_bytes`` and ``fits``.
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
    devices: int = 1
    mesh: tuple[tuple[str, int], ...] = ()
    rules: tuple[tuple[str, Any], ...] = ()
    parameter_bytes: int | None = None
    optimizer_bytes: int | None = None
    batch_bytes: int | None = None
    peak_terms: tuple[tuple[str, int], ...] = ()
    peak_residuals: tuple[tuple[str, int], ...] = ()
    peak_buffers: tuple[PeakBuffer, ...] = ()
    host_peak_bytes: int | None = None
    host_transfer_bytes: int = 0
    host_link_bytes_per_s: float = HOST_LINK_BYTES_PER_S
    peak_flops_per_s: float = PEAK_FLOPS_PER_S
    target: str = "cpu"
    limit_bytes: int | None = None

    @property
    def headroom_bytes(self) -> int | None:
        """``limit_bytes - peak_bytes`` (negative: over), None without a limit."""
        return None if self.limit_bytes is None else self.limit_bytes - self.peak_bytes

    @property
    def fits(self) -> bool | None:
        """``peak_bytes <= limit_bytes``, None without a limit."""
        return None if self.limit_bytes is None else self.peak_bytes <= self.limit_bytes

    @property
    def flops_per_device(self) -> float:
        """``flops / devices``: each device's share of the step."""
        return self.flops / self.devices

    @property
    def transfer_seconds(self) -> float:
        """``host_transfer_bytes / host_link_bytes_per_s``: seconds the host
        link is busy per step (each direction in its own pass)."""
        return self.host_transfer_bytes / self.host_link_bytes_per_s

    @property
    def compute_seconds(self) -> float:
        """``flops_per_device / peak_flops_per_s``: the step's compute at the
        peak rate, a lower bound on its time (recompute included)."""
        return self.flops_per_device / self.peak_flops_per_s

    @property
    def transfer_compute_ratio(self) -> float:
        """``transfer_seconds / compute_seconds``: above 1 the offload cannot
        hide under compute even with perfect overlap; at or below 1 it can,
        if XLA schedules the copies beside the layers' compute (a necessary
        condition, measured on a GPU by ``tests/benchmarks/gpu_check.py``)."""
        return self.transfer_seconds / self.compute_seconds if self.compute_seconds else float("inf")

    def with_rates(self, host_link_bytes_per_s: float | None = None,
                   peak_flops_per_s: float | None = None) -> Report:
        """This report with another host-link bandwidth (bytes/s each way)
        or peak rate (FLOP/s) for its transfer and compute times.

        Raises:
          RematError: a rate that is not positive.
        """
        rates = {k: v for k, v in (("host_link_bytes_per_s", host_link_bytes_per_s),
                                   ("peak_flops_per_s", peak_flops_per_s)) if v is not None}
        for k, v in rates.items():
            if not v > 0:
                raise RematError(f"{k}={v!r} must be a positive rate")
        return dataclasses.replace(self, **rates)

    def transfer_line(self) -> str:
        """One line: the host traffic per step, its transfer time against the
        compute time, and whether it can hide."""
        if not self.host_transfer_bytes:
            return "nothing offloaded"
        hides = "can hide under compute" if self.transfer_compute_ratio <= 1 else "cannot hide under compute"
        return (f"{format_bytes(self.host_transfer_bytes)} to host and back: "
                f"{self.transfer_seconds * 1e3:.3g} ms at {self.host_link_bytes_per_s / 1e9:.3g} GB/s vs "
                f"compute {self.compute_seconds * 1e3:.3g} ms at {self.peak_flops_per_s / 1e12:.4g} TFLOP/s: "
                f"ratio {self.transfer_compute_ratio:.2f}, "
                f"{hides}")

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-able Python values (rows as dicts, tuples as lists)."""
        d = dataclasses.asdict(self)
        d["residuals"] = [{**r, "shape": list(r["shape"])} for r in d["residuals"]]
        d["checkpoint_names"] = list(self.checkpoint_names)
        d["notes"] = list(self.notes)
        d["mesh"] = dict(self.mesh)
        d["rules"] = [[k, list(v) if isinstance(v, tuple) else v] for k, v in self.rules]
        d["flops_per_device"] = self.flops_per_device
        for k in ("transfer_seconds", "compute_seconds", "transfer_compute_ratio", "headroom_bytes", "fits"):
            d[k] = getattr(self, k)
        d["peak_terms"] = dict(self.peak_terms)
        d["peak_residuals"] = dict(self.peak_residuals)
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

    def fit_line(self) -> str:
        """``"fits, 3.2 GiB headroom"`` or ``"does not fit, 1.1 GiB over"``
        against ``limit_bytes``; ``""`` without a limit."""
        if self.headroom_bytes is None:
            return ""
        if self.headroom_bytes >= 0:
            return f"fits, {format_bytes(self.headroom_bytes)} headroom"
        return f"does not fit, {format_bytes(-self.headroom_bytes)} over"

    def summary_table(self, timings: bool = True) -> Table:
        """A two-column rich table of the memory and compute figures;
        ``timings=False`` leaves out the trace and compile times."""
        from rich.table import Table

        t = Table(title=f"remat inspect: {self.label}", show_header=False)
        t.add_column("figure", style="bold")
        t.add_column("value", justify="right")
        rows = [
            ("peak per device", format_bytes(self.peak_bytes) + ("" if self.peak_source == "memory_analysis"
                                                                 else f" ({self.peak_source})")),
            *([("usable memory", f"{format_bytes(self.limit_bytes)}: "
                                 f"{self.fit_line()}")] if self.limit_bytes is not None else []),
            ("  arguments", format_bytes(self.argument_bytes)),
            *([("    parameters", format_bytes(self.parameter_bytes)),
               ("    optimizer state", format_bytes(self.optimizer_bytes)),
               ("    batch", format_bytes(self.batch_bytes))] if self.parameter_bytes is not None else []),
            ("  outputs", format_bytes(self.output_bytes)),
            ("  temporaries", format_bytes(self.temp_bytes)),
            ("  aliased (donated)", format_bytes(self.alias_bytes)),
            ("host temporaries", format_bytes(self.host_temp_bytes)),
            ("residuals on device", format_bytes(self.residual_bytes)),
            ("residuals on host", format_bytes(self.host_residual_bytes)),
            ("host transfer per step", self.transfer_line()),
            ("FLOPs (all devices)", format_flops(self.flops)),
            *([("FLOPs per device", format_flops(self.flops_per_device)),
               ("mesh", ", ".join(f"{a}={n}" for a, n in self.mesh))] if self.mesh else []),
            ("recompute FLOPs", format_flops(self.recompute_flops)),
            ("recompute overhead", "-" if self.recompute_overhead is None
             else f"{self.recompute_overhead:+.1%}"),
            ("matmuls kept", f"{self.dots_kept} of {self.dots_forward} "
                             f"({self.dots_forward_batched} with batch dims)"),
            ("checkpoint names", ", ".join(self.checkpoint_names) or "-"),
            ("compiled for", f"target {self.target}: {self.backend} ({self.device_kind}), "
                             f"jax {self.jax_version}"),
            *([("trace / compile", f"{self.trace_seconds:.2f} s / {self.compile_seconds:.2f} s")]
              if timings else []),
        ]
        for k, v in rows:
            t.add_row(k, v)
        return t

    def residual_table(self) -> Table:
        """A rich table of the residual rows: name x layers, shape, bytes, memory kind."""
        from rich.table import Table

        t = Table(title="residuals kept for the backward pass")
        for col, just in (("name", "left"), ("source", "left"), ("per-layer shape (global)", "left"),
                          ("dtype", "left"), ("count", "right"), ("layers", "right"),
                          ("bytes per device", "right"), ("memory", "left")):
            t.add_column(col, justify=just, overflow="fold")
        for r in self.residuals:
            t.add_row(r.name, r.source, "[" + ", ".join(map(str, r.shape)) + "]", r.dtype,
                      str(r.count), str(r.layers), format_bytes(r.device_bytes), r.memory_kind)
        return t

    def peak_table(self) -> Table:
        """A rich table of the peak by term (share of ``peak_bytes``) and the
        largest buffers live at the peak."""
        from rich.table import Table

        t = Table(title=f"the peak ({format_bytes(self.peak_bytes)} per device) by term")
        for col, just in (("term", "left"), ("bytes per device", "right"), ("share", "right")):
            t.add_column(col, justify=just)
        for term, n in self.peak_terms:
            t.add_row(term, format_bytes(n), f"{n / self.peak_bytes:.1%}")
            if term == "residuals":
                for name, m in self.peak_residuals:
                    t.add_row(f"  {name}", format_bytes(m), f"{m / self.peak_bytes:.1%}", style="dim")
        if self.host_peak_bytes:
            t.add_row("host memory (not in the peak)", format_bytes(self.host_peak_bytes), "", style="dim")
        return t

    def buffer_table(self) -> Table:
        """A rich table of the largest buffers live at the peak."""
        from rich.table import Table

        t = Table(title="largest buffers live at the peak")
        for col in ("bytes", "shape", "term", "name", "made by", "source"):
            t.add_column(col, justify="right" if col == "bytes" else "left", overflow="fold")
        for b in self.peak_buffers:
            t.add_row(format_bytes(b.size_bytes), b.shape, b.term, b.name,
                      "/".join(b.op_name.split("/")[-2:]), b.source)
        return t

    def __str__(self) -> str:
        """The text rich renders (:func:`render_text`): ``print(report)`` reads as the CLI prints it."""
        return render_text(self)

    def __rich__(self) -> Group:
        from rich.console import Group

        parts: list[Any] = [self.summary_table(), self.residual_table()]
        if self.peak_terms:
            parts += [self.peak_table(), self.buffer_table()]
        parts += [f"[yellow]note:[/] {n}" for n in self.notes]
        return Group(*parts)


def render_text(renderable: Any, width: int = 120) -> str:
    """What rich prints for ``renderable`` (tables, groups), as plain text
    ``width`` columns wide: the ``__str__`` of :class:`Report`,
    :class:`remat.SweepResult` and :class:`remat.TuneResult`."""
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]
