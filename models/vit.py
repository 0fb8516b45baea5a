"""A small Vision Transformer classifier (Dosovitskiy et al. 2021, "An Image
is Worth 16x16 Words"), in linen (:class:`ViT`) and NNX (:class:`NnxViT`):
the example of a model that is not a decoder, measured through
:func:`remat.linen_workload` and :func:`remat.nnx_workload`.

``images[B, 32, 32, 3] float32 -> logits[B, 10] float32``: 8x8 patches
(16 of them) embedded to D=64, learned positions, :data:`LAYERS` pre-norm
encoder blocks scanned (:func:`remat.scan_layers`,
:func:`remat.nnx.scan_layers`), mean pooling and a linear head. Each block
tags seven values with the checkpoint-name vocabulary
(:mod:`remat.policies.vocab`): ``qkv_proj``, ``attn_scores``,
``attn_probs``, ``context``, ``out_proj``, ``mlpwi``, ``mlpwo``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from remat._scan import Groups, PolicyArg, scan_layers
from remat.nnx import scan_layers as nnx_scan_layers

__all__ = ["LAYERS", "NnxViT", "ViT", "batch_shapes", "classification_loss"]

IMAGE, PATCH, CHANNELS, CLASSES = 32, 8, 3, 10
DIM, HEADS, MLP = 64, 4, 128
LAYERS = 4
"""Encoder blocks, scanned."""


def _attention(qkv: jax.Array) -> jax.Array:
    """``qkv[B, P, 3, H, D/H] -> context[B, P, H, D/H]``, its values tagged."""
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = checkpoint_name(jnp.einsum("bqnh,bknh->bnqk", q, k) / (DIM // HEADS) ** 0.5, "attn_scores")
    probs = checkpoint_name(jax.nn.softmax(scores), "attn_probs")
    return checkpoint_name(jnp.einsum("bnqk,bknh->bqnh", probs, v), "context")


class Block(nn.Module):
    """Pre-norm encoder block, ``x[B, P, D] -> x``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        context = _attention(checkpoint_name(nn.DenseGeneral((3, HEADS, DIM // HEADS))(nn.LayerNorm()(x)),
                                             "qkv_proj"))
        x = x + checkpoint_name(nn.DenseGeneral(DIM, axis=(-2, -1))(context), "out_proj")
        hidden = checkpoint_name(nn.gelu(nn.Dense(MLP)(nn.LayerNorm()(x))), "mlpwi")
        return x + checkpoint_name(nn.Dense(DIM)(hidden), "mlpwo")


class ViT(nn.Module):
    """The linen ViT; its blocks under ``policy`` and ``groups`` (:func:`remat.scan_layers`)."""

    policy: PolicyArg = "full"
    groups: Groups = None

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = nn.Conv(DIM, (PATCH, PATCH), strides=(PATCH, PATCH))(images)
        x = x.reshape(x.shape[0], -1, DIM)
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], DIM))
        x = scan_layers(Block, num_layers=LAYERS, policy=self.policy, groups=self.groups)()(x)
        return nn.Dense(CLASSES)(nn.LayerNorm()(x).mean(axis=1))


class NnxBlock(nnx.Module):
    """:class:`Block` in NNX."""

    def __init__(self, rngs: nnx.Rngs):
        self.norm1, self.norm2 = nnx.LayerNorm(DIM, rngs=rngs), nnx.LayerNorm(DIM, rngs=rngs)
        self.qkv = nnx.LinearGeneral(DIM, (3, HEADS, DIM // HEADS), rngs=rngs)
        self.out = nnx.LinearGeneral((HEADS, DIM // HEADS), DIM, axis=(-2, -1), rngs=rngs)
        self.wi, self.wo = nnx.Linear(DIM, MLP, rngs=rngs), nnx.Linear(MLP, DIM, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        context = _attention(checkpoint_name(self.qkv(self.norm1(x)), "qkv_proj"))
        x = x + checkpoint_name(self.out(context), "out_proj")
        hidden = checkpoint_name(nnx.gelu(self.wi(self.norm2(x))), "mlpwi")
        return x + checkpoint_name(self.wo(hidden), "mlpwo")


class NnxViT(nnx.Module):
    """:class:`ViT` in NNX; its blocks under ``policy`` and ``groups`` (:func:`remat.nnx.scan_layers`)."""

    def __init__(self, policy: PolicyArg = "full", groups: Groups = None, *, rngs: nnx.Rngs):
        self.patch = nnx.Conv(CHANNELS, DIM, (PATCH, PATCH), strides=(PATCH, PATCH), rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, (IMAGE // PATCH) ** 2, DIM)))
        self.blocks = nnx_scan_layers(NnxBlock, num_layers=LAYERS, policy=policy, groups=groups)(rngs=rngs)
        self.norm, self.head = nnx.LayerNorm(DIM, rngs=rngs), nnx.Linear(DIM, CLASSES, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.patch(images)
        x = x.reshape(x.shape[0], -1, DIM) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(axis=1))


def classification_loss(model: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """Mean cross-entropy (float32 scalar) of ``model(batch["images"])``
    against ``batch["labels"]`` (``int32[B]``), for either API."""
    logits = model(batch["images"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def batch_shapes(batch: int = 8) -> dict[str, jax.ShapeDtypeStruct]:
    """The abstract batch: ``images`` ``float32[batch, 32, 32, 3]``, ``labels`` ``int32[batch]``."""
    return {"images": jax.ShapeDtypeStruct((batch, IMAGE, IMAGE, CHANNELS), jnp.float32),
            "labels": jax.ShapeDtypeStruct((batch,), jnp.int32)}
