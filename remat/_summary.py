"""How a :class:`remat.Report` reads: its rich tables (summary, residuals,
the peak by term, the largest buffers), its notes, and the plain text rich
prints for them, the ``str()`` of reports, sweeps and tune results. Kept
beside the report, as Flax keeps its module tables in ``flax/linen/summary.py``;
rich is imported only when something is drawn."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from remat import _compat
from remat._format import format_bytes, format_flops

_compat.hide_frames(__file__)

if TYPE_CHECKING:
    from rich.console import Group
    from rich.table import Table

    from remat._report import Memory, Report

__all__ = ["buffer_table", "fit_line", "peak_table", "render_text", "report_group", "residual_table",
           "summary_table", "transfer_line"]


def fit_line(memory: Memory) -> str:
    """``"fits, 3.2 GiB headroom"`` or ``"does not fit, 1.1 GiB over"``
    against ``memory.limit_bytes`` (bytes per device); ``""`` without a limit."""
    headroom = memory.headroom_bytes
    if headroom is None:
        return ""
    if headroom >= 0:
        return f"fits, {format_bytes(headroom)} headroom"
    return f"does not fit, {format_bytes(-headroom)} over"


def transfer_line(report: Report) -> str:
    """One line: the host traffic per step (bytes per device), its transfer
    time against the compute time (ms, at the report's GB/s and TFLOP/s),
    and whether it can hide under compute."""
    host = report.host_traffic
    if not host.host_transfer_bytes:
        return "nothing offloaded"
    ratio = report.transfer_compute_ratio
    hides = "can hide under compute" if ratio <= 1 else "cannot hide under compute"
    return (f"{format_bytes(host.host_transfer_bytes)} to host and back: "
            f"{host.transfer_seconds * 1e3:.3g} ms at {host.host_link_bytes_per_s / 1e9:.3g} GB/s vs "
            f"compute {report.compute_seconds * 1e3:.3g} ms at "
            f"{report.compute.peak_flops_per_s / 1e12:.4g} TFLOP/s: ratio {ratio:.2f}, {hides}")


def summary_table(report: Report, timings: bool = True) -> Table:
    """A two-column rich table of the memory (bytes per device) and compute
    (FLOPs) figures; ``timings=False`` leaves out the trace and compile times."""
    from rich.table import Table

    m, saved, c = report.memory, report.saved, report.compute
    t = Table(title=f"remat inspect: {report.label}", show_header=False)
    t.add_column("figure", style="bold")
    t.add_column("value", justify="right")
    rows = [
        ("peak per device", format_bytes(m.peak_bytes) + ("" if m.peak_source == "memory_analysis"
                                                          else f" ({m.peak_source})")),
        *([("usable memory", f"{format_bytes(m.limit_bytes)}: {fit_line(m)}")]
          if m.limit_bytes is not None else []),
        ("  arguments", format_bytes(m.argument_bytes)),
        *([("    parameters", format_bytes(m.parameter_bytes)),
           ("    optimizer state", format_bytes(m.optimizer_bytes)),
           ("    batch", format_bytes(m.batch_bytes))] if m.parameter_bytes is not None else []),
        ("  outputs", format_bytes(m.output_bytes)),
        ("  temporaries", format_bytes(m.temp_bytes)),
        ("  aliased (donated)", format_bytes(m.alias_bytes)),
        ("host temporaries", format_bytes(m.host_temp_bytes)),
        ("residuals on device", format_bytes(saved.residual_bytes)),
        ("residuals on host", format_bytes(saved.host_residual_bytes)),
        ("host transfer per step", transfer_line(report)),
        ("FLOPs (all devices)", format_flops(c.flops)),
        *([("FLOPs per device", format_flops(report.flops_per_device)),
           ("mesh", ", ".join(f"{a}={n}" for a, n in report.mesh))] if report.mesh else []),
        ("recompute FLOPs", format_flops(c.recompute_flops)),
        ("recompute overhead", "-" if c.recompute_overhead is None else f"{c.recompute_overhead:+.1%}"),
        ("matmuls kept", f"{saved.dots_kept} of {saved.dots_forward} "
                         f"({saved.dots_forward_batched} with batch dims)"),
        ("checkpoint names", ", ".join(saved.checkpoint_names) or "-"),
        ("compiled for", f"target {report.target}: {report.backend} ({report.device_kind}), "
                         f"jax {report.jax_version}"),
        *([("trace / compile", f"{report.trace_seconds:.2f} s / {report.compile_seconds:.2f} s")]
          if timings else []),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


def residual_table(report: Report) -> Table:
    """A rich table of the residual rows: name x layers, per-layer global
    shape, dtype, bytes per device, memory kind."""
    from rich.table import Table

    t = Table(title="residuals kept for the backward pass")
    for col, just in (("name", "left"), ("source", "left"), ("per-layer shape (global)", "left"),
                      ("dtype", "left"), ("count", "right"), ("layers", "right"),
                      ("bytes per device", "right"), ("memory", "left")):
        t.add_column(col, justify=just, overflow="fold")
    for r in report.saved.residuals:
        t.add_row(r.name, r.source, "[" + ", ".join(map(str, r.shape)) + "]", r.dtype,
                  str(r.count), str(r.layers), format_bytes(r.device_bytes), r.memory_kind)
    return t


def peak_table(report: Report) -> Table:
    """A rich table of the peak by term (bytes per device and share of
    ``peak_bytes``), the residuals term by name, and the host bytes beside it."""
    from rich.table import Table

    peak, b = report.memory.peak_bytes, report.breakdown
    t = Table(title=f"the peak ({format_bytes(peak)} per device) by term")
    for col, just in (("term", "left"), ("bytes per device", "right"), ("share", "right")):
        t.add_column(col, justify=just)
    for term, n in b.peak_terms:
        t.add_row(term, format_bytes(n), f"{n / peak:.1%}")
        if term == "residuals":
            for name, m in b.peak_residuals:
                t.add_row(f"  {name}", format_bytes(m), f"{m / peak:.1%}", style="dim")
    if b.host_peak_bytes:
        t.add_row("host memory (not in the peak)", format_bytes(b.host_peak_bytes), "", style="dim")
    return t


def buffer_table(report: Report) -> Table:
    """A rich table of the largest buffers live at the peak (bytes per
    device, shape, term, the op that made each and its source line)."""
    from rich.table import Table

    t = Table(title="largest buffers live at the peak")
    for col in ("bytes", "shape", "term", "name", "made by", "source"):
        t.add_column(col, justify="right" if col == "bytes" else "left", overflow="fold")
    for b in report.breakdown.peak_buffers:
        t.add_row(format_bytes(b.size_bytes), b.shape, b.term, b.name,
                  "/".join(b.op_name.split("/")[-2:]), b.source)
    return t


def report_group(report: Report) -> Group:
    """The report as rich draws it (its ``__rich__``): the summary and
    residual tables, the peak tables where there is a breakdown, then the notes."""
    from rich.console import Group

    parts: list[Any] = [summary_table(report), residual_table(report)]
    if report.breakdown.peak_terms:
        parts += [peak_table(report), buffer_table(report)]
    parts += [f"[yellow]note:[/] {n}" for n in report.notes]
    return Group(*parts)


def render_text(renderable: Any, width: int = 120) -> str:
    """What rich prints for ``renderable`` (tables, groups), as plain text
    ``width`` columns wide: the ``__str__`` of :class:`remat.Report`,
    :class:`remat.SweepResult` and :class:`remat.TuneResult`."""
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]
