"""One workload's train step under many remat policies: the memory/compute
trade-off and its Pareto frontier, measured compile-only.

The step is a :class:`remat.Workload`'s, bound to its knobs, mesh and target
(:class:`TrainStepSetup`); for a model preset, the step ``remat train`` runs
(:func:`remat.step.lm_workload`: forward, next-token loss, gradients, the
update of :func:`remat.step.make_optimizer` on the donated abstract state),
so parameters, gradients and optimizer state all appear in the memory
figures. Each policy is traced and lowered on the main thread while the
previous one compiles on a worker thread, and policies that lower to the
same XLA program (e.g. ``minimal`` and ``dots_with_no_batch_dims_saveable``
on a model whose only unbatched matmuls are the named projections) share
one compile.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import optax
from jax.sharding import Mesh
from rich.console import Console
from rich.table import Table

from remat import _compat, models, policies as registry
from remat._analysis import Traced, compile_figures, measure
from remat._apply import PolicyLike, check_offload, label as label_of
from remat._errors import RematError
from remat._files import replaced
from remat._format import byte_unit, flop_unit, format_bytes, format_flops
from remat._jaxpr import checkpoint_names
from remat._memory import TERMS
from remat._mesh import Rules
from remat._report import HOST_LINK_BYTES_PER_S, PEAK_FLOPS_PER_S, Report, render_text
from remat._scan import policy_names, policy_parts
from remat._targets import Target, get_target, prepare_environment
from remat._workload import TrainStepSetup, Workload, bind
from remat.models.hf import defaults_note
from remat.policies import Policy
from remat.step import lm_workload

_compat.hide_frames(__file__)

__all__ = [
    "NO_NAMES", "ModelLike", "SweepResult", "as_workload", "default_policies", "inspect_policy", "no_names",
    "pareto_frontier", "plot_sweep", "sweep", "train_step_setup",
]

DEFAULT_SEQ = 2048
"""Default sequence length of a preset, capped at the model's ``max_seq_len``."""

ModelLike = str | models.ModelConfig | Workload
"""What the tools take: a preset name (or a Hugging Face ``config.json`` or
MaxText YAML path), a ``ModelConfig``, or any :class:`remat.Workload`."""


def as_workload(model: ModelLike, *, seq: int | None = None, dtype: str | None = None,
                optimizer: optax.GradientTransformation | None = None, api: str | None = None,
                rules: Rules | None = None, target: str | Target = "cpu") -> Workload:
    """``model`` as a :class:`remat.Workload`: a workload as it is; a preset
    or ``ModelConfig`` through :func:`remat.step.lm_workload` (the step
    ``remat train`` runs).

    Args:
      model: see :data:`ModelLike`.
      seq: tokens per sequence, 1..``max_seq_len``; default
        ``min(DEFAULT_SEQ, max_seq_len)``.
      dtype: compute dtype override (``"bf16"``, ``"f32"``, ``"f16"``); None keeps the preset's.
      optimizer: default :func:`remat.step.make_optimizer` ``()``.
      api: ``"linen"`` (default) or ``"nnx"``.
      rules: logical-axis rules (default :data:`remat._mesh.LOGICAL_RULES`).
      target: the default attention follows its platform.

    Raises:
      RematError: an unknown preset or api, a bad ``seq``, or one of these
        options given with a workload (it sets its own shapes and optimizer).
    """
    if isinstance(model, Workload):
        given = [k for k, v in (("seq", seq), ("dtype", dtype), ("optimizer", optimizer), ("api", api),
                                ("rules", rules)) if v is not None]
        if given:
            raise RematError(f"{', '.join(given)} set a model preset's step; workload {model.name!r} builds "
                             "its own: leave them out")
        return model
    config = models.get_config(model) if isinstance(model, str) else model
    if not isinstance(config, models.ModelConfig):
        raise RematError(f"model={model!r}: give a preset name, a ModelConfig or a remat.Workload")
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype)
    workload = lm_workload(config, seq=min(DEFAULT_SEQ, config.max_seq_len) if seq is None else seq,
                           name=model if isinstance(model, str) else "custom config", optimizer=optimizer,
                           api=api or "linen", rules=rules, platform=get_target(target).platform)
    is_file = isinstance(model, str) and model.endswith((".json", ".yml", ".yaml"))
    note = defaults_note(model) if is_file else None
    return dataclasses.replace(workload, notes=(note,)) if note else workload


def train_step_setup(model: ModelLike, *, batch: int | None = None, seq: int | None = None,
                     dtype: str | None = None, groups: Any = None,
                     optimizer: optax.GradientTransformation | None = None,
                     mesh: Mesh | Mapping[str, int] | None = None,
                     rules: Rules | None = None, loss_chunks: int | None = None,
                     microbatches: int | None = None, api: str | None = None, target: str | Target = "cpu",
                     attention: str | None = None, mem_fraction: float | None = None) -> TrainStepSetup:
    """Bind a model's train step to its knobs, mesh and target (nothing
    allocated): :func:`as_workload`, then :func:`remat._workload.bind`.

    Args:
      model: a preset name, a ``ModelConfig`` or a :class:`remat.Workload`.
      batch: global examples per step (default: the workload's; 1 for a preset).
      seq, dtype, optimizer, api, rules: a preset's options (:func:`as_workload`).
      groups: ``None``, ``(G, K)`` or ``"sqrt"`` (see :func:`remat.scan_layers`).
      mesh: a ``jax.sharding.Mesh`` with axes ``data``/``fsdp``/``tensor``, or
        their sizes (``{"fsdp": 8}``; see :func:`remat._mesh.make_mesh`);
        None for one device.
      loss_chunks: compute the loss head in this many chunks; None keeps the config's.
      microbatches: accumulate gradients over this many micro-batches of
        ``batch / microbatches`` examples (:func:`remat.step.make_train_step`).
      target: a :data:`remat.TARGETS` name or :class:`remat.Target`: compile
        for its devices (``mesh`` then counts devices of that target; a GPU
        target compiles deviceless, on this host's CPU, with ``remat[gpu]``);
        ``"cpu"`` is this host.
      attention: the model's attention (``ModelConfig.attention``: ``"xla"``,
        ``"dot_product_attention"``, ``"cudnn"`` or ``"pallas"``); None: the
        config's, except on a GPU or TPU target where a flash attention
        kernel takes the model (:func:`remat.step.default_attention`).
      mem_fraction: the fraction of device memory the runtime may allocate
        (None: the target's default, JAX's 0.75 on a GPU).

    Raises:
      RematError: unknown preset, api or target (the message lists them), a
        bad batch or ``seq``, a mesh that does not match the device count, a
        batch the micro-batches and the mesh cannot split evenly, or a knob
        the workload never reads.
    """
    tgt = get_target(target)
    prepare_environment(tgt)  # before the first JAX computation starts its backends
    w = as_workload(model, seq=seq, dtype=dtype, optimizer=optimizer, api=api, rules=rules, target=tgt)
    return bind(w, mesh=mesh, target=tgt, mem_fraction=mem_fraction, batch=batch, microbatches=microbatches,
                groups=groups, loss_chunks=loss_chunks, attention=attention)


def never_kept(policy: PolicyLike, report: Report) -> Report:
    """``report`` with a note naming each checkpoint name of ``policy`` that
    the step emits but never keeps for the backward pass (JAX drops a value
    the backward pass does not read, e.g. ``mlpwo``, whose only use is an
    addition, whatever the policy says).

    Only for steps without nested groups: under groups, what a layer keeps
    while its group is recomputed is transient and not in the residual rows
    (the check at first trace, on one layer, covers that case)."""
    kept = {r.name for r in report.residuals if r.source == "checkpoint_name"}
    never = sorted((policy_names(policy) & set(report.checkpoint_names)) - kept)
    if not never:
        return report
    it = "it" if len(never) == 1 else "them"
    note = (f"{', '.join(never)}: named by the policy and emitted, but never kept (the backward pass never "
            f"reads {it}, so JAX drops {it} whatever the policy says)")
    return dataclasses.replace(report, notes=(*report.notes, note))


def inspect_policy(s: TrainStepSetup | ModelLike, policy: PolicyLike, *,
                   compiler_options: dict[str, Any] | None = None) -> Report:
    """The :class:`Report` of ``s``'s train step under ``policy``, measured
    against the step with no ``jax.checkpoint`` at all (compiled too, unless
    it is the same program), with a note for each name of the policy that is
    never kept (:func:`never_kept`). ``policy`` may be a JAX policy callable,
    applied as it is (a note says when remat cannot check it). On a GPU
    target, a step that does not fit the usable memory with XLA:GPU's own
    rematerialization pass off (the default) is compiled once more with it
    on, and a note says whether the pass would make it fit.

    Raises:
      remat.policies.PolicySpecError / UnknownPolicyError: a bad spec.
      remat.MissingCheckpointNameError: the policy names a tag the model does not emit.
      remat.OffloadUnsupportedError: an offload on a backend that cannot
        offload (:func:`remat._apply.check_offload`).

    ``s`` is a :class:`TrainStepSetup` (a workload bound to its knobs, mesh
    and target: :func:`train_step_setup`), or a model or :class:`remat.Workload`
    taken with its defaults on one CPU device.
    """
    if not isinstance(s, TrainStepSetup):
        s = train_step_setup(s)
    label = label_of(policy)
    for part in policy_parts(policy):
        check_offload(part.policy, s.device())
    t = s.trace(policy, label)
    report = s.finish(measure(t, *compile_figures(t, compiler_options)))
    b = s.baseline()
    base = report if b.program == t.program else measure(b, *compile_figures(b, compiler_options))
    report = no_names(report.with_baseline(base))
    if report.fits is False and report.backend == "gpu" and compiler_options is None:
        with_pass = s.finish(measure(t, *compile_figures(t, {})))
        verdict = ("fits only with it" if with_pass.fits else "does not fit even with it")
        report = dataclasses.replace(report, notes=(
            *report.notes, f"with XLA:GPU's own rematerialization pass on (--xla-remat) the peak is "
                           f"{format_bytes(with_pass.peak_bytes)}: {verdict} (the pass recomputes values "
                           "the policy keeps; train with the setting you measured)"))
    return report if s.groups else never_kept(policy, report)


NO_NAMES = ("the step emits no checkpoint name (jax.ad_checkpoint.checkpoint_name): only none, full and the "
            "dots rules apply; tag the values worth saving to choose among them")
"""The note of a step that emits no checkpoint name."""


def no_names(report: Report) -> Report:
    """``report`` with :data:`NO_NAMES` where its step emits no checkpoint name."""
    if report.checkpoint_names:
        return report
    return dataclasses.replace(report, notes=(*report.notes, NO_NAMES))


def shape_text(batch: int | None, seq: int | None) -> str:
    """``", batch 8 x seq 512"``, ``", batch 8"``, or "" (what a title says of the shapes)."""
    parts = [f"batch {batch}"] if batch is not None else []
    parts += [f"seq {seq}"] if seq is not None else []
    return (", " + " x ".join(parts)) if parts else ""


def default_policies(emitted: Sequence[str], offload: bool = True) -> list[str]:
    """Every registered preset that applies to a model emitting the checkpoint
    names ``emitted`` (``vocab.missing_names`` of its saved/offloaded names is
    empty), one name per distinct :class:`Policy` value (registry order: the
    first name of equal policies wins, e.g. ``full`` over ``save_nothing``),
    without ``everything_saveable``: it keeps what ``none`` keeps (a
    ``jax.checkpoint`` that saves every residual), so it would cost one more
    compile for a point on top of ``none``'s; sweep it by name. With
    ``offload=False``, none that offloads.
    """
    seen: set[Policy] = set()
    out = []
    for name in registry.names():
        p = registry.get(name)
        if p in seen or p.everything or registry.vocab.missing_names(p.names, frozenset(emitted)) or (
                p.offloads and not offload):
            continue
        seen.add(p)
        out.append(name)
    return out


def pareto_frontier(reports: Sequence[Report], rtol: float = 1e-3) -> tuple[int, ...]:
    """Indices of the reports that no other beats on ``peak_bytes`` and
    ``flops`` (lower is better: at least as good on both, better on one), by
    peak bytes. Differences below ``rtol`` (relative; default 0.1%) count as
    ties, so a few bytes of compiler noise do not put a policy that costs far
    more FLOPs on the frontier."""

    def better(a: float, b: float) -> bool:
        return a < b * (1 - rtol)

    def no_worse(a: float, b: float) -> bool:
        return a <= b * (1 + rtol)

    idx = [i for i, r in enumerate(reports) if not any(
        no_worse(o.peak_bytes, r.peak_bytes) and no_worse(o.flops, r.flops)
        and (better(o.peak_bytes, r.peak_bytes) or better(o.flops, r.flops)) for o in reports)]
    return tuple(sorted(idx, key=lambda i: (reports[i].peak_bytes, reports[i].flops)))


DROPPED_FIRST = ("transfer/compute", "on host", "temp", "headroom", "residuals", "FLOPs")
"""The columns :meth:`SweepResult.table` leaves out, in this order, to fit a width
(the policy, its peak and recompute always stay)."""


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """A model's train step under several policies.

    Attributes:
      model: preset name (or config repr).
      batch: sequences per step.
      seq: tokens per sequence.
      reports: one :class:`Report` per policy, in the order asked, each with
        ``recompute_overhead`` against ``"none"``.
      frontier: indices into ``reports`` on the Pareto frontier (peak bytes
        vs FLOPs), by peak bytes.
      wall_seconds: the whole sweep, setup included.
      notes: what the sweep left out and why (e.g. the offload presets on a
        target whose devices cannot offload).
      same_cost: indices into ``reports`` grouped by identical figures (peak,
        temporaries, residuals on device and host, FLOPs): policies that cost
        the same, e.g. ``full`` and ``save_iteration_input``, or two that lower
        to one XLA program, are one table row and one plot point. Empty: every
        report its own group.
    """

    model: str
    batch: int
    seq: int
    reports: tuple[Report, ...]
    frontier: tuple[int, ...]
    wall_seconds: float
    same_cost: tuple[tuple[int, ...], ...] = ()
    notes: tuple[str, ...] = ()

    def groups(self) -> list[tuple[int, ...]]:
        """The report indices per cost (see ``same_cost``), sorted by peak
        bytes then FLOPs."""
        groups = list(self.same_cost) or [(i,) for i in range(len(self.reports))]
        return sorted(groups, key=lambda g: (self.reports[g[0]].peak_bytes, self.reports[g[0]].flops))

    def group_label(self, group: Sequence[int]) -> str:
        """The policies of one group, e.g. ``"full = save_iteration_input"``."""
        return " = ".join(self.reports[i].label for i in group)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the fields, reports via :meth:`Report.to_dict`, frontier as labels."""
        return {"model": self.model, "batch": self.batch, "seq": self.seq,
                "wall_seconds": self.wall_seconds, "notes": list(self.notes),
                "frontier": [self.reports[i].label for i in self.frontier],
                "same_cost": [[self.reports[i].label for i in g] for g in self.groups()],
                "reports": [r.to_dict() for r in self.reports]}

    def with_rates(self, host_link_bytes_per_s: float | None = None,
                   peak_flops_per_s: float | None = None) -> SweepResult:
        """Every report :meth:`Report.with_rates`."""
        reports = tuple(r.with_rates(host_link_bytes_per_s, peak_flops_per_s) for r in self.reports)
        return dataclasses.replace(self, reports=reports)

    def __rich_console__(self, console: Any, options: Any) -> Any:
        """rich prints the table fitted to the console's width (:meth:`table`)."""
        yield self.table(width=options.max_width)

    def __str__(self) -> str:
        """The text rich renders: ``print(result)`` reads as ``remat sweep`` prints it."""
        return render_text(self)

    def table(self, timings: bool = True, width: int | None = None) -> Table:
        """A rich table sorted by peak bytes, one row per cost (policies that
        cost the same joined by ``=``); frontier rows marked ``*``.
        ``timings=False`` leaves the wall time out of the title (output that
        is the same on every machine, as the committed notebooks need).
        ``width``: the columns to fit; columns are left out in the order of
        :data:`DROPPED_FIRST` until the table fits (the caption says which),
        and a policy name too long for its column folds, never cut."""
        n = len(self.reports)
        mesh = self.reports[0].mesh if self.reports else ()
        r0 = self.reports[0] if self.reports else None
        link, peak = ((r0.host_link_bytes_per_s, r0.peak_flops_per_s) if r0
                      else (HOST_LINK_BYTES_PER_S, PEAK_FLOPS_PER_S))
        on = (" on mesh " + ",".join(f"{a}={k}" for a, k in mesh if k > 1)) if mesh else ""
        title = (f"remat sweep: {self.model}{shape_text(self.batch, self.seq)}{on} "
                 f"({n} policies{f', {self.wall_seconds:.1f} s' if timings else ''})")
        caption = ("* = Pareto frontier (no other policy is as good on peak memory and FLOPs "
                   "and better on one, by more than 0.1%); ! = the compiled memory does not show the "
                   "residual saving (see the report's notes); recompute against no jax.checkpoint; "
                   "memory per device, compile-only; transfer/compute = host traffic time over "
                   f"compute time at {link / 1e9:.3g} GB/s and {peak / 1e12:.4g} TFLOP/s (above 1: "
                   "the offload cannot hide)")
        limit = r0.limit_bytes if r0 else None
        if limit is not None:
            title += f"\ntarget {r0.target} ({r0.device_kind}): {format_bytes(limit)} usable per device"
            caption += "; x = does not fit the usable memory"
        if any(r.peak_source == "out-of-memory error" for r in self.reports):
            caption += ("; >= = the compiler refused the step for lack of memory: the need its message "
                        "states")
        for note in self.notes:
            caption += f"; {note}"
        columns = [c for c in ("", "policy", "peak", "headroom", "temp", "residuals", "on host",
                               "transfer/compute", "FLOPs", "recompute")
                   if c != "headroom" or limit is not None]
        front, rows = set(self.frontier), []
        for group in self.groups():
            r, on_front = self.reports[group[0]], bool(front & set(group))
            refused = ">= " if r.peak_source == "out-of-memory error" else ""
            rows.append((on_front, {
                "": ("*" if on_front else "") + ("!" if r.saving_unconfirmed else "") + (
                    "x" if r.fits is False else ""),
                "policy": self.group_label(group), "peak": refused + format_bytes(r.peak_bytes),
                "headroom": format_bytes(r.headroom_bytes), "temp": format_bytes(r.temp_bytes),
                "residuals": format_bytes(r.residual_bytes),
                "on host": format_bytes(r.host_residual_bytes) if r.host_residual_bytes else "-",
                "transfer/compute": f"{r.transfer_compute_ratio:.2f}" if r.host_transfer_bytes else "-",
                "FLOPs": format_flops(r.flops),
                "recompute": "-" if r.recompute_overhead is None else f"{r.recompute_overhead:+.1%}"}))

        longest = max((len(cells["policy"]) for _, cells in rows), default=6)

        def build(shown: list[str], note: str) -> Table:
            t = Table(title=title, caption=caption + note)
            for col in shown:
                t.add_column(col, justify="center" if col == "" else "left" if col == "policy" else "right",
                             overflow="fold", no_wrap=col != "policy",
                             min_width=min(longest, 24) if col == "policy" else None)
            for on_front, cells in rows:
                t.add_row(*(cells[c] for c in shown), style="bold" if on_front else None)
            return t

        t = build(columns, "")
        dropped: list[str] = []
        for col in DROPPED_FIRST:
            if width is None or Console(width=10**4).measure(t).maximum <= width:  # the width it wants
                break
            if col in columns:
                dropped.append(col)
                t = build([c for c in columns if c not in dropped],
                          f"; left out to fit {width} columns: {', '.join(dropped)}")
        return t


def sweep(model: ModelLike | TrainStepSetup, policies: Sequence[PolicyLike] | None = None,
          *, batch: int | None = None, seq: int | None = None, dtype: str | None = None, groups: Any = None,
          mesh: Mesh | Mapping[str, int] | None = None, rules: Rules | None = None,
          loss_chunks: int | None = None, microbatches: int | None = None, api: str | None = None,
          target: str | Target = "cpu", attention: str | None = None, mem_fraction: float | None = None,
          workers: int = 2, compiler_options: dict[str, Any] | None = None,
          on_report: Callable[[Report, int, int], None] | None = None) -> SweepResult:
    """Measure a model's train step under many policies (compile-only).

    ``"none"`` is traced first (always: it is the baseline of
    ``recompute_overhead`` and gives the checkpoint names the model emits);
    then each policy is traced and lowered on this thread and compiled on a
    pool of ``workers`` threads.

    Args:
      model: a preset name, a ``ModelConfig``, a :class:`remat.Workload`, or
        a :class:`TrainStepSetup` (then the options below are ignored).
      policies: preset names, spec strings, Policies or JAX policy callables
        (applied as they are; one remat cannot check gets a note in its
        report); default :func:`default_policies` of the model.
      batch, seq, dtype, groups, mesh, rules, loss_chunks, microbatches: see
        :func:`train_step_setup`.
      api, target, attention, mem_fraction: see :func:`train_step_setup`.
      workers: compile threads (>= 1).
      compiler_options: see :func:`remat.analyze`.
      on_report: called as ``on_report(report, done, total)`` with each finished
        report (e.g. to advance a progress bar).

    Returns:
      A :class:`SweepResult`.

    Raises:
      RematError: ``workers < 1``, an empty or duplicated policy list, and the errors of
        :func:`train_step_setup`.
      remat.policies.PolicySpecError / UnknownPolicyError: a bad spec.
      remat.MissingCheckpointNameError: a policy names a tag the model does not emit.
    """
    t0 = time.perf_counter()
    if workers < 1:
        raise RematError(f"workers={workers} must be >= 1")
    s = model if isinstance(model, TrainStepSetup) else train_step_setup(
        model, batch=batch, seq=seq, dtype=dtype, groups=groups, mesh=mesh, rules=rules,
        loss_chunks=loss_chunks, microbatches=microbatches, api=api, target=target, attention=attention,
        mem_fraction=mem_fraction)
    if policies is not None:  # bad input fails before any trace or compile
        labels = [label_of(p) for p in policies]
        if not labels:
            raise RematError("no policies to sweep")
        if len(set(labels)) != len(labels):
            raise RematError(f"duplicated policies in {labels}")
        for p in policies:
            for part in policy_parts(p):
                check_offload(part.policy, s.device())
    base = s.baseline()
    notes: list[str] = []
    emitted = sorted(checkpoint_names(base.traced.jaxpr))
    if not emitted:
        notes.append(NO_NAMES)
    if policies is None:
        offload = s.can_offload()
        policies = default_policies(emitted, offload=offload)
        if not offload:
            notes.append(f"offload presets left out: the {s.target.name} devices cannot offload to host "
                         "memory (inspect an offload policy to see why)")
    labels = [label_of(p) for p in policies]

    reports: list[Report | None] = [None] * len(labels)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        programs: dict[str, tuple[Future, str]] = {}  # lowered program hash -> (its compile, first label)

        def submit(t: Traced) -> tuple[Future, str | None]:
            if t.program in programs:
                return programs[t.program]
            f = programs[t.program] = (pool.submit(compile_figures, t, compiler_options), t.label)
            return f[0], None

        base_compile, _ = submit(base)
        pending: list[tuple[int, Traced, Future, str | None]] = []
        base_report: list[Report] = []

        def collect(i: int, t: Traced, f: Future, same_as: str | None) -> None:
            if not base_report:
                base_report.append(s.finish(measure(base, *base_compile.result())))
            compiled, seconds, dump = f.result()
            r = s.finish(measure(t, compiled, 0.0 if same_as else seconds, dump))
            r = r.with_baseline(base_report[0])
            if same_as:
                r = dataclasses.replace(r, notes=(*r.notes, f"the same XLA program as {same_as!r}: "
                                                  "its compile was reused"))
            reports[i] = r if s.groups else never_kept(policies[i], r)
            if on_report is not None:
                on_report(r, sum(x is not None for x in reports), len(reports))

        for i, (p, label) in enumerate(zip(policies, labels, strict=True)):
            t = s.trace(p, label)
            f, same_as = submit(t)
            pending.append((i, t, f, same_as))
            while pending and pending[0][2].done():
                collect(*pending.pop(0))
        for item in pending:
            collect(*item)
    done = tuple(r for r in reports if r is not None)
    by_cost: dict[tuple, list[int]] = {}
    for i, r in enumerate(done):
        cost = (r.peak_bytes, r.temp_bytes, r.residual_bytes, r.host_residual_bytes, r.flops)
        by_cost.setdefault(cost, []).append(i)
    return SweepResult(s.workload.name, s.batch, s.seq, done, pareto_frontier(done), time.perf_counter() - t0,
                       tuple(tuple(g) for g in by_cost.values()), tuple(notes))


def plot_sweep(result: SweepResult, path: str | None = None) -> Any:
    """Peak memory per device against FLOPs, in the units the data reads best
    in (MiB, GiB, ...; GFLOP, TFLOP, ...), one numbered point
    per cost (policies that cost the same share it; the key beside the axes
    lists them), the Pareto frontier drawn as a step line; beside it, where
    the reports have the peak by term (``Report.peak_terms``), the terms of
    each numbered point's peak as stacked bars. Uses matplotlib's Agg backend.

    Args:
      result: from :func:`sweep`.
      path: save the figure there (format from the extension: .png, .svg, .pdf).

    Returns:
      The ``matplotlib.figure.Figure``.
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    from matplotlib.lines import Line2D

    groups = result.groups()
    with_terms = all(result.reports[g[0]].peak_terms for g in groups)
    fig = Figure(figsize=(16 if with_terms else 11, 6), layout="constrained")
    ax = fig.add_subplot(1, 2 if with_terms else 1, 1)
    if with_terms:
        _plot_terms(fig.add_subplot(1, 2, 2), [result.reports[g[0]] for g in groups])
    front = set(result.frontier)
    on_front = [bool(front & set(g)) for g in groups]
    mem_unit, mem_size = byte_unit(max(result.reports[g[0]].peak_bytes for g in groups))
    flop_name, flop_size = flop_unit(max(result.reports[g[0]].flops for g in groups))
    gib = [result.reports[g[0]].peak_bytes / mem_size for g in groups]
    tflop = [result.reports[g[0]].flops / flop_size for g in groups]
    ax.scatter([x for x, f in zip(gib, on_front, strict=True) if not f],
               [y for y, f in zip(tflop, on_front, strict=True) if not f], color="tab:gray", label="policy")
    ax.scatter([x for x, f in zip(gib, on_front, strict=True) if f],
               [y for y, f in zip(tflop, on_front, strict=True) if f], color="tab:red", zorder=3,
               label="Pareto frontier")
    ax.step([x for x, f in zip(gib, on_front, strict=True) if f],
            [y for y, f in zip(tflop, on_front, strict=True) if f], where="post", color="tab:red", alpha=0.6)
    # Numbers at the points and a numbered key beside the axes, so no label overlaps another.
    for k, (x, y) in enumerate(zip(gib, tflop, strict=True), start=1):
        ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    key = [Line2D([], [], linestyle="none", marker=f"${k}$", color="black")
           for k in range(1, len(groups) + 1)]
    fig.legend(key, [result.group_label(g) for g in groups], loc="outside right upper", fontsize=7,
               title="policies (same cost: one point)", title_fontsize=8)
    ax.set_xlabel(f"peak memory per device ({mem_unit})")
    ax.set_ylabel(f"train step FLOPs ({flop_name})")
    ax.set_title(f"{result.model}{shape_text(result.batch, result.seq)}, "
                 f"{result.reports[0].backend} compile-only")
    ax.grid(alpha=0.3)
    ax.legend()
    if path is not None:
        with replaced(path) as tmp:  # whole or not at all
            fig.savefig(tmp, dpi=120)
    return fig


def _plot_terms(ax: Any, reports: Sequence[Report]) -> None:
    """The peak by term of each report as one stacked bar, numbered as the points."""
    x = np.arange(1, len(reports) + 1)
    bottom = np.zeros(len(reports))
    unit, size = byte_unit(max(r.peak_bytes for r in reports))
    for term in TERMS:
        gib = np.array([dict(r.peak_terms).get(term, 0) / size for r in reports])
        if gib.any():
            ax.bar(x, gib, bottom=bottom, label=term)
            bottom += gib
    ax.set_xticks(x)
    ax.set_xlabel("policy (numbered as in the key)")
    ax.set_ylabel(f"peak memory per device ({unit})")
    ax.set_title("the peak by term")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
