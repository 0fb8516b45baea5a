"""Accept nothing silently: wrong types in a config, absurd numbers on the
command line, the whole NNX state where parameters are wanted; and output
people read (``print(report)``)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import remat
from remat import RematError, cli
from remat.models import from_hf_config


@pytest.mark.parametrize("flags, message", [
    (["--budget", "1e400B"], "size '1e400B' is outside 0 B..1 PiB per device: check the number and its unit"),
    (["--budget", "1e99B"], "size '1e99B' is outside 0 B..1 PiB per device: check the number and its unit"),
    (["--budget", "1GiB", "--max-compiles", "-1"], "max_compiles=-1 must be a positive integer (the cap on "
                                                   "compiles)"),
])
def test_absurd_numbers_on_the_command_line_are_one_line(capsys, flags, message):
    assert cli.main(["tune", "--model", "tiny", "--seq", "16", *flags]) == 2
    err = capsys.readouterr().err
    assert " ".join(err.split()) == f"error: {message}"


@pytest.mark.parametrize("raw, message", [
    ([1, 2], "is a JSON list, not an object of keys and values: a Hugging Face config.json is one object"),
    ({"model_type": "llama", "hidden_size": "64"}, "hidden_size='64' in {where}: expected an integer"),
    ({"model_type": "gpt2", "n_layer": 2.5}, "n_layer=2.5 in {where}: expected an integer"),
    ({"model_type": "llama", "rms_norm_eps": "1e-6"}, "rms_norm_eps='1e-6' in {where}: expected a number"),
    ({"model_type": "llama", "tie_word_embeddings": 1}, "tie_word_embeddings=1 in {where}: expected true or "
                                                        "false"),
    ({"model_type": "llama", "head_dim": "8"}, "head_dim='8' in {where}: expected an integer or null"),
])
def test_a_config_of_the_wrong_type_is_one_line(tmp_path, raw, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(RematError) as e:
        from_hf_config(path)
    assert str(e.value).endswith(message.format(where=path))


def test_a_maxtext_yaml_of_the_wrong_type_is_one_line(tmp_path):
    path = tmp_path / "m.yml"
    path.write_text("base_emb_dim: wide\n")
    with pytest.raises(RematError, match=r"^base_emb_dim='wide' in .*m\.yml: expected an integer$"):
        remat.models.from_maxtext_config(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(RematError, match=r"m\.yml is a YAML list, not a mapping of keys and values$"):
        remat.models.from_maxtext_config(path)
    path.write_text("normalization_layer_epsilon: 1e-5\n")  # YAML 1.1 reads this as text: still a number
    assert remat.models.from_maxtext_config(path).norm_eps == 1e-5


class _Dropped(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(4, 4, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)  # holds an RNG stream: a key and a count

    def __call__(self, x):
        return self.dropout(self.linear(x), deterministic=True)


def test_remat_testing_names_the_nnx_state_that_is_not_parameters():
    graphdef, state = nnx.split(_Dropped(nnx.Rngs(0)))
    fn = lambda state, x: nnx.merge(graphdef, state)(x)
    with pytest.raises(RematError, match=r"^remat.testing.assert_policy_parity: argument 0"
                                         r"\['dropout'\]\['rngs'\].* is (key<fry>|uint32), not a float "
                                         r"array, and gradients are taken for every argument; an NNX state "
                                         r"from nnx.split holds RNG keys and counts: pass the parameters "
                                         r"only"):
        remat.testing.assert_policy_parity(fn, "full", state, jnp.ones((2, 4)))
    graphdef, params, rest = nnx.split(_Dropped(nnx.Rngs(0)), nnx.Param, ...)
    remat.testing.assert_policy_parity(lambda p, x: nnx.merge(graphdef, p, rest)(x), "full", params,
                                       jnp.ones((2, 4)))  # what the message says to do


def test_print_report_reads_as_the_cli_prints_it():
    r = remat.analyze(jax.grad(lambda w, x: jnp.tanh(x @ w).sum()), jnp.ones((4, 4)), jnp.ones((2, 4)))
    text = str(r)
    assert "peak per device" in text and not text.startswith("Report(")
    assert text == remat._report.render_text(r)


def test_the_defaults_a_config_leaves_to_apply_are_said(tmp_path, capsys):
    from remat._sweep import as_workload

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
                                "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 256}))
    note = (f"{path} leaves out 7 of the keys read; transformers' LlamaConfig defaults apply: "
            "hidden_act='silu', max_position_embeddings=2048, rms_norm_eps=1e-06, tie_word_embeddings=False, "
            "rope_theta=10000.0, attention_bias=False, mlp_bias=False")
    assert as_workload(str(path), seq=16).notes == (note,)  # every report of it says so
    cli._say_ignored(str(path))
    assert " ".join(capsys.readouterr().err.split()) == " ".join(f"note: {note}".split())
    full = {**json.loads(path.read_text()), "hidden_act": "silu", "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "rope_theta": 1e4, "attention_bias": False,
            "mlp_bias": False}
    path.write_text(json.dumps(full))
    assert as_workload(str(path), seq=16).notes == ()


@pytest.mark.parametrize("raw, message", [
    ({"model_type": "llama", "num_hidden_layer": 2},
     "'num_hidden_layer' is not a key of transformers' LlamaConfig: did you mean 'num_hidden_layers'?"),
    ({"model_type": "gpt2", "n_layers": 2, "n_embed": 64},
     "'n_layers' is not a key of transformers' GPT2Config: did you mean 'n_layer'?; 'n_embed' is not a key "
     "of transformers' GPT2Config: did you mean 'n_embd'?"),
])
def test_a_misspelt_config_key_is_an_error_naming_both(raw, message):
    with pytest.raises(RematError) as e:
        from_hf_config(raw)
    assert str(e.value) == f"the config: {message} (a misspelt key would take the default without a word)"


def test_a_misspelt_maxtext_key_is_an_error_naming_both(tmp_path):
    path = tmp_path / "m.yml"
    path.write_text("base_num_decoder_layer: 2\nbase_embed_dim: 64\ndecoder_blok: llama2\n")
    with pytest.raises(RematError) as e:
        remat.models.from_maxtext_config(path)
    assert str(e.value) == (
        f"{path}: 'base_num_decoder_layer' is not a key of MaxText's base.yml: did you mean "
        "'base_num_decoder_layers'?; 'base_embed_dim' is not a key of MaxText's base.yml: did you mean "
        "'base_emb_dim'?; 'decoder_blok' is not a key of MaxText's base.yml: did you mean 'decoder_block'? "
        "(a misspelt key would take the default without a word)")


# The top-level keys of MaxText's published model YAMLs (src/maxtext/configs/models/, llama2-7b,
# llama3.1-8b, mistral-7b, gemma-7b, qwen2.5-7b, qwen3-8b), and keys a difflib check against only the
# keys remat reads would wrongly flag.
MAXTEXT_PUBLISHED = {"base_emb_dim", "base_mlp_dim", "base_num_decoder_layers", "base_num_kv_heads",
                     "base_num_query_heads", "decoder_block", "enable_dropout", "head_dim",
                     "logical_axis_rules", "logits_via_embedding", "mlp_activations",
                     "normalization_layer_epsilon", "vocab_size",
                     "rope_max_timescale", "attention_bias", "normalize_embedding_logits", "tokenizer_type",
                     "use_qk_norm", "rope_min_timescale", "num_experts_per_tok", "model_name"}


def test_real_configs_are_not_rejected():
    from remat.models.hf import known_keys

    for path in sorted((Path(__file__).parents[1] / "notebooks" / "configs").glob("*.json")):
        remat.models.get_config(str(path))  # every public config.json shipped: no key flagged
    assert MAXTEXT_PUBLISHED <= set(known_keys()["maxtext"]["keys"])
    for raw in ({"model_type": "llama", "dtype": "bfloat16"}, {"model_type": "gpt2", "attn_pdrop": 0.1,
                                                               "n_ctx": 1024}):
        from_hf_config(raw)  # transformers' own keys, and an old one of its own
