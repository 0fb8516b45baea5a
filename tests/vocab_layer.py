"""A small layer that emits every checkpoint name of the vocabulary, shared
by the policy tests (unscanned) and the scan tests (scanned, grouped)."""

from __future__ import annotations

import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from remat.policies import vocab as v


def vocab_layer(w, x):
    """``w[9, D, D], x[..., D] -> [..., D]``: every name tagged once (split and
    fused projections in separate branches), each on a no-batch matmul output
    or an elementwise value."""
    x = checkpoint_name(x, v.DECODER_LAYER_INPUT)
    h = checkpoint_name(x / (1 + jnp.abs(x)), v.ATTN_NORM)
    q, k, val = (checkpoint_name(jnp.sin(h @ w[i]), n) for i, n in enumerate((v.QUERY_PROJ, v.KEY_PROJ,
                                                                              v.VALUE_PROJ)))
    qkv = checkpoint_name(jnp.sin(h @ w[3]), v.QKV_PROJ)
    s = checkpoint_name(jnp.sin(q * k), v.ATTN_SCORES)
    pr = checkpoint_name(jnp.sin(s), v.ATTN_PROBS)
    ctx = checkpoint_name(jnp.sin(pr * val + qkv), v.CONTEXT)
    o = checkpoint_name(jnp.sin(ctx @ w[4]), v.OUT_PROJ)
    m = checkpoint_name(jnp.cos(o), v.MLP_NORM)
    a = checkpoint_name(jnp.sin(m @ w[5]), v.MLPWI)
    g = checkpoint_name(jnp.sin(m @ w[6]), v.MLPWI_0) * checkpoint_name(jnp.sin(m @ w[7]), v.MLPWI_1)
    return x + checkpoint_name(jnp.sin((a + g) @ w[8]), v.MLPWO)
