"""The NNX twin of :mod:`remat.models`: the same decoder, written as Flax NNX
modules (``nnx.Module``), layers scanned by :func:`remat.nnx.scan_layers`.

Same config, same computation (the linen and NNX modules call the same
functions of :mod:`remat.models.layers` and :mod:`remat.models.transformer`),
same checkpoint names, every family and option. The parameters have the
linen model's paths and shapes, so they convert both ways
(:func:`linen_params`, :func:`load_linen_params`) and, with dropout off, both
give the same loss and gradients for the same parameters. Dropout masks
differ between the APIs (each draws its own keys).

:class:`LinenApply` puts the NNX model behind linen's ``init``/``apply``, so
the train step, the sweep, ``remat tune`` and ``remat train`` run it
(``--api nnx``) on the linen parameter layout: one checkpoint serves both APIs.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from remat import nnx as remat_nnx
from remat._errors import RematError
from remat.models.config import ModelConfig, residual_init_std
from remat.models.layers import attention, has_bias, mlp, mlp_inputs, project
from remat.models.transformer import (
    Transformer as LinenTransformer,
    check_tokens,
    decoder_layer,
    embed_tokens,
    lm_head,
)
from remat.policies import Policy

__all__ = ["APIS", "Attention", "Block", "LinenApply", "Mlp", "Transformer", "check_api", "linen_params",
           "load_linen_params", "model_for_api"]


def _normal(cfg: ModelConfig, rngs: nnx.Rngs, shape: tuple[int, ...], residual: bool = False) -> nnx.Param:
    std = residual_init_std(cfg) if residual else cfg.init_std
    return nnx.Param(nn.initializers.normal(std)(rngs.params(), shape, cfg.param_dtype))


class Projection(nnx.Module):
    """:class:`remat.models.layers.Projection` in NNX: ``kernel[*in, *features]``
    (+ ``bias[*features]``), ``[..., *in] -> [..., *features]`` in ``config.dtype``."""

    def __init__(self, config: ModelConfig, in_shape: tuple[int, ...], features: tuple[int, ...], *,
                 residual: bool = False, bias: bool = False, rngs: nnx.Rngs):
        self.config, self.n_in = config, len(in_shape)
        self.kernel = _normal(config, rngs, (*in_shape, *features), residual)
        self.bias = (nnx.Param(nn.initializers.zeros(rngs.params(), features, config.param_dtype))
                     if has_bias(config, bias) else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        return project(x, self.kernel[...], bias, self.n_in, self.config.dtype)


def _norm(cfg: ModelConfig, features: int, rngs: nnx.Rngs, *, rms: bool = False) -> nnx.Module:
    """:func:`remat.models.layers.norm` (``rms=False``) or ``head_norm`` in NNX."""
    kw = dict(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    if cfg.family == "gpt2" and not rms:
        return nnx.LayerNorm(features, **kw)
    return nnx.RMSNorm(features, **kw)


class Attention(nnx.Module):
    """:class:`remat.models.Attention` in NNX; ``__call__(x_BxTxD, *,
    deterministic) -> [B, T, D]``, the same tags."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.query = Projection(cfg, (d,), (n, h), bias=cfg.qkv_bias, rngs=rngs)
        self.key = Projection(cfg, (d,), (k, h), bias=cfg.qkv_bias, rngs=rngs)
        self.value = Projection(cfg, (d,), (k, h), bias=cfg.qkv_bias, rngs=rngs)
        self.out = Projection(cfg, (n, h), (d,), residual=True, bias=cfg.out_bias, rngs=rngs)
        self.query_norm = _norm(cfg, h, rngs, rms=True) if cfg.qk_norm else None
        self.key_norm = _norm(cfg, h, rngs, rms=True) if cfg.qk_norm else None
        self.attn_dropout = nnx.Dropout(cfg.attn_dropout, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array, *, deterministic: bool) -> jax.Array:
        return attention(self.config, x_BxTxD, query=self.query, key=self.key, value=self.value,
                         out=self.out, query_norm=self.query_norm, key_norm=self.key_norm,
                         dropout=partial(self.attn_dropout, deterministic=deterministic))


class Mlp(nnx.Module):
    """:class:`remat.models.Mlp` in NNX, ``[B, T, D] -> [B, T, D]``, the same tags."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        for name in mlp_inputs(cfg):
            setattr(self, name, Projection(cfg, (cfg.d_model,), (cfg.mlp_dim,), bias=cfg.mlp_bias, rngs=rngs))
        self.wo = Projection(cfg, (cfg.mlp_dim,), (cfg.d_model,), residual=True, bias=cfg.mlp_bias, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        names = (*mlp_inputs(self.config), "wo")
        return mlp(self.config, x_BxTxD, {n: getattr(self, n) for n in names})


class Block(nnx.Module):
    """:class:`remat.models.Block` in NNX: ``__call__(x_BxTxD, *,
    deterministic) -> [B, T, D]``, the same tags and dropouts; each dropout
    keeps its own ``"dropout"`` stream."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = _norm(config, config.d_model, rngs)
        self.attention = Attention(config, rngs=rngs)
        self.attn_resid_dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)
        self.mlp_norm = _norm(config, config.d_model, rngs)
        self.mlp = Mlp(config, rngs=rngs)
        self.mlp_resid_dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array, *, deterministic: bool) -> jax.Array:
        drop = lambda d: partial(d, deterministic=deterministic)
        return decoder_layer(
            x_BxTxD, attn_norm=self.attn_norm, attention=drop(self.attention),
            attn_dropout=drop(self.attn_resid_dropout), mlp_norm=self.mlp_norm, mlp=self.mlp,
            mlp_dropout=drop(self.mlp_resid_dropout))


class Transformer(nnx.Module):
    """:class:`remat.models.Transformer` in NNX: ``tokens[B, T] int ->
    logits[B, T, V]`` (``config.dtype``), or with ``targets`` the mean
    next-token loss (nats, float32).

    ``Transformer(config, policy="full", groups=None, rngs=nnx.Rngs(params=0,
    dropout=1))``; the layers are ``self.layers.block``, every variable with
    a leading ``[L]`` axis (:func:`remat.nnx.scan_layers`). Parameters are
    initialised as the linen model's (the same distributions, not the same
    draws) and have its paths (``layers/block/...`` here, ``layers/...``
    there: :func:`linen_params`).

    Raises (at trace time):
      RematError: ``tokens`` not ``int[B, T]`` or ``T > config.max_seq_len``;
        policy and groups errors as :func:`remat.nnx.scan_layers`.
    """

    def __init__(self, config: ModelConfig, *, policy: str | Policy = "full", groups: Any = None,
                 rngs: nnx.Rngs):
        cfg = self.config = config
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                               embedding_init=nn.initializers.normal(cfg.init_std), rngs=rngs)
        self.pos_embed = _normal(cfg, rngs, (cfg.max_seq_len, cfg.d_model)) if cfg.family == "gpt2" else None
        self.embed_dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)
        stack = remat_nnx.scan_layers(Block, num_layers=cfg.num_layers, policy=policy, groups=groups,
                                      static_argnames=("deterministic",))
        self.layers = stack(cfg, rngs=rngs)
        self.final_norm = _norm(cfg, cfg.d_model, rngs)
        self.head = None if cfg.tie_embeddings else _Head(_normal(cfg, rngs, (cfg.d_model, cfg.vocab_size)))

    def __call__(self, tokens_BxT: jax.Array, *, deterministic: bool = True,
                 targets: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        check_tokens(cfg, tokens_BxT)
        pos = None if self.pos_embed is None else self.pos_embed[...]
        x_BxTxD = embed_tokens(cfg, self.embed(tokens_BxT), pos,
                               partial(self.embed_dropout, deterministic=deterministic))
        x_BxTxD = self.final_norm(self.layers(x_BxTxD, deterministic=deterministic))
        w_DxV = self.embed.embedding[...].T if self.head is None else self.head.kernel[...]
        return lm_head(cfg, x_BxTxD, w_DxV, targets)


class _Head(nnx.Module):
    """The untied output head ``kernel[D, V]`` (path ``head/kernel``, as linen's)."""

    def __init__(self, kernel: nnx.Param):
        self.kernel = kernel


def linen_params(model: Transformer) -> dict[str, Any]:
    """The parameters of an NNX :class:`Transformer` as the linen
    :class:`remat.models.Transformer`'s ``params`` tree (plain arrays, the same
    shapes and dtypes): ``layers/block/...`` becomes ``layers/...``."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {**pure, "layers": pure["layers"]["block"]}


def load_linen_params(model: Transformer, params: Mapping[str, Any]) -> None:
    """Set the NNX :class:`Transformer`'s parameters, in place, from a linen
    ``params`` tree (boxed or not; e.g. ``TrainState.params``).

    Raises:
      RematError: a tree that is not this model's: the missing, extra and
        mis-shaped paths, named.
    """
    params = nn.unbox(dict(params))
    state = nnx.state(model, nnx.Param)
    want = traverse_util.flatten_dict(linen_params(model), sep="/")
    got = traverse_util.flatten_dict(params, sep="/")
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    shapes = sorted(f"{k} {list(jnp.shape(got[k]))} (want {list(want[k].shape)})"
                    for k in set(want) & set(got) if jnp.shape(got[k]) != want[k].shape)
    if missing or extra or shapes:
        raise RematError("the parameters are not this model's: " + "; ".join(
            f"{what}: {', '.join(keys)}" for what, keys in
            (("missing", missing), ("extra", extra), ("shapes differ", shapes)) if keys))
    nnx.replace_by_pure_dict(state, {**params, "layers": {"block": params["layers"]}})
    nnx.update(model, state)


class LinenApply:
    """The NNX :class:`Transformer` behind linen's interface, for the tools
    that take a linen model (:func:`remat.step.make_train_step`, the sweep,
    ``remat tune``, ``remat train``): ``init`` gives linen-layout parameters
    (those of the linen twin, with its logical axis names, so a mesh shards
    them as it shards the linen model's), and ``apply`` builds the NNX model
    from the abstract module (``nnx.eval_shape``: nothing allocated), loads
    the parameters (:func:`load_linen_params`), reseeds every dropout stream
    from ``rngs["dropout"]`` (``nnx.reseed``, one key per layer) and calls it.

    Attributes:
      config: the model config.
    """

    def __init__(self, config: ModelConfig, policy: str | Policy = "full", groups: Any = None):
        self.config, self.policy, self.groups = config, policy, groups
        self._linen = LinenTransformer(config, policy=policy, groups=groups)
        self._graphdef, self._state = nnx.split(nnx.eval_shape(
            lambda: Transformer(config, policy=policy, groups=groups, rngs=nnx.Rngs(params=0, dropout=0))))

    def init(self, rngs: Any, tokens_BxT: jax.Array, **kwargs: Any) -> dict[str, Any]:
        """The linen twin's ``init`` (``{"params": ...}``, logically boxed)."""
        return self._linen.init(rngs, tokens_BxT, **kwargs)

    def apply(self, variables: Mapping[str, Any], tokens_BxT: jax.Array, *, deterministic: bool = True,
              rngs: Mapping[str, jax.Array] | None = None, targets: jax.Array | None = None) -> jax.Array:
        """``Transformer(...)(tokens, deterministic=, targets=)`` with
        ``variables["params"]``; ``rngs["dropout"]`` (default key 0) seeds dropout."""
        model = nnx.merge(self._graphdef, self._state, copy=True)
        load_linen_params(model, variables["params"])
        key = (rngs or {}).get("dropout", jax.random.key(0))
        nnx.reseed(model, policy="match_shape", dropout=key)
        return model(tokens_BxT, deterministic=deterministic, targets=targets)


APIS = ("linen", "nnx")
"""The Flax APIs a model is built in: ``--api`` on the command line."""


def model_for_api(config: ModelConfig, *, policy: str | Policy = "full", groups: Any = None,
                  api: str = "linen") -> LinenTransformer | LinenApply:
    """The model of ``config`` under ``policy``/``groups`` behind linen's
    ``init``/``apply``: the linen :class:`remat.models.Transformer`
    (``api="linen"``) or the NNX :class:`Transformer` (``"nnx"``, through
    :class:`LinenApply`).

    Raises:
      RematError: an unknown ``api`` (:func:`check_api`).
    """
    check_api(api)
    if api == "nnx":
        return LinenApply(config, policy, groups)
    return LinenTransformer(config, policy=policy, groups=groups)


def check_api(api: str) -> None:
    """Raise :class:`remat.RematError` unless ``api`` is one of :data:`APIS`, naming them."""
    if api not in APIS:
        raise RematError(f"unknown model api {api!r}; valid: {', '.join(APIS)}")
