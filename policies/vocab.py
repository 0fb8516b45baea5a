"""Checkpoint-name vocabulary: the tags that models emit and policies refer to.

Models mark a value as saveable by name with
``jax.ad_checkpoint.checkpoint_name(x, NAME)``; a policy then keeps, offloads
or recomputes each name. We use MaxText's names (``MaxText/layers``) so that a
MaxText user's ``remat_policy`` carries over unchanged, and add only what the
field lacks: the attention core (scores, probabilities) that selective
recomputation (Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models") drops, and the normalisation outputs.

Shapes use B = batch, T = sequence, D = model width, N = query heads,
K = key/value heads, H = head width, F = MLP hidden width, L = layers.

MaxText's presets name both spellings of a projection (``qkv_proj`` and the
separate ``query_proj``/``key_proj``/``value_proj``; ``mlpwi`` and the gated
``mlpwi_0``/``mlpwi_1``), because a model emits one or the other.
:data:`ALTERNATIVES` records those pairs: validation accepts a name that is
not emitted only when the same policy also names an alternative spelling that
is, so such a preset is valid on both kinds of model, while ``save:mlpwi``
alone on a gated MLP (which would keep nothing) is an error.
"""

from __future__ import annotations

# --- MaxText's names ---------------------------------------------------------
DECODER_LAYER_INPUT = "decoder_layer_input"
"""The input of a decoder layer, ``[B, T, D]`` (the scan carry)."""
QUERY_PROJ = "query_proj"
"""Query projection output, ``[B, T, N, H]``."""
KEY_PROJ = "key_proj"
"""Key projection output, ``[B, T, K, H]``."""
VALUE_PROJ = "value_proj"
"""Value projection output, ``[B, T, K, H]``."""
QKV_PROJ = "qkv_proj"
"""Fused query/key/value projection output, ``[B, T, 3, N, H]``."""
CONTEXT = "context"
"""Attention output before the out projection, ``[B, T, N, H]``."""
OUT_PROJ = "out_proj"
"""Attention out projection output, ``[B, T, D]``."""
MLPWI = "mlpwi"
"""Non-gated MLP up projection output, ``[B, T, F]``."""
MLPWI_0 = "mlpwi_0"
"""Gated MLP: gate projection output, ``[B, T, F]``."""
MLPWI_1 = "mlpwi_1"
"""Gated MLP: up projection output, ``[B, T, F]``."""
MLPWO = "mlpwo"
"""MLP down projection output, ``[B, T, D]``."""

# --- ours ----------------------------------------------------------------------
ATTN_SCORES = "attn_scores"
"""Attention logits ``q k^T / sqrt(H)`` after masking, ``[B, N, T, T]``."""
ATTN_PROBS = "attn_probs"
"""Attention probabilities after softmax (and dropout), ``[B, N, T, T]``."""
ATTN_NORM = "attn_norm"
"""Output of the pre-attention norm, ``[B, T, D]``."""
MLP_NORM = "mlp_norm"
"""Output of the pre-MLP norm, ``[B, T, D]``."""

MAXTEXT_NAMES: tuple[str, ...] = (
    DECODER_LAYER_INPUT, QUERY_PROJ, KEY_PROJ, VALUE_PROJ, QKV_PROJ, CONTEXT,
    OUT_PROJ, MLPWI, MLPWI_0, MLPWI_1, MLPWO,
)
"""MaxText's checkpoint names, in MaxText's order."""
EXTRA_NAMES: tuple[str, ...] = (ATTN_SCORES, ATTN_PROBS, ATTN_NORM, MLP_NORM)
"""Names this project adds."""
ALL_NAMES: tuple[str, ...] = MAXTEXT_NAMES + EXTRA_NAMES
"""Every name of the vocabulary."""

ALTERNATIVES: dict[str, frozenset[str]] = {
    QKV_PROJ: frozenset({QUERY_PROJ, KEY_PROJ, VALUE_PROJ}),
    QUERY_PROJ: frozenset({QKV_PROJ}),
    KEY_PROJ: frozenset({QKV_PROJ}),
    VALUE_PROJ: frozenset({QKV_PROJ}),
    MLPWI: frozenset({MLPWI_0, MLPWI_1}),
    MLPWI_0: frozenset({MLPWI}),
    MLPWI_1: frozenset({MLPWI}),
}
"""For each name, the names a model may emit instead (fused vs split)."""

LOSS_HEAD_SCOPE = "loss_head"
"""Not a checkpoint name: the ``jax.named_scope`` around a model's loss head
(the logits ``[B, T, V]`` and the cross-entropy). Checkpoint names do not reach
the compiled program, but named scopes do (in each HLO op's ``op_name``), so
the memory breakdown counts the buffers made under this scope as the loss-head
term. Wrap your own model's head in it to have it counted so."""


def missing_names(wanted: frozenset[str], emitted: frozenset[str]) -> frozenset[str]:
    """The names in ``wanted`` that neither occur in ``emitted`` nor have an
    alternative spelling (see :data:`ALTERNATIVES`) that is also in
    ``wanted`` and occurs in ``emitted``.

    Example: ``save:mlpwi`` on a gated MLP keeps nothing; a policy that also
    names ``mlpwi_0`` fits it.

      >>> from remat.policies.vocab import missing_names
      >>> sorted(missing_names({"mlpwi"}, {"mlpwi_0", "mlpwi_1"}))
      ['mlpwi']
      >>> sorted(missing_names({"mlpwi", "mlpwi_0"}, {"mlpwi_0", "mlpwi_1"}))
      []

    Args:
      wanted: names a policy saves or offloads.
      emitted: names a traced function emits.

    Returns:
      The unsatisfied names; empty when the policy fits the function.
    """
    return frozenset(
        n for n in wanted
        if n not in emitted and not (ALTERNATIVES.get(n, frozenset()) & wanted & emitted)
    )
