"""Tests for ``remat.models``: configs and presets, parameter counts, the
blocks' tags and shapes, attention and RoPE against references, and gradient
parity of every registered remat policy on both block families.

Compiles use ``remat._memory.default_compiler_options()`` (on CPU: LLVM
optimisation off, classic fusion emitters): the HLO (remat, CSE and fusion
decisions) and the float semantics are unchanged, compiling is about 4x faster.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from small_models import UNIQUE_POLICIES, small

import remat
import remat.policies as P
from remat import models as M
from remat._jaxpr import walk
from remat._memory import default_compiler_options
from remat.policies.vocab import missing_names
from remat.step import lm_loss
from remat.testing import TOLERANCES

FAST = default_compiler_options()
B, T = 2, 16
FAMILIES = ("llama", "gpt2")


def jit(fn):
    return jax.jit(fn, compiler_options=FAST)


RNG = np.random.default_rng(0)  # numpy: eager jax.random compiles threefry slowly on CPU
TOKENS = jnp.asarray(RNG.integers(0, 256, (B, T)), jnp.int32)
DROPOUT_KEY = jax.random.key(2)


@functools.cache
def params_of(config: M.ModelConfig):
    return jit(M.Transformer(config).init)(jax.random.key(0), TOKENS)["params"]


@functools.cache
def loss_and_grads(config: M.ModelConfig, policy: str, groups=None, deterministic: bool = True):
    """``(loss, grads)`` of the next-token loss on :data:`TOKENS`, dropout seeded
    by :data:`DROPOUT_KEY` when not ``deterministic``; same parameters whatever
    the policy and grouping."""
    model = M.Transformer(config, policy=policy, groups=groups)

    def loss(p):
        logits = model.apply({"params": p}, TOKENS, deterministic=deterministic,
                             rngs={"dropout": DROPOUT_KEY})
        return lm_loss(logits, TOKENS)

    return jit(jax.value_and_grad(loss))(params_of(config))


# -- configs and presets -----------------------------------------------------------------

def test_names_and_tiny_preset():
    assert M.names() == ["tiny", "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl",
                         "llama3.2-1b", "llama3.2-3b", "llama3-8b", "llama3-70b"]
    cfg = M.get_config("tiny")
    assert (cfg.family, cfg.vocab_size, cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.mlp_dim, cfg.max_seq_len, cfg.dropout_rate, cfg.tie_embeddings) == (
        "llama", 256, 4, 128, 4, 2, 32, 384, 512, 0.0, True)
    assert cfg.dtype == jnp.float32 and cfg.param_dtype == jnp.float32
    hash(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 64  # type: ignore[misc]


def test_get_config_overrides_and_dtype_strings():
    cfg = M.get_config("tiny", family="gpt2", dtype="bf16")
    assert cfg.family == "gpt2" and cfg.dtype == jnp.bfloat16 and cfg.dtype == np.dtype("bfloat16")
    assert M.get_config("tiny", dtype=jnp.bfloat16) == M.get_config("tiny", dtype="bfloat16")
    assert M.get_config("gpt2-small", dtype="f32").dtype == jnp.float32
    assert M.get_config("llama3-8b").dtype == jnp.bfloat16


@pytest.mark.parametrize("name, match", [
    ("gpt2-smal", r"unknown model preset 'gpt2-smal' \(did you mean 'gpt2-small'"),
    ("llama-8b", r"did you mean 'llama3-8b'.*valid names: tiny, gpt2-small"),
    ("bert", r"unknown model preset 'bert'; valid names: tiny, gpt2-small, gpt2-medium"),
])
def test_unknown_preset(name, match):
    with pytest.raises(ValueError, match=match):
        M.get_config(name)


@pytest.mark.parametrize("overrides, match", [
    ({"famly": "gpt2"}, r"unknown ModelConfig field\(s\) 'famly'; valid: attention, "),
    ({"family": "bert"}, r"ModelConfig.family='bert'; valid: gpt2, llama"),
    ({"attention": "flash"}, r"ModelConfig.attention='flash'; valid: xla, dot_product_attention"),
    ({"dtype": "fp8"}, r"ModelConfig.dtype='fp8' is not a dtype name; valid: bf16, bfloat16"),
    ({"param_dtype": jnp.int32}, r"ModelConfig.param_dtype=.*int32.* is not a supported float dtype"),
    ({"d_model": 0}, r"ModelConfig.d_model=0 must be a positive integer"),
    ({"num_layers": 2.5}, r"ModelConfig.num_layers=2.5 must be a positive integer"),
    ({"num_heads": 3}, r"ModelConfig.num_heads=3 is not a multiple of num_kv_heads=2"),
    ({"head_dim": 33}, r"ModelConfig.head_dim=33 must be even for the llama family"),
    ({"dropout_rate": 1.0}, r"ModelConfig.dropout_rate=1.0 must be in \[0, 1\)"),
    ({"attention_dropout_rate": -0.1}, r"ModelConfig.attention_dropout_rate=-0.1 must be in"),
    ({"attention": "dot_product_attention", "dropout_rate": 0.1},
     r"attention_dropout_rate=0.1 \(from dropout_rate\) with attention='dot_product_attention'"),
    ({"rope_theta": 0.0}, r"ModelConfig.rope_theta=0.0 must be positive"),
])
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        M.get_config("tiny", **overrides)


def test_dot_product_attention_allows_residual_dropout():
    cfg = M.get_config("tiny", attention="dot_product_attention", dropout_rate=0.1,
                       attention_dropout_rate=0.0)
    assert (cfg.dropout_rate, cfg.attn_dropout) == (0.1, 0.0)
    assert M.get_config("tiny", dropout_rate=0.1).attn_dropout == 0.1
    assert M.attention_implementation(cfg) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
    assert M.attention_implementation(M.get_config("tiny")) == "einsum"


@pytest.mark.parametrize("name", [n for n in M.names() if n != "tiny"])
def test_preset_param_count_matches_published(name):
    """``jax.eval_shape`` of init (nothing allocated) gives the formula's count,
    within 1% of the published one; every parameter is float32."""
    cfg = M.get_config(name)
    shapes = jax.eval_shape(lambda t: M.Transformer(cfg).init(jax.random.key(0), t),
                            jax.ShapeDtypeStruct((1, 8), jnp.int32))
    leaves = jax.tree.leaves(shapes)
    count = sum(int(x.size) for x in leaves)
    assert count == cfg.num_params == M.param_count(cfg)
    assert abs(count / M.PUBLISHED_PARAMS[name] - 1) < 0.01, (name, count)
    assert {x.dtype for x in leaves} == {np.dtype("float32")}
    layer_q = nn.unbox(shapes)["params"]["layers"]["attention"]["query"]["kernel"]
    assert layer_q.shape == (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.head_dim)


def test_eval_shape_init_independent_of_policy_and_groups():
    """Abstract init under a policy and a grouping gives the same parameter tree
    (``[L, ...]`` leaves) as without remat."""
    cfg = M.get_config("tiny")
    tok = jax.ShapeDtypeStruct((B, T), jnp.int32)
    init = lambda **kw: jax.eval_shape(lambda t: M.Transformer(cfg, **kw).init(jax.random.key(0), t), tok)
    ref = init(policy="none")
    for kw in ({"policy": "selective"}, {"policy": "minimal", "groups": (2, 2)},
               {"policy": "full", "groups": "sqrt"}, {"policy": "minimal_offloaded", "groups": (4, 1)}):
        chex.assert_trees_all_equal_shapes_and_dtypes(init(**kw), ref)


# -- parameters: logical axes ---------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_logical_axis_names(family):
    cfg = small(family, tie_embeddings=False)
    shapes = jax.eval_shape(lambda t: M.Transformer(cfg, groups=(2, 2)).init(jax.random.key(0), t),
                            jax.ShapeDtypeStruct((B, T), jnp.int32))
    specs = nn.get_partition_spec(shapes)["params"]
    P_ = jax.sharding.PartitionSpec
    assert specs["embed"]["embedding"] == P_("vocab", "embed")
    assert specs["head"]["kernel"] == P_("embed", "vocab")
    att, mlp = specs["layers"]["attention"], specs["layers"]["mlp"]
    assert att["query"]["kernel"] == P_("layers", "embed", "heads", "head_dim")
    assert att["key"]["kernel"] == P_("layers", "embed", "kv_heads", "head_dim")
    assert att["out"]["kernel"] == P_("layers", "heads", "head_dim", "embed")
    assert specs["layers"]["attn_norm"]["scale"] == P_("layers", "norm")
    assert specs["final_norm"]["scale"] == P_("norm")
    if family == "gpt2":
        assert specs["pos_embed"] == P_(None, "embed")
        assert att["value"]["bias"] == P_("layers", "kv_heads", "head_dim")
        assert mlp["wi"]["kernel"] == P_("layers", "embed", "mlp")
        assert mlp["wi"]["bias"] == P_("layers", "mlp")
    else:
        assert mlp["wi_0"]["kernel"] == mlp["wi_1"]["kernel"] == P_("layers", "embed", "mlp")
        assert mlp["wo"]["kernel"] == P_("layers", "mlp", "embed")
        assert "bias" not in att["query"]


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_constraints_follow_rules(family):
    """Under a mesh and logical rules, init and apply trace, and activations
    carry sharding constraints (a 1-device mesh: only their presence is checked)."""
    cfg = small(family)
    model = M.Transformer(cfg, policy="minimal", groups=(2, 2))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    rules = (("activation_batch", "data"), ("embed", None), ("heads", None), ("mlp", None), ("layers", None))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params = jax.eval_shape(model.init, jax.random.key(0), TOKENS)
        text = str(jax.make_jaxpr(lambda p, t: model.apply(p, t))(params, TOKENS))
    assert text.count("sharding_constraint") >= 10


# -- tags ----------------------------------------------------------------------------

def _tag_shapes(jaxpr) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{checkpoint name: (shape, dtype)}`` from a jaxpr and its sub-jaxprs."""
    return {s.eqn.params["name"]: (tuple(s.eqn.invars[0].aval.shape), str(s.eqn.invars[0].aval.dtype))
            for s in walk(jaxpr) if s.eqn.primitive.name == "name"}


@pytest.mark.parametrize("attention", ["xla", "dot_product_attention"])
@pytest.mark.parametrize("family", FAMILIES)
def test_block_tags_and_shapes(family, attention):
    cfg = small(family, "bfloat16", attention=attention)
    x = jax.ShapeDtypeStruct((B, T, cfg.d_model), jnp.bfloat16)
    block = M.Block(cfg)
    params = jax.eval_shape(lambda x: block.init(jax.random.key(0), x, deterministic=True), x)
    jaxpr = jax.make_jaxpr(lambda p, x: block.apply(p, x, deterministic=True))(params, x).jaxpr
    n, k, h, d, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model, cfg.mlp_dim
    want = {
        "decoder_layer_input": (B, T, d), "attn_norm": (B, T, d), "query_proj": (B, T, n, h),
        "key_proj": (B, T, k, h), "value_proj": (B, T, k, h), "context": (B, T, n, h),
        "out_proj": (B, T, d), "mlp_norm": (B, T, d), "mlpwo": (B, T, d),
    }
    if attention == "xla":
        want |= {"attn_scores": (B, n, T, T), "attn_probs": (B, n, T, T)}
    want |= {"mlpwi": (B, T, f)} if family == "gpt2" else {"mlpwi_0": (B, T, f), "mlpwi_1": (B, T, f)}
    assert _tag_shapes(jaxpr) == {name: (shape, "bfloat16") for name, shape in want.items()}


@pytest.mark.parametrize("attention", ["xla", "dot_product_attention"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_preset_name_is_emitted(family, attention):
    """No MaxText-style drift: every name any registered policy saves or
    offloads is emitted by the scanned model (or its fused/split alternative)."""
    cfg = small(family, attention=attention)
    params = jax.eval_shape(lambda t: M.Transformer(cfg).init(jax.random.key(0), t), TOKENS)
    emitted = remat.checkpoint_names(lambda p, t: M.Transformer(cfg).apply(p, t), params, TOKENS)
    for name in P.names():
        assert not missing_names(P.get(name).names, emitted), (name, sorted(emitted))
    assert {"qkv_proj", "attn_scores"}.isdisjoint(emitted) or attention == "xla"


# -- attention, RoPE, masking ------------------------------------------------------------

def test_rope_matches_complex_rotation():
    """Feature i and i + H/2 form the complex number x_i + i x_{i+H/2}, rotated
    by t * theta^(-2i/H) (Hugging Face Llama's rotate_half convention)."""
    x = jnp.asarray(RNG.standard_normal((2, 5, 3, 8)), jnp.float32)
    got = jit(lambda x: M.rope(x, 100.0))(x)
    h = x.shape[-1]
    freqs = 100.0 ** (-np.arange(0, h, 2) / h)
    angle = np.arange(5)[:, None, None] * freqs
    z = (np.asarray(x[..., : h // 2]) + 1j * np.asarray(x[..., h // 2:])) * np.exp(1j * angle)
    np.testing.assert_allclose(np.asarray(got), np.concatenate([z.real, z.imag], -1), rtol=1e-5, atol=1e-5)
    assert jax.eval_shape(lambda x: M.rope(x, 100.0), x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("family", FAMILIES)
def test_einsum_attention_equals_dot_product_attention(family):
    """The grouped einsum (no repeated K/V) equals jax.nn.dot_product_attention
    on the same parameters, for the attention layer and the whole model."""
    cfg = small(family)
    x = jnp.asarray(RNG.standard_normal((B, T, cfg.d_model)), jnp.float32)
    att = M.Attention(cfg)
    p = jit(functools.partial(att.init, deterministic=True))(jax.random.key(0), x)
    dpa = M.Attention(dataclasses.replace(cfg, attention="dot_product_attention"))
    run = jit(lambda p, x: (att.apply(p, x, deterministic=True), dpa.apply(p, x, deterministic=True)))
    chex.assert_trees_all_close(*run(p, x), rtol=1e-5, atol=1e-5)
    params = params_of(cfg)
    models = [M.Transformer(dataclasses.replace(cfg, attention=a)) for a in ("xla", "dot_product_attention")]
    a, b = (jit(lambda p, t, m=m: m.apply({"params": p}, t))(params, TOKENS) for m in models)
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_causal(family):
    """Changing tokens from position 10 on leaves logits before 10 unchanged,
    and changes the logits from 10 on."""
    cfg = small(family)
    params = params_of(cfg)
    fwd = jit(lambda t: M.Transformer(cfg).apply({"params": params}, t))
    other = TOKENS.at[:, 10:].set((TOKENS[:, 10:] + 1) % 256)
    a, b = fwd(TOKENS), fwd(other)
    assert a.shape == (B, T, cfg.vocab_size) and a.dtype == jnp.float32
    chex.assert_trees_all_close(a[:, :10], b[:, :10], rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(a[:, 10:] - b[:, 10:]).min(axis=-1).max()) > 0


def test_bad_tokens():
    model = M.Transformer(small("llama"))
    with pytest.raises(ValueError, match=r"integer tokens \[B, T\], got float32\[2, 16\]"):
        model.init(jax.random.key(0), jnp.zeros((B, T)))
    with pytest.raises(ValueError, match=r"sequence length T=33 exceeds config.max_seq_len=32"):
        model.init(jax.random.key(0), jnp.zeros((1, 33), jnp.int32))


# -- gradient parity -------------------------------------------------------------------------

# Every distinct policy, both families: float32 with dropout on (the same rng
# under every policy: the recompute must regenerate the same masks)
# and bfloat16 with dropout off, each to its dtype's tolerance from
# remat.testing.TOLERANCES.
PARITY = [(family, dtype, rate, p) for family in FAMILIES for p in UNIQUE_POLICIES if p != "none"
          for dtype, rate in (("float32", 0.1), ("bfloat16", 0.0))]


@pytest.mark.parametrize("family, dtype, dropout_rate, policy", PARITY)
def test_gradient_parity(family, dtype, dropout_rate, policy):
    cfg = small(family, dtype, dropout_rate=dropout_rate)
    det = dropout_rate == 0.0
    got = loss_and_grads(cfg, policy, deterministic=det)
    ref = loss_and_grads(cfg, "none", deterministic=det)
    rtol, atol = TOLERANCES[dtype]
    chex.assert_trees_all_close(got, ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_is_active(family):
    """Dropout (rate 0.1) changes the gradients by more than 10%: the parity
    cases above compare dropout masks, not a no-op."""
    cfg = small(family, dropout_rate=0.1)
    _, on = loss_and_grads(cfg, "none", deterministic=False)
    _, off = loss_and_grads(cfg, "none", deterministic=True)
    diff = optax.tree.norm(jax.tree.map(jnp.subtract, on, off))
    assert float(diff) > 0.1 * float(optax.tree.norm(off))


@pytest.mark.parametrize("policy, groups", [
    ("selective", "sqrt"), ("full", (4, 1)), ("minimal_offloaded", (2, 2)),
    ("2x minimal_offloaded; 2x qkv_proj_offloaded", None)])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_parity_groups(family, policy, groups):
    """Nested checkpointing and policy segments change no number, the
    parameters being the ungrouped ones: ``"sqrt"`` (here 2 groups of 2
    layers), 4 groups of 1 (inner scans of length 1), offloading inside
    nested groups and in segments. Dropout off: the dropout masks depend on the
    grouping (rngs are split per group, then per layer)."""
    cfg = small(family, dropout_rate=0.1)
    got = loss_and_grads(cfg, policy, groups=groups)
    ref = loss_and_grads(cfg, "none")
    rtol, atol = TOLERANCES["float32"]
    chex.assert_trees_all_close(got, ref, rtol=rtol, atol=atol)


# -- the chunked loss head -------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "tie"), [("float32", True), ("float32", False), ("bfloat16", True)])
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_loss_head_equals_the_whole_logits(family, dtype, tie):
    """5 chunks over 31 predicted positions (padded to 35): loss and gradients
    equal lm_loss of the whole logits."""
    cfg = small(family, dtype, tie_embeddings=tie)
    tokens = jnp.asarray(RNG.integers(0, cfg.vocab_size, (2, 32)), jnp.int32)
    whole = M.Transformer(cfg, policy="minimal")
    chunked = M.Transformer(dataclasses.replace(cfg, loss_chunks=5), policy="minimal")
    params = jit(whole.init)(jax.random.key(1), tokens)
    want = jit(jax.value_and_grad(lambda p: lm_loss(whole.apply(p, tokens), tokens)))(params)
    got = jit(jax.value_and_grad(lambda p: chunked.apply(p, tokens, targets=tokens)))(params)
    rtol, atol = TOLERANCES[dtype]
    chex.assert_trees_all_close(got, want, rtol=rtol, atol=atol)


def test_chunked_loss_head_keeps_no_logits_for_the_backward_pass():
    from remat._sweep import inspect_policy, train_step_setup

    def loss_head_bytes(chunks, fn):
        r = inspect_policy(train_step_setup("tiny", batch=2, seq=128, loss_chunks=chunks), "full")
        return sum(row.size_bytes for row in r.residuals if row.source.endswith(f"({fn})")), r

    whole, r1 = loss_head_bytes(1, "lm_loss")
    chunked, r8 = loss_head_bytes(8, "chunked_lm_loss")
    assert whole >= 2 * 127 * 256 * 4  # the f32 softmax [B, T - 1, V]
    assert chunked <= 2 * 128 * (128 + 2) * 4  # only the hidden states [B, T, D] and the targets
    assert r8.flops < r1.flops * 1.15  # at most one more forward of the head
    with pytest.raises(remat.RematError, match="ModelConfig.loss_chunks=0 must be a positive integer"):
        M.get_config("tiny", loss_chunks=0)


# -- segments written as a string, gradient accumulation ---------------------------------
def test_policy_segments_as_a_string():
    """``"1x minimal; 3x full"`` is the segments ``[(1, "minimal"), (3, "full")]``:
    the same numbers as no remat; a malformed part is named."""
    from remat._scan import parse_segments

    assert parse_segments("1x minimal; 3x save:mlpwi_0,mlpwi_1 + dots") == [
        (1, "minimal"), (3, "save:mlpwi_0,mlpwi_1 + dots")]
    cfg = small("llama")
    got = loss_and_grads(cfg, "1x minimal; 3x full")
    rtol, atol = TOLERANCES["float32"]
    chex.assert_trees_all_close(got, loss_and_grads(cfg, "none"), rtol=rtol, atol=atol)
    with pytest.raises(remat.RematError, match=r"policy segment 'minimal' in '1x full; minimal': write "
                                               r"COUNTx SPEC, e\.g\. '8x minimal; 24x full'"):
        parse_segments("1x full; minimal")


@pytest.mark.parametrize("family", FAMILIES)
def test_microbatches_give_the_whole_batch_update(family):
    """Gradient accumulation over 2 micro-batches: the same loss, gradient norm
    and updated parameters as the whole batch of 4; a batch it does not divide is an error."""
    from remat.step import init_train_state, make_optimizer, make_train_step

    cfg = small(family)
    model = M.Transformer(cfg, policy="minimal")
    tokens = jnp.asarray(RNG.integers(0, cfg.vocab_size, (4, 32)), jnp.int32)
    state = init_train_state(model, make_optimizer(), tokens, jax.random.key(0))
    whole = jit(make_train_step(model))(state, tokens, jax.random.key(1))
    split = jit(make_train_step(model, microbatches=2))(state, tokens, jax.random.key(1))
    chex.assert_trees_all_close((split[0].params, split[1]), (whole[0].params, whole[1]),
                                rtol=1e-5, atol=1e-6)
    with pytest.raises(remat.RematError, match="microbatches=3 must divide the batch B=4"):
        jax.eval_shape(make_train_step(model, microbatches=3), state, tokens, jax.random.key(1))
    with pytest.raises(remat.RematError, match="microbatches=0 must be a positive integer"):
        make_train_step(model, microbatches=0)
