"""The language-model train step shared by ``remat train``, ``remat.analyze``
sweeps and the tests: forward, next-token loss, gradients, optimizer update.

Shapes: ``tokens`` is ``int32[B, T]``; the model maps it to ``logits[B, T, V]``;
the loss predicts ``tokens[:, 1:]`` from ``logits[:, :-1]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training.train_state import TrainState

StepFn = Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]


def lm_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in nats, computed in float32.

    Args:
      logits: ``[B, T, V]`` any float dtype.
      tokens: ``int32[B, T]``; position t predicts token t + 1.

    Returns:
      A float32 scalar: nats per predicted token.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_train_step(model: nn.Module, *, deterministic: bool = True) -> StepFn:
    """A (not yet jitted) train step ``step(state, tokens, rng) -> (state, metrics)``.

    Args:
      model: a linen module ``tokens[B, T] -> logits[B, T, V]`` whose
        ``__call__`` takes ``deterministic=`` (dropout off when True).
      deterministic: False switches dropout on; ``rng`` then seeds it.

    Returns:
      ``step``: ``state`` is a ``flax.training.train_state.TrainState``,
      ``tokens`` ``int32[B, T]``, ``rng`` a PRNG key; metrics are float32
      scalars ``loss`` (nats/token) and ``grad_norm``.
    """

    def step(state: TrainState, tokens: jax.Array, rng: jax.Array):
        def loss_fn(params: Any) -> jax.Array:
            logits = model.apply({"params": params}, tokens, deterministic=deterministic,
                                 rngs={"dropout": rng})
            return lm_loss(logits, tokens)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
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
      tx: an optax optimizer, e.g. ``optax.adamw(3e-4)``.
      tokens: ``int32[B, T]`` example (or abstract) input.
      rng: PRNG key for parameter init.
    """
    params = model.init({"params": rng}, tokens, deterministic=True)["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)
