"""Building blocks of the decoder: norms, RoPE, attention, MLPs.

Shape-suffix legend (nanodo style; a local ``x_BxTxD`` has shape ``[B, T, D]``):

- B: batch
- T: query sequence length; S: key/value sequence length (``S == T`` here)
- D: model width (``d_model``)
- N: query heads; K: key/value heads; G = N / K, query heads per kv head
- H: head width (``head_dim``)
- F: MLP hidden width (``mlp_dim``)
- V: vocabulary

Logical axis names (MaxText style, for ``flax.linen`` logical partitioning
rules): parameters use ``"embed"`` (D), ``"heads"`` (N), ``"kv_heads"`` (K),
``"head_dim"`` (H), ``"mlp"`` (F), ``"vocab"`` (V), ``"norm"`` (a norm's D);
activations have names of their own, as MaxText's: ``"activation_batch"``,
``"activation_length"``, ``"activation_embed"``, ``"activation_heads"``,
``"activation_kv_heads"``, ``"activation_kv"`` (H), ``"activation_mlp"``,
``"activation_vocab"``, so that sharding a parameter's axis (FSDP shards
``embed``) never constrains an activation's, and the reverse (the rules:
:mod:`remat._mesh`). The scanned layer axis is ``"layers"`` (added by
:func:`remat.scan_layers`).

Checkpoint names come from :mod:`remat.policies.vocab`; each is placed where
MaxText places it (``MaxText/layers/attentions.py``, ``linears.py``,
``llama2.py``), after the logical constraint of the tensor it names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from remat._errors import RematError
from remat.models.config import ModelConfig, residual_init_std
from remat.policies import vocab

# Logical axes of activations.
BTD = ("activation_batch", "activation_length", "activation_embed")
BTNH = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
BTKH = ("activation_batch", "activation_length", "activation_kv_heads", "activation_kv")
BNTS = ("activation_batch", "activation_heads", "activation_length", None)
BTF = ("activation_batch", "activation_length", "activation_mlp")
BTV = ("activation_batch", "activation_length", "activation_vocab")


def tag(x: jax.Array, name: str, axes: tuple[str | None, ...]) -> jax.Array:
    """Constrain ``x`` to logical ``axes`` (``nn.with_logical_constraint``, a
    no-op without a mesh and rules) and name it for remat policies
    (``jax.ad_checkpoint.checkpoint_name``)."""
    return checkpoint_name(nn.with_logical_constraint(x, axes), name)


def kernel_init(config: ModelConfig, axes: tuple[str | None, ...], *,
                residual: bool = False) -> nn.initializers.Initializer:
    """Normal(``init_std``) initialiser with logical axis names; ``residual``
    projections use ``init_std / sqrt(2 L)`` (GPT-2)."""
    std = residual_init_std(config) if residual else config.init_std
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def norm(config: ModelConfig, name: str) -> nn.Module:
    """The family's normalisation layer over the last axis: ``LayerNorm`` (scale
    and bias) for gpt2 (Ba et al. 2016), ``RMSNorm`` (scale) for llama (Zhang &
    Sennrich 2019). Statistics in float32, output in ``config.dtype``."""
    scale_init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
    if config.family == "gpt2":
        return nn.LayerNorm(
            epsilon=config.norm_eps, dtype=config.dtype, param_dtype=config.param_dtype,
            scale_init=scale_init,
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), name=name)
    return nn.RMSNorm(epsilon=config.norm_eps, dtype=config.dtype, param_dtype=config.param_dtype,
                      scale_init=scale_init, name=name)


def head_norm(config: ModelConfig, name: str) -> nn.Module:
    """RMSNorm over ``head_dim`` (scale ``[H]``), for Qwen3's q/k norm."""
    return nn.RMSNorm(epsilon=config.norm_eps, dtype=config.dtype, param_dtype=config.param_dtype,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("head_dim",)), name=name)


def rope(x_BxTxMxH: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (Su et al. 2021, "RoFormer"), Llama's
    half-split convention (Hugging Face ``rotate_half``): feature ``i`` pairs
    with ``i + H/2`` and rotates by ``t * theta^(-2i/H)`` at position ``t``.

    Args:
      x_BxTxMxH: queries or keys, ``[B, T, M, H]`` (M heads), any float dtype;
        position ``t`` is the index along T.
      theta: base frequency (``rope_theta``).

    Returns:
      The rotated array, same shape and dtype; the angles and the rotation are
      computed in float32.
    """
    _, t, _, h = x_BxTxMxH.shape
    inv_freq_Hh = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    angle_TxHh = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq_Hh[None, :]
    sin_1xTx1xHh, cos_1xTx1xHh = jnp.sin(angle_TxHh)[None, :, None, :], jnp.cos(angle_TxHh)[None, :, None, :]
    x1, x2 = jnp.split(x_BxTxMxH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos_1xTx1xHh - x2 * sin_1xTx1xHh, x2 * cos_1xTx1xHh + x1 * sin_1xTx1xHh], -1)
    return out.astype(x_BxTxMxH.dtype)


def attention_implementation(config: ModelConfig) -> str:
    """The ``implementation=`` passed to ``jax.nn.dot_product_attention`` for
    ``attention="dot_product_attention"``: ``"cudnn"`` (flash attention, Dao et
    al. 2022, through cuDNN) when the default backend is a GPU and the compute
    dtype is bf16 or f16 (cuDNN's requirement), else ``"xla"``. cuDNN raises
    for shapes it does not support (e.g. head_dim > 128 or not a multiple of 8),
    never falls back silently. Returns ``"einsum"`` for ``attention="xla"``
    and ``"cudnn"`` for ``attention="cudnn"`` (a GPU target compiled from
    any host).
    """
    if config.attention == "xla":
        return "einsum"
    if config.attention == "cudnn":
        return "cudnn"
    if jax.default_backend() == "gpu" and config.dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def project(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, n_in: int, dtype: Any) -> jax.Array:
    """``[..., *in] @ kernel[*in, *features] (+ bias[*features]) -> [..., *features]``
    with ``lax.dot_general`` in ``dtype`` (the projection of both model APIs)."""
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (contract, ((), ())))
    if bias is not None:
        y = y + bias.astype(dtype).reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
    return y


def has_bias(config: ModelConfig, bias: bool) -> bool:
    """Whether a projection adds a bias: always in the gpt2 family."""
    return bias or config.family == "gpt2"


class Projection(nn.Module):
    """A linear map of the trailing axes, ``[..., *in] -> [..., *features]``,
    kernel ``[*in, *features]`` (+ bias ``[*features]`` for gpt2 or with ``bias``), computed with
    ``lax.dot_general`` in ``config.dtype`` (parameters kept in
    ``config.param_dtype``).

    Used instead of ``nn.DenseGeneral``, whose initialiser unboxes a
    logically-partitioned kernel while it is still flattened to 2-D, which
    fails under a mesh for kernels of rank > 2 (flax 0.12).

    Attributes:
      config: for dtypes and the init std.
      features: output feature shape, e.g. ``(N, H)``.
      in_axes: logical names of the contracted trailing input axes.
      out_axes: logical names of ``features``.
      residual: use the residual-projection init std (GPT-2).
      bias: add a bias (always in the gpt2 family).
    """

    config: ModelConfig
    features: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    residual: bool = False
    bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        n_in = len(self.in_axes)
        init = kernel_init(cfg, (*self.in_axes, *self.out_axes), residual=self.residual)
        kernel = self.param("kernel", init, (*x.shape[-n_in:], *self.features), cfg.param_dtype)
        bias = None
        if has_bias(cfg, self.bias):
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.out_axes),
                              self.features, cfg.param_dtype)
        return project(x, kernel, bias, n_in, cfg.dtype)


Layer = Callable[[jax.Array], jax.Array]


def attention(cfg: ModelConfig, x_BxTxD: jax.Array, *, query: Layer, key: Layer, value: Layer, out: Layer,
              query_norm: Layer | None, key_norm: Layer | None, dropout: Layer) -> jax.Array:
    """The attention computation of :class:`Attention` (and of its NNX twin),
    given its layers: the q/k/v projections (``[B, T, D] -> [B, T, N|K, H]``),
    the output projection, Qwen3's per-head norms (when ``qk_norm``) and the
    dropout on the probabilities. Tags as :class:`Attention` describes."""
    q_BxTxNxH = tag(query(x_BxTxD), vocab.QUERY_PROJ, BTNH)
    k_BxSxKxH = tag(key(x_BxTxD), vocab.KEY_PROJ, BTKH)
    v_BxSxKxH = tag(value(x_BxTxD), vocab.VALUE_PROJ, BTKH)
    if cfg.qk_norm:  # Qwen3: RMSNorm per head on queries and keys, before RoPE
        q_BxTxNxH, k_BxSxKxH = query_norm(q_BxTxNxH), key_norm(k_BxSxKxH)
    if cfg.family == "llama":
        q_BxTxNxH = rope(q_BxTxNxH, cfg.rope_theta)
        k_BxSxKxH = rope(k_BxSxKxH, cfg.rope_theta)
    if cfg.attention == "xla":
        ctx_BxTxNxH = _einsum_attention(cfg, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, dropout)
    elif cfg.attention == "pallas":
        ctx_BxTxNxH = pallas_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH)
    else:
        ctx_BxTxNxH = jax.nn.dot_product_attention(
            q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, is_causal=True, implementation=attention_implementation(cfg))
    ctx_BxTxNxH = tag(ctx_BxTxNxH, vocab.CONTEXT, BTNH)
    return tag(out(ctx_BxTxNxH), vocab.OUT_PROJ, BTD)


def _einsum_attention(cfg: ModelConfig, q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                      dropout: Layer) -> jax.Array:
    b, t, n, h = q_BxTxNxH.shape
    s, k = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    g = n // k
    # Query head n = k * G + g attends with kv head k (Llama's repeat_kv order).
    q_BxTxKxGxH = (q_BxTxNxH * jnp.asarray(h ** -0.5, q_BxTxNxH.dtype)).reshape(b, t, k, g, h)
    scores_BxKxGxTxS = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH)
    scores_BxNxTxS = scores_BxKxGxTxS.reshape(b, n, t, s)
    causal_TxS = jnp.tril(jnp.ones((t, s), dtype=bool), k=s - t)
    scores_BxNxTxS = jnp.where(causal_TxS, scores_BxNxTxS, jnp.finfo(scores_BxNxTxS.dtype).min)
    scores_BxNxTxS = tag(scores_BxNxTxS, vocab.ATTN_SCORES, BNTS)
    probs_BxNxTxS = jax.nn.softmax(scores_BxNxTxS.astype(jnp.float32), axis=-1).astype(cfg.dtype)
    probs_BxNxTxS = tag(dropout(probs_BxNxTxS), vocab.ATTN_PROBS, BNTS)
    probs_BxKxGxTxS = probs_BxNxTxS.reshape(b, k, g, t, s)
    ctx_BxTxKxGxH = jnp.einsum("bkgts,bskh->btkgh", probs_BxKxGxTxS, v_BxSxKxH)
    return ctx_BxTxKxGxH.reshape(b, t, n, h)


PALLAS_BLOCK = 128
"""The block size of the Pallas TPU flash attention's default ``BlockSizes``
(``jax.experimental.pallas.ops.tpu.flash_attention``): the sequence length
must be a multiple of it."""


def pallas_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array) -> jax.Array:
    """Causal flash attention (Dao et al. 2022) with JAX's Pallas TPU kernel,
    ``jax.experimental.pallas.ops.tpu.flash_attention`` (``[B, N, T, H]``
    layout, scale ``H**-0.5``), as MaxText's ``attention_kernel: flash`` on TPU.

    The kernel takes as many key/value heads as query heads, so grouped
    keys and values are repeated (query head ``k * G + g`` with kv head
    ``k``, as :func:`_einsum_attention` groups them). Under a mesh
    (``jax.set_mesh``) the kernel runs per shard in ``jax.shard_map``, split
    as flax's logical-axis rules split the activations' batch and heads (a
    Pallas call is not partitioned by XLA). Needs ``T`` and ``S`` multiples of
    :data:`PALLAS_BLOCK`; compiles for TPU only.

    Returns:
      ``[B, T, N, H]`` in the queries' dtype.

    Raises:
      RematError: ``T`` or ``S`` not a multiple of :data:`PALLAS_BLOCK`.
    """
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention

    t, s = q_BxTxNxH.shape[1], k_BxSxKxH.shape[1]
    if t % PALLAS_BLOCK or s % PALLAS_BLOCK:
        raise RematError(f"attention='pallas': sequence length {t} (keys {s}) is not a multiple of "
                         f"{PALLAS_BLOCK}, the Pallas TPU flash attention's block; use a multiple of "
                         f"{PALLAS_BLOCK} or attention='xla'")
    n, k, h = q_BxTxNxH.shape[2], k_BxSxKxH.shape[2], q_BxTxNxH.shape[3]
    k_BxNxSxH = jnp.repeat(k_BxSxKxH, n // k, axis=2).transpose(0, 2, 1, 3)
    v_BxNxSxH = jnp.repeat(v_BxSxKxH, n // k, axis=2).transpose(0, 2, 1, 3)
    q_BxNxTxH = q_BxTxNxH.transpose(0, 2, 1, 3)
    kernel = partial(flash_attention, causal=True, sm_scale=h ** -0.5)
    if not jax.sharding.get_abstract_mesh().empty:
        spec = nn.logical_to_mesh_axes(("activation_batch", "activation_heads", None, None))
        kernel = jax.shard_map(kernel, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    return kernel(q_BxNxTxH, k_BxNxSxH, v_BxNxSxH).transpose(0, 2, 1, 3)


class Attention(nn.Module):
    """Causal self-attention with separate query/key/value projections:
    multi-head (K == N) or grouped-query (K < N, Ainslie et al. 2023, without
    repeating K/V: queries are grouped ``[B, T, K, G, H]`` against ``[B, S, K, H]``).

    ``__call__(x_BxTxD, *, deterministic) -> [B, T, D]`` in ``config.dtype``.
    Tags ``query_proj``, ``key_proj``, ``value_proj`` (``[B, T, N|K, H]``,
    before RoPE), ``attn_scores`` (masked logits ``[B, N, T, S]``) and
    ``attn_probs`` (after softmax and dropout) with ``attention="xla"``,
    ``context`` (``[B, T, N, H]``) and ``out_proj`` (``[B, T, D]``). Llama
    rotates queries and keys with RoPE; gpt2 adds biases. Softmax in float32.
    Dropout on the probabilities at ``config.attn_dropout`` (rng ``"dropout"``).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, *, deterministic: bool) -> jax.Array:
        cfg = self.config
        n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def proj(features: tuple[int, int], heads_axis: str, name: str) -> nn.Module:
            return Projection(cfg, features, ("embed",), (heads_axis, "head_dim"), bias=cfg.qkv_bias,
                              name=name)

        return attention(
            cfg, x_BxTxD, query=proj((n, h), "heads", "query"), key=proj((k, h), "kv_heads", "key"),
            value=proj((k, h), "kv_heads", "value"),
            out=Projection(cfg, (cfg.d_model,), ("heads", "head_dim"), ("embed",), residual=True,
                           bias=cfg.out_bias, name="out"),
            query_norm=head_norm(cfg, "query_norm") if cfg.qk_norm else None,
            key_norm=head_norm(cfg, "key_norm") if cfg.qk_norm else None,
            dropout=partial(nn.Dropout(cfg.attn_dropout, name="attn_dropout"), deterministic=deterministic))


def mlp(cfg: ModelConfig, x_BxTxD: jax.Array, dense: Mapping[str, Layer]) -> jax.Array:
    """The feed-forward computation of :class:`Mlp` (and of its NNX twin),
    given its projections by name (``wi`` for gpt2, ``wi_0``/``wi_1`` for
    llama, and ``wo``)."""
    if cfg.family == "gpt2":
        h_BxTxF = nn.gelu(tag(dense["wi"](x_BxTxD), vocab.MLPWI, BTF), approximate=True)
    else:
        gate_BxTxF = tag(dense["wi_0"](x_BxTxD), vocab.MLPWI_0, BTF)
        up_BxTxF = tag(dense["wi_1"](x_BxTxD), vocab.MLPWI_1, BTF)
        act = nn.silu if cfg.mlp_activation == "silu" else partial(nn.gelu, approximate=True)
        h_BxTxF = act(gate_BxTxF) * up_BxTxF
    return tag(dense["wo"](h_BxTxF), vocab.MLPWO, BTD)


def mlp_inputs(cfg: ModelConfig) -> tuple[str, ...]:
    """The names of the MLP's input projections: ``("wi",)`` (gpt2) or ``("wi_0", "wi_1")``."""
    return ("wi",) if cfg.family == "gpt2" else ("wi_0", "wi_1")


class Mlp(nn.Module):
    """The feed-forward block, ``[B, T, D] -> [B, T, D]`` in ``config.dtype``.

    gpt2: ``wo(gelu_tanh(wi x))`` with biases (Hendrycks & Gimpel 2016; GPT-2's
    ``gelu_new``), tags ``mlpwi`` and ``mlpwo``. llama: SwiGLU ``wo(silu(wi_0
    x) * wi_1 x)`` without biases (Shazeer 2020), tags ``mlpwi_0`` (gate),
    ``mlpwi_1`` (up) and ``mlpwo``.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        cfg = self.config

        def dense(features: int, axes: tuple[str, str], name: str, residual: bool = False) -> nn.Module:
            return Projection(cfg, (features,), axes[:1], axes[1:], residual=residual, bias=cfg.mlp_bias,
                              name=name)

        layers = {name: dense(cfg.mlp_dim, ("embed", "mlp"), name) for name in mlp_inputs(cfg)}
        return mlp(cfg, x_BxTxD, {**layers, "wo": dense(cfg.d_model, ("mlp", "embed"), "wo", residual=True)})
