"""The :class:`Report` of a measured step: a few typed groups of figures
(:class:`Memory`, :class:`PeakBreakdown`, :class:`Residuals`,
:class:`Compute`, :class:`HostTraffic`) and what the step was compiled for.
The report is a value; :mod:`remat._summary` draws it (``__rich__``), as
``flax/linen/summary.py`` keeps Flax's tables beside its modules."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from remat import _compat, _summary
from remat._errors import RematError
from remat._format import format_bytes
from remat._memory import PeakBuffer
from remat._residuals import ResidualRow
from remat._summary import render_text  # re-exported: _sweep, _tune and callers import it from here

_compat.hide_frames(__file__)

if TYPE_CHECKING:
    from rich.console import Group
    from rich.table import Table

__all__ = ["HOST_LINK_BYTES_PER_S", "PEAK_FLOPS_PER_S", "Compute", "HostTraffic", "Memory", "PeakBreakdown",
           "Report", "Residuals", "render_text"]

HOST_LINK_BYTES_PER_S = 64e9
"""Default host-link bandwidth, bytes per second each way: PCIe Gen5 x16, as
an H200's (about 64 GB/s per direction)."""
PEAK_FLOPS_PER_S = 989e12
"""Default peak compute rate, FLOPs per second per device: an H200's dense
bf16 tensor-core rate (989 TFLOP/s)."""


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device (one SPMD partition) of a compiled step.

    The first five come from XLA's ``compiled.memory_analysis()`` and are
    None where the backend does not report them (then ``peak_source`` says
    which fallback gave ``peak_bytes``).

    Attributes:
      temp_bytes: XLA temporaries (activations, residuals, workspace).
      argument_bytes: the inputs (parameters, optimizer state, batch).
      output_bytes: the outputs.
      alias_bytes: outputs that reuse a donated input's buffer.
      host_temp_bytes: temporaries in host memory (offloaded residuals); 0 on
        backends that do not account for host memory (CPU), see
        :attr:`Residuals.host_residual_bytes`.
      peak_bytes: ``argument + output + temp - alias``; if the backend reports
        no memory analysis, ``argument + output + residual_bytes`` (a lower
        bound) computed from the abstract values.
      peak_source: ``"memory_analysis"``, ``"residual estimate"`` or
        ``"out-of-memory error"`` (a compile the backend refused: see
        :attr:`Report.notes`).
      parameter_bytes, optimizer_bytes, batch_bytes: ``argument_bytes`` split
        into the parameters, the optimizer state and the batch (None when the
        step's arguments are not a train step's).
      limit_bytes: the usable memory on the target
        (:meth:`remat.Target.usable_bytes`), or None where none is stated
        (``cpu``); see ``headroom_bytes`` and ``fits``.
    """

    temp_bytes: int | None
    argument_bytes: int | None
    output_bytes: int | None
    alias_bytes: int | None
    host_temp_bytes: int | None
    peak_bytes: int
    peak_source: str
    parameter_bytes: int | None = None
    optimizer_bytes: int | None = None
    batch_bytes: int | None = None
    limit_bytes: int | None = None

    @property
    def headroom_bytes(self) -> int | None:
        """``limit_bytes - peak_bytes`` (negative: over), None without a limit."""
        return None if self.limit_bytes is None else self.limit_bytes - self.peak_bytes

    @property
    def fits(self) -> bool | None:
        """``peak_bytes <= limit_bytes``, None without a limit."""
        return None if self.limit_bytes is None else self.peak_bytes <= self.limit_bytes


@dataclasses.dataclass(frozen=True)
class PeakBreakdown:
    """What is live at the peak, bytes per device, from XLA's buffer
    assignment (see :func:`remat._memory.peak_terms` for how each term is
    found). Empty where the backend writes no buffer assignment (a note of
    the report says why).

    Attributes:
      peak_terms: ``(term, bytes)`` pairs in the order of
        :data:`remat._memory.TERMS` (zero terms left out); they sum to
        :attr:`Memory.peak_bytes` (a note says so when they do not, within 1%).
      peak_residuals: the ``residuals`` term by checkpoint name (or producing
        op), ``(name, bytes)`` pairs, largest first.
      peak_buffers: the largest buffers live at the peak (:class:`remat.PeakBuffer`).
      host_peak_bytes: bytes live in host memory at the peak (offloaded
        residuals), beside the terms, not in them; None without a breakdown.
    """

    peak_terms: tuple[tuple[str, int], ...] = ()
    peak_residuals: tuple[tuple[str, int], ...] = ()
    peak_buffers: tuple[PeakBuffer, ...] = ()
    host_peak_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class Residuals:
    """The values the forward pass saves for the backward pass, read from
    the traced jaxpr (independent of the backend), and the matmuls among them.

    Attributes:
      residuals: the rows (:class:`remat.ResidualRow`), largest first.
      residual_bytes: device residuals, bytes per device, summed over the
        rows' ``device_bytes``.
      host_residual_bytes: host (offloaded) residuals, bytes per device, likewise.
      checkpoint_names: every ``checkpoint_name`` the step emits, sorted.
      dots_forward: matmuls of the forward pass (layers counted).
      dots_forward_batched: of those, matmuls with batch dimensions (attention's
        ``q k^T`` and ``p v``), which a ``dots:no_batch`` rule never keeps.
      dots_kept: matmul outputs kept as residuals (layers counted).
    """

    residuals: tuple[ResidualRow, ...]
    residual_bytes: int
    host_residual_bytes: int
    checkpoint_names: tuple[str, ...]
    dots_forward: int
    dots_forward_batched: int
    dots_kept: int


@dataclasses.dataclass(frozen=True)
class Compute:
    """FLOPs of the step, read from the traced jaxpr, and the peak rate that
    turns them into seconds.

    Attributes:
      flops: FLOPs of one call, every scan iteration counted, over all devices
        (the global count, e.g. about 6 x parameters x tokens for a train step).
      recompute_flops: ``flops - flops(no remat)``; None without a baseline.
      recompute_overhead: ``flops / flops(no remat) - 1`` (a fraction); None
        without a baseline.
      peak_flops_per_s: the device's peak rate, FLOPs per second, of
        :attr:`Report.compute_seconds` (default :data:`PEAK_FLOPS_PER_S`).
    """

    flops: int
    recompute_flops: int | None = None
    recompute_overhead: float | None = None
    peak_flops_per_s: float = PEAK_FLOPS_PER_S


@dataclasses.dataclass(frozen=True)
class HostTraffic:
    """What crosses the host link per step (offloaded residuals).

    Attributes:
      host_transfer_bytes: bytes per device that cross the host link per
        step (:func:`remat._residuals.host_traffic`): each offloaded value
        goes to host in the forward pass and comes back in the backward pass,
        ``2 x host_residual_bytes`` for a layer scan; with nested groups the
        values a group offloads while it is recomputed count too (they are
        transients, no residual rows). Per device as the host residual rows
        are (from the jaxpr's sharding constraints), else divided evenly over
        the devices.
      host_link_bytes_per_s: the host-link bandwidth, bytes per second each
        way (default :data:`HOST_LINK_BYTES_PER_S`).
    """

    host_transfer_bytes: int = 0
    host_link_bytes_per_s: float = HOST_LINK_BYTES_PER_S

    @property
    def transfer_seconds(self) -> float:
        """``host_transfer_bytes / host_link_bytes_per_s``: seconds the host
        link is busy per step (each direction in its own pass)."""
        return self.host_transfer_bytes / self.host_link_bytes_per_s


_GROUPS: dict[str, type] = {"memory": Memory, "breakdown": PeakBreakdown, "saved": Residuals,
                            "compute": Compute, "host_traffic": HostTraffic}
"""The :class:`Report` fields that hold a group, and the group's type."""
_GROUP_OF = {f.name: group for group, cls in _GROUPS.items() for f in dataclasses.fields(cls)}
"""The group (a Report field) each flat name is read from."""

T = TypeVar("T")


class _Flat(Generic[T]):
    """A read-only :class:`Report` attribute that reads the field of the same
    name of the group that holds it (:data:`_GROUP_OF`)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.group = name, _GROUP_OF[name]
        self.__doc__ = f"``report.{self.group}.{name}`` (:class:`{_GROUPS[self.group].__name__}`), read-only."

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _Flat[T]: ...
    @overload
    def __get__(self, obj: Report, owner: type | None = None) -> T: ...
    def __get__(self, obj: Report | None, owner: type | None = None) -> T | _Flat[T]:
        return self if obj is None else getattr(getattr(obj, self.group), self.name)

    def __set__(self, obj: Report, value: Any) -> None:
        raise AttributeError(f"Report.{self.name} is read-only; report.replace({self.name}=...) copies")


_JSON_KEYS = (
    "label", "backend", "device_kind", "jax_version", "temp_bytes", "argument_bytes", "output_bytes",
    "alias_bytes", "host_temp_bytes", "peak_bytes", "peak_source", "residual_bytes", "host_residual_bytes",
    "residuals", "flops", "recompute_flops", "recompute_overhead", "dots_forward", "dots_forward_batched",
    "dots_kept", "checkpoint_names", "trace_seconds", "compile_seconds", "notes", "saving_unconfirmed",
    "devices", "mesh", "rules", "parameter_bytes", "optimizer_bytes", "batch_bytes", "peak_terms",
    "peak_residuals", "peak_buffers", "host_peak_bytes", "host_transfer_bytes", "host_link_bytes_per_s",
    "peak_flops_per_s", "target", "limit_bytes",
    # derived (properties), last
    "flops_per_device", "transfer_seconds", "compute_seconds", "transfer_compute_ratio", "headroom_bytes",
    "fits",
)
"""The keys of :meth:`Report.to_dict` (the ``--json`` schema) in their order,
which is the order of the flat Report this one was before its groups."""
_DERIVED = _JSON_KEYS[_JSON_KEYS.index("flops_per_device"):]
_TO_JSON: dict[str, Any] = {
    "residuals": lambda rows: [{**r, "shape": list(r["shape"])} for r in rows],
    "checkpoint_names": list, "notes": list, "mesh": dict, "peak_terms": dict, "peak_residuals": dict,
    "rules": lambda rules: [[k, list(v) if isinstance(v, tuple) else v] for k, v in rules],
}
"""Per key of :meth:`Report.to_dict`: its value from ``dataclasses.asdict`` made JSON-shaped."""


@dataclasses.dataclass(frozen=True)
class Report:
    """What a compiled step costs, per device, measured without running it.

    The figures are in groups: ``report.memory`` (:class:`Memory`, bytes),
    ``report.breakdown`` (:class:`PeakBreakdown`, bytes),
    ``report.saved`` (:class:`Residuals`, bytes and counts),
    ``report.compute`` (:class:`Compute`, FLOPs and FLOP/s) and
    ``report.host_traffic`` (:class:`HostTraffic`, bytes and bytes/s). Every
    field of a group reads from the report too, by the same name
    (``report.peak_bytes`` is ``report.memory.peak_bytes``), read-only;
    :meth:`replace` takes those names.

    Every ``*_bytes`` figure is per device (one SPMD partition); ``flops`` is
    the global count and ``flops_per_device`` each device's share. Memory
    comes from XLA's ``compiled.memory_analysis()``, the residuals and FLOPs
    from the jaxpr (see :mod:`remat._analysis`), which do not depend on the
    backend.

    Attributes:
      label: what was measured, e.g. a policy spec.
      backend: the platform the step was compiled for (its arguments'
        devices), e.g. ``"cpu"``, ``"gpu"``, ``"tpu"``.
      device_kind: e.g. ``"cpu"``, ``"NVIDIA H100 80GB HBM3"``.
      jax_version: ``jax.__version__``.
      memory, saved, compute, breakdown, host_traffic: the groups above.
      trace_seconds: seconds tracing the step to a jaxpr and lowering it to StableHLO.
      compile_seconds: seconds XLA compiling.
      notes: caveats on this measurement (fallbacks, uncounted loops, a
        residual saving the compiled memory does not show).
      saving_unconfirmed: against its baseline (the step with no
        ``jax.checkpoint``), the compiled ``temp_bytes`` fall by less than half
        the residual bytes this report claims to save, or the peak is higher:
        XLA did not do what the residual rows suggest (see ``notes``).
      devices: how many devices the step runs on (its SPMD partitions).
      mesh: the device mesh, ``(axis, size)`` pairs (empty on one device).
      rules: the logical-axis rules used under the mesh.
      target: the :data:`remat.TARGETS` name compiled for (``"cpu"``: this
        host's XLA:CPU, or a function measured outside a target).
    """

    label: str
    backend: str
    device_kind: str
    jax_version: str
    memory: Memory
    saved: Residuals
    compute: Compute
    trace_seconds: float
    compile_seconds: float
    notes: tuple[str, ...] = ()
    saving_unconfirmed: bool = False
    devices: int = 1
    mesh: tuple[tuple[str, int], ...] = ()
    rules: tuple[tuple[str, Any], ...] = ()
    breakdown: PeakBreakdown = dataclasses.field(default_factory=PeakBreakdown)
    host_traffic: HostTraffic = dataclasses.field(default_factory=HostTraffic)
    target: str = "cpu"

    # The groups' fields, flat (see _Flat): the attributes of the Report before its groups.
    temp_bytes = _Flat[int | None]()
    argument_bytes = _Flat[int | None]()
    output_bytes = _Flat[int | None]()
    alias_bytes = _Flat[int | None]()
    host_temp_bytes = _Flat[int | None]()
    peak_bytes = _Flat[int]()
    peak_source = _Flat[str]()
    parameter_bytes = _Flat[int | None]()
    optimizer_bytes = _Flat[int | None]()
    batch_bytes = _Flat[int | None]()
    limit_bytes = _Flat[int | None]()
    peak_terms = _Flat[tuple[tuple[str, int], ...]]()
    peak_residuals = _Flat[tuple[tuple[str, int], ...]]()
    peak_buffers = _Flat[tuple[PeakBuffer, ...]]()
    host_peak_bytes = _Flat[int | None]()
    residuals = _Flat[tuple[ResidualRow, ...]]()
    residual_bytes = _Flat[int]()
    host_residual_bytes = _Flat[int]()
    checkpoint_names = _Flat[tuple[str, ...]]()
    dots_forward = _Flat[int]()
    dots_forward_batched = _Flat[int]()
    dots_kept = _Flat[int]()
    flops = _Flat[int]()
    recompute_flops = _Flat[int | None]()
    recompute_overhead = _Flat[float | None]()
    peak_flops_per_s = _Flat[float]()
    host_transfer_bytes = _Flat[int]()
    host_link_bytes_per_s = _Flat[float]()

    @property
    def headroom_bytes(self) -> int | None:
        """``limit_bytes - peak_bytes`` (negative: over), None without a limit."""
        return self.memory.headroom_bytes

    @property
    def fits(self) -> bool | None:
        """``peak_bytes <= limit_bytes``, None without a limit."""
        return self.memory.fits

    @property
    def flops_per_device(self) -> float:
        """``flops / devices``: each device's share of the step."""
        return self.flops / self.devices

    @property
    def transfer_seconds(self) -> float:
        """``host_transfer_bytes / host_link_bytes_per_s``: seconds the host
        link is busy per step (each direction in its own pass)."""
        return self.host_traffic.transfer_seconds

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

    def replace(self, **changes: Any) -> Report:
        """This report with fields replaced (``dataclasses.replace``), where a
        group's field may be named flat: ``report.replace(peak_bytes=1 << 30,
        flops=10**12)`` replaces ``memory.peak_bytes`` and ``compute.flops``.

        Raises:
          TypeError: a name that is neither a field nor a group's field.
        """
        by_group: dict[str, dict[str, Any]] = {}
        for name in [n for n in changes if n in _GROUP_OF]:
            by_group.setdefault(_GROUP_OF[name], {})[name] = changes.pop(name)
        for group, fields in by_group.items():
            changes[group] = dataclasses.replace(changes.get(group, getattr(self, group)), **fields)
        return dataclasses.replace(self, **changes)

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
        return self.replace(**rates)

    def to_dict(self) -> dict[str, Any]:
        """Every figure as JSON-able Python values, flat (the groups' fields
        at the top level, rows as dicts, tuples as lists), in the order of
        :data:`_JSON_KEYS`: the ``--json`` schema."""
        d = dataclasses.asdict(self)
        for group in _GROUPS:
            d.update(d.pop(group))
        d |= {k: f(d[k]) for k, f in _TO_JSON.items()}
        d |= {k: getattr(self, k) for k in _DERIVED}
        return {**{k: d.pop(k) for k in _JSON_KEYS}, **d}

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
        r = self.replace(recompute_flops=self.flops - base_flops,
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

    # Rendering: remat._summary.
    def fit_line(self) -> str:
        """``"fits, 3.2 GiB headroom"`` or ``"does not fit, 1.1 GiB over"``
        against ``limit_bytes``; ``""`` without a limit (:func:`remat._summary.fit_line`)."""
        return _summary.fit_line(self.memory)

    def transfer_line(self) -> str:
        """One line: the host traffic per step, its transfer time against the
        compute time, and whether it can hide (:func:`remat._summary.transfer_line`)."""
        return _summary.transfer_line(self)

    def summary_table(self, timings: bool = True) -> Table:
        """A two-column rich table of the memory and compute figures;
        ``timings=False`` leaves out the trace and compile times."""
        return _summary.summary_table(self, timings)

    def residual_table(self) -> Table:
        """A rich table of the residual rows (:func:`remat._summary.residual_table`)."""
        return _summary.residual_table(self)

    def peak_table(self) -> Table:
        """A rich table of the peak by term (:func:`remat._summary.peak_table`)."""
        return _summary.peak_table(self)

    def buffer_table(self) -> Table:
        """A rich table of the largest buffers live at the peak
        (:func:`remat._summary.buffer_table`)."""
        return _summary.buffer_table(self)

    def __str__(self) -> str:
        """The text rich renders (:func:`render_text`): ``print(report)`` reads as the CLI prints it."""
        return render_text(self)

    def __rich__(self) -> Group:
        """Every table and note, as a rich ``Group`` (:func:`remat._summary.report_group`)."""
        return _summary.report_group(self)


if _unaliased := sorted(set(_GROUP_OF) - {n for n, v in vars(Report).items() if isinstance(v, _Flat)}):
    raise TypeError(f"Report has no flat attribute for the group fields {_unaliased}")
