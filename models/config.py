"""Model configuration: one frozen dataclass for both block families, and presets
with the published shapes.

Sources for the presets: GPT-2 (Radford et al. 2019; Hugging Face ``gpt2``,
``gpt2-medium``, ``gpt2-large``, ``gpt2-xl`` ``config.json``), Llama 3
(Grattafiori et al. 2024, "The Llama 3 Herd of Models", Table 3) and the
``meta-llama/Llama-3.2-1B``, ``Llama-3.2-3B``, ``Meta-Llama-3-8B`` and
``Meta-Llama-3-70B`` ``config.json`` files. Llama 3.1/3.2's long-context RoPE
frequency scaling (``rope_scaling.rope_type = "llama3"``) is not modelled: it
changes no shape, parameter or memory figure, only the angles beyond 8k tokens.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

from remat._errors import RematError

Family = Literal["gpt2", "llama"]
"""``"gpt2"``: LayerNorm, learned positions, GELU MLP, multi-head attention,
biases. ``"llama"``: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention, no
biases."""
MlpActivation = Literal["silu", "gelu_tanh"]
"""The llama family's gated MLP activation: ``"silu"`` (SwiGLU: Llama, Mistral,
Qwen) or ``"gelu_tanh"`` (GeGLU with the tanh approximation: Gemma)."""
AttentionImpl = Literal["xla", "dot_product_attention", "cudnn", "pallas"]
"""``"xla"``: einsum attention that tags ``attn_scores`` and ``attn_probs``;
``"dot_product_attention"``: ``jax.nn.dot_product_attention`` (cuDNN flash
attention when the default backend is a GPU), which tags only its output
``context``; ``"cudnn"``: the same with ``implementation="cudnn"`` always, for
a GPU target compiled from a host without one (the kernel follows the target,
not the host); ``"pallas"``: JAX's Pallas TPU flash attention
(``jax.experimental.pallas.ops.tpu.flash_attention``) for a TPU target, which
also tags only ``context``."""

FAMILIES: tuple[str, ...] = ("gpt2", "llama")
MLP_ACTIVATIONS: tuple[str, ...] = ("silu", "gelu_tanh")
ATTENTION_IMPLS: tuple[str, ...] = ("xla", "dot_product_attention", "cudnn", "pallas")
_DTYPE_ALIASES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "f16": "float16", "fp16": "float16", "float16": "float16",
    "f32": "float32", "fp32": "float32", "float32": "float32",
}
_FLOAT_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16), np.dtype(jnp.float32))


def _dtype(field: str, value: Any) -> np.dtype:
    """Normalise ``"bf16"``/``"f32"``/``jnp.bfloat16``/... to a numpy dtype."""
    if isinstance(value, str):
        if value.lower() not in _DTYPE_ALIASES:
            raise RematError(
                f"ModelConfig.{field}={value!r} is not a dtype name; valid: "
                f"{', '.join(sorted(_DTYPE_ALIASES))} or jnp.bfloat16/float16/float32")
        value = _DTYPE_ALIASES[value.lower()]
    try:
        dt = np.dtype(value)
    except TypeError:
        dt = None
    if dt not in _FLOAT_DTYPES:
        raise RematError(
            f"ModelConfig.{field}={value!r} is not a supported float dtype; valid: "
            "bfloat16 ('bf16'), float16 ('f16'), float32 ('f32')")
    return dt


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shapes and options of a decoder-only transformer (:class:`remat.models.Transformer`).

    Frozen and hashable, so it can be a static argument and a linen module
    attribute. Build one from a preset with :func:`get_config`.

    Attributes:
      family: ``"gpt2"`` or ``"llama"`` (see :data:`Family`).
      vocab_size: V, tokens.
      num_layers: L, decoder blocks (scanned).
      d_model: D, residual stream width.
      num_heads: N, query heads.
      num_kv_heads: K, key/value heads; ``N % K == 0`` (K < N is grouped-query
        attention, Ainslie et al. 2023). The GPT-2 presets have ``K == N``
        (multi-head attention); a smaller K is allowed in both families.
      head_dim: H, width of one head (``N * H`` need not equal D).
      mlp_dim: F, MLP hidden width.
      max_seq_len: longest sequence T; the size of GPT-2's learned position
        table, and the bound :class:`Transformer` checks for both families.
      dropout_rate: dropout probability on the embedding output and on both
        residual branches (GPT-2's ``embd_pdrop``/``resid_pdrop``); rng stream
        ``"dropout"``, active only when ``deterministic=False``.
      attention_dropout_rate: dropout probability on the attention
        probabilities (GPT-2's ``attn_pdrop``); ``None`` (default) means the
        same as ``dropout_rate``. Must be 0 with ``attention="dot_product_attention"``,
        which has no dropout.
      tie_embeddings: the output head reuses the token embedding (``logits =
        x @ E^T``); otherwise a separate ``[D, V]`` head.
      dtype: compute dtype of activations and matmuls (bf16 or f32; the strings
        ``"bf16"``/``"f32"``/``"f16"`` are accepted and normalised to a numpy dtype).
        Norm statistics and softmax run in float32 whatever this is.
      param_dtype: dtype of the parameters (float32 by default).
      attention: ``"xla"``, ``"dot_product_attention"``, ``"cudnn"`` or
        ``"pallas"`` (see :data:`AttentionImpl`).
      rope_theta: RoPE base frequency (Su et al. 2021), llama only.
      norm_eps: epsilon of LayerNorm / RMSNorm.
      loss_chunks: compute the logits and the cross-entropy of a train step in
        this many chunks over the token positions (:meth:`Transformer.__call__`
        with ``targets``), so the float32 ``[B, T, V]`` logits are never whole
        in memory ("vocab tiling"); 1 (default) computes them at once.
      init_std: standard deviation of the normal initialiser of embeddings and
        kernels; the two residual projections (``out_proj``, ``mlpwo``) use
        ``init_std / sqrt(2 L)`` as GPT-2 does.
      qkv_bias: llama family: biases on the query, key and value projections
        (Qwen2; Hugging Face ``attention_bias`` sets this and ``out_bias``).
      out_bias: llama family: a bias on the attention's out projection.
      mlp_bias: llama family: biases on the MLP's projections (``mlp_bias``).
      qk_norm: llama family: RMSNorm over ``head_dim`` on the queries and keys
        before RoPE, one ``[H]`` scale each per layer (Qwen3).
      mlp_activation: llama family: see :data:`MlpActivation`.
      embed_scale: multiply the token embeddings by ``sqrt(D)`` (Gemma).
      name: where the configuration came from (a preset, a ``config.json``'s
        ``model_type``), for reports; no effect on the model.

    Raises:
      ValueError: naming the field and the bad value: an unknown family,
        attention or dtype, a non-positive size, ``num_heads`` not a multiple of
        ``num_kv_heads``, an odd llama
        ``head_dim`` (RoPE rotates pairs), a rate outside [0, 1), attention
        dropout with ``dot_product_attention``, a non-positive ``rope_theta``,
        ``norm_eps`` or ``init_std``.
    """

    family: Family
    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_seq_len: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float | None = None
    tie_embeddings: bool = True
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    attention: AttentionImpl = "xla"
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    loss_chunks: int = 1
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    mlp_activation: MlpActivation = "silu"
    embed_scale: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise RematError(f"ModelConfig.family={self.family!r}; valid: {', '.join(FAMILIES)}")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise RematError(
                f"ModelConfig.mlp_activation={self.mlp_activation!r}; valid: {', '.join(MLP_ACTIVATIONS)}")
        llama_only = ("qkv_bias", "out_bias", "mlp_bias", "qk_norm")
        llama_set = any(getattr(self, f) for f in llama_only) or self.mlp_activation != "silu"
        if self.family == "gpt2" and llama_set:
            raise RematError(f"ModelConfig: {', '.join((*llama_only, 'mlp_activation'))} are llama-family "
                             "options (the gpt2 family always has biases, no q/k norm and a GELU MLP)")
        if self.attention not in ATTENTION_IMPLS:
            raise RematError(
                f"ModelConfig.attention={self.attention!r}; valid: {', '.join(ATTENTION_IMPLS)}")
        for field in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads",
                      "head_dim", "mlp_dim", "max_seq_len", "loss_chunks"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
                raise RematError(f"ModelConfig.{field}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise RematError(
                f"ModelConfig.num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}")
        if self.family == "llama" and self.head_dim % 2:
            raise RematError(
                f"ModelConfig.head_dim={self.head_dim} must be even for the llama family "
                "(RoPE rotates pairs of features)")
        for field in ("dropout_rate", "attention_dropout_rate"):
            value = getattr(self, field)
            if value is not None and not 0.0 <= value < 1.0:
                raise RematError(f"ModelConfig.{field}={value!r} must be in [0, 1)")
        if self.attention != "xla" and self.attn_dropout > 0:
            raise RematError(
                f"ModelConfig.attention_dropout_rate={self.attn_dropout} (from "
                f"{'dropout_rate' if self.attention_dropout_rate is None else 'attention_dropout_rate'}) "
                f"with attention={self.attention!r}, which has no attention dropout; "
                "set attention_dropout_rate=0.0 or attention='xla'")
        for field in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, field)
            if not value > 0:
                raise RematError(f"ModelConfig.{field}={value!r} must be positive")
        object.__setattr__(self, "dtype", _dtype("dtype", self.dtype))
        object.__setattr__(self, "param_dtype", _dtype("param_dtype", self.param_dtype))

    @property
    def attn_dropout(self) -> float:
        """The effective dropout rate on attention probabilities."""
        return self.dropout_rate if self.attention_dropout_rate is None else self.attention_dropout_rate

    @property
    def num_groups(self) -> int:
        """G = N / K, query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    @property
    def num_params(self) -> int:
        """The number of parameters (scalars), by formula; equals the count of
        the leaves of ``Transformer(config).init`` (tested).

        Per layer: attention ``D N H + 2 D K H + N H D`` (+ biases ``N H + 2 K H``
        and ``D``: gpt2, ``qkv_bias``, ``out_bias``; + ``2 H`` with ``qk_norm``),
        MLP ``2 D F`` (gpt2, + biases ``F + D``) or ``3 D F`` (llama, + ``2 F +
        D`` with ``mlp_bias``), norms ``2 D`` (RMSNorm) or ``4 D`` (LayerNorm). Outside:
        token embedding ``V D``, gpt2's position table ``T_max D``, final norm,
        untied head ``D V``.
        """
        d, n, k, h, f = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim
        gpt2 = self.family == "gpt2"
        attn = d * n * h + 2 * d * k * h + n * h * d
        attn += (n * h + 2 * k * h if gpt2 or self.qkv_bias else 0) + (d if gpt2 or self.out_bias else 0)
        attn += 2 * h if self.qk_norm else 0
        mlp = 2 * d * f + f + d if gpt2 else 3 * d * f + (2 * f + d if self.mlp_bias else 0)
        norm = 2 * d if gpt2 else d
        per_layer = attn + mlp + 2 * norm
        outside = self.vocab_size * d + norm + (self.max_seq_len * d if gpt2 else 0)
        if not self.tie_embeddings:
            outside += d * self.vocab_size
        return self.num_layers * per_layer + outside


def _gpt2(layers: int, d: int, heads: int) -> ModelConfig:
    return ModelConfig(
        family="gpt2", vocab_size=50257, num_layers=layers, d_model=d, num_heads=heads,
        num_kv_heads=heads, head_dim=d // heads, mlp_dim=4 * d, max_seq_len=1024,
        dropout_rate=0.1, tie_embeddings=True, dtype="bf16", norm_eps=1e-5)


def _llama(layers: int, d: int, heads: int, kv: int, mlp: int, *, tied: bool,
           max_seq_len: int) -> ModelConfig:
    return ModelConfig(
        family="llama", vocab_size=128256, num_layers=layers, d_model=d, num_heads=heads,
        num_kv_heads=kv, head_dim=d // heads, mlp_dim=mlp, max_seq_len=max_seq_len,
        dropout_rate=0.0, tie_embeddings=tied, dtype="bf16", rope_theta=500_000.0, norm_eps=1e-5)


_PRESETS: dict[str, ModelConfig] = {
    # Tests and the CPU training demo: bytes as tokens.
    "tiny": ModelConfig(
        family="llama", vocab_size=256, num_layers=4, d_model=128, num_heads=4, num_kv_heads=2,
        head_dim=32, mlp_dim=384, max_seq_len=512, dropout_rate=0.0, tie_embeddings=True,
        dtype="f32"),
    "gpt2-small": _gpt2(12, 768, 12),
    "gpt2-medium": _gpt2(24, 1024, 16),
    "gpt2-large": _gpt2(36, 1280, 20),
    "gpt2-xl": _gpt2(48, 1600, 25),
    "llama3.2-1b": _llama(16, 2048, 32, 8, 8192, tied=True, max_seq_len=131072),
    "llama3.2-3b": _llama(28, 3072, 24, 8, 8192, tied=True, max_seq_len=131072),
    "llama3-8b": _llama(32, 4096, 32, 8, 14336, tied=False, max_seq_len=8192),
    "llama3-70b": _llama(80, 8192, 64, 8, 28672, tied=False, max_seq_len=8192),
}

PUBLISHED_PARAMS: dict[str, float] = {
    "gpt2-small": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "gpt2-xl": 1.56e9,
    "llama3.2-1b": 1.24e9, "llama3.2-3b": 3.21e9, "llama3-8b": 8.03e9, "llama3-70b": 70.6e9,
}
"""Published parameter counts of the presets (GPT-2: Radford et al. 2019 as
recounted by Hugging Face; Llama: Meta's model cards)."""


def names() -> list[str]:
    """Every preset name, smallest first within each family (``tiny`` first)."""
    return list(_PRESETS)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A preset, optionally with fields replaced (``dataclasses.replace``).

    Example:
      >>> from remat.models import get_config
      >>> cfg = get_config("tiny", family="gpt2", dtype="bf16")
      >>> cfg.family, cfg.num_layers
      ('gpt2', 4)

    Args:
      name: one of :func:`names`, the path of a Hugging Face ``config.json``
        (:func:`remat.models.from_hf_config`) or of a MaxText model YAML
        (:func:`remat.models.from_maxtext_config`).
      **overrides: :class:`ModelConfig` fields to replace; the result is
        validated again.

    Raises:
      ValueError: an unknown preset (with close matches and the valid names),
        an unknown field, an override that fails validation, or the errors of
        :func:`remat.models.from_hf_config`.
    """
    if name.endswith(".json"):
        from remat.models.hf import from_hf_config

        base = from_hf_config(name)
    elif name.endswith((".yml", ".yaml")):
        from remat.models.hf import from_maxtext_config

        base = from_maxtext_config(name)
    elif name not in _PRESETS:
        close = difflib.get_close_matches(name, names(), n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise RematError(f"unknown model preset {name!r}{hint}; valid names: {', '.join(names())}, "
                         "or the path of a Hugging Face config.json or a MaxText model .yml")
    else:
        base = _PRESETS[name]
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise RematError(f"unknown ModelConfig field(s) {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(sorted(fields))}")
    return dataclasses.replace(base, **overrides)


def residual_init_std(config: ModelConfig) -> float:
    """Init std of the residual projections: ``init_std / sqrt(2 L)`` (GPT-2 paper, §2.3)."""
    return config.init_std / math.sqrt(2 * config.num_layers)
