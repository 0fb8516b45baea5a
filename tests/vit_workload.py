"""Your own model, not a decoder: the small ViT of :mod:`remat.models.vit`
handed to the tools as a :class:`remat.Workload` three ways: its train step
written by hand (``workload``, the general case), and in one call from a
model, a loss and a batch shape (``linen``: :func:`remat.linen_workload`;
``nnx_vit``: :func:`remat.nnx_workload`). ``remat sweep --model
vit_workload:workload`` measures one from the command line (run from this
folder)."""

from __future__ import annotations

import dataclasses

import jax
import optax
from flax import nnx

import remat
from remat.models.vit import LAYERS, NnxViT, ViT, batch_shapes, classification_loss


def build(c: remat.Configuration, mesh) -> remat.TrainStep:
    """The ViT's train step under ``c.policy`` and ``c.groups``, at ``c.batch`` images."""
    model = ViT(policy=c.policy, groups=c.groups)
    tx = optax.adamw(1e-3)
    batch = batch_shapes(c.batch)
    init = lambda b: model.init(jax.random.key(0), b, method=classification_loss)
    params = jax.eval_shape(init, batch)["params"]
    opt_state = jax.eval_shape(tx.init, params)

    def step(weights, adam, batch):  # not named params/opt_state: the roles say what they are
        grad_fn = jax.value_and_grad(lambda w: model.apply({"params": w}, batch, method=classification_loss))
        value, grads = grad_fn(weights)
        updates, adam = tx.update(grads, adam, weights)
        return optax.apply_updates(weights, updates), adam, value

    return remat.TrainStep(step, (params, opt_state, batch), roles=("parameters", "optimizer state", "batch"),
                           donate_argnums=(0, 1))


workload = remat.Workload("vit", build, remat.Configuration(batch=8), layers=LAYERS)


def make() -> remat.Workload:
    """A zero-argument function returning a workload, as ``--model vit_workload:make`` takes it."""
    return dataclasses.replace(workload, name="vit-2")


linen = remat.linen_workload(lambda c: ViT(policy=c.policy, groups=c.groups), classification_loss,
                             batch_shapes(8), name="vit-linen", optimizer=optax.adamw(1e-3), layers=LAYERS)
nnx_vit = remat.nnx_workload(lambda c: NnxViT(c.policy, c.groups, rngs=nnx.Rngs(0)), classification_loss,
                             batch_shapes(8), name="vit-nnx", layers=LAYERS)
