"""A user's own model, not a decoder: a small ViT classifier (linen) whose
blocks are scanned by :func:`remat.scan_layers`, its train step written by
hand (cross-entropy, optax AdamW) and handed to the tools as a
:class:`remat.Workload`. ``remat sweep --model vit_workload:workload``
measures it from the command line (run from this folder)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.ad_checkpoint import checkpoint_name

import remat

IMAGE, PATCH, CHANNELS, CLASSES = 32, 8, 3, 10
DIM, HEADS, MLP, LAYERS = 64, 4, 128, 4


class Block(nn.Module):
    """Pre-norm encoder block, ``x[B, P, D] -> x``, its values tagged with
    the checkpoint-name vocabulary."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        qkv = checkpoint_name(nn.DenseGeneral((3, HEADS, DIM // HEADS))(h), "qkv_proj")
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = checkpoint_name(jnp.einsum("bqnh,bknh->bnqk", q, k) / (DIM // HEADS) ** 0.5, "attn_scores")
        probs = checkpoint_name(jax.nn.softmax(scores), "attn_probs")
        context = checkpoint_name(jnp.einsum("bnqk,bknh->bqnh", probs, v), "context")
        x = x + checkpoint_name(nn.DenseGeneral(DIM, axis=(-2, -1))(context), "out_proj")
        h = nn.LayerNorm()(x)
        hidden = checkpoint_name(nn.gelu(nn.Dense(MLP)(h)), "mlpwi")
        return x + checkpoint_name(nn.Dense(DIM)(hidden), "mlpwo")


class ViT(nn.Module):
    """``images[B, H, W, C] -> logits[B, CLASSES]``: patches, scanned blocks, mean pool."""

    policy: object = "full"
    groups: object = None

    @nn.compact
    def __call__(self, images):
        x = nn.Conv(DIM, (PATCH, PATCH), strides=(PATCH, PATCH))(images)
        x = x.reshape(x.shape[0], -1, DIM)
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], DIM))
        x = remat.scan_layers(Block, num_layers=LAYERS, policy=self.policy, groups=self.groups)()(x)
        return nn.Dense(CLASSES)(nn.LayerNorm()(x).mean(axis=1))


def build(c: remat.Configuration, mesh) -> remat.TrainStep:
    """The ViT's train step under ``c.policy`` and ``c.groups``, at ``c.batch`` images."""
    model = ViT(policy=c.policy, groups=c.groups)
    tx = optax.adamw(1e-3)
    images = jax.ShapeDtypeStruct((c.batch, IMAGE, IMAGE, CHANNELS), jnp.float32)
    labels = jax.ShapeDtypeStruct((c.batch,), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(images.shape))["params"])
    opt_state = jax.eval_shape(tx.init, params)

    def step(weights, adam, batch):  # not named params/opt_state: the roles say what they are
        def loss_fn(w):
            logits = model.apply({"params": w}, batch["images"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(weights)
        updates, adam = tx.update(grads, adam, weights)
        return optax.apply_updates(weights, updates), adam, loss

    return remat.TrainStep(step, (params, opt_state, {"images": images, "labels": labels}),
                           roles=("parameters", "optimizer state", "batch"), donate_argnums=(0, 1))


workload = remat.Workload("vit", build, remat.Configuration(batch=8), layers=LAYERS)


def make() -> remat.Workload:
    """A zero-argument function returning a workload, as ``--model vit_workload:make`` takes it."""
    return dataclasses.replace(workload, name="vit-2")
