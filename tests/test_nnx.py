"""remat.nnx (policies on Flax NNX modules) and the NNX twin of the models."""

import functools

import chex
import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from small_models import UNIQUE_POLICIES as ALL_POLICIES, small

import remat
from remat import cli, models as M
from remat._memory import default_compiler_options
from remat.models import nnx as MN
from remat.step import lm_loss
from remat.testing import TOLERANCES

B, T, D = 2, 16, 8
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (B, T)), jnp.int32)
X = jnp.asarray(np.random.default_rng(1).normal(size=(B, D)), jnp.float32)
FAST = default_compiler_options()
UNIQUE_POLICIES = [p for p in ALL_POLICIES if p != "none"]
L = 4  # small()'s layers


class Block(nnx.Module):
    """A tagged residual layer with dropout (its own stream) and a call counter."""

    def __init__(self, d: int, *, rngs: nnx.Rngs, rate: float = 0.5):
        self.lin = nnx.Linear(d, d, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x, *, deterministic: bool = False, scale=1.0):
        self.calls[...] += 1  # a method that mutates state
        h = checkpoint_name(self.lin(x), "mlpwi")
        return x + scale * self.drop(jnp.tanh(h), deterministic=deterministic)


def _loss_and_grads(module, *args, **kwargs):
    return nnx.value_and_grad(lambda m: jnp.sum(m(*args, **kwargs) ** 2))(module)


# -- remat.nnx.remat ------------------------------------------------------------------------------

def test_remat_keeps_state_static_by_name_kwargs_and_gradients():
    ref = Block(D, rngs=nnx.Rngs(params=0, dropout=1))
    got = remat.nnx.remat(Block, "save:mlpwi", static_argnames=("deterministic",))(
        D, rngs=nnx.Rngs(params=0, dropout=1))
    for _ in range(2):  # the second step draws new masks in both
        kwargs = {"deterministic": False, "scale": jnp.float32(0.5)}
        chex.assert_trees_all_close(_loss_and_grads(got, X, **kwargs), _loss_and_grads(ref, X, **kwargs),
                                    rtol=1e-6)
    assert int(got.calls[...]) == 2 and int(got.drop.rngs.count[...]) == 2
    assert remat.nnx.remat(Block, "none") is Block


def test_remat_errors_name_the_fix():
    with pytest.raises(remat.MissingCheckpointNameError, match=(
            r"^remat policy 'save:query_proj' names checkpoint name\(s\) that module Block.__call__ never "
            r"emits: query_proj; it emits: mlpwi\.")):
        remat.nnx.remat(Block, "save:query_proj", static_argnames=("deterministic",))(D, rngs=nnx.Rngs(0))(X)
    with pytest.raises(remat.RematError, match=r"static argument name 'determinstic' is not a parameter"):
        remat.nnx.remat(Block, "full", static_argnames=("determinstic",))
    block = remat.nnx.remat(Block, "full")(D, rngs=nnx.Rngs(0))
    with pytest.raises(jax.errors.TracerBoolConversionError,
                       match=r"remat: in module Block.__call__, the arguments x, deterministic are traced"):
        block(X, deterministic=False)  # not static: traced under jax.checkpoint


def test_a_live_module_closed_over_by_a_jax_transform_gets_the_recipe():
    """Flax's own failure (closing over a module that owns an RNG stream),
    then ours: the same situation, with what to do instead."""
    dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(0))
    with pytest.raises(flax.errors.TraceContextError):
        jax.grad(lambda x: dropout(x).sum())(X)
    block = remat.nnx.remat(Block, "full", static_argnames=("deterministic",))(D, rngs=nnx.Rngs(0))
    with pytest.raises(remat.RematError, match=(
            r"changed variables \(calls, drop/rngs/count\) of a live NNX module that a plain JAX transform "
            r".* nnx.merge\(graphdef, state, copy=True\).* nnx.update\(model, new_state\)")):
        jax.grad(lambda x: block(x).sum())(X)
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)  # the NNX way: split, merge, update

    def loss(params, rest, x):
        model = nnx.merge(graphdef, params, rest, copy=True)
        return jnp.sum(model(x) ** 2), nnx.state(model)

    (_, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params, rest, X)
    nnx.update(block, new_state)
    assert int(block.calls[...]) == 1 and jax.tree.leaves(grads)


# -- remat.nnx.scan_layers ------------------------------------------------------------------------

def _stack(policy="full", groups=None, layers=L, rate=0.5, **kw):
    cls = remat.nnx.scan_layers(Block, num_layers=layers, policy=policy, groups=groups,
                                static_argnames=("deterministic",), broadcast_argnames=("scale",), **kw)
    return cls(D, rngs=nnx.Rngs(params=0, dropout=1), rate=rate)


@functools.cache
def _scan_reference():
    return _loss_and_grads(_stack("none"), X)


@pytest.mark.parametrize("policy, groups", [
    ("full", None), ("save:mlpwi", None), ("full", (2, 2)), ("save:mlpwi", "sqrt"),
    ("1x full; 3x save:mlpwi", None)])
def test_scan_layers_parity_with_dropout(policy, groups):
    """The same key gives the same loss and gradients under every policy,
    grouping and segmentation (dropout on: the recompute redraws the same masks)."""
    chex.assert_trees_all_close(_loss_and_grads(_stack(policy, groups), X), _scan_reference(), rtol=1e-6)


def test_stacked_layers_draw_their_own_masks_every_step():
    stack = _stack(rate=0.5)
    state = nnx.state(stack)
    assert state["block"]["lin"]["kernel"].shape == (L, D, D)
    assert state["block"]["drop"]["rngs"]["key"].shape == (L,)  # one stream per layer
    keys = jax.random.key_data(stack.block.drop.rngs.key[...])
    assert len({tuple(np.asarray(k).ravel()) for k in keys}) == L
    ones = jnp.ones((1, D))

    def masks():  # each layer's dropout mask on its own: zero out the layer's linear map
        graphdef, st = nnx.split(stack.block)
        out = []
        for i in range(L):
            layer = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], st))
            out.append(np.asarray(layer.drop(ones) == 0))
        return np.stack(out)

    first = masks()
    assert len({m.tobytes() for m in first}) == L  # masks differ between layers
    stack(X)
    assert np.asarray(stack.block.drop.rngs.count[...]).tolist() == [1] * L  # counters advanced
    assert np.asarray(stack.block.calls[...]).tolist() == [1] * L  # every variable type, per layer
    assert not np.array_equal(masks(), first)  # and the next step draws new masks


def test_layer_axis_is_tracked_per_variable_type():
    """The call counters stacked on axis 1 ([1, L]), the rest on axis 0: each
    layer still sees its own slice, and the update lands on axis 1."""

    class Counted(Block):
        def __init__(self, d, *, rngs, rate=0.5):
            super().__init__(d, rngs=rngs, rate=rate)
            self.calls = nnx.BatchStat(jnp.zeros((1,), jnp.int32))

    cls = remat.nnx.scan_layers(Counted, num_layers=L, static_argnames=("deterministic",),
                                broadcast_argnames=("scale",), layer_axes={nnx.BatchStat: 1})
    stack = cls(D, rngs=nnx.Rngs(0))
    assert stack.block.calls.shape == (1, L) and stack.block.drop.rngs.count.shape == (L,)
    stack(X, deterministic=True)
    assert np.asarray(stack.block.calls[...]).tolist() == [[1] * L]


def test_one_layer_and_a_one_by_one_grouping():
    for groups in (None, (1, 1)):
        stack = _stack("full", groups, layers=1)
        assert stack.block.lin.kernel.shape == (1, D, D)
        loss, _ = _loss_and_grads(stack, X)
        assert np.isfinite(float(loss))


def test_scan_layers_missing_name_and_bad_groups():
    with pytest.raises(remat.MissingCheckpointNameError, match=(
            r"^remat policy 'save:context' names checkpoint name\(s\) that module Block never emits: "
            r"context; it emits: mlpwi\.")):
        _stack("save:context")(X)
    with pytest.raises(remat.RematError, match=r"groups=\(3, 2\) must be \(G, K\) with G \* K == 4 layers"):
        _stack("full", (3, 2))
    with pytest.raises(remat.RematError, match=r"^broadcast argument name 'scael' is not a parameter of Bl"):
        remat.nnx.scan_layers(Block, num_layers=L, broadcast_argnames=("scael",))
    stack = _stack("full")
    with pytest.raises(remat.RematError, match=(
            r"^module ScannedBlock: the call changed variables \(block/calls, block/drop/rngs/count\)")):
        jax.grad(lambda x: stack(x).sum())(X)


# -- the NNX transformer --------------------------------------------------------------------------

MODELS = {"llama": small("llama"), "gpt2": small("gpt2"),
          "qwen3-like": small("llama", qk_norm=True, qkv_bias=True, tie_embeddings=False, embed_scale=True,
                              mlp_activation="gelu_tanh", loss_chunks=4)}


def _linen_params(cfg):
    return M.Transformer(cfg, policy="none").init(jax.random.key(0), TOKENS)["params"]


def _loss(model, cfg, **kw):
    if cfg.loss_chunks > 1:
        return model(TOKENS, targets=TOKENS, **kw)
    return lm_loss(model(TOKENS, **kw), TOKENS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_nnx_model_matches_linen_and_converts_both_ways(name):
    cfg = MODELS[name]
    params = _linen_params(cfg)
    linen = M.Transformer(cfg, policy="minimal")
    apply = lambda p: functools.partial(linen.apply, {"params": p})
    want = jax.value_and_grad(lambda p: _loss(apply(p), cfg))(params)
    model = MN.Transformer(cfg, policy="minimal", rngs=nnx.Rngs(params=1, dropout=2))
    MN.load_linen_params(model, params)
    chex.assert_trees_all_close(MN.linen_params(model), nn.unbox(params))
    loss, grads = nnx.value_and_grad(lambda m: _loss(m, cfg))(model)
    got = (loss, MN.linen_params(grads))
    chex.assert_trees_all_close(got, (want[0], nn.unbox(want[1])), rtol=1e-5, atol=1e-6)


def test_parameters_that_are_not_the_models_are_named():
    model = MN.Transformer(MODELS["llama"], rngs=nnx.Rngs(0))
    wrong = MN.linen_params(model) | {"extra": jnp.ones(2)}
    wrong.pop("final_norm")
    wrong["layers"]["mlp"]["wo"]["kernel"] = jnp.ones((3, 3))
    with pytest.raises(remat.RematError, match=(
            r"^the parameters are not this model's: missing: final_norm/scale; extra: extra; shapes differ: "
            r"layers/mlp/wo/kernel \[3, 3\] \(want \[4, 64, 32\]\)$")):
        MN.load_linen_params(model, wrong)


@functools.cache
def _nnx_reference(family, dtype, dropout):
    return _nnx_loss_and_grads(family, dtype, dropout, "none")


def _nnx_loss_and_grads(family, dtype, dropout, policy):
    cfg = small(family, dtype, dropout_rate=dropout)
    model = MN.Transformer(cfg, policy=policy, rngs=nnx.Rngs(params=0, dropout=3))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        return _loss(nnx.merge(graphdef, params, rest, copy=True), cfg, deterministic=dropout == 0)

    loss, grads = jax.jit(jax.value_and_grad(loss), compiler_options=FAST)(params)
    return loss, nnx.to_pure_dict(grads)


@pytest.mark.parametrize("policy", UNIQUE_POLICIES)
@pytest.mark.parametrize("family, dtype, dropout", [("llama", "float32", 0.1), ("gpt2", "bfloat16", 0.0)])
def test_nnx_gradient_parity(family, dtype, dropout, policy):
    """Every distinct policy against no remat on the NNX model: float32 with
    dropout on (the same key: the recompute redraws the same masks), bf16
    with dropout off, each at its dtype's tolerance."""
    rtol, atol = TOLERANCES[dtype]
    chex.assert_trees_all_close(_nnx_loss_and_grads(family, dtype, dropout, policy),
                                _nnx_reference(family, dtype, dropout), rtol=rtol, atol=atol)


def test_the_tools_run_the_nnx_model_with_the_same_memory(capsys):
    """``--api nnx``: the same train step, state and compiled temp bytes as linen
    (tiny); an unknown api names the valid ones."""
    reports = {api: remat.inspect_policy(remat.train_step_setup("tiny", batch=2, seq=32, api=api), "minimal")
               for api in ("linen", "nnx")}
    assert reports["nnx"].temp_bytes == reports["linen"].temp_bytes > 0
    tuned = remat.tune("tiny", "1GiB", batch=2, seq=32, api="nnx")  # no remat fits: one compile
    assert tuned.pick.policy == "none" and tuned.compiles == 1
    with pytest.raises(SystemExit) as e:  # argparse's choices: a usage error, before any work
        cli.main(["inspect", "--model", "tiny", "--policy", "full", "--api", "jax"])
    assert e.value.code == 2
    assert "argument --api: invalid choice: 'jax' (choose from 'linen', 'nnx')" in capsys.readouterr().err
    with pytest.raises(remat.RematError, match=r"^unknown model api 'jax'; valid: linen, nnx$"):
        remat.train_step_setup("tiny", seq=32, api="jax")  # from Python, the library's own check
