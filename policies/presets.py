"""The built-in presets: JAX's policies, MaxText's ``remat_policy`` values,
Praxis's ``AutodiffCheckpointType`` values that map onto our names, and ours.

Importing this module registers them (``remat.policies`` does so).
"""

from __future__ import annotations

from remat import _compat
from remat.policies import vocab as v
from remat.policies.policy import Policy
from remat.policies.registry import register

_compat.hide_frames(__file__)

_QKV = frozenset({v.QUERY_PROJ, v.KEY_PROJ, v.VALUE_PROJ, v.QKV_PROJ})
_MLP_IN = frozenset({v.MLPWI_0, v.MLPWI_1, v.MLPWI})
_MINIMAL = _QKV | {v.OUT_PROJ, v.MLPWO} | _MLP_IN

# -- the two ends ------------------------------------------------------------------
register("none", Policy(remat=False), doc="""
    No rematerialization: jax.checkpoint is not applied, every residual is kept.
    The fastest and the most memory; the baseline of every comparison.""")
register("full", Policy(), doc="""
    Recompute everything: keep only the inputs of each checkpointed layer and
    re-run its forward pass in the backward pass (at most one extra forward of
    the layers; +18% to +28% FLOPs on our model presets). MaxText
    remat_policy=full; JAX nothing_saveable.""")

# -- JAX's jax.checkpoint_policies -----------------------------------------------------
register("everything_saveable", Policy(everything=True), doc="""
    JAX's everything_saveable, applied under jax.checkpoint as JAX applies it:
    every residual kept, as with 'none', but the function is still a
    checkpoint (JAX rounds its outputs as the backward pass sees them, and
    logs its residuals), unlike 'none', which applies no jax.checkpoint.""")
register("nothing_saveable", Policy(), doc="""
    JAX's nothing_saveable: recompute everything; the same policy as 'full'.""")
register("dots_saveable", Policy(dots="all"), doc="""
    JAX's dots_saveable (alias checkpoint_dots): keep the output of every
    matmul (dot_general), including attention's batched ones; recompute the
    elementwise work.""")
register("dots_with_no_batch_dims_saveable", Policy(dots="no_batch"), doc="""
    JAX's dots_with_no_batch_dims_saveable: keep matmul outputs without batch
    dimensions (the weight projections), recompute attention's batched matmuls.
    Caution: under an outer vmap or on batched expert einsums no matmul
    qualifies; prefer the name-based presets.""")
register("offload_dot_with_no_batch_dims", Policy(offload_dots="no_batch"), doc="""
    JAX's offload_dot_with_no_batch_dims: like dots_with_no_batch_dims_saveable,
    but the kept matmul outputs move to pinned host memory.""")

# -- MaxText's remat_policy values (MaxText/layers/decoders.py) ----------------------------
register("minimal", Policy(save=_MINIMAL), doc="""
    MaxText 'minimal': keep every projection (query/key/value or fused qkv,
    out_proj, mlpwi/mlpwi_0/mlpwi_1, mlpwo); recompute the attention core,
    norms and activations.""")
register("minimal_with_context", Policy(save=_MINIMAL | {v.CONTEXT}), doc="""
    MaxText 'minimal_with_context' (formerly 'minimal_flash'): 'minimal' plus the
    attention output 'context', so the attention core is not re-run for the
    out projection's gradient.""")
register("save_dot_with_context_except_mlp",
         Policy(save=_QKV | {v.CONTEXT, v.OUT_PROJ}), doc="""
    MaxText 'save_dot_with_context_except_mlp': keep the attention projections
    and context; recompute the whole MLP.""")
register("save_dot_except_mlpwi", Policy(save=_QKV | {v.OUT_PROJ, v.MLPWO}), doc="""
    MaxText 'save_dot_except_mlpwi': keep the attention projections and the MLP
    down projection; recompute the MLP up projections (the widest tensors).""")
register("save_dot_except_mlp", Policy(save=_QKV | {v.OUT_PROJ}), doc="""
    MaxText 'save_dot_except_mlp': keep the attention projections; recompute the
    whole MLP.""")
register("save_qkv_proj", Policy(save=_QKV), doc="""
    MaxText 'save_qkv_proj': keep only the query/key/value projections.""")
register("save_out_proj", Policy(save={v.OUT_PROJ}), doc="""
    MaxText 'save_out_proj' (also Praxis SAVE_OUT_PROJ): keep only the attention
    out projection.""")
register("qkv_proj_offloaded",
         Policy(offload={v.QUERY_PROJ, v.KEY_PROJ, v.VALUE_PROJ}), doc="""
    MaxText 'qkv_proj_offloaded': move the query/key/value projections to pinned
    host memory; recompute the rest.""")
register("minimal_offloaded", Policy(offload=_MINIMAL), doc="""
    MaxText 'minimal_offloaded': the names 'minimal' keeps, moved to pinned host
    memory instead of kept on device.""")

# -- Praxis's AutodiffCheckpointType (praxis/layers/checkpoint_policy.py) ----------------
register("save_nothing", Policy(), doc="Praxis SAVE_NOTHING: the same as 'full'.")
register("save_everything", Policy(everything=True), doc="""
    Praxis SAVE_EVERYTHING (Praxis applies jax.checkpoint_policies.everything_saveable
    under its remat): the same as everything_saveable.""")
register("save_qkv_out_proj", Policy(save=_QKV | {v.OUT_PROJ}), doc="""
    Praxis SAVE_QKV_OUT_PROJ: keep the query/key/value (or fused qkv) and out
    projections; the same names as MaxText's save_dot_except_mlp.""")
register("save_context", Policy(save={v.CONTEXT}), doc="""
    Praxis SAVE_CONTEXT: keep only the attention output 'context'.""")
register("save_context_and_out_proj", Policy(save={v.CONTEXT, v.OUT_PROJ}), doc="""
    Praxis SAVE_CONTEXT_AND_OUT_PROJ: keep the attention output and its out
    projection.""")
register("save_dot_only", Policy(dots="all"), doc="""
    Praxis SAVE_DOT_ONLY: keep every matmul output; the same as dots_saveable.""")
register("save_dot_with_no_batch_dim", Policy(dots="no_batch"), doc="""
    Praxis SAVE_DOT_WITH_NO_BATCH_DIM: the same as
    dots_with_no_batch_dims_saveable.""")
register("save_iteration_input", Policy(save={v.DECODER_LAYER_INPUT}), doc="""
    Praxis SAVE_ITERATION_INPUT: keep the layer input (Praxis 'iteration_input',
    our 'decoder_layer_input'); useful inside nested (grouped) checkpointing.""")

# -- ours ---------------------------------------------------------------------------
register("selective",
         Policy(save=_MINIMAL | {v.CONTEXT, v.ATTN_NORM, v.MLP_NORM}), doc="""
    Selective activation recomputation (Korthikanti et al. 2022): keep every
    matmul output and the norms' outputs, recompute only the attention core
    (scores, softmax, dropout: the [B, N, T, T] tensors that grow with T^2).""")
