"""Your own model from its Hugging Face ``config.json`` or MaxText model YAML.

:func:`from_hf_config` maps the decoder families people train onto
:class:`remat.models.ModelConfig`, with the checkpoint names of
:mod:`remat.policies.vocab`, so every preset policy applies:

================  ===========================================================
``model_type``    what it becomes
================  ===========================================================
``llama``         Llama 2, 3, 3.1, 3.2: RMSNorm, RoPE, SwiGLU, GQA
``mistral``       as llama (the sliding window is accepted and ignored)
``qwen2``         as llama, with biases on the q/k/v projections
``qwen3``         as llama, with RMSNorm on q and k per head (``head_dim`` given)
``gemma``         as llama, GeGLU (tanh) MLP, embeddings scaled by sqrt(D), tied
``gpt2``          LayerNorm, learned positions, GELU MLP, biases (own keys)
================  ===========================================================

A key missing from the file takes the default of that architecture's
configuration class in Hugging Face ``transformers`` (``LlamaConfig``,
``MistralConfig``, ``Qwen2Config``, ``Qwen3Config``, ``GemmaConfig``,
``GPT2Config``): :data:`HF_FALLBACKS`. Keys that change shapes and are not
modelled (mixture of experts, low-rank attention) are errors naming them;
keys that change numerics but no shape or memory figure (RoPE scaling,
sliding windows, dropout in inference configs) are accepted and listed in
:data:`IGNORED`. A key that is not one of the configuration class's (or
MaxText's ``base.yml``'s: :func:`known_keys`) and closely matches one that
is, is an error naming both (a typo would take a default silently); a key
read of the wrong type is an error naming the type expected; the defaults a
file leaves to apply are said (:func:`defaults_note`).
"""

from __future__ import annotations

import difflib
import functools
import importlib.resources
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from remat._errors import RematError
from remat.models.config import ModelConfig

__all__ = [
    "HF_FALLBACKS",
    "IGNORED",
    "MAXTEXT_BLOCKS",
    "MAXTEXT_FALLBACKS",
    "SUPPORTED",
    "defaults_note",
    "from_hf_config",
    "from_maxtext_config",
    "ignored_keys",
    "maxtext_run_defaults",
]

_LLAMA = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
          "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
          "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False}

HF_FALLBACKS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA,
    "mistral": {**_LLAMA, "intermediate_size": 14336, "num_key_value_heads": 8,
                "max_position_embeddings": 4096 * 32},
    "qwen2": {**_LLAMA, "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
              "max_position_embeddings": 32768},
    "qwen3": {**_LLAMA, "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
              "head_dim": 128, "max_position_embeddings": 32768},
    "gemma": {**_LLAMA, "vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576,
              "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16,
              "head_dim": 256, "hidden_act": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
              "tie_word_embeddings": True},
    "gpt2": {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
             "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
             "tie_word_embeddings": True},
}
"""The defaults of ``transformers``' configuration classes for the keys read."""

SUPPORTED: tuple[str, ...] = tuple(HF_FALLBACKS)
"""The ``model_type`` values :func:`from_hf_config` reads."""

IGNORED: tuple[str, ...] = ("rope_scaling", "sliding_window", "use_sliding_window", "max_window_layers",
                            "attention_dropout", "pretraining_tp", "layer_types")
"""Keys that change numerics but no shape, parameter or memory figure: accepted, not modelled."""

def defaults_note(path: str | os.PathLike) -> str | None:
    """The keys a ``config.json`` or MaxText YAML leaves out (or sets to
    null) that are read, with the defaults that apply to them, as one line;
    None when it sets every one. So "no ``hidden_size``, so 4096" is seen."""
    path = os.fspath(path)
    if path.endswith(".json"):
        with open(path) as f:
            raw = json.load(f)
        kind = raw.get("model_type")
        given, fallbacks = raw, HF_FALLBACKS.get(kind, {})
        source = f"transformers' {_HF_CLASSES.get(kind, kind)} defaults"
    else:
        given, fallbacks, source = _maxtext_yaml(path), MAXTEXT_FALLBACKS, "MaxText's base.yml defaults"
    left = {k: v for k, v in fallbacks.items() if given.get(k) is None and v is not None}
    if not left:
        return None
    return (f"{path} leaves out {len(left)} of the keys read; {source} apply: "
            + ", ".join(f"{k}={v!r}" for k, v in left.items()))


_HF_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
               "qwen3": "Qwen3Config", "gemma": "GemmaConfig", "gpt2": "GPT2Config"}


def ignored_keys(path: str | os.PathLike) -> list[str]:
    """The keys of :data:`IGNORED` that a ``config.json`` sets (not null, not false)."""
    with open(path) as f:
        raw = json.load(f)
    return [k for k in IGNORED if raw.get(k)]


_UNMODELLED = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size",
               "q_lora_rank", "kv_lora_rank", "num_experts_per_tok")
"""Keys that change shapes (mixture of experts, low-rank attention) and are not modelled."""

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu": "gelu_tanh"}


def from_hf_config(source: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """A :class:`ModelConfig` from a Hugging Face ``config.json`` (its path, or
    the parsed dict). Compute dtype bf16, parameters f32, no dropout, as the
    presets; ``overrides`` replace any field (e.g. ``dtype="f32"``).

    Example:
      >>> cfg = from_hf_config({"model_type": "mistral"})  # every key at MistralConfig's default
      >>> cfg.num_params
      7241732096

    Raises:
      RematError: an unsupported ``model_type`` (naming it and the supported
        ones), a key that changes shapes and is not modelled, an activation
        the family does not have, or a file that cannot be read.
    """
    if isinstance(source, Mapping):
        raw, where = dict(source), "the config"
    else:
        try:
            with open(source) as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise RematError(f"cannot read the Hugging Face config {os.fspath(source)!r}: {e}") from e
        where = os.fspath(source)
    if not isinstance(raw, Mapping):
        raise RematError(f"{where} is a JSON {type(raw).__name__}, not an object of keys and values: "
                         "a Hugging Face config.json is one object")
    kind = raw.get("model_type")
    if kind not in HF_FALLBACKS:
        raise RematError(f"model_type={kind!r} in {where} is not supported; supported: "
                         f"{', '.join(SUPPORTED)}")
    unmodelled = [k for k in _UNMODELLED if raw.get(k)]
    if unmodelled:
        verb = "changes shapes and is" if len(unmodelled) == 1 else "change shapes and are"
        raise RematError(f"{where} sets {', '.join(unmodelled)}, which {verb} not modelled "
                         f"(supported: dense decoders of model_type {', '.join(SUPPORTED)})")
    hf = known_keys()["hf"]
    _check_typos(raw, {*hf["PretrainedConfig"], *hf[kind], *IGNORED}, where,
                 f"transformers' {_HF_CLASSES[kind]}")
    c = {**HF_FALLBACKS[kind], **{k: v for k, v in raw.items() if v is not None or k == "n_inner"}}
    _check_types(c, HF_FALLBACKS[kind], where)
    if kind == "gpt2":
        act_key = "activation_function"
    else:
        act_key = "hidden_activation" if raw.get("hidden_activation") else "hidden_act"
    act = _ACTIVATIONS.get(c.get(act_key) or c.get("hidden_act"))
    want = "gelu_tanh" if kind in ("gemma", "gpt2") else "silu"
    if act != want:
        raise RematError(f"{act_key}={c.get(act_key)!r} in {where}: the {kind} family here has a "
                         f"{'GELU' if want == 'gelu_tanh' else 'SiLU'} MLP; valid: "
                         f"{', '.join(k for k, v in _ACTIVATIONS.items() if v == want)}")
    if kind == "gpt2":
        d = c["n_embd"]
        fields = dict(family="gpt2", vocab_size=c["vocab_size"], num_layers=c["n_layer"], d_model=d,
                      num_heads=c["n_head"], num_kv_heads=c["n_head"], head_dim=d // c["n_head"],
                      mlp_dim=c["n_inner"] or 4 * d, max_seq_len=c["n_positions"],
                      tie_embeddings=c["tie_word_embeddings"], norm_eps=c["layer_norm_epsilon"])
    else:
        d, n = c["hidden_size"], c["num_attention_heads"]
        if not c["head_dim"] and d % n:
            raise RematError(f"hidden_size={d} in {where} is not a multiple of num_attention_heads={n}, and "
                             "head_dim is not given")
        bias = bool(c["attention_bias"])
        fields = dict(family="llama", vocab_size=c["vocab_size"], num_layers=c["num_hidden_layers"],
                      d_model=d, num_heads=n, num_kv_heads=c["num_key_value_heads"] or n,
                      head_dim=c["head_dim"] or d // n,
                      mlp_dim=c["intermediate_size"], max_seq_len=c["max_position_embeddings"],
                      tie_embeddings=c["tie_word_embeddings"], rope_theta=float(c["rope_theta"]),
                      norm_eps=c["rms_norm_eps"], qkv_bias=bias or kind == "qwen2", out_bias=bias,
                      mlp_bias=bool(c["mlp_bias"]), qk_norm=kind == "qwen3", mlp_activation=act,
                      embed_scale=kind == "gemma")
    return ModelConfig(**{**fields, "dropout_rate": 0.0, "dtype": "bf16", "name": kind, **overrides})


@functools.cache
def known_keys() -> dict[str, Any]:
    """Every key a config may hold, shipped with remat (``config_keys.json``):
    ``["hf"]``: per ``model_type``, the parameters of its ``transformers``
    configuration class, and ``"PretrainedConfig"``'s; ``["maxtext"]["keys"]``:
    the top-level keys of MaxText's ``base.yml``; each with its ``source`` and
    the date it was ``read``."""
    return json.loads(importlib.resources.files("remat.models").joinpath("config_keys.json").read_text())


TYPO_CUTOFF = 0.85
"""How close (``difflib`` ratio) an unknown key must be to a known one to be a typo of it."""


def _check_typos(keys: Iterable[str], known: set[str], where: str, what: str) -> None:
    """Raise :class:`RematError` for every key not in ``known`` that closely
    matches one that is (:data:`TYPO_CUTOFF`), naming both; other unknown
    keys pass (configs carry keys of their own)."""
    typos = [(k, m[0]) for k in keys if k not in known
             for m in [difflib.get_close_matches(k, known, n=1, cutoff=TYPO_CUTOFF)] if m]
    if typos:
        raise RematError(f"{where}: " + "; ".join(f"{k!r} is not a key of {what}: did you mean {m!r}?"
                                                  for k, m in typos)
                         + " (a misspelt key would take the default without a word)")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_types(config: Mapping[str, Any], fallbacks: Mapping[str, Any], where: str,
                 yaml_numbers: bool = False) -> None:
    """Each key read holds its default's type (an int where the default is an
    int, a number for a float, ...; an int or null where the default is null).
    ``yaml_numbers``: a float may be written as text (YAML 1.1, which PyYAML
    reads, takes ``1e-5`` without a dot for a string).

    Raises:
      RematError: naming the key, the value and the type expected.
    """
    for key, default in fallbacks.items():
        v = config.get(key)
        if default is None:
            ok, want = v is None or (isinstance(v, int) and not isinstance(v, bool)), "an integer or null"
        elif isinstance(default, bool):
            ok, want = isinstance(v, bool), "true or false"
        elif isinstance(default, int):
            ok, want = isinstance(v, int) and not isinstance(v, bool), "an integer"
        elif isinstance(default, float):
            ok, want = isinstance(v, (int, float)) and not isinstance(v, bool), "a number"
            if yaml_numbers and isinstance(v, str):
                ok = _is_number(v)
        else:
            ok, want = isinstance(v, type(default)), f"a {type(default).__name__}"
        if not ok:
            raise RematError(f"{key}={v!r} in {where}: expected {want}")


MAXTEXT_FALLBACKS: dict[str, Any] = {
    "base_emb_dim": 2048, "base_num_query_heads": 16, "base_num_kv_heads": 16, "base_mlp_dim": 7168,
    "base_num_decoder_layers": 16, "head_dim": 128, "mlp_activations": ["silu", "linear"],
    "vocab_size": 32000,
    "decoder_block": "llama2", "normalization_layer_epsilon": 1e-5, "logits_via_embedding": False,
    "max_target_length": 2048, "rope_max_timescale": 10000.0, "use_qk_norm": False}
"""MaxText's defaults (``MaxText/configs/base.yml``) for the keys read
(``rope_max_timescale`` as a float: published model YAMLs write it either way)."""

MAXTEXT_BLOCKS: dict[str, str] = {"llama2": "llama", "mistral": "mistral", "gemma": "gemma", "qwen3": "qwen3"}
"""MaxText ``decoder_block`` values read, and the family each becomes."""


def _maxtext_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A MaxText YAML's keys; a run YAML that names ``model_name`` is merged
    over ``models/<model_name>.yml`` beside it (MaxText's ``configs/`` layout)."""
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise RematError(f"cannot read the MaxText config {os.fspath(path)!r}: {e}") from e
    if not isinstance(raw, dict):
        raise RematError(f"{os.fspath(path)} is a YAML {type(raw).__name__}, not a mapping of keys and "
                         "values")
    if "base_emb_dim" not in raw and raw.get("model_name"):
        model = os.path.join(os.path.dirname(os.fspath(path)), "models", f"{raw['model_name']}.yml")
        raw = {**_maxtext_yaml(model), **raw}
    return raw


def from_maxtext_config(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """A :class:`ModelConfig` from a MaxText model YAML
    (``MaxText/configs/models/*.yml``: ``base_emb_dim``, ``base_num_query_heads``,
    ``base_num_kv_heads``, ``base_mlp_dim``, ``base_num_decoder_layers``,
    ``head_dim``, ``vocab_size``, ``decoder_block``, ``mlp_activations``,
    ``logits_via_embedding``, ``normalization_layer_epsilon``,
    ``rope_max_timescale``, ``use_qk_norm``, ``max_target_length``), or a
    run YAML naming one with ``model_name``; missing keys take
    :data:`MAXTEXT_FALLBACKS`. Compute dtype bf16, parameters f32, no dropout.

    Raises:
      RematError: a ``decoder_block`` not in :data:`MAXTEXT_BLOCKS` (mixture
        of experts among them), MLP activations the block does not have, or
        a file that cannot be read.
    """
    where = os.fspath(path)
    raw = _maxtext_yaml(path)
    _check_typos(raw, set(known_keys()["maxtext"]["keys"]), where, "MaxText's base.yml")
    c = {**MAXTEXT_FALLBACKS, **raw}
    _check_types(c, MAXTEXT_FALLBACKS, where, yaml_numbers=True)
    block = c["decoder_block"]
    if block not in MAXTEXT_BLOCKS or c.get("num_experts", 1) > 1:
        raise RematError(f"decoder_block={block!r} (num_experts={c.get('num_experts', 1)}) in {where} is not "
                         f"supported; supported: dense {', '.join(MAXTEXT_BLOCKS)}")
    kind = MAXTEXT_BLOCKS[block]
    want = ["gelu", "linear"] if kind == "gemma" else ["silu", "linear"]
    if list(c["mlp_activations"]) != want:
        raise RematError(f"mlp_activations={c['mlp_activations']!r} in {where}: the {block} block here is "
                         f"{want!r}")
    fields = dict(family="llama", vocab_size=c["vocab_size"], num_layers=c["base_num_decoder_layers"],
                  d_model=c["base_emb_dim"], num_heads=c["base_num_query_heads"],
                  num_kv_heads=c["base_num_kv_heads"], head_dim=c["head_dim"], mlp_dim=c["base_mlp_dim"],
                  max_seq_len=c["max_target_length"], tie_embeddings=bool(c["logits_via_embedding"]),
                  rope_theta=float(c["rope_max_timescale"]), norm_eps=float(c["normalization_layer_epsilon"]),
                  qk_norm=bool(c["use_qk_norm"]) or kind == "qwen3",
                  mlp_activation="gelu_tanh" if kind == "gemma" else "silu", embed_scale=kind == "gemma")
    return ModelConfig(**{**fields, "dropout_rate": 0.0, "dtype": "bf16", "name": f"maxtext {block}",
                          **overrides})


def maxtext_run_defaults(path: str | os.PathLike) -> dict[str, Any]:
    """What a MaxText YAML (or the model YAML it names) sets for the run:
    ``{"policy": remat_policy, "per_device_batch_size": ...}``, only the keys
    it sets (MaxText's ``remat_policy`` values are presets here)."""
    raw = _maxtext_yaml(path)
    out = {}
    if "remat_policy" in raw:
        out["policy"] = str(raw["remat_policy"])
    if "per_device_batch_size" in raw:
        out["per_device_batch_size"] = float(raw["per_device_batch_size"])
    return out
