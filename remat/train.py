"""``remat train``: byte-level language modelling on real text under a named remat policy.

One run lives in one folder ``DIR``:

- ``run.json``: the :class:`TrainConfig` (``--resume`` reads it back);
- ``model_config.json``: a copy of the Hugging Face ``config.json`` given as
  ``--model``, which ``--resume`` uses (the original file may be gone);
- ``data/``: the corpus as memory-mapped byte files (:func:`remat._data.build_corpus`);
- ``checkpoints/<step>/``: orbax checkpoints (parameters, optimizer state, PRNG key,
  data position, elapsed seconds, the run's config) every ``ckpt_every`` steps, at
  the end, and on Ctrl-C or SIGTERM;
- ``damaged/<step>-<time>/``: a checkpoint that failed to restore, moved aside
  (never deleted) by ``--resume``, which goes on from the newest intact one;
- ``.lock``, ``.lock.json``: the run's lock (:class:`remat._files.RunLock`): one
  ``remat train`` writes a folder at a time;
- ``metrics.jsonl``: one JSON object per step: ``step``, ``train_loss`` and
  ``val_loss`` (nats per byte; ``val_loss`` is ``null`` between evaluations), ``lr``,
  ``tokens_per_s`` and ``seconds`` (wall time since the run started, summed over
  resumed segments);
- ``loss.png``: train and validation loss against step (matplotlib).

The optimizer is :func:`remat.step.make_optimizer` (AdamW, warmup + cosine, clipping),
the one that ``remat inspect``/``sweep`` measure too. The step is
:func:`remat.step.make_train_step`, compiled once ahead of time
(``jax.jit(...).lower(...).compile()``, with the PRNG split and the learning rate
inside); that one compile is also measured (:func:`remat._analysis.compile_and_analyze`)
for the step's peak memory in the summary. On accelerators the model computes in
bfloat16 (parameters stay float32); on CPU in float32.

Resume is exact: a batch is a pure function of the data position
(:class:`remat._data.Batches`) and the checkpoint holds everything else that evolves,
so ``N/2`` steps + ``--resume`` + ``N/2`` steps gives the same losses and parameters
as ``N`` steps in one go.

Nothing is lost: Ctrl-C (SIGINT) and SIGTERM (what SLURM, Kubernetes and
preemptible VMs send before they kill) finish the step, save a checkpoint and
stop (``KeyboardInterrupt``; :class:`Preempted`, exit status 143 on the command
line); with several processes they stop at the same step (JAX's preemption
sync point, ``jax.experimental.multihost_utils.reached_preemption_sync_point``).
``run.json`` and the plot are written whole (:func:`remat._files.replaced`),
``metrics.jsonl`` one line per write, a torn last line dropped on resume; only
process 0 writes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax.training.train_state import TrainState
from matplotlib.figure import Figure
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from remat import _compat
from remat._analysis import compile_and_analyze
from remat._data import Batches, Corpus, build_corpus, eval_batches
from remat._errors import RematError
from remat._files import RunLock, replaced, write_text
from remat._format import format_bytes
from remat._mesh import (
    batch_sharding,
    check_batch,
    make_mesh,
    mesh_context,
    parse_mesh,
    replicated,
    sharded_abstract,
)
from remat._report import Report
from remat._scan import plan
from remat.models import from_hf_config, get_config
from remat.models.nnx import check_api, model_for_api
from remat.policies import require_text
from remat.step import (
    OptimizerConfig,
    init_train_state,
    lm_loss,
    make_lr_schedule,
    make_optimizer,
    make_train_step,
)

_compat.hide_frames(__file__)

__all__ = ["Preempted", "TrainConfig", "TrainResult", "load_config", "train"]


class Preempted(Exception):  # a stop, not an error: as KeyboardInterrupt
    """:func:`train` stopped on SIGTERM (a scheduler's preemption notice) after
    saving the checkpoint of the last finished step; ``--resume`` goes on from it.

    Attributes:
      step: the step saved.
    """

    def __init__(self, step: int):
        super().__init__(f"preempted (SIGTERM): checkpoint saved at step {step}")
        self.step = step


EXIT_PREEMPTED = 128 + signal.SIGTERM
"""The exit status of ``remat train`` stopped by SIGTERM (143), so a scheduler sees a preempted job."""

@dataclass(frozen=True, kw_only=True)
class TrainConfig(OptimizerConfig):
    """Everything that defines a training run (stored as ``DIR/run.json``): the
    optimizer's settings (:class:`remat.step.OptimizerConfig`: ``steps``, ``lr``,
    ``warmup``, ``min_lr_ratio``, ``weight_decay``, ``b1``, ``b2``, ``clip``) and:

    The defaults are tuned so that ``remat train --model tiny --policy minimal`` reaches
    validation loss <= 2.4 nats/byte on the standard-library corpus within 5 minutes on a
    2-core CPU.

    Attributes:
      model: a preset name of :func:`remat.models.get_config` (e.g. ``"tiny"``), or the path of a
        Hugging Face ``config.json`` (copied into the run folder, so ``--resume`` needs no file).
      policy: remat policy name or spec (``remat policies`` lists them).
      groups: ``None``, ``"sqrt"`` or ``(G, K)`` with ``G * K`` = layers: nested
        checkpointing of groups of layers (:func:`remat.scan_layers`).
      batch: sequences per step, B.
      seq: bytes per sequence, T (<= the model's ``max_seq_len``).
      data: files/folders of text; ``None`` is the Python standard library.
      data_ext: keep only files with these suffixes when walking ``data`` folders.
      val_fraction: share of files held out for validation.
      eval_every: evaluate the validation loss every this many steps (and at the end).
      eval_windows: validation windows of ``seq`` bytes per evaluation (evenly spaced).
      ckpt_every: checkpoint every this many steps (and at the end); the last
        :data:`CHECKPOINTS_KEPT` checkpoints are kept.
      mesh: train on a device mesh, e.g. ``"data=2,fsdp=4"`` (:mod:`remat._mesh`:
        axes ``data``, ``fsdp``, ``tensor``, the default logical rules); None
        for one device. It may change on resume: a checkpoint restores onto
        any mesh.
      loss_chunks: the loss head's chunks (``ModelConfig.loss_chunks``); the
        losses do not change, only the step's memory.
      microbatches: accumulate gradients over this many micro-batches of
        ``batch / microbatches`` sequences per step (same loss and update, less
        activation memory; :func:`remat.step.make_train_step`).
      seed: seeds parameter init, data order and the dropout key.
      api: the Flax API the model is built in, ``"linen"`` or ``"nnx"``
        (:func:`remat.models.nnx.model_for_api`): the same parameters and
        checkpoints, so a run may resume in the other API (with dropout on,
        each API draws its own masks).

    Raises:
      RematError: a count below 1, ``seq < 2``, and the errors of :class:`OptimizerConfig`.
    """

    model: str = "tiny"
    policy: str = "minimal"
    groups: str | tuple[int, int] | None = None
    batch: int = 16
    seq: int = 128
    data: tuple[str, ...] | None = None
    data_ext: tuple[str, ...] | None = None
    val_fraction: float = 0.1
    eval_every: int = 25
    eval_windows: int = 128
    ckpt_every: int = 50
    seed: int = 0
    mesh: str | None = None
    loss_chunks: int = 1
    microbatches: int = 1
    api: str = "linen"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_api(self.api)
        require_text(self.policy, "TrainConfig.policy (stored in run.json)")
        for name in ("batch", "eval_every", "eval_windows", "ckpt_every", "microbatches"):
            if getattr(self, name) < 1:
                raise RematError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.seq < 2:
            raise RematError(f"seq must be >= 2, got {self.seq!r}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_json` (lists back to tuples)."""
        d = dict(d)
        for k in ("groups", "data", "data_ext"):
            if isinstance(d.get(k), list):
                d[k] = tuple(d[k])
        return cls(**d)


RESUME_MUST_MATCH = ("model", "steps", "batch", "seq", "lr", "warmup", "min_lr_ratio", "weight_decay",
                     "b1", "b2", "clip", "data", "data_ext", "val_fraction", "seed")
"""Fields that change the numbers of a run, so ``--resume`` refuses a different value.
The policy, groups, evaluation and checkpoint cadence may change on resume: remat does
not change the mathematics (bitwise equality is then not promised: XLA may fuse the
recomputation differently)."""


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns.

    Attributes:
      state: the final ``TrainState`` (``state.step`` = steps done).
      train_loss: last step's training loss, nats/byte.
      val_loss: last validation loss, nats/byte.
      tokens_per_s: input bytes per second of step time over this process' steps.
      seconds: wall seconds of the whole run (all resumed segments).
      report: :func:`remat.analyze` of the train step (compile-time memory, residuals, FLOPs);
        ``report.peak_bytes`` is the step's peak device memory in bytes.
      out: the run folder.
    """

    state: TrainState
    train_loss: float
    val_loss: float
    tokens_per_s: float
    seconds: float
    report: Report
    out: Path

    def summary(self) -> str:
        """The one-line summary printed at the end of ``remat train``."""
        return (f"done: {int(self.state.step)} steps in {self.seconds:.0f} s · "
                f"val loss {self.val_loss:.3f} nats/byte (train {self.train_loss:.3f}) · "
                f"{self.tokens_per_s:,.0f} tokens/s · train step peak memory "
                f"{format_bytes(self.report.peak_bytes)} (compile-time, remat.analyze: "
                f"{self.report.peak_source}) · {self.out}")


MODEL_CONFIG = "model_config.json"
"""The run folder's copy of a Hugging Face ``config.json`` given as ``--model``."""


def _model_source(cfg: TrainConfig, out: Path, resume: bool) -> str:
    """``cfg.model``; for a ``config.json``, the run folder's copy of it
    (written on a fresh start, read on resume, so resuming needs no file)."""
    if not cfg.model.endswith(".json"):
        return cfg.model
    stored = out / MODEL_CONFIG
    if not (resume and stored.exists()):
        from_hf_config(cfg.model)  # a missing or unsupported file fails here, naming it
        write_text(stored, json.dumps(json.loads(Path(cfg.model).read_text()), indent=1))
    return str(stored)


def build_model(cfg: TrainConfig, source: str | None = None) -> tuple[nn.Module, bool]:
    """The model of ``cfg.model`` (or of ``source``,
    the run folder's copy of its ``config.json``) under ``cfg.policy``/``cfg.groups``, in ``cfg.api``
    (:func:`remat.models.nnx.model_for_api`).

    Returns:
      ``(model, deterministic)``: ``deterministic`` is False when the preset has dropout.

    Raises:
      ValueError: unknown model (:func:`remat.models.get_config`), policy or groups
        (:func:`remat._scan.plan`), or ``seq`` longer than the model's ``max_seq_len``.
    """
    overrides = {} if jax.default_backend() == "cpu" else {"dtype": "bfloat16"}
    mcfg = get_config(source or cfg.model, loss_chunks=cfg.loss_chunks, **overrides)
    if cfg.seq > mcfg.max_seq_len:
        raise RematError(f"seq={cfg.seq} exceeds max_seq_len={mcfg.max_seq_len} of model {cfg.model!r}")
    plan(mcfg.num_layers, cfg.policy, cfg.groups)  # bad policy/groups fail here, before any work
    deterministic = mcfg.dropout_rate == 0 and not mcfg.attn_dropout
    return model_for_api(mcfg, policy=cfg.policy, groups=cfg.groups, api=cfg.api), deterministic


def read_metrics(metrics_path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The rows of a ``metrics.jsonl`` and whether its last line was torn
    (cut by a crash mid-write: not JSON, dropped)."""
    lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
    rows, torn = [], False
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i != len(lines) - 1:
                raise RematError(f"{metrics_path}: line {i + 1} is not JSON ({line[:60]!r})") from None
            torn = True
    return rows, torn


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """Plot ``train_loss`` and ``val_loss`` (nats/byte) against step from a
    metrics file; the PNG is written whole (:func:`remat._files.replaced`)."""
    rows, _ = read_metrics(metrics_path)
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    train = [(r["step"], r["train_loss"]) for r in rows if r["train_loss"] is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r["val_loss"] is not None]
    if train:
        ax.plot(*zip(*train, strict=True), lw=1, alpha=0.7, label="train")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.axhline(math.log(256), color="gray", ls=":", lw=1, label="uniform (ln 256)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title(f"remat train: {metrics_path.parent.name}")
    ax.legend()
    ax.grid(alpha=0.3)
    with replaced(png_path) as tmp:
        fig.savefig(tmp, dpi=110)


def load_config(out: str | Path, given: dict[str, Any]) -> TrainConfig:
    """The config to resume the run in ``out``: its ``run.json`` updated by ``given``.

    Raises:
      RematError: ``out/run.json`` missing (nothing to resume).
      ValueError: ``given`` changes a field of :data:`RESUME_MUST_MATCH`; names it with
        the old and new values.
    """
    path = Path(out) / "run.json"
    if not path.exists():
        raise RematError(f"nothing to resume in {str(out)!r}: no run.json (start without --resume)")
    saved = TrainConfig.from_json(json.loads(path.read_text()))
    for k, v in given.items():
        if k in RESUME_MUST_MATCH and getattr(saved, k) != v:
            raise RematError(f"--resume: {k}={v!r} differs from the run's {k}={getattr(saved, k)!r}; "
                             f"these must match to resume: {', '.join(RESUME_MUST_MATCH)}")
    return dataclasses.replace(saved, **given)


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=not enabled)


class _Interrupt:
    """SIGINT and SIGTERM turn into a flag checked between steps (so a step and its state
    are never torn; ``signum`` says which came); a second one raises at once. With several
    processes, SIGTERM is left to JAX's preemption notifier (:meth:`stop`)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.signum = signum

    def stop(self, step: int, mngr: ocp.CheckpointManager) -> bool:
        """Whether to stop after ``step``: a signal here, or (several processes) the
        preemption sync point, which every process reaches at the same step (orbax's
        ``CheckpointManager.reached_preemption``)."""
        if jax.process_count() > 1 and mngr.reached_preemption(step):
            self.signum = signal.SIGTERM
        return self.requested

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            signums = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGINT, signal.SIGTERM)
            self._previous = {n: signal.signal(n, self._handler) for n in signums}
        return self

    def __exit__(self, *exc: object) -> None:
        for n, previous in self._previous.items():
            signal.signal(n, previous)


CHECKPOINTS_KEPT = 2
"""How many checkpoints a run folder keeps (the newest; orbax deletes older ones)."""


@dataclass
class _Position:
    """What evolves from step to step besides the train state."""

    rng: jax.Array
    data_position: int
    prior_seconds: float
    train_loss: float
    start: float = 0.0
    tokens_per_s: float = 0.0

    def seconds(self) -> float:
        """Wall seconds of the run, resumed segments included."""
        return self.prior_seconds + time.perf_counter() - self.start


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, model: nn.Module | None = None,
          deterministic: bool = True, console: Console | None = None, progress: bool = True,
          compiler_options: dict[str, Any] | None = None) -> TrainResult:
    """Train ``cfg`` into the run folder ``out`` (layout in the module doc).

    Args:
      cfg: the run's settings.
      out: run folder (created if missing).
      resume: continue from the latest checkpoint in ``out``; the config must agree
        with ``out/run.json`` on :data:`RESUME_MUST_MATCH`.
      model: a linen module ``int32[B, T] -> logits[B, T, 256]`` to use instead of
        :func:`build_model` (tests use a small one); ``deterministic`` then says
        whether to run it without dropout.
      console: where progress and messages go (default: a new rich ``Console``).
      progress: show the rich progress bar.
      compiler_options: XLA options for every ``Lowered.compile`` of the run (default none);
        e.g. ``remat._memory.FAST_CPU_COMPILE`` compiles 5x faster on CPU and runs
        about 2x slower (the tests use it).

    Returns:
      :class:`TrainResult`.

    Raises:
      RematError: ``out`` already holds checkpoints and ``resume`` is False, ``resume``
        with no checkpoint in ``out`` (or none intact), checkpoints of another model, a
        changed corpus on resume, a non-finite loss (names the step), or another process
        holding ``out`` (names its host and pid).
      remat.CorpusError: bad data paths, empty corpus, binary file.
      KeyboardInterrupt: after Ctrl-C, once the checkpoint of the last finished step is saved.
      Preempted: after SIGTERM, likewise.
    """
    console = console or Console()
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    writer = jax.process_index() == 0  # the processes of one run share the folder: process 0 writes
    with contextlib.ExitStack() as stack:
        if writer:
            stack.enter_context(RunLock(out, say=lambda line: console.print(line, highlight=False)))
        result = _train(cfg, out, resume, model, deterministic, console, progress, compiler_options, writer)
    return result


def _train(cfg: TrainConfig, out: Path, resume: bool, model: nn.Module | None, deterministic: bool,
           console: Console, progress: bool, compiler_options: dict[str, Any] | None,
           writer: bool) -> TrainResult:
    """:func:`train` with the folder locked."""
    mngr = ocp.CheckpointManager(out / "checkpoints",
                                 options=ocp.CheckpointManagerOptions(max_to_keep=CHECKPOINTS_KEPT),
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "meta": ocp.JsonCheckpointHandler()})
    try:
        # Ctrl-C becomes a flag from here on, also while XLA compiles (a KeyboardInterrupt
        # raised inside a compile can crash the process).
        with _Interrupt() as interrupt:
            latest = _check_out(mngr, out, resume)
            if model is None:
                model, deterministic = build_model(cfg, _model_source(cfg, out, resume))
            corpus = build_corpus(cfg.data, out / "data", val_fraction=cfg.val_fraction,
                                  suffixes=cfg.data_ext)
            console.print(corpus.summary(), highlight=False)
            batches = Batches(corpus.train, batch=cfg.batch, seq=cfg.seq, seed=cfg.seed)
            val = list(eval_batches(corpus.val, batch=cfg.batch, seq=cfg.seq, max_windows=cfg.eval_windows))
            place = _Placement.of(cfg, model, jnp.asarray(batches.batch_at(0)))
            val = [place.batch(b) for b in val]
            if resume:
                state, pos, latest = _restore(cfg, model, mngr, corpus, place, out, console, writer)
            else:
                state, pos = _initialise(cfg, model, place, out, compiler_options, writer)
            if writer:
                write_text(out / "run.json", json.dumps(cfg.to_json(), indent=1))
            step_fn, report, evaluate = _compile(cfg, model, deterministic, state, place, pos.rng, val,
                                                 compiler_options, console)
            state, val_loss = _loop(cfg, state, pos, step_fn, evaluate, batches, corpus, mngr, latest, out,
                                    console, progress, interrupt, place, writer)
    finally:
        mngr.wait_until_finished()
        mngr.close()
    if writer:
        plot_metrics(out / "metrics.jsonl", out / "loss.png")
    return TrainResult(state=state, train_loss=pos.train_loss, val_loss=val_loss,
                       tokens_per_s=pos.tokens_per_s, seconds=pos.seconds(), report=report, out=out)


def _check_out(mngr: ocp.CheckpointManager, out: Path, resume: bool) -> int | None:
    """The latest checkpoint step of ``out`` (None for a new run), checked against ``resume``."""
    latest = mngr.latest_step()
    if resume and latest is None:
        raise RematError(f"nothing to resume in {str(out)!r}: no checkpoint (start without --resume)")
    if not resume and latest is not None:
        raise RematError(f"{str(out)!r} already holds a run (checkpoint at step {latest}); "
                         "pass --resume to continue it or choose another --out")
    return latest


@dataclass(frozen=True)
class _Placement:
    """Where a run's arrays live: one device (``mesh`` None) or a device mesh.

    Attributes:
      mesh: the mesh of ``cfg.mesh``, or None.
      example: the first batch, placed (its shape is every batch's).
      init: ``(tokens, key) -> TrainState``: the initial state, unboxed (plain arrays).
      abstract: the abstract state, with its shardings under a mesh.
      shardings: the state's ``NamedSharding`` tree under a mesh, else None.
      batch_sharding, replicated_sharding: a batch's and a replicated value's
        ``NamedSharding`` under a mesh, else None.
    """

    mesh: Any
    example: jax.Array
    init: Any
    abstract: Any
    shardings: Any
    batch_sharding: Any = None
    replicated_sharding: Any = None

    @classmethod
    def of(cls, cfg: TrainConfig, model: nn.Module, example: jax.Array) -> _Placement:
        """The placement of ``cfg`` (its mesh checked against the devices and the batch)."""
        boxed = partial(init_train_state, model, make_optimizer(cfg))
        init = lambda tokens, key: nn.meta.unbox(boxed(tokens, key))
        key = jax.random.PRNGKey(cfg.seed)
        if cfg.mesh is None:
            check_batch(cfg.batch, None, microbatches=cfg.microbatches)
            return cls(None, example, init, jax.eval_shape(init, example, key), None)
        mesh = make_mesh(parse_mesh(cfg.mesh))
        check_batch(cfg.batch, mesh, microbatches=cfg.microbatches)
        abstract, shardings = sharded_abstract(boxed, example, key, mesh=mesh)
        batch = batch_sharding(mesh)
        return cls(mesh, jax.device_put(example, batch), init, abstract, shardings, batch, replicated(mesh))

    def context(self) -> Any:
        """Trace under the mesh and the logical rules (nothing on one device)."""
        return mesh_context(self.mesh)

    def batch(self, tokens: Any) -> jax.Array:
        """``int32[B, T]`` tokens on the device(s), the batch split over the mesh."""
        return jnp.asarray(tokens) if self.mesh is None else jax.device_put(tokens, self.batch_sharding)

    def replicated(self, x: jax.Array) -> jax.Array:
        """``x`` on every device of the mesh (as it is on one device)."""
        return x if self.mesh is None else jax.device_put(x, self.replicated_sharding)

    def jit(self, fn: Any, out_shardings: Any = None) -> Any:
        """``jax.jit(fn)``, with ``out_shardings`` pinned under a mesh."""
        return jax.jit(fn) if self.mesh is None else jax.jit(fn, out_shardings=out_shardings)


def _initialise(cfg: TrainConfig, model: nn.Module, place: _Placement, out: Path,
                compiler_options: dict[str, Any] | None, writer: bool) -> tuple[TrainState, _Position]:
    """A new run: initial parameters and optimizer state, an empty metrics file."""
    init_key, rng = jax.random.split(jax.random.PRNGKey(cfg.seed))
    with place.context():
        init = place.jit(place.init, place.shardings).lower(place.example, init_key).compile(compiler_options)
    if writer:
        write_text(out / "metrics.jsonl", "")
    return init(place.example, init_key), _Position(place.replicated(rng), 0, 0.0, float("nan"))


def _restore(cfg: TrainConfig, model: nn.Module, mngr: ocp.CheckpointManager, corpus: Corpus,
             place: _Placement, out: Path, console: Console,
             writer: bool) -> tuple[TrainState, _Position, int]:
    """The state of the newest intact checkpoint (onto this run's mesh, whatever the
    mesh it was saved on) and its step; metrics after it are dropped (they are redone).
    A checkpoint that fails to restore is moved aside (:func:`_move_aside`); one of
    another model stops the resume (:func:`_check_model`)."""
    _, rng = jax.random.split(jax.random.PRNGKey(cfg.seed))
    abstract = place.abstract
    tx = abstract.tx  # the optimizer of the placement's shardings (TrainState metadata must match)
    target = {"params": abstract.params, "opt_state": abstract.opt_state, "step": abstract.step, "rng": rng}
    newest, damaged = mngr.latest_step(), []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            stored = mngr.item_metadata(step)["state"]["params"]
            _check_model(cfg, meta, stored, target["params"], step, out)
            args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
            tree = mngr.restore(step, args=args)["state"]
        except RematError:
            raise
        except Exception as e:  # tensorstore, JSON and orbax errors alike: the files are bad
            damaged.append(step)
            if writer:
                _move_aside(mngr, out, step, e, console)
            continue
        break
    else:
        raise RematError(f"nothing to resume in {str(out)!r}: no intact checkpoint (damaged: steps "
                         f"{', '.join(map(str, damaged))}, moved to {out / 'damaged'}); start without "
                         "--resume")
    if damaged:
        console.print(f"resuming from step {step}, the newest intact checkpoint: steps {step + 1}..{newest} "
                      "will be redone", highlight=False)
    if meta["corpus_key"] != corpus.key:
        raise RematError(f"--resume: the corpus changed since step {step} was saved (files added, "
                         f"removed or edited); its batches would differ. Corpus now: {corpus.summary()}")
    state = TrainState(step=tree["step"], apply_fn=model.apply, params=tree["params"], tx=tx,
                       opt_state=tree["opt_state"])
    metrics_path = out / "metrics.jsonl"
    rows, torn = read_metrics(metrics_path)
    if torn:
        console.print(f"{metrics_path}: dropped a torn last line (a crash mid-write)", highlight=False)
    if writer:
        write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))
    train_loss = next((r["train_loss"] for r in reversed(rows) if r["step"] == step), None)
    console.print(f"resumed {out} at step {step} (data position {meta['data_position']})", highlight=False)
    return state, _Position(place.replicated(tree["rng"]), meta["data_position"], meta["seconds"],
                            float("nan") if train_loss is None else train_loss), step


def _check_model(cfg: TrainConfig, meta: dict[str, Any], stored: Any, target: Any, step: int,
                 out: Path) -> None:
    """Raise :class:`RematError` if checkpoint ``step`` holds another model than
    ``cfg``'s: by the model its config names, else by the parameter shapes that
    differ (``stored``: the checkpoint's parameter metadata; ``target``: the model's)."""
    saved = meta.get("config", {}).get("model")
    if saved is not None and saved != cfg.model:
        raise RematError(f"the checkpoints in {str(out / 'checkpoints')!r} are of model {saved!r} (step "
                         f"{step}), but this run's model is {cfg.model!r}: resume with the run's own folder")
    shapes = lambda tree: {jax.tree_util.keystr(k): tuple(v.shape)
                           for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    want, have = shapes(target), shapes(stored)
    differ = [f"{k}: {have.get(k, 'missing')} saved, {want.get(k, 'absent')} in the model"
              for k in sorted(want.keys() | have.keys()) if have.get(k) != want.get(k)]
    if differ:
        raise RematError(f"checkpoint step {step} in {str(out / 'checkpoints')!r} is of another model than "
                         f"{cfg.model!r}: {len(differ)} arrays differ, e.g. " + "; ".join(differ[:3]))


def _move_aside(mngr: ocp.CheckpointManager, out: Path, step: int, error: Exception,
                console: Console) -> None:
    """Move the damaged checkpoint ``step`` to ``out/damaged/<step>-<time>`` (never
    deleted: it may be repaired; the step number is then free for the next save)."""
    source = out / "checkpoints" / str(step)
    dest = out / "damaged" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.parent.mkdir(exist_ok=True)
    os.replace(source, dest)
    mngr.reload()
    reason = (str(error).strip().splitlines() or [""])[0][:200]
    console.print(f"checkpoint {source} (step {step}) is damaged ({type(error).__name__}: {reason}); "
                  f"moved to {dest}", highlight=False)


def _compile(cfg: TrainConfig, model: nn.Module, deterministic: bool, state: TrainState, place: _Placement,
             rng: jax.Array, val: list[jax.Array], compiler_options: dict[str, Any] | None,
             console: Console) -> tuple[Any, Report, Any]:
    """The compiled train step (PRNG split and learning rate inside), its
    :class:`Report` from the same compile, and ``evaluate(params)`` (mean
    validation loss, nats/byte)."""
    step_fn = make_train_step(model, deterministic=deterministic, microbatches=cfg.microbatches)
    schedule = make_lr_schedule(cfg)

    def train_step(state: TrainState, tokens: jax.Array, rng: jax.Array):
        rng, step_rng = jax.random.split(rng)
        lr = schedule(state.step)
        state, metrics = step_fn(state, tokens, step_rng)
        return state, rng, metrics | {"lr": lr}

    def eval_fn(params: Any, tokens: jax.Array) -> jax.Array:
        return lm_loss(model.apply({"params": params}, tokens, deterministic=True), tokens)

    t0 = time.perf_counter()
    # One compile of the step serves both the run and its measurement.
    options = {} if compiler_options is None else compiler_options  # None: XLA's defaults, to run fast
    replicated = place.replicated_sharding
    with place.context():
        compiled, report = compile_and_analyze(
            train_step, state, place.example, rng, label="train step", donate_argnums=(0, 2),
            compiler_options=options, out_shardings=None if place.mesh is None else (
                place.shardings, replicated, replicated))
        eval_compiled = place.jit(eval_fn, replicated).lower(state.params, val[0]).compile(compiler_options)
    console.print(f"compiled train and eval steps in {time.perf_counter() - t0:.1f} s", highlight=False)
    console.print(f"train step peak memory {format_bytes(report.peak_bytes)} (compile-time, "
                  f"remat.analyze; policy {cfg.policy}, groups {cfg.groups})", highlight=False)
    evaluate = lambda params: float(np.mean([float(eval_compiled(params, b)) for b in val]))
    return compiled, report, evaluate


def _save(mngr: ocp.CheckpointManager, cfg: TrainConfig, state: TrainState, pos: _Position,
          corpus: Corpus) -> None:
    """Checkpoint the state and the data position at ``state.step`` (once per step)."""
    step = int(state.step)
    if mngr.latest_step() == step:
        return
    tree = {"params": state.params, "opt_state": state.opt_state, "step": state.step, "rng": pos.rng}
    meta = {"data_position": pos.data_position, "seconds": pos.seconds(), "corpus_key": corpus.key,
            "config": cfg.to_json()}
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))


def _loop(cfg: TrainConfig, state: TrainState, pos: _Position, step_fn: Any, evaluate: Any, batches: Batches,
          corpus: Corpus, mngr: ocp.CheckpointManager, latest: int | None, out: Path, console: Console,
          progress: bool, interrupt: _Interrupt, place: _Placement, writer: bool) -> tuple[TrainState, float]:
    """Run the steps left, logging, evaluating and checkpointing; returns the final
    state and the last validation loss. Ctrl-C saves and raises ``KeyboardInterrupt``,
    SIGTERM saves and raises :class:`Preempted`."""
    step, step_time, val_loss = int(state.step), 0.0, float("nan")
    pos.start = time.perf_counter()
    log = open(out / "metrics.jsonl", "a") if writer else None  # closed below
    with _progress(console, progress) as bar, contextlib.closing(log or io.StringIO()) as log:
        def record(**row: Any) -> None:
            log.write(json.dumps(row | {"seconds": pos.seconds()}) + "\n")  # one write per line
            log.flush()

        if latest is None:
            val_loss = evaluate(state.params)
            record(step=0, train_loss=None, val_loss=val_loss, lr=0.0, tokens_per_s=None)
        task = bar.add_task("train", total=cfg.steps, completed=step, loss="-", tps="-")
        while step < cfg.steps and not interrupt.stop(step, mngr):
            t0 = time.perf_counter()
            state, pos.rng, m = step_fn(state, place.batch(batches.batch_at(pos.data_position)), pos.rng)
            pos.train_loss, lr = float(m["loss"]), float(m["lr"])
            dt = time.perf_counter() - t0
            step_time, step, pos.data_position = step_time + dt, step + 1, pos.data_position + cfg.batch
            if not math.isfinite(pos.train_loss):
                raise RematError(f"training diverged: loss {pos.train_loss} at step {step} (lr={lr:.2e}); "
                                 "lower --lr")
            row_val = None
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val_loss = row_val = evaluate(state.params)
                bar.console.print(f"step {step}: train loss {pos.train_loss:.3f}, "
                                  f"val loss {val_loss:.3f} nats/byte", highlight=False)
            tps = cfg.batch * cfg.seq / dt
            record(step=step, train_loss=pos.train_loss, val_loss=row_val, lr=lr, tokens_per_s=tps)
            bar.update(task, completed=step, loss=f"{pos.train_loss:.3f}", tps=f"{tps:,.0f}")
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                _save(mngr, cfg, state, pos, corpus)
    pos.tokens_per_s = (step - (latest or 0)) * cfg.batch * cfg.seq / step_time if step_time else 0.0
    if interrupt.requested:
        _save(mngr, cfg, state, pos, corpus)
        mngr.wait_until_finished()
        preempted = interrupt.signum == signal.SIGTERM
        console.print(f"{'preempted (SIGTERM)' if preempted else 'interrupted'}: checkpoint saved at step "
                      f"{step}; continue with remat train --out {out} --resume", highlight=False)
        raise Preempted(step) if preempted else KeyboardInterrupt
    if math.isnan(val_loss):  # resumed a finished run: nothing trained, evaluate once
        val_loss = evaluate(state.params)
    return state, val_loss
