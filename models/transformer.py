"""The decoder block and the language model that scans it over layers.

Shape-suffix legend (nanodo style; ``x_BxTxD`` has shape ``[B, T, D]``):
B batch, T sequence, D model width, V vocabulary (see :mod:`remat.models.layers`
for the attention and MLP letters).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from remat._errors import RematError
from remat._scan import scan_layers
from remat.models.config import ModelConfig
from remat.models.layers import BTD, BTV, Attention, Mlp, kernel_init, norm, tag
from remat.policies import Policy, vocab


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
        x_BxTxD = tag(x_BxTxD, vocab.DECODER_LAYER_INPUT, BTD)
        h_BxTxD = tag(norm(cfg, "attn_norm")(x_BxTxD), vocab.ATTN_NORM, BTD)
        h_BxTxD = Attention(cfg, name="attention")(h_BxTxD, deterministic=deterministic)
        h_BxTxD = nn.Dropout(cfg.dropout_rate, name="attn_resid_dropout")(
            h_BxTxD, deterministic=deterministic)
        x_BxTxD = x_BxTxD + h_BxTxD
        h_BxTxD = tag(norm(cfg, "mlp_norm")(x_BxTxD), vocab.MLP_NORM, BTD)
        h_BxTxD = Mlp(cfg, name="mlp")(h_BxTxD)
        h_BxTxD = nn.Dropout(cfg.dropout_rate, name="mlp_resid_dropout")(
            h_BxTxD, deterministic=deterministic)
        return nn.with_logical_constraint(x_BxTxD + h_BxTxD, BTD)


class Transformer(nn.Module):
    """A decoder-only language model, ``tokens[B, T] int -> logits[B, T, V]``.

    Token embedding (plus GPT-2's learned positions) and dropout, then
    ``config.num_layers`` :class:`Block` s scanned by :func:`remat.scan_layers`
    with ``policy`` per layer and optional nested ``groups``, then the final
    norm and the output head (the embedding transposed when
    ``config.tie_embeddings``, else a ``[D, V]`` kernel ``head``). Logits are in
    ``config.dtype``; :func:`remat.step.lm_loss` upcasts them.

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
    def __call__(self, tokens_BxT: jax.Array, *, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        if tokens_BxT.ndim != 2 or not jnp.issubdtype(tokens_BxT.dtype, jnp.integer):
            raise RematError(
                f"Transformer takes integer tokens [B, T], got {tokens_BxT.dtype}{list(tokens_BxT.shape)}")
        t = tokens_BxT.shape[1]
        if t > cfg.max_seq_len:
            raise RematError(f"sequence length T={t} exceeds config.max_seq_len={cfg.max_seq_len}")

        embed = nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=kernel_init(cfg, ("vocab", "embed")), name="embed")
        x_BxTxD = embed(tokens_BxT)
        if cfg.family == "gpt2":
            pos_TmaxxD = self.param("pos_embed", kernel_init(cfg, (None, "embed")),
                                    (cfg.max_seq_len, cfg.d_model), cfg.param_dtype)
            x_BxTxD = x_BxTxD + pos_TmaxxD[None, :t].astype(cfg.dtype)
        x_BxTxD = nn.Dropout(cfg.dropout_rate, name="embed_dropout")(x_BxTxD, deterministic=deterministic)
        x_BxTxD = nn.with_logical_constraint(x_BxTxD, BTD)

        stack = scan_layers(
            Block, num_layers=cfg.num_layers, policy=self.policy, groups=self.groups,
            static_argnames=("deterministic",))
        x_BxTxD = stack(config=cfg, name="layers")(x_BxTxD, deterministic=deterministic)

        x_BxTxD = norm(cfg, "final_norm")(x_BxTxD)
        if cfg.tie_embeddings:
            logits_BxTxV = embed.attend(x_BxTxD)
        else:
            logits_BxTxV = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                kernel_init=kernel_init(cfg, ("embed", "vocab")), name="head")(x_BxTxD)
        return nn.with_logical_constraint(logits_BxTxV, BTV)


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
