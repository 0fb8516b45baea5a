"""The decoder block and the language model that scans it over layers.

Shape-suffix legend (nanodo style; ``x_BxTxD`` has shape ``[B, T, D]``):
B batch, T sequence, D model width, V vocabulary (see :mod:`remat.models.layers`
for the attention and MLP letters).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from remat._errors import RematError
from remat._scan import scan_layers
from remat.models.config import ModelConfig
from remat.models.layers import BTD, BTV, Attention, Layer, Mlp, kernel_init, norm, tag
from remat.policies import Policy, vocab


def lm_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in nats, computed in float32.

    Args:
      logits: ``[B, T, V]`` any float dtype.
      tokens: ``int32[B, T]``; position t predicts token t + 1.

    Returns:
      A float32 scalar: nats per predicted token.
    """
    with jax.named_scope(vocab.LOSS_HEAD_SCOPE):  # counted as the loss head in the peak breakdown
        logits = logits[:, :-1].astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


class Block(nn.Module):
    """One pre-norm decoder layer, ``x + attn(norm(x))`` then ``x + mlp(norm(x))``
    (GPT-2, Radford et al. 2019; Llama, Touvron et al. 2023), the family taken
    from ``config.family``.

    ``__call__(x_BxTxD, *, deterministic) -> [B, T, D]``, same dtype as the
    input (``config.dtype``). Tags, in order: ``decoder_layer_input``,
    ``attn_norm``, the attention's names (:class:`remat.models.layers.Attention`),
    ``mlp_norm``, the MLP's names (:class:`remat.models.layers.Mlp`). Dropout at
    ``config.dropout_rate`` on both residual branches when ``deterministic`` is
    False (rng ``"dropout"``).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, *, deterministic: bool) -> jax.Array:
        cfg = self.config
        dropout = lambda name: partial(nn.Dropout(cfg.dropout_rate, name=name), deterministic=deterministic)
        return decoder_layer(
            x_BxTxD, attn_norm=norm(cfg, "attn_norm"),
            attention=partial(Attention(cfg, name="attention"), deterministic=deterministic),
            attn_dropout=dropout("attn_resid_dropout"), mlp_norm=norm(cfg, "mlp_norm"),
            mlp=Mlp(cfg, name="mlp"), mlp_dropout=dropout("mlp_resid_dropout"))


def decoder_layer(x_BxTxD: jax.Array, *, attn_norm: Layer, attention: Layer, attn_dropout: Layer,
                  mlp_norm: Layer, mlp: Layer, mlp_dropout: Layer) -> jax.Array:
    """The computation of :class:`Block` (and of its NNX twin), given its layers."""
    x_BxTxD = tag(x_BxTxD, vocab.DECODER_LAYER_INPUT, BTD)
    h_BxTxD = attention(tag(attn_norm(x_BxTxD), vocab.ATTN_NORM, BTD))
    x_BxTxD = x_BxTxD + attn_dropout(h_BxTxD)
    h_BxTxD = mlp(tag(mlp_norm(x_BxTxD), vocab.MLP_NORM, BTD))
    return nn.with_logical_constraint(x_BxTxD + mlp_dropout(h_BxTxD), BTD)


class Transformer(nn.Module):
    """A decoder-only language model, ``tokens[B, T] int -> logits[B, T, V]``.

    Token embedding (plus GPT-2's learned positions) and dropout, then
    ``config.num_layers`` :class:`Block` s scanned by :func:`remat.scan_layers`
    with ``policy`` per layer and optional nested ``groups``, then the final
    norm and the output head (the embedding transposed when
    ``config.tie_embeddings``, else a ``[D, V]`` kernel ``head``). Logits are in
    ``config.dtype``; :func:`lm_loss` upcasts them.

    Parameters: ``embed/embedding [V, D]``, ``pos_embed [max_seq_len, D]``
    (gpt2), ``layers/...`` (every leaf of a :class:`Block` with a leading
    ``[L]`` axis, logical name ``"layers"``), ``final_norm``, ``head/kernel``
    (untied), all in ``config.param_dtype`` with logical axis names.

    Attributes:
      config: the shapes and options.
      policy: a remat policy name, spec string or :class:`remat.Policy`
        applied to each layer (``"none"``: no rematerialization).
      groups: ``None``, ``(G, K)`` with ``G * K == num_layers``, or ``"sqrt"``:
        nested checkpointing of groups of layers (see :func:`remat.scan_layers`).

    Raises (at trace time):
      ValueError: ``tokens`` not a 2-D integer array, or ``T > config.max_seq_len``;
        policy and groups errors come from :func:`remat.scan_layers`.
    """

    config: ModelConfig
    policy: str | Policy = "full"
    groups: tuple[int, int] | str | None = None

    @nn.compact
    def __call__(self, tokens_BxT: jax.Array, *, deterministic: bool = True,
                 targets: jax.Array | None = None) -> jax.Array:
        """``tokens[B, T] -> logits[B, T, V]`` (``config.dtype``); with
        ``targets`` (``int32[B, T]``, usually the tokens themselves), the mean
        next-token cross-entropy in nats instead, position ``t`` predicting
        ``targets[:, t + 1]`` (as :func:`lm_loss`), computed by the
        loss head in ``config.loss_chunks`` chunks (:func:`chunked_lm_loss`)."""
        cfg = self.config
        check_tokens(cfg, tokens_BxT)
        embed = nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=kernel_init(cfg, ("vocab", "embed")), name="embed")
        pos_TmaxxD = None
        if cfg.family == "gpt2":
            pos_TmaxxD = self.param("pos_embed", kernel_init(cfg, (None, "embed")),
                                    (cfg.max_seq_len, cfg.d_model), cfg.param_dtype)
        x_BxTxD = embed_tokens(cfg, embed(tokens_BxT), pos_TmaxxD, partial(
            nn.Dropout(cfg.dropout_rate, name="embed_dropout"), deterministic=deterministic))

        stack = scan_layers(
            Block, num_layers=cfg.num_layers, policy=self.policy, groups=self.groups,
            static_argnames=("deterministic",))
        x_BxTxD = stack(config=cfg, name="layers")(x_BxTxD, deterministic=deterministic)

        x_BxTxD = norm(cfg, "final_norm")(x_BxTxD)
        if cfg.tie_embeddings:
            w_DxV = embed.embedding.T
        else:
            w_DxV = self.param("head", _HeadKernel(kernel_init(cfg, ("embed", "vocab"))),
                               (cfg.d_model, cfg.vocab_size), cfg.param_dtype)["kernel"]
        return lm_head(cfg, x_BxTxD, w_DxV, targets)


def check_tokens(cfg: ModelConfig, tokens_BxT: jax.Array) -> None:
    """Raise :class:`remat.RematError` unless ``tokens`` is ``int[B, T]`` with ``T <= max_seq_len``."""
    if tokens_BxT.ndim != 2 or not jnp.issubdtype(tokens_BxT.dtype, jnp.integer):
        raise RematError(
            f"Transformer takes integer tokens [B, T], got {tokens_BxT.dtype}{list(tokens_BxT.shape)}")
    if tokens_BxT.shape[1] > cfg.max_seq_len:
        raise RematError(
            f"sequence length T={tokens_BxT.shape[1]} exceeds config.max_seq_len={cfg.max_seq_len}")


def embed_tokens(cfg: ModelConfig, x_BxTxD: jax.Array, pos_TmaxxD: jax.Array | None,
                 dropout: Layer) -> jax.Array:
    """Token embeddings ``[B, T, D]`` -> the first layer's input: Gemma's
    ``sqrt(D)`` scale, GPT-2's learned positions, dropout, the logical constraint."""
    if cfg.embed_scale:  # Gemma: embeddings times sqrt(D), the factor in the compute dtype
        x_BxTxD = x_BxTxD * jnp.asarray(cfg.d_model ** 0.5, cfg.dtype)
    if pos_TmaxxD is not None:
        x_BxTxD = x_BxTxD + pos_TmaxxD[None, :x_BxTxD.shape[1]].astype(cfg.dtype)
    return nn.with_logical_constraint(dropout(x_BxTxD), BTD)


def lm_head(cfg: ModelConfig, x_BxTxD: jax.Array, w_DxV: jax.Array, targets: jax.Array | None) -> jax.Array:
    """The output head under the ``loss_head`` named scope: ``logits[B, T, V]``
    (``config.dtype``), or with ``targets`` the mean next-token loss (nats,
    float32), in ``config.loss_chunks`` chunks when > 1 (:func:`chunked_lm_loss`)."""
    with jax.named_scope(vocab.LOSS_HEAD_SCOPE):
        if targets is not None and cfg.loss_chunks > 1:
            return chunked_lm_loss(x_BxTxD, w_DxV, targets, cfg.loss_chunks, cfg.dtype)
        logits_BxTxV = nn.with_logical_constraint(_logits(x_BxTxD, w_DxV, cfg.dtype), BTV)
        return logits_BxTxV if targets is None else lm_loss(logits_BxTxV, targets)


def _logits(x: jax.Array, w_DxV: jax.Array, dtype: Any) -> jax.Array:
    """``x @ w`` in ``dtype`` (as ``nn.Dense`` and ``nn.Embed.attend`` compute it)."""
    return jnp.dot(x.astype(dtype), w_DxV.astype(dtype))


class _HeadKernel:
    """The untied head's initialiser as a ``{"kernel": [D, V]}`` param, so the
    parameter path stays ``head/kernel`` (as an ``nn.Dense`` named ``head``)."""

    def __init__(self, init: Any):
        self.init = init

    def __call__(self, key: jax.Array, shape: tuple[int, int], dtype: Any) -> dict[str, Any]:
        return {"kernel": self.init(key, shape, dtype)}


def chunked_lm_loss(x_BxTxD: jax.Array, w_DxV: jax.Array, targets_BxT: jax.Array, chunks: int,
                    dtype: Any) -> jax.Array:
    """Mean next-token cross-entropy (nats, float32) of ``logits = x @ w``,
    computed over the token positions in ``chunks`` pieces so that the float32
    logits ``[B, T, V]`` are never whole in memory ("vocab tiling").

    A ``jax.custom_vjp``: when differentiated, a ``lax.scan`` over the pieces
    computes each piece's logits ``[B, T/chunks, V]``, its cross-entropy and,
    in the same step, its gradients: ``d x`` for the piece and ``d w``
    accumulated in float32 (constrained to the head weight's logical axes
    ``("embed", "vocab")``, so a mesh shards it as the parameter). The
    backward pass only scales them by the incoming cotangent: nothing is
    recomputed, the FLOPs are those of the whole-logits head, and the
    residuals are ``d x`` and ``d w``. Positions are padded to a multiple of
    ``chunks`` and the padding masked. Without differentiation the scan
    computes the loss alone.

    Equal to ``lm_loss(x @ w, targets)`` up to float rounding (the
    matmuls run in ``dtype`` as the whole head's do; ``d w`` is summed over
    pieces in float32).

    Measured compile-only at batch 8 under ``full`` (8 chunks against 1):
    ``gpt2-small`` x 1024 on one device, peak 6.24 -> 4.39 GiB, the loss-head
    term at the peak 3.07 GiB -> 12 MiB, FLOPs +0.02 %. On ``llama3-8b`` x 2048
    the loss-head term falls 15.91 GiB -> 128 MiB but the peak does not
    (149.34 -> 149.58 GiB: it moves to the layers' backward pass), and on an
    ``fsdp=8`` mesh it rises (20.75 -> 23.92 GiB): each piece's matmuls need
    the whole gathered head weight, more than the per-device logits saved.
    """
    b, t, d = x_BxTxD.shape
    n = t - 1
    size = -(-n // chunks)
    pad = size * chunks - n
    h = jnp.pad(x_BxTxD[:, :-1], ((0, 0), (0, pad), (0, 0))).reshape(b, chunks, size, d).swapaxes(0, 1)
    y = jnp.pad(targets_BxT[:, 1:], ((0, 0), (0, pad))).reshape(b, chunks, size).swapaxes(0, 1)
    mask = (jnp.arange(size * chunks) < n).reshape(chunks, 1, size)

    def piece_loss(h_BxSxD: jax.Array, w_c: jax.Array, y_BxS: jax.Array, m_1xS: jax.Array):
        logits = nn.with_logical_constraint(_logits(h_BxSxD, w_c, dtype), BTV).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y_BxS)
        return jnp.sum(jnp.where(m_1xS, ce, 0.0)) / (b * n), logits

    def loss_only(h: jax.Array, w: jax.Array) -> jax.Array:
        w_c = w.astype(dtype)

        def piece(total, xs):
            return total + piece_loss(xs[0], w_c, xs[1], xs[2])[0], None
        return jax.lax.scan(piece, jnp.float32(0.0), (h, y, mask))[0]

    def loss_and_grads(h: jax.Array, w: jax.Array):
        w_c = nn.with_logical_constraint(w.astype(dtype), (None, None))  # gathered once, not per piece

        def piece(carry, xs):
            total, dw_DxV = carry
            h_BxSxD, y_BxS, m_1xS = xs
            loss, logits = piece_loss(h_BxSxD, w_c, y_BxS, m_1xS)
            # d loss / d logits of the masked mean cross-entropy
            dl = (jax.nn.softmax(logits) - jax.nn.one_hot(y_BxS, logits.shape[-1], dtype=jnp.float32))
            dl = (jnp.where(m_1xS[..., None], dl, 0.0) / (b * n)).astype(dtype)
            dl = nn.with_logical_constraint(dl, BTV)
            dh_BxSxD = nn.with_logical_constraint(jnp.einsum("bsv,dv->bsd", dl, w_c), BTD)
            dw_DxV = dw_DxV + nn.with_logical_constraint(
                jnp.einsum("bsd,bsv->dv", h_BxSxD.astype(dtype), dl, preferred_element_type=jnp.float32),
                ("embed", "vocab"))
            return (total + loss, nn.with_logical_constraint(dw_DxV, ("embed", "vocab"))), dh_BxSxD

        dw0 = nn.with_logical_constraint(jnp.zeros(w.shape, jnp.float32), ("embed", "vocab"))
        (total, dw), dh = jax.lax.scan(piece, (jnp.float32(0.0), dw0), (h, y, mask))
        return total, dh.astype(h.dtype), dw.astype(w.dtype)

    @jax.custom_vjp
    def head(h: jax.Array, w: jax.Array) -> jax.Array:
        return loss_only(h, w)

    def head_fwd(h: jax.Array, w: jax.Array):
        total, dh, dw = loss_and_grads(h, w)
        return total, (dh, dw)

    def head_bwd(res, g):
        dh, dw = res
        return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype)

    head.defvjp(head_fwd, head_bwd)
    return head(h, w_DxV)


def param_count(config: ModelConfig, **model_kwargs: Any) -> int:
    """The number of parameters of ``Transformer(config)``, counted from
    ``jax.eval_shape`` of its init (nothing is allocated; seconds even for
    70B). ``config.num_params`` gives the same by formula.

    Args:
      config: the model.
      **model_kwargs: passed to :class:`Transformer` (``policy``, ``groups``).
    """
    model = Transformer(config, **model_kwargs)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(
        lambda tok: model.init(jax.random.key(0), tok, deterministic=True), tokens)
    return sum(int(x.size) for x in jax.tree.leaves(shapes))
