"""One model's train step under many remat policies: the memory/compute
trade-off and its Pareto frontier, measured compile-only.

The step is :func:`remat.step.make_train_step` (forward, next-token loss,
gradients, the update of :func:`remat.step.make_optimizer`, as ``remat train``
runs it) on the abstract state of ``jax.eval_shape(remat.step.init_train_state,
...)``, donated, so parameters,
gradients and optimizer state all appear in the memory figures. The abstract
state is built once and reused for every policy; each policy is traced and
lowered on the main thread while the previous one compiles on a worker thread,
and policies that lower to the same XLA program (e.g. ``minimal`` and
``dots_with_no_batch_dims_saveable`` on a model whose only unbatched matmuls
are the named projections) share one compile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from rich.table import Table

from remat import _compat, models
from remat import policies as registry
from remat._analysis import (
    Traced,
    analyze,
    compile_figures,
    device_bytes,
    measure,
    trace,
    trace_without_remat,
)
from remat._apply import OffloadUnsupportedError, PolicyLike, check_offload
from remat._apply import label as label_of
from remat._errors import RematError
from remat._format import format_bytes, format_flops
from remat._jaxpr import checkpoint_names
from remat._memory import TERMS
from remat._mesh import (
    LOGICAL_RULES,
    Rules,
    batch_sharding,
    check_batch,
    make_mesh,
    mesh_context,
    replicated,
    sharded_abstract,
)
from remat._report import HOST_LINK_BYTES_PER_S, PEAK_FLOPS_PER_S, Report
from remat._scan import policy_names, segment_policies
from remat._targets import TARGETS, Target, get_target, prepare_environment, target_mesh
from remat.models.layers import PALLAS_BLOCK
from remat.models.nnx import check_api, model_for_api
from remat.policies import Policy
from remat.step import init_train_state, make_optimizer, make_train_step

_compat.hide_frames(__file__)

__all__ = [
    "SweepResult", "TrainStepSetup", "default_policies", "inspect_policy", "pareto_frontier", "plot_sweep",
    "sweep", "trace_policy", "train_step_setup",
]

DEFAULT_SEQ = 2048
"""Default sequence length, capped at the model's ``max_seq_len``."""


@dataclasses.dataclass(frozen=True)
class TrainStepSetup:
    """The abstract inputs of one model's train step, shared by every policy.

    Attributes:
      config: the model config.
      batch: sequences per step (B), global (over all devices).
      seq: tokens per sequence (T).
      groups: nested-checkpointing groups passed to :class:`remat.models.Transformer`.
      state: the abstract ``TrainState`` (``jax.ShapeDtypeStruct`` leaves:
        float params, AdamW ``mu``/``nu``, step counts; under a mesh each with
        its ``NamedSharding``).
      tokens: ``ShapeDtypeStruct(int32[B, T])``, the batch sharded under a mesh.
      rng: a PRNG key (dropout; unused when deterministic), abstract under a mesh.
      mesh: the device mesh, or None for one device.
      rules: the logical-axis rules under the mesh (:data:`remat._mesh.LOGICAL_RULES`).
      out_shardings: the step's output shardings under a mesh: the state as
        its input, the metrics replicated.
      microbatches: gradient accumulation over this many micro-batches
        (:func:`remat.step.make_train_step`).
      api: the Flax API the model is built in, ``"linen"`` or ``"nnx"``
        (:func:`remat.models.nnx.model_for_api`); the state is the same.
      target: what the step is compiled for (:class:`remat.Target`; ``cpu``
        is this host's XLA:CPU).
      mem_fraction: the fraction of the target's memory the runtime may
        allocate (None: the target's default); see :meth:`remat.Target.usable_bytes`.
    """

    config: models.ModelConfig
    batch: int
    seq: int
    groups: Any
    state: Any
    tokens: jax.ShapeDtypeStruct
    rng: Any
    mesh: Mesh | None = None
    rules: Rules = LOGICAL_RULES
    out_shardings: Any = None
    microbatches: int = 1
    api: str = "linen"
    target: Target = TARGETS["cpu"]
    mem_fraction: float | None = None

    def device(self) -> jax.Device:
        """A device the step is compiled for (the mesh's, else JAX's default)."""
        return self.mesh.devices.flat[0] if self.mesh is not None else jax.devices()[0]

    def can_offload(self) -> bool:
        """Whether the target's devices can offload residuals to host memory
        (:func:`remat._apply.check_offload`: its memories and a probe compile)."""
        try:
            check_offload(registry.get("minimal_offloaded"), self.device())
        except OffloadUnsupportedError:
            return False
        return True

    def step_args(self) -> tuple[Any, jax.ShapeDtypeStruct, Any]:
        """``(state, tokens, rng)`` for ``make_train_step(model)``."""
        return self.state, self.tokens, self.rng

    def model(self, policy: str | Policy) -> Any:
        """The model under ``policy``, in :attr:`api` (behind linen's ``init``/``apply``)."""
        return model_for_api(self.config, policy=policy, groups=self.groups, api=self.api)

    def step(self, policy: str | Policy) -> Any:
        """The train step under ``policy`` as ``remat train`` runs it (:func:`remat.step.make_train_step`)."""
        return make_train_step(self.model(policy), microbatches=self.microbatches)

    def context(self) -> contextlib.AbstractContextManager[Any]:
        """Where the step is traced: under the mesh and the logical-axis rules
        (:func:`remat._mesh.mesh_context`)."""
        return mesh_context(self.mesh, self.rules)

    def argument_split(self) -> dict[str, int]:
        """Bytes per device of the step's arguments: ``parameter_bytes``,
        ``optimizer_bytes`` (the optimizer state) and ``batch_bytes``."""
        return {"parameter_bytes": device_bytes(self.state.params),
                "optimizer_bytes": device_bytes(self.state.opt_state),
                "batch_bytes": device_bytes(self.tokens)}

    def finish(self, report: Report) -> Report:
        """``report`` with what the setup knows: the mesh, the rules, the
        argument split and the target (its name, usable memory and rates)."""
        mesh = tuple(self.mesh.shape.items()) if self.mesh is not None else ()
        t = self.target
        return dataclasses.replace(
            report, mesh=mesh, rules=tuple(self.rules) if mesh else (), target=t.name,
            limit_bytes=t.usable_bytes(self.mem_fraction), peak_flops_per_s=t.peak_flops_per_s,
            host_link_bytes_per_s=t.host_link_bytes_per_s, **self.argument_split())


def train_step_setup(model: str | models.ModelConfig, *, batch: int = 1, seq: int | None = None,
                     dtype: str | None = None, groups: Any = None,
                     optimizer: optax.GradientTransformation | None = None,
                     mesh: Mesh | Mapping[str, int] | None = None,
                     rules: Rules | None = None, loss_chunks: int | None = None,
                     microbatches: int = 1, api: str = "linen", target: str | Target = "cpu",
                     attention: str | None = None, mem_fraction: float | None = None) -> TrainStepSetup:
    """Build the abstract train-step inputs for a model (nothing allocated).

    Args:
      model: a preset name (:func:`remat.models.names`) or a ``ModelConfig``.
      batch: sequences per step, >= 1 (global: over all devices).
      seq: tokens per sequence, 1..``max_seq_len``; default
        ``min(DEFAULT_SEQ, max_seq_len)``.
      dtype: compute dtype override (``"bf16"``, ``"f32"``, ``"f16"``); None keeps the preset's.
      groups: ``None``, ``(G, K)`` or ``"sqrt"`` (see :func:`remat.scan_layers`).
      optimizer: default :func:`remat.step.make_optimizer` ``()``, the optimizer
        ``remat train`` trains with (clipping, AdamW with its schedule and
        weight-decay mask), so what is measured is what trains.
      mesh: a ``jax.sharding.Mesh`` with axes ``data``/``fsdp``/``tensor``, or
        their sizes (``{"fsdp": 8}``; see :func:`remat._mesh.make_mesh`);
        None for one device.
      rules: logical-axis rules (default :data:`remat._mesh.LOGICAL_RULES`).
      loss_chunks: compute the loss head in this many chunks
        (``ModelConfig.loss_chunks``); None keeps the config's.
      microbatches: accumulate gradients over this many micro-batches of
        ``batch / microbatches`` sequences (:func:`remat.step.make_train_step`).
      api: ``"linen"`` or ``"nnx"``: the Flax API of the model the step runs
        (:func:`remat.models.nnx.model_for_api`; the parameters and their
        layout are the same).
      target: a :data:`remat.TARGETS` name or :class:`remat.Target`: compile
        for its devices (``mesh`` then counts devices of that target; a GPU
        target compiles deviceless, on this host's CPU, with ``remat[gpu]``);
        ``"cpu"`` is this host.
      attention: the model's attention (``ModelConfig.attention``: ``"xla"``,
        ``"dot_product_attention"``, ``"cudnn"`` or ``"pallas"``); None keeps
        the config's, except on a GPU or TPU target where a flash attention
        kernel takes the model (:func:`default_attention`): the kernel
        follows the target, not the host.
      mem_fraction: the fraction of device memory the runtime may allocate
        (None: the target's default, JAX's 0.75 on a GPU).

    Raises:
      RematError: unknown preset, api or target (the message lists them), ``batch < 1``,
        ``seq`` outside ``1..max_seq_len``, a mesh that does not match the
        device count, or a batch the micro-batches and the mesh cannot split evenly.
    """
    config = models.get_config(model) if isinstance(model, str) else model
    tgt = get_target(target)
    prepare_environment(tgt)  # before the first JAX computation below starts its backends
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype)
    if loss_chunks is not None:
        config = dataclasses.replace(config, loss_chunks=loss_chunks)
    if seq is None:
        seq = min(DEFAULT_SEQ, config.max_seq_len)
    config = dataclasses.replace(config, attention=attention or default_attention(config, tgt, seq))
    tgt.usable_bytes(mem_fraction)  # checks the fraction
    if batch < 1:
        raise RematError(f"batch={batch} must be >= 1")
    if not 1 <= seq <= config.max_seq_len:
        raise RematError(f"seq={seq} must be in 1..{config.max_seq_len} (the model's max_seq_len)")
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    rng = jax.random.key(0)
    check_api(api)
    init_model = models.Transformer(config, policy="full", groups=groups)
    tx = optimizer if optimizer is not None else make_optimizer()
    init = lambda t, k: init_train_state(init_model, tx, t, k)
    if mesh is None and tgt.platform == "cpu":
        check_batch(batch, None, microbatches=microbatches)
        return TrainStepSetup(config, batch, seq, groups, jax.eval_shape(init, tokens, rng), tokens, rng,
                              microbatches=microbatches, api=api, target=tgt, mem_fraction=mem_fraction)
    if tgt.platform == "cpu" or isinstance(mesh, Mesh):
        mesh = make_mesh(mesh)  # type: ignore[arg-type]
    else:
        mesh = target_mesh(tgt, mesh or {})
    rules = tuple(rules if rules is not None else LOGICAL_RULES)
    check_batch(batch, mesh, rules, microbatches)
    state, state_shardings = sharded_abstract(init, tokens, rng, mesh=mesh, rules=rules)
    whole = replicated(mesh)
    tokens = jax.ShapeDtypeStruct(tokens.shape, tokens.dtype, sharding=batch_sharding(mesh, rules))
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: rng).dtype, sharding=whole)
    return TrainStepSetup(config, batch, seq, groups, state, tokens, key, mesh, rules,
                          (state_shardings, whole), microbatches, api, tgt, mem_fraction)


def default_attention(config: models.ModelConfig, target: Target, seq: int) -> str:
    """The attention a model gets on ``target`` unless one is asked for:
    ``"cudnn"`` (flash attention) on a GPU target where cuDNN takes the
    model (bf16 or f16, no attention dropout, head_dim a multiple of 8 and
    at most 128); ``"pallas"`` (JAX's Pallas TPU flash attention) on a TPU
    target where it takes the model (no attention dropout, ``seq`` a
    multiple of :data:`remat.models.layers.PALLAS_BLOCK`); else the config's own."""
    no_dropout = config.attn_dropout == 0
    if target.platform == "gpu" and no_dropout and config.dtype in (jnp.bfloat16, jnp.float16) \
            and config.head_dim % 8 == 0 and config.head_dim <= 128:
        return "cudnn"
    if target.platform == "tpu" and no_dropout and seq % PALLAS_BLOCK == 0:
        return "pallas"
    return config.attention


def trace_policy(s: TrainStepSetup, policy: PolicyLike, label: str) -> Traced:
    """Trace and lower ``s``'s train step under ``policy`` (in ``s.context()``)."""
    with s.context():
        return trace(s.step(policy), s.step_args(), {}, label, donate_argnums=0,
                     out_shardings=s.out_shardings)


def _baseline(s: TrainStepSetup) -> Traced:
    """The train step with no ``jax.checkpoint`` at all (not even the groups'
    of a grouped ``"none"``): the baseline of every overhead."""
    with s.context():
        return trace_without_remat(s.step("full"), s.step_args(), {}, donate_argnums=0,
                                   out_shardings=s.out_shardings)


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


def inspect_policy(s: TrainStepSetup, policy: PolicyLike, *,
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
    """
    label = label_of(policy)
    for p in segment_policies(policy):
        check_offload(p, s.device())
    with s.context():
        report = s.finish(analyze(s.step(policy), *s.step_args(), label=label,
                                  donate_argnums=0, compiler_options=compiler_options,
                                  out_shardings=s.out_shardings))
        if report.fits is False and report.backend == "gpu" and compiler_options is None:
            with_pass = s.finish(analyze(s.step(policy), *s.step_args(), label=label, donate_argnums=0,
                                         compiler_options={}, baseline=None, out_shardings=s.out_shardings))
            verdict = ("fits only with it" if with_pass.fits else "does not fit even with it")
            report = dataclasses.replace(report, notes=(
                *report.notes, f"with XLA:GPU's own rematerialization pass on (--xla-remat) the peak is "
                               f"{format_bytes(with_pass.peak_bytes)}: {verdict} (the pass recomputes values "
                               "the policy keeps; train with the setting you measured)"))
    return report if s.groups else never_kept(policy, report)


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

    def table(self, timings: bool = True) -> Table:
        """A rich table sorted by peak bytes, one row per cost (policies that
        cost the same joined by ``=``); frontier rows marked ``*``.
        ``timings=False`` leaves the wall time out of the title (output that
        is the same on every machine, as the committed notebooks need)."""
        n = len(self.reports)
        mesh = self.reports[0].mesh if self.reports else ()
        r0 = self.reports[0] if self.reports else None
        link, peak = ((r0.host_link_bytes_per_s, r0.peak_flops_per_s) if r0
                      else (HOST_LINK_BYTES_PER_S, PEAK_FLOPS_PER_S))
        on = (" on mesh " + ",".join(f"{a}={k}" for a, k in mesh if k > 1)) if mesh else ""
        t = Table(title=f"remat sweep: {self.model}, batch {self.batch} x seq {self.seq}{on} "
                        f"({n} policies{f', {self.wall_seconds:.1f} s' if timings else ''})",
                  caption="* = Pareto frontier (no other policy is as good on peak memory and FLOPs "
                          "and better on one, by more than 0.1%); ! = the compiled memory does not show the "
                          "residual saving (see the report's notes); recompute against no jax.checkpoint; "
                          "memory per device, compile-only; transfer/compute = host traffic time over "
                          f"compute time at {link / 1e9:.3g} GB/s and {peak / 1e12:.4g} TFLOP/s (above 1: "
                          "the offload cannot hide)")
        limit = r0.limit_bytes if r0 else None
        if limit is not None:
            t.title += f"\ntarget {r0.target} ({r0.device_kind}): {format_bytes(limit)} usable per device"
            t.caption += "; x = does not fit the usable memory"
        if any(r.peak_source == "out-of-memory error" for r in self.reports):
            t.caption += ("; >= = the compiler refused the step for lack of memory: the need its message "
                          "states")
        for note in self.notes:
            t.caption += f"; {note}"
        for col, just in (("", "center"), ("policy", "left"), ("peak", "right"),
                          *((("headroom", "right"),) if limit is not None else ()), ("temp", "right"),
                          ("residuals", "right"), ("on host", "right"), ("transfer/compute", "right"),
                          ("FLOPs", "right"), ("recompute", "right")):
            t.add_column(col, justify=just)
        front = set(self.frontier)
        for group in self.groups():
            r, on_front = self.reports[group[0]], bool(front & set(group))
            mark = ("*" if on_front else "") + ("!" if r.saving_unconfirmed else "") + (
                "x" if r.fits is False else "")
            headroom = () if limit is None else (format_bytes(r.headroom_bytes),)
            refused = ">= " if r.peak_source == "out-of-memory error" else ""
            t.add_row(mark, self.group_label(group), refused + format_bytes(r.peak_bytes), *headroom,
                      format_bytes(r.temp_bytes), format_bytes(r.residual_bytes),
                      format_bytes(r.host_residual_bytes) if r.host_residual_bytes else "-",
                      f"{r.transfer_compute_ratio:.2f}" if r.host_transfer_bytes else "-",
                      format_flops(r.flops),
                      "-" if r.recompute_overhead is None else f"{r.recompute_overhead:+.1%}",
                      style="bold" if on_front else None)
        return t


def sweep(model: str | models.ModelConfig | TrainStepSetup, policies: Sequence[PolicyLike] | None = None,
          *, batch: int = 1, seq: int | None = None, dtype: str | None = None, groups: Any = None,
          mesh: Mesh | Mapping[str, int] | None = None, rules: Rules | None = None,
          loss_chunks: int | None = None, microbatches: int = 1, api: str = "linen",
          target: str | Target = "cpu", attention: str | None = None, mem_fraction: float | None = None,
          workers: int = 2, compiler_options: dict[str, Any] | None = None,
          on_report: Callable[[Report, int, int], None] | None = None) -> SweepResult:
    """Measure a model's train step under many policies (compile-only).

    ``"none"`` is traced first (always: it is the baseline of
    ``recompute_overhead`` and gives the checkpoint names the model emits);
    then each policy is traced and lowered on this thread and compiled on a
    pool of ``workers`` threads.

    Args:
      model: a preset name, a ``ModelConfig`` or a :class:`TrainStepSetup`
        (then ``batch``/``seq``/``dtype``/``groups`` are ignored).
      policies: preset names, spec strings, Policies or JAX policy callables
        (applied as they are; one remat cannot check gets a note in its
        report); default :func:`default_policies` of the model.
      batch, seq, dtype, groups, mesh, rules, loss_chunks, microbatches, api, target,
        attention, mem_fraction: see :func:`train_step_setup`.
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
    name = model if isinstance(model, str) else "custom config"
    if policies is not None:  # bad input fails before any trace or compile
        labels = [label_of(p) for p in policies]
        if not labels:
            raise RematError("no policies to sweep")
        if len(set(labels)) != len(labels):
            raise RematError(f"duplicated policies in {labels}")
        for p in policies:
            for seg in segment_policies(p):
                check_offload(seg, s.device())
    base = _baseline(s)
    notes: list[str] = []
    if policies is None:
        offload = s.can_offload()
        policies = default_policies(sorted(checkpoint_names(base.traced.jaxpr)), offload=offload)
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
            t = trace_policy(s, p, label)
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
    return SweepResult(name, s.batch, s.seq, done, pareto_frontier(done), time.perf_counter() - t0,
                       tuple(tuple(g) for g in by_cost.values()), tuple(notes))


def plot_sweep(result: SweepResult, path: str | None = None) -> Any:
    """Peak memory per device (GiB) against FLOPs (TFLOP), one numbered point
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
    gib = [result.reports[g[0]].peak_bytes / 2**30 for g in groups]
    tflop = [result.reports[g[0]].flops / 1e12 for g in groups]
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
    ax.set_xlabel("peak memory per device (GiB)")
    ax.set_ylabel("train step FLOPs (TFLOP)")
    ax.set_title(f"{result.model}: batch {result.batch} x seq {result.seq}, "
                 f"{result.reports[0].backend} compile-only")
    ax.grid(alpha=0.3)
    ax.legend()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _plot_terms(ax: Any, reports: Sequence[Report]) -> None:
    """The peak by term of each report as one stacked bar (GiB), numbered as the points."""
    x = np.arange(1, len(reports) + 1)
    bottom = np.zeros(len(reports))
    for term in TERMS:
        gib = np.array([dict(r.peak_terms).get(term, 0) / 2**30 for r in reports])
        if gib.any():
            ax.bar(x, gib, bottom=bottom, label=term)
            bottom += gib
    ax.set_xticks(x)
    ax.set_xlabel("policy (numbered as in the key)")
    ax.set_ylabel("peak memory per device (GiB)")
    ax.set_title("the peak by term")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
