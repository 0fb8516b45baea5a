"""remat.checkpoint, remat.remat, remat.scan_layers and tag validation."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import checkpoint_name
from vocab_layer import vocab_layer

import remat
from remat import policies
from remat._jaxpr import CHECKPOINT, walk
from remat._scan import plan
from remat._sweep import default_policies
from remat.policies import vocab
from remat.testing import assert_memory_ordered, assert_policy_parity, assert_saved_names

D, F = 8, 16
POLICIES = ["full", "save:mlpwi", "save:decoder_layer_input + offload:mlpwi", "dots:no_batch", "none"]


class Block(nn.Module):
    """A tagged residual MLP layer ``x[B, T, D] -> [B, T, D]`` with dropout."""

    hidden: int = F
    rate: float = 0.5

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        x = checkpoint_name(x, vocab.DECODER_LAYER_INPUT)
        h = checkpoint_name(nn.Dense(self.hidden)(x), vocab.MLPWI)
        h = nn.Dropout(self.rate)(jnp.tanh(h), deterministic=deterministic)
        return x + checkpoint_name(nn.Dense(x.shape[-1])(h), vocab.MLPWO)


X = jax.random.normal(jax.random.key(0), (2, 3, D))
RNGS = {"params": jax.random.key(1), "dropout": jax.random.key(2)}


def stack(policy="full", groups=None, num_layers=6, block=Block):
    return remat.scan_layers(block, num_layers=num_layers, policy=policy, groups=groups,
                             static_argnames=("deterministic",))()


def grads(module, params, deterministic):
    def loss(p):
        y = module.apply(p, X, deterministic=deterministic, rngs={"dropout": jax.random.key(3)})
        return jnp.sum(y ** 2)

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def params():
    return stack("none").init(RNGS, X, deterministic=True)


# -- remat.checkpoint ------------------------------------------------------------------
def mlp(w1, w2, x):
    h = checkpoint_name(jnp.tanh(x @ w1), vocab.MLPWI)
    return checkpoint_name(h @ w2, vocab.MLPWO)


W1, W2 = jax.random.normal(jax.random.key(4), (D, F)), jax.random.normal(jax.random.key(5), (F, D))


def test_checkpoint_parity_and_saved_names():
    assert_policy_parity(mlp, ["full", "save:mlpwi", "offload:mlpwi", "dots"], W1, W2, X)
    assert_saved_names(mlp, "save:mlpwi", W1, W2, X, names={"mlpwi"})
    assert_saved_names(mlp, "offload:mlpwi", W1, W2, X, names=(), offloaded={"mlpwi"})
    with pytest.raises(AssertionError, match=r"keeps on device \['mlpwi'\], expected \[\]"):
        assert_saved_names(mlp, "save:mlpwi", W1, W2, X, names=())
    assert remat.checkpoint(mlp, "none") is mlp


def test_checkpoint_missing_tag_is_an_error_listing_emitted_names():
    f = remat.checkpoint(mlp, "save:mlpwi_o")
    with pytest.raises(remat.MissingCheckpointNameError,
                       match="remat policy 'save:mlpwi_o' names checkpoint name.s. that function "
                             "'mlp' never emits: mlpwi_o; it emits: mlpwi, mlpwo"):
        jax.jit(f)(W1, W2, X)


def test_checkpoint_static_argnames_by_name():
    def f(x, *, square: bool):
        return jnp.sin(checkpoint_name(x * x if square else x, vocab.MLPWI))

    g = remat.checkpoint(f, "save:mlpwi", static_argnames=("square",))
    chex.assert_trees_all_close(jax.grad(lambda x: g(x, square=True).sum())(X), 2 * X * jnp.cos(X * X))
    with pytest.raises(ValueError, match="static argument name 'sqr' is not a parameter of "
                                         ".*f; its parameters: x, square"):
        remat.checkpoint(f, "full", static_argnames=("sqr",))
    with pytest.raises(TypeError, match="static argument 'square' got an unhashable value of type "
                                        "ArrayImpl"):
        g(X, square=jnp.ones(2))


def test_debug_callbacks_run_again_in_the_recompute():
    """a callback inside a rematerialized region runs once in the
    forward pass and once more in the backward pass's recomputation."""
    calls = []

    def f(x):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.sin(x)

    jax.grad(lambda x: remat.checkpoint(f, "full")(x).sum())(X)
    assert len(calls) == 2
    calls.clear()
    jax.grad(lambda x: f(x).sum())(X)
    assert len(calls) == 1


# -- remat.remat -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def block_reference():
    params = Block().init(RNGS, X, deterministic=True)
    return params, grads(Block(), params, False)


@pytest.mark.parametrize("policy", ["full", "save:mlpwi", "offload:mlpwi"])
def test_remat_module_same_params_and_gradients_with_dropout(block_reference, policy):
    params, want = block_reference
    wrapped = remat.remat(Block, policy, static_argnames=("deterministic",))()
    chex.assert_trees_all_equal(wrapped.init(RNGS, X, deterministic=True), params)
    # `deterministic` is keyword-only and static by name: Python branching on it works.
    chex.assert_trees_all_close(grads(wrapped, params, False), want, atol=1e-6)
    assert remat.remat(Block, "none") is Block


def test_remat_errors():
    with pytest.raises(ValueError, match="static argument name 'train' is not a parameter of "
                                         "Block.__call__; its parameters: x, deterministic"):
        remat.remat(Block, "full", static_argnames=("train",))
    wrapped = remat.remat(Block, "save:mlpwo_1", static_argnames=("deterministic",))()
    with pytest.raises(remat.MissingCheckpointNameError,
                       match="never emits: mlpwo_1; it emits: decoder_layer_input, mlpwi, mlpwo"):
        wrapped.init(RNGS, X, deterministic=True)


# -- remat.scan_layers ------------------------------------------------------------------
def test_parameters_are_stacked_on_a_leading_layer_axis(params):
    shapes = jax.tree.map(jnp.shape, params)
    abstract_init = lambda m: jax.eval_shape(lambda: m.init(RNGS, X, deterministic=True))
    assert shapes == {"params": {"Dense_0": {"kernel": (6, D, F), "bias": (6, F)},
                                 "Dense_1": {"kernel": (6, F, D), "bias": (6, D)}}}
    for groups in [(2, 3), (3, 2), "sqrt", (6, 1), (1, 6)]:
        chex.assert_trees_all_equal_shapes(abstract_init(stack("full", groups)), params)
    for policy, groups in [("full", (2, 3)), ([(2, "full"), (4, "save:mlpwi")], "sqrt")]:
        chex.assert_trees_all_equal(stack(policy, groups).init(RNGS, X, deterministic=True), params)


@pytest.fixture(scope="module")
def plain_grads(params):
    return grads(stack("none"), params, True)


@pytest.mark.parametrize("groups", [None, (2, 3), "sqrt"])
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_and_grouping_gives_the_plain_gradients(params, plain_grads, policy, groups):
    chex.assert_trees_all_close(grads(stack(policy, groups), params, True), plain_grads, atol=1e-5)


def test_dropout_gradients_equal_under_remat_for_the_same_rng(params):
    for groups in [None, (3, 2)]:
        want = grads(stack("none", groups), params, False)
        for policy in ["full", "save:mlpwi"]:
            chex.assert_trees_all_close(grads(stack(policy, groups), params, False), want, atol=1e-5)


def test_each_layer_draws_its_own_dropout_mask():
    class Noise(nn.Module):
        @nn.compact
        def __call__(self, x, *, deterministic: bool):
            return x + nn.Dropout(0.5)(jnp.ones_like(x), deterministic=deterministic)

    for groups in [None, (2, 1)]:
        m = remat.scan_layers(Noise, num_layers=2, groups=groups, static_argnames=("deterministic",))()
        y = m.apply({}, jnp.zeros((64,)), deterministic=False, rngs={"dropout": jax.random.key(0)})
        assert jnp.any(y == 2.0), "identical masks in every layer give only 0 or 4"


def test_segments_and_prime_layer_counts(params):
    want = grads(stack("none"), params, True)
    segmented = stack([(2, "full"), (4, "save:mlpwi")])
    chex.assert_trees_all_close(grads(segmented, params, True), want, atol=1e-5)
    assert [(s.num_layers, s.groups) for s in plan(13, "full", "sqrt")] == [(12, (3, 4)), (1, None)]
    assert [(s.num_layers, s.groups) for s in plan(6, [(2, "full"), (4, "none")], "sqrt")] == [
        (2, (2, 1)), (4, (2, 2))]
    seven = stack("full", "sqrt", num_layers=7)
    p7 = stack("none", num_layers=7).init(RNGS, X, deterministic=True)
    assert p7["params"]["Dense_0"]["kernel"].shape == (7, D, F)
    chex.assert_trees_all_close(grads(seven, p7, True), grads(stack("none", num_layers=7), p7, True),
                                atol=1e-5)


def test_a_single_layer_and_a_one_by_one_grouping():
    for groups in [None, (1, 1), "sqrt"]:
        m = stack("full", groups, num_layers=1)
        p = m.init(RNGS, X, deterministic=True)
        assert p["params"]["Dense_0"]["kernel"].shape == (1, D, F)
        chex.assert_trees_all_close(grads(m, p, True), grads(stack("none", num_layers=1), p, True),
                                    atol=1e-6)


def test_scan_layers_errors():
    with pytest.raises(ValueError, match=r"groups=\(4, 2\) must be \(G, K\) with G \* K == 6 layers "
                                         r".*; valid: \(1, 6\), \(2, 3\), \(3, 2\), \(6, 1\)"):
        stack("full", (4, 2))
    with pytest.raises(ValueError, match=r"policy segments \[2, 2\] must be positive and add up to "
                                         "num_layers=6"):
        stack([(2, "full"), (2, "none")])
    with pytest.raises(ValueError, match="num_layers must be a positive int, got 0"):
        stack(num_layers=0)
    with pytest.raises(remat.MissingCheckpointNameError, match="never emits: qkv_proj"):
        stack("save:qkv_proj").init(RNGS, X, deterministic=True)
    with pytest.raises(ValueError, match="unknown remat policy 'minmal'"):
        stack("minmal")


def test_broadcast_arguments_and_weak_typed_python_floats():
    """a Python float reaching a scanned, rematerialized body works."""

    class Scaled(nn.Module):
        @nn.compact
        def __call__(self, x, scale, *, deterministic: bool):
            return x + scale * checkpoint_name(nn.Dense(x.shape[-1])(x), vocab.MLPWO)

    m = remat.scan_layers(Scaled, num_layers=3, policy="save:mlpwo", static_argnames=("deterministic",),
                          broadcast_argnames=("scale",))()
    p = m.init(RNGS, X, 0.5, deterministic=True)
    g = jax.grad(lambda p: m.apply(p, X, 0.5, deterministic=True).sum())(p)
    assert jnp.all(jnp.isfinite(g["params"]["Dense_0"]["kernel"]))
    bad = remat.scan_layers(Scaled, num_layers=3, static_argnames=("deterministic",))()
    with pytest.raises(TypeError, match="argument.s. scale are neither static nor broadcast"):
        bad.init(RNGS, X, 0.5, deterministic=True)


def test_scan_bodies_use_prevent_cse_false():
    m = stack("full", (2, 3))
    p = m.init(RNGS, X, deterministic=True)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: m.apply(p, X, deterministic=True).sum()))(p)
    found = [s.eqn for s in walk(jaxpr) if s.eqn.primitive.name in CHECKPOINT]
    assert len(found) == 3 and all(e.params["prevent_cse"] is False for e in found)


def test_nested_groups_cut_activation_memory():
    """Compile-only: temp bytes none > full > full with sqrt grouping (16 layers)."""
    x = jax.ShapeDtypeStruct((4, 64, 32), jnp.float32)

    def temp(m):
        p = jax.eval_shape(lambda: m.init(RNGS, x, deterministic=True))
        f = jax.grad(lambda p, x: m.apply(p, x, deterministic=True).sum())
        return jax.jit(f).lower(p, x).compile().memory_analysis().temp_size_in_bytes

    none, full, nested = (temp(stack(p, g, num_layers=16)) for p, g in
                          [("none", None), ("full", None), ("full", "sqrt")])
    assert none > full > nested, (none, full, nested)
    assert nested <= 0.7 * full


def test_testing_kit_memory_order():
    def build(policy):
        layer = remat.checkpoint(mlp, policy)
        return lambda w1s, w2s, x: jax.lax.scan(lambda c, w: (c + layer(*w, c), None), x, (w1s, w2s))[0]

    args = (jax.ShapeDtypeStruct((8, D, 256), jnp.float32), jax.ShapeDtypeStruct((8, 256, D), jnp.float32),
            jax.ShapeDtypeStruct((64, 64, D), jnp.float32))
    assert_memory_ordered(build, ["none", "save:mlpwi", "full"], *args)
    with pytest.raises(AssertionError, match="temp_size_in_bytes is not non-increasing along the "
                                             "policies: full: [0-9]+ B, none: [0-9]+ B"):
        assert_memory_ordered(build, ["full", "none"], *args)


def test_checkpoint_names_looks_inside_scan_and_remat(params):
    names = remat.checkpoint_names(lambda p: stack("full", (2, 3)).apply(p, X, deterministic=True), params)
    assert names == {"decoder_layer_input", "mlpwi", "mlpwo"}
    assert policies.get("minimal").names - names  # the MLP block lacks the attention names


# -- fault kinds from public reports ------------------------------------------------------
def test_offload_on_a_backend_without_pinned_host_is_a_clear_error(monkeypatch):
    """no silent no-op; the message gives the explicit on-device fallback."""

    class NoHost:
        platform, device_kind = "fake", "Fake TPU"

        def addressable_memories(self):
            return [type("Memory", (), {"kind": "device"})()]

    from remat import _apply as apply

    with pytest.raises(apply.OffloadUnsupportedError,
                       match=r"remat policy 'save:mlpwo \+ offload:mlpwi' offloads to 'pinned_host', but "
                             r"backend 'fake' \(Fake TPU\) has memories \['device'\]; to keep those values "
                             r"on device instead, use 'save:mlpwi,mlpwo' \(Policy.on_device\(\)\)"):
        apply.check_offload(policies.get("save:mlpwo + offload:mlpwi"), NoHost())
    apply.check_offload(policies.get("save:mlpwo"), NoHost())  # nothing offloaded: fine
    on_device = policies.get("offload_dots:no_batch + offload:a").on_device()
    assert on_device == policies.get("dots:no_batch + save:a")


def test_a_float_static_argument_that_keeps_changing_warns():
    """a Python float static argument retraces at every new value."""

    def f(x, scale):
        return jnp.sin(checkpoint_name(x * scale, vocab.MLPWI))

    g = jax.jit(remat.checkpoint(f, "save:mlpwi", static_argnames=("scale",)), static_argnames=("scale",))
    with pytest.warns(UserWarning, match="static argument 'scale' has taken 8 different float values; "
                                         "each one retraces"):
        for i in range(8):
            g(X, scale=1.0 + i)


def test_new_user_mistakes_get_clear_errors():
    """From a new user's trial: a Python flag left traced, policy=None, a preset
    named in errors as the user wrote it, and ``+`` on Policy values."""
    traced = remat.remat(Block, "full")()
    with pytest.raises(jax.errors.TracerBoolConversionError,
                       match="remat: in module Block.__call__, the arguments x, deterministic are traced; "
                             "name the Python flags among them"):
        traced.init(RNGS, X, deterministic=True)
    with pytest.raises(TypeError, match="a remat policy is a name, a spec string, a Policy or a JAX policy "
                                        "callable, got None; for no remat write 'none'"):
        stack(None)
    with pytest.raises(remat.MissingCheckpointNameError,
                       match=r"remat policy 'save_qkv_proj' \(save:key_proj,qkv_proj,query_proj,value_proj\)"
                             " names checkpoint name.s. that module Block never emits"):
        stack("save_qkv_proj").init(RNGS, X, deterministic=True)
    assert policies.get("save:mlpwi") + policies.get("offload:mlpwo") == policies.get(
        "save:mlpwi + offload:mlpwo")


class VocabBlock(nn.Module):
    """:func:`vocab_layer` as a linen layer: every vocabulary name, so every preset applies."""

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        w = self.param("w", nn.initializers.normal(0.3), (9, x.shape[-1], x.shape[-1]))
        return vocab_layer(w, x)


@pytest.fixture(scope="module")
def vocab_reference():
    p = stack("none", num_layers=4, block=VocabBlock).init(RNGS, X, deterministic=True)
    return p, grads(stack("none", num_layers=4, block=VocabBlock), p, True)


@pytest.mark.parametrize("groups", [None, (2, 2)])
@pytest.mark.parametrize("policy", default_policies(vocab.ALL_NAMES))  # one preset name per distinct policy
def test_every_registry_preset_scanned_gives_the_plain_gradients(vocab_reference, policy, groups):
    p, want = vocab_reference
    got = grads(stack(policy, groups, num_layers=4, block=VocabBlock), p, True)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
