"""``remat.models``: decoder-only transformers that scan over layers, every
saveable tensor tagged with the checkpoint-name vocabulary
(:mod:`remat.policies.vocab`).

- :class:`ModelConfig`, :func:`get_config`, :func:`names`: shapes and options,
  presets with published shapes (``tiny``, GPT-2 small..xl, Llama 3.2 1B/3B,
  Llama 3 8B/70B).
- :class:`Transformer`: ``tokens[B, T] -> logits[B, T, V]``, layers scanned by
  :func:`remat.scan_layers` under a remat policy; :class:`Block`, one layer.
- :func:`param_count`: parameters counted through ``jax.eval_shape``.
- :mod:`remat.models.nnx`: the same model in Flax NNX, its parameters
  convertible to and from the linen model's.
- :mod:`remat.models.vit`: a small ViT classifier in linen and NNX, the
  example of your own model that is not a decoder.
- :func:`from_hf_config`: your own model from its Hugging Face ``config.json``
  (llama, mistral, qwen2, qwen3, gemma, gpt2), :func:`from_maxtext_config`
  from a MaxText model YAML; :func:`get_config` and every ``--model`` also
  take the file's path.
"""

from remat.models import nnx, vit
from remat.models.config import PUBLISHED_PARAMS, ModelConfig, get_config, names
from remat.models.hf import from_hf_config, from_maxtext_config
from remat.models.layers import Attention, Mlp, attention_implementation, rope
from remat.models.transformer import Block, Transformer, param_count

__all__ = [
    "PUBLISHED_PARAMS",
    "Attention",
    "Block",
    "Mlp",
    "ModelConfig",
    "Transformer",
    "attention_implementation",
    "from_hf_config",
    "from_maxtext_config",
    "get_config",
    "names",
    "nnx",
    "param_count",
    "rope",
    "vit",
]
