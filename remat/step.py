"""The one language-model train step that ``remat train`` runs and
``remat inspect``/``sweep`` measure: forward, next-token loss, gradients and
the optimizer update of :func:`make_optimizer`, so what is measured is what
trains.

Shapes: ``tokens`` is ``int32[B, T]``; the model maps it to ``logits[B, T, V]``;
the loss predicts ``tokens[:, 1:]`` from ``logits[:, :-1]``.

The optimizer is AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay
Regularization") with linear warmup then cosine decay
(``optax.warmup_cosine_decay_schedule``), weight decay on matrices only, and
global-norm gradient clipping (``optax.clip_by_global_norm``), as in GPT-3
style training (Brown et al. 2020, appendix B).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training.train_state import TrainState

from remat import _compat
from remat._errors import RematError
from remat._mesh import LOGICAL_RULES, Rules, batch_sharding, replicated, sharded_abstract
from remat._workload import Configuration, TrainStep, Workload
from remat.models.config import ModelConfig
from remat.models.layers import PALLAS_BLOCK
from remat.models.transformer import (
    Transformer,
    lm_loss,  # the loss is the model's: its residuals are user code
)

_compat.hide_frames(__file__)

__all__ = ["OptimizerConfig", "StepFn", "default_attention", "init_train_state", "lm_loss", "lm_workload",
           "make_lr_schedule", "make_optimizer", "make_train_step"]

StepFn = Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]


def make_train_step(model: nn.Module, *, deterministic: bool = True, microbatches: int = 1) -> StepFn:
    """A (not yet jitted) train step ``step(state, tokens, rng) -> (state, metrics)``.

    With ``microbatches=k > 1`` the batch is split into ``k`` micro-batches of
    ``B / k`` sequences (sequence ``i`` in micro-batch ``i % k``, so each
    device keeps its own rows under batch sharding) whose gradients a
    ``lax.scan`` sums in float32 before one update: gradient accumulation,
    the same loss and gradients as the whole batch (up to float rounding) at
    about ``1/k`` of the activation memory, for the same FLOPs (as
    ``optax.MultiSteps`` over ``k`` calls, in one step).

    Args:
      model: a linen module ``tokens[B, T] -> logits[B, T, V]`` whose
        ``__call__`` takes ``deterministic=`` (dropout off when True); a
        :class:`remat.models.Transformer` whose ``config.loss_chunks > 1``
        computes the loss itself (``targets=``), in chunks.
      deterministic: False switches dropout on; ``rng`` then seeds it (folded
        with the micro-batch index).
      microbatches: ``k >= 1``, dividing the batch ``B``.

    Returns:
      ``step``: ``state`` is a ``flax.training.train_state.TrainState``,
      ``tokens`` ``int32[B, T]``, ``rng`` a PRNG key; metrics are float32
      scalars ``loss`` (nats/token) and ``grad_norm``.

    Raises:
      RematError: ``microbatches < 1``, or (when traced) a batch it does not divide.
    """
    if not isinstance(microbatches, int) or microbatches < 1:
        raise RematError(f"microbatches={microbatches!r} must be a positive integer")
    chunked = getattr(getattr(model, "config", None), "loss_chunks", 1) > 1

    def loss_and_grads(params: Any, tokens: jax.Array, rng: jax.Array) -> tuple[jax.Array, Any]:
        def loss_fn(params: Any) -> jax.Array:
            variables, rngs = {"params": params}, {"dropout": rng}
            if chunked:  # the model's loss head computes the logits in chunks
                return model.apply(variables, tokens, deterministic=deterministic, rngs=rngs, targets=tokens)
            return lm_loss(model.apply(variables, tokens, deterministic=deterministic, rngs=rngs), tokens)

        return jax.value_and_grad(loss_fn)(params)

    def accumulated(params: Any, tokens: jax.Array, rng: jax.Array) -> tuple[jax.Array, Any]:
        b, t = tokens.shape
        if b % microbatches:
            raise RematError(f"microbatches={microbatches} must divide the batch B={b}")
        split = tokens.reshape(b // microbatches, microbatches, t).swapaxes(0, 1)

        def one(carry: tuple[jax.Array, Any], xs: tuple[jax.Array, jax.Array]):
            loss, grads = loss_and_grads(params, xs[0], jax.random.fold_in(rng, xs[1]))
            total, acc = carry
            return (total + loss, jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (total, acc), _ = jax.lax.scan(one, (jnp.float32(0.0), zeros), (split, jnp.arange(microbatches)))
        grads = jax.tree.map(lambda a, p: (a / microbatches).astype(p.dtype), acc, params)
        return total / microbatches, grads

    def step(state: TrainState, tokens: jax.Array, rng: jax.Array):
        fn = loss_and_grads if microbatches == 1 else accumulated
        loss, grads = fn(state.params, tokens, rng)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return state.apply_gradients(grads=grads), metrics

    return step


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, tokens: jax.Array,
                     rng: jax.Array) -> TrainState:
    """Initialise parameters and optimizer state.

    Wrap in ``jax.eval_shape`` with ``jax.ShapeDtypeStruct`` tokens to get the
    abstract state for compile-only analysis (nothing allocated).

    Args:
      model: as for :func:`make_train_step`.
      tx: an optax optimizer, e.g. :func:`make_optimizer` ``()``.
      tokens: ``int32[B, T]`` example (or abstract) input.
      rng: PRNG key for parameter init.
    """
    params = model.init({"params": rng}, tokens, deterministic=True)["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """The optimizer's settings (:func:`make_optimizer`).

    Attributes:
      steps: optimizer steps of the run (the cosine reaches its end there).
      lr: peak learning rate (reached after ``warmup`` steps).
      warmup: linear warmup steps from 0; ``None`` means ``steps // 10``.
      min_lr_ratio: the cosine decays to ``lr * min_lr_ratio`` at ``steps``.
      weight_decay: AdamW decoupled weight decay, on matrices only (``ndim >= 2``).
      b1, b2: AdamW moment decay rates.
      clip: maximum global gradient norm.

    Raises:
      RematError: ``steps < 1``, ``warmup`` outside ``[0, steps)``, ``lr <= 0``
        or ``clip <= 0``.
    """

    steps: int = 150
    lr: float = 3e-3
    warmup: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise RematError(f"steps must be >= 1, got {self.steps!r}")
        if self.warmup is None:
            object.__setattr__(self, "warmup", self.steps // 10)
        if not 0 <= self.warmup < self.steps:  # type: ignore[operator]
            raise RematError(f"warmup must be in [0, steps={self.steps}), got {self.warmup!r}")
        if self.lr <= 0 or self.clip <= 0:
            raise RematError(f"lr and clip must be > 0, got lr={self.lr!r}, clip={self.clip!r}")


def make_lr_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """The learning-rate schedule of :func:`make_optimizer` (step -> learning rate)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup, decay_steps=cfg.steps,
        end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg: OptimizerConfig | None = None) -> optax.GradientTransformation:
    """Clip-by-global-norm, then AdamW on a warmup + cosine schedule with
    weight decay on matrices (see the module doc); ``None``: the defaults of
    :class:`OptimizerConfig`. Its state is two float32 moments per parameter
    plus step counts."""
    cfg = cfg or OptimizerConfig()
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip),
        optax.adamw(make_lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                    mask=decay_mask))


def default_attention(config: ModelConfig, platform: str, seq: int) -> str:
    """The attention a model gets on ``platform`` unless one is asked for:
    ``"cudnn"`` (flash attention) on ``"gpu"`` where cuDNN takes the model
    (bf16 or f16, no attention dropout, head_dim a multiple of 8 and at most
    128); ``"pallas"`` (JAX's Pallas TPU flash attention) on ``"tpu"`` where
    it takes the model (no attention dropout, ``seq`` a multiple of
    :data:`remat.models.layers.PALLAS_BLOCK`); else the config's own."""
    no_dropout = config.attn_dropout == 0
    if platform == "gpu" and no_dropout and config.dtype in (jnp.bfloat16, jnp.float16) \
            and config.head_dim % 8 == 0 and config.head_dim <= 128:
        return "cudnn"
    if platform == "tpu" and no_dropout and seq % PALLAS_BLOCK == 0:
        return "pallas"
    return config.attention


def lm_workload(config: ModelConfig, *, seq: int, name: str = "custom config",
                optimizer: optax.GradientTransformation | None = None, api: str = "linen",
                rules: Rules | None = None, platform: str = "cpu") -> Workload:
    """The train step of :func:`make_train_step` on a
    :class:`remat.models.Transformer` of ``config`` as a
    :class:`remat.Workload`: what ``remat inspect``, ``sweep`` and ``tune``
    measure for a preset. It reads every knob: the global batch of
    ``int32[batch, seq]`` tokens, micro-batches, nested groups, loss chunks
    and attention (by default :func:`default_attention` on ``platform``); its
    arguments are ``(state, tokens, rng)`` (the state donated; under a mesh
    sharded by flax's logical-axis ``rules`` and pinned as outputs).

    Args:
      config: the model.
      seq: tokens per sequence, 1..``config.max_seq_len``.
      name: what reports call it (the preset's name).
      optimizer: default :func:`make_optimizer` ``()``, what ``remat train`` trains with.
      api: ``"linen"`` or ``"nnx"`` (:func:`remat.models.nnx.model_for_api`; the state is the same).
      rules: logical-axis rules (default :data:`remat._mesh.LOGICAL_RULES`).
      platform: the platform compiled for (``"cpu"``, ``"gpu"``, ``"tpu"``):
        the default attention follows it.

    Raises:
      RematError: ``seq`` outside ``1..max_seq_len``, or an unknown api.
    """
    from remat.models.nnx import check_api, model_for_api

    check_api(api)
    if not isinstance(seq, int) or not 1 <= seq <= config.max_seq_len:
        raise RematError(f"seq={seq!r} must be in 1..{config.max_seq_len} (the model's max_seq_len)")
    rules = tuple(rules if rules is not None else LOGICAL_RULES)
    tx = optimizer if optimizer is not None else make_optimizer()
    attention = default_attention(config, platform, seq)
    init_model = Transformer(dataclasses.replace(config, attention=attention), policy="full")
    states: dict[Any, tuple[Any, Any]] = {}  # mesh -> abstract state and its shardings (any batch)

    def build(c: Any, mesh: Any) -> Any:
        cfg = dataclasses.replace(config, loss_chunks=c.loss_chunks, attention=c.attention)
        tokens = jax.ShapeDtypeStruct((c.batch, seq), jnp.int32)
        rng = jax.random.key(0)
        if mesh not in states:
            init = lambda t, k: init_train_state(init_model, tx, t, k)
            states[mesh] = ((jax.eval_shape(init, tokens, rng), None) if mesh is None
                            else sharded_abstract(init, tokens, rng, mesh=mesh, rules=rules))
        state, shardings = states[mesh]
        step = make_train_step(model_for_api(cfg, policy=c.policy, groups=c.groups, api=api),
                               microbatches=c.microbatches)
        roles = state.replace(step="optimizer state", params="parameters", opt_state="optimizer state")
        if mesh is None:
            return TrainStep(step, (state, tokens, rng), (roles, "batch", "batch"), donate_argnums=0)
        whole = replicated(mesh)
        tokens = jax.ShapeDtypeStruct(tokens.shape, tokens.dtype, sharding=batch_sharding(mesh, rules))
        key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: rng).dtype, sharding=whole)
        return TrainStep(step, (state, tokens, key), (roles, "batch", "batch"), donate_argnums=0,
                         out_shardings=(shardings, whole), context=lambda: nn.logical_axis_rules(rules),
                         rules=rules)

    target = dict(rules).get("activation_batch")
    batch_axes = (target,) if isinstance(target, str) else tuple(target or ())
    return Workload(name, build, Configuration(loss_chunks=config.loss_chunks, attention=attention),
                    batch_axes=batch_axes,
                    layers=config.num_layers, seq=seq)
