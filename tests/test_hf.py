"""Your own model from its Hugging Face ``config.json``: exact parameter
counts, the architectures' defaults, errors by message, compile-only inspect
of every family and gradient parity on a tiny config of each, ``--model
path`` on the command line and in a resumable training run."""

import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import remat
from remat import cli, models as M
from remat.models.hf import from_hf_config
from remat.step import lm_loss
from remat.testing import TOLERANCES

CONFIGS = pathlib.Path(__file__).parent.parent / "notebooks" / "configs"
"""Copies of public ``config.json`` files (numbers from the model repositories)."""


@pytest.mark.parametrize(("name", "params"), [
    ("Llama-2-7b-hf", 6_738_415_616), ("Mistral-7B-v0.1", 7_241_732_096), ("Llama-3.1-8B", 8_030_261_248),
    ("Qwen2.5-7B", 7_615_616_512), ("gpt2", 124_439_808),
    # model cards give rounded counts only: Qwen3-8B "8.2B", gemma-7b "8.54B"
    ("Qwen3-8B", 8_190_735_360), ("gemma-7b", 8_537_680_896)])
def test_parameter_count_is_the_published_one(name, params):
    cfg = M.get_config(str(CONFIGS / f"{name}.json"))
    assert cfg.num_params == params
    if name in ("Qwen3-8B", "gemma-7b"):  # the formula against the initialised model, for the new blocks
        assert M.param_count(cfg) == params


def test_keys_that_change_numerics_only_are_said_to_be_ignored(capsys):
    """Llama 3.1's ``rope_scaling`` is accepted, and the command line says it is not modelled."""
    path = str(CONFIGS / "Llama-3.1-8B.json")
    assert M.hf.ignored_keys(path) == ["rope_scaling"]
    cli._say_ignored(path)
    assert capsys.readouterr().err.startswith(f"note: {path} sets rope_scaling: numerics only")


def test_missing_keys_take_the_architectures_defaults():
    """``tie_word_embeddings`` defaults to false for llama, mistral and qwen2,
    true for gemma and gpt2; Qwen2's q/k/v biases follow from its model_type;
    Llama's ``num_key_value_heads`` defaults to the heads, Mistral's to 8."""
    tied = {k: from_hf_config({"model_type": k}).tie_embeddings for k in M.hf.SUPPORTED}
    assert tied == {"llama": False, "mistral": False, "qwen2": False, "qwen3": False, "gemma": True,
                    "gpt2": True}
    assert from_hf_config({"model_type": "qwen2"}).qkv_bias
    assert not from_hf_config({"model_type": "qwen3"}).qkv_bias
    assert from_hf_config({"model_type": "qwen3"}).qk_norm
    assert from_hf_config({"model_type": "llama", "num_attention_heads": 16}).num_kv_heads == 16
    assert from_hf_config({"model_type": "mistral"}).num_kv_heads == 8
    gemma = from_hf_config({"model_type": "gemma"})
    assert (gemma.head_dim, gemma.mlp_activation, gemma.embed_scale) == (256, "gelu_tanh", True)
    assert from_hf_config({"model_type": "gpt2", "n_embd": 64, "n_head": 4}).mlp_dim == 256  # n_inner null


def test_bad_configs_are_errors_that_name_them(tmp_path):
    with pytest.raises(remat.RematError, match=r"model_type='mixtral' in the config is not supported; "
                                               r"supported: llama, mistral, qwen2, qwen3, gemma, gpt2"):
        from_hf_config({"model_type": "mixtral"})
    with pytest.raises(remat.RematError, match=r"the config sets num_local_experts, which changes shapes and "
                                               r"is not modelled"):
        from_hf_config({"model_type": "mistral", "num_local_experts": 8})
    with pytest.raises(remat.RematError, match=r"hidden_act='relu' in the config: the llama family here has "
                                               r"a SiLU MLP; valid: silu, swish"):
        from_hf_config({"model_type": "llama", "hidden_act": "relu"})
    with pytest.raises(remat.RematError, match=r"hidden_size=64 in the config is not a multiple of "
                                               r"num_attention_heads=3, and head_dim is not given"):
        from_hf_config({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 3})
    with pytest.raises(remat.RematError, match=r"cannot read the Hugging Face config '.*nope\.json'"):
        M.get_config(str(tmp_path / "nope.json"))


def _tiny(kind: str) -> dict:
    if kind == "gpt2":
        return {"model_type": "gpt2", "vocab_size": 64, "n_positions": 32, "n_embd": 32, "n_layer": 2,
                "n_head": 4}
    return {"model_type": kind, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "max_position_embeddings": 32, "mlp_bias": kind == "llama", "attention_bias": kind == "mistral"}


@pytest.mark.parametrize("kind", M.hf.SUPPORTED)
def test_every_family_inspects_and_keeps_its_gradients(kind, tmp_path):
    """Compile-only ``remat inspect --model config.json`` emits the vocabulary's
    names; gradients under ``minimal`` and ``full`` equal no remat's (f32)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_tiny(kind)))
    r = remat.inspect_policy(remat.train_step_setup(str(path), batch=2, seq=16, dtype="f32"), "minimal")
    assert {"query_proj", "out_proj", "mlpwo"} <= set(r.checkpoint_names) and r.peak_bytes > 0
    cfg = M.get_config(str(path), dtype="f32")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
    params = jax.jit(M.Transformer(cfg).init)(jax.random.key(0), tokens)

    def grads(policy):
        model = M.Transformer(cfg, policy=policy)
        return jax.jit(jax.value_and_grad(lambda p: lm_loss(model.apply(p, tokens), tokens)))(params)

    rtol, atol = TOLERANCES["float32"]
    want = grads("none")
    for policy in ("minimal", "full"):
        chex.assert_trees_all_close(grads(policy), want, rtol=rtol, atol=atol)


def test_train_keeps_the_config_so_resume_needs_no_file(tmp_path):
    """``remat train --model config.json`` copies the file into the run
    folder; with the original gone, ``--resume`` builds the model from the copy."""
    path = tmp_path / "my.json"
    path.write_text(json.dumps({**_tiny("qwen3"), "vocab_size": 256}))
    out = tmp_path / "run"
    corpus = pathlib.Path(remat.__file__).parent / "_format.py"  # a small text file
    args = ["train", "--model", str(path), "--batch", "2", "--seq", "16", "--data", str(corpus),
            "--steps", "2", "--eval-every", "2", "--ckpt-every", "2", "--eval-windows", "2",
            "--out", str(out)]
    assert cli.main(args) == 0
    assert json.loads((out / "model_config.json").read_text())["model_type"] == "qwen3"
    path.unlink()
    assert cli.main([*args, "--resume"]) == 0
    assert json.loads((out / "run.json").read_text())["model"] == str(path)


# -- MaxText model YAMLs -------------------------------------------------------------------
LLAMA31_8B_YML = """\
base_emb_dim: 4096
base_num_query_heads: 32
base_num_kv_heads: 8
base_num_decoder_layers: 32
base_mlp_dim: 14336
head_dim: 128
mlp_activations: ["silu","linear"]
vocab_size: 128256
enable_dropout: False
logits_via_embedding: False
normalization_layer_epsilon: 1.0e-5
rope_max_timescale: 500_000
decoder_block: "llama2"
"""
"""MaxText's ``configs/models/llama3.1-8b.yml``."""


def test_maxtext_model_yaml_and_a_run_yaml_that_names_it(tmp_path, capsys):
    """The model YAML gives Llama 3.1 8B's exact count; a run YAML naming it
    (``model_name``) sets the sequence bound, and its ``remat_policy`` and
    ``per_device_batch_size`` become the defaults of ``remat inspect``."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "llama3.1-8b.yml").write_text(LLAMA31_8B_YML)
    cfg = M.from_maxtext_config(tmp_path / "models" / "llama3.1-8b.yml")
    assert (cfg.num_params, cfg.rope_theta, cfg.tie_embeddings) == (8_030_261_248, 500_000.0, False)
    (tmp_path / "models" / "small.yml").write_text(
        "base_emb_dim: 64\nbase_num_query_heads: 4\nbase_num_kv_heads: 2\nbase_num_decoder_layers: 2\n"
        "base_mlp_dim: 128\nhead_dim: 16\nvocab_size: 512\ndecoder_block: qwen3\n")
    run = tmp_path / "run.yml"
    run.write_text("model_name: small\nremat_policy: save_qkv_proj\nper_device_batch_size: 3\n"
                   "max_target_length: 64\n")
    assert M.get_config(str(run)).qk_norm and M.get_config(str(run)).max_seq_len == 64
    assert cli.main(["inspect", "--model", str(run), "--seq", "32", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["label"] == "save_qkv_proj" and report["batch_bytes"] == 3 * 32 * 4 + 8  # tokens, the key
    msg = r"decoder_block='mixtral' \(num_experts=8\) in .*bad\.yml is not supported; supported: dense llama2"
    with pytest.raises(remat.RematError, match=msg):
        bad = tmp_path / "bad.yml"
        bad.write_text("decoder_block: mixtral\nnum_experts: 8\n")
        M.get_config(str(bad))
