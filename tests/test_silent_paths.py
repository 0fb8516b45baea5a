"""Inputs from public fault reports that used to pass silently: a policy does
what it says, a report says what XLA does. Each asserts the right value."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import checkpoint_name

import remat
from remat import NeverKeptError, NeverKeptWarning, ScanCarryOffloadError, testing
from remat._analysis import count_checkpoints
from remat._sweep import inspect_policy, sweep, train_step_setup
from remat.models import Transformer, get_config
from remat.policies import UnsupportedJaxModeError, vocab as v

D, F = 8, 16
X = jax.random.normal(jax.random.key(0), (2, 3, D))
KEY = jax.random.key(1)


# -- 1. a name counts only if emitted, or if an alternative the same policy names is -----------
class SwiGLU(nn.Module):
    @nn.compact
    def __call__(self, x):
        gate = checkpoint_name(nn.Dense(F)(x), v.MLPWI_0)
        up = checkpoint_name(nn.Dense(F)(x), v.MLPWI_1)
        return x + nn.Dense(D)(nn.silu(gate) * up)


class FusedQKV(nn.Module):
    @nn.compact
    def __call__(self, x):
        qkv = checkpoint_name(nn.Dense(3 * D)(x), v.QKV_PROJ)
        q, k, val = jnp.split(qkv, 3, axis=-1)
        return x + jax.nn.softmax(q * k) * val


@pytest.mark.parametrize(("block", "spec", "missing", "emitted"), [
    (SwiGLU, "save:mlpwi", "mlpwi", "mlpwi_0, mlpwi_1"),
    (FusedQKV, "save:query_proj", "query_proj", "qkv_proj"),
])
def test_an_alternative_spelling_the_policy_does_not_name_is_missing(block, spec, missing, emitted):
    with pytest.raises(remat.MissingCheckpointNameError,
                       match=f"remat policy '{spec}' names checkpoint name.s. that module {block.__name__}"
                             f".__call__ never emits: {missing}; it emits: {emitted}\\."):
        remat.remat(block, spec)().init(KEY, X)


@pytest.mark.parametrize(("block", "spec"), [(SwiGLU, "save:mlpwi,mlpwi_0,mlpwi_1"),
                                             (FusedQKV, "save_qkv_proj")])
def test_a_policy_naming_both_spellings_stays_valid(block, spec):
    params = block().init(KEY, X)
    got = jax.grad(lambda p: remat.remat(block, spec)().apply(p, X).sum())(params)
    chex.assert_trees_all_close(got, jax.grad(lambda p: block().apply(p, X).sum())(params), rtol=1e-6)


TINY = get_config("tiny")
TOKENS = jnp.zeros((2, 16), jnp.int32)


def test_a_policy_whose_names_are_never_kept_is_an_error():
    """``mlpwo``'s only use is an addition: JAX drops it whatever the policy says."""
    with pytest.raises(NeverKeptError, match="remat policy 'save:mlpwo' keeps nothing on module Block: mlpwo "
                                             "is emitted, but the backward pass never reads it"):
        Transformer(TINY, policy="save:mlpwo").init(KEY, TOKENS)


def test_a_written_name_never_kept_warns_and_a_preset_does_not():
    with pytest.warns(NeverKeptWarning, match="remat policy 'save:mlpwi_0,mlpwo' names mlpwo, which is "
                                              "emitted but never kept"):
        Transformer(TINY, policy="save:mlpwi_0,mlpwo").init(KEY, TOKENS)
    Transformer(TINY, policy="minimal + offload:decoder_layer_input").init(KEY, TOKENS)  # no warning


def test_the_report_notes_names_never_kept():
    r = inspect_policy(train_step_setup("tiny", batch=2, seq=16), "minimal")
    assert "mlpwo: named by the policy and emitted, but never kept (the backward pass never reads it" \
        in " ".join(r.notes)


def h_layer(x):
    return jnp.sin(checkpoint_name(jnp.sin(x), "h"))


@pytest.fixture
def remat3():
    jax.config.update("jax_remat3", True)
    yield
    jax.config.update("jax_remat3", False)


@pytest.mark.parametrize("mode", ["default", "jax_remat3"])
def test_offload_under_jax_remat3_is_an_error_and_names_work_in_both_modes(mode, request):
    if mode == "jax_remat3":
        request.getfixturevalue("remat3")
        with pytest.raises(UnsupportedJaxModeError,
                           match="remat policy 'offload:h' offloads to host, and JAX's 'jax_remat3' mode is "
                                 "on: that engine keeps nothing for such a policy"):
            testing.saved_names(h_layer, "offload:h", X)
        with pytest.raises(UnsupportedJaxModeError, match="'save:h \\+ dots' needs a policy callable"):
            remat.checkpoint(h_layer, "save:h + dots")(X)
    else:
        testing.assert_saved_names(h_layer, "offload:h", X, names=(), offloaded={"h"})
    testing.assert_saved_names(h_layer, "save:h", X, names={"h"})


# -- 2. names inside custom_vjp forward rules ----------------------------------------------------
@jax.custom_vjp
def kernel(x):
    return jnp.exp(x) * 2.0


def _kernel_fwd(x):
    e = jnp.exp(x)
    return e * 2.0, checkpoint_name(e, "kres")


kernel.defvjp(_kernel_fwd, lambda e, g: (g * e * 2.0,))


def uses_kernel(x):
    return jnp.sin(checkpoint_name(kernel(x), "kout"))


def test_a_name_in_a_custom_vjp_forward_rule_is_seen_and_honoured():
    assert remat.checkpoint_names(uses_kernel, X) == {"kout", "kres"}
    testing.assert_saved_names(uses_kernel, "save:kres", X, names={"kres"})
    testing.assert_policy_parity(uses_kernel, ["save:kres", "save:kres,kout"], X)


def test_the_kernel_runs_once_only_when_its_residual_and_output_are_saved():
    count = lambda policy: testing.compiled_op_count(uses_kernel, "exponential", X, policy=policy)
    assert [count(None), count("save:kout"), count("save:kres"), count("save:kout,kres")] == [1, 2, 2, 1]


# -- 3. offloading the scan carry ------------------------------------------------------------------
class TagsOutput(nn.Module):
    @nn.compact
    def __call__(self, x):
        return checkpoint_name(x + jnp.tanh(nn.Dense(D)(x)), "residual")


class TagsInput(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = checkpoint_name(x, v.DECODER_LAYER_INPUT)
        return x + jnp.tanh(nn.Dense(D)(x))


def test_offloading_the_scan_carry_is_an_error_naming_the_fix():
    bad = remat.scan_layers(TagsOutput, num_layers=4, policy="offload:residual")()
    with pytest.raises(ScanCarryOffloadError,
                       match="remat policy 'offload:residual' offloads residual, which tags the output of "
                             "module TagsOutput: the scan carry, .* Tag the block's input instead, e.g. "
                             "x = checkpoint_name.x, 'decoder_layer_input'.,"):
        bad.init(KEY, X)
    fixed = remat.scan_layers(TagsInput, num_layers=4, policy="offload:decoder_layer_input")()
    params = fixed.init(KEY, X)
    r = remat.analyze(jax.grad(lambda p: fixed.apply(p, X).sum()), params)
    assert r.host_residual_bytes == 4 * X.size * X.dtype.itemsize


# -- 4. every variable collection is stacked per layer ----------------------------------------------
class Sows(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(checkpoint_name(nn.Dense(D)(x), v.MLPWI))
        self.sow("intermediates", "act_mean", h.mean())
        return x + h


class Normed(nn.Module):
    train: bool = True

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(checkpoint_name(nn.Dense(D)(x), v.MLPWI))
        return x + nn.BatchNorm(use_running_average=not self.train)(h)


class FlaxScan(nn.Module):
    """Flax's own ``nn.scan`` over the same block: the reference."""

    block: type[nn.Module]

    @nn.compact
    def __call__(self, x):
        body = lambda mdl, c, _: (mdl(c), None)
        scan = nn.scan(body, variable_axes={True: 0}, split_rngs={"params": True}, length=4)
        return scan(self.block(), x, None)[0]


@pytest.mark.parametrize("groups", [None, (2, 2), "sqrt"])
@pytest.mark.parametrize(("block", "collection"), [(Sows, "intermediates"), (Normed, "batch_stats")])
def test_every_collection_is_stacked_and_returned_updated(block, collection, groups):
    ours = remat.scan_layers(block, num_layers=4, policy="save:mlpwi", groups=groups)()
    variables = ours.init(KEY, X)
    # Flax's nn.scan on the same variables, under its own module name
    child = next(iter(FlaxScan(block).init(KEY, X)["params"]))
    y, state = ours.apply(variables, X, mutable=[collection])
    want_y, want = FlaxScan(block).apply({c: {child: t} for c, t in variables.items()}, X,
                                         mutable=[collection])
    chex.assert_trees_all_close(y, want_y, rtol=1e-6)
    assert {x.shape[0] for x in jax.tree.leaves(state[collection])} == {4}
    chex.assert_trees_all_close(state[collection], want[collection][child], rtol=1e-5, atol=1e-6)


# -- 5a. a saving the compiled memory does not show ---------------------------------------------------
W4 = jax.ShapeDtypeStruct((4, 64, 64), jnp.float32)
X4 = jax.ShapeDtypeStruct((128, 64), jnp.float32)


def unrolled(policy, prevent_cse=True):
    layer = remat.checkpoint(lambda w, x: jnp.tanh(jnp.tanh(x @ w)), policy, prevent_cse=prevent_cse)

    def f(w, x):
        for i in range(4):
            x = layer(w[i], x)
        return x.sum()

    return jax.grad(f)


def test_an_unrolled_remat_whose_saving_xla_does_not_realise_is_flagged():
    r = remat.analyze(unrolled("full"), W4, X4)
    assert r.residual_bytes < r.temp_bytes
    assert r.saving_unconfirmed
    assert any("but the compiled temporaries by" in n and "XLA did not realise the saving" in n
               for n in r.notes)
    loose = remat.analyze(unrolled("full", prevent_cse=False), W4, X4)
    assert any(n.startswith("4 jax.checkpoint(prevent_cse=False) outside a scan body: XLA's "
                            "common-subexpression elimination") for n in loose.notes)


# -- 5b. all-zero or missing memory analysis -----------------------------------------------------------
class _Zeros:
    temp_size_in_bytes = argument_size_in_bytes = output_size_in_bytes = 0
    alias_size_in_bytes = host_temp_size_in_bytes = 0


@pytest.mark.parametrize("answer", [_Zeros(), None])
def test_missing_memory_analysis_falls_back_and_the_testing_kit_refuses(monkeypatch, answer):
    monkeypatch.setattr(jax.stages.Compiled, "memory_analysis", lambda self: answer)
    r = remat.analyze(unrolled("full"), W4, X4)
    assert r.peak_source == "residual estimate" and r.temp_bytes is None and r.peak_bytes > 0
    assert any("gives no memory_analysis() (or all zeros)" in n for n in r.notes)

    def build(policy):
        layer = remat.checkpoint(lambda x: jnp.tanh(jnp.tanh(x)), policy)
        return lambda x: jax.lax.scan(lambda c, _: (layer(c), None), x, None, length=4)[0]

    with pytest.raises(testing.NoMemoryAnalysisError, match="the 'cpu' backend .* gives no compiled memory "
                                                              "analysis .none, or all zeros."):
        testing.assert_memory_ordered(build, ["full", "none"], X4)


# -- 5c. one baseline: the step with no jax.checkpoint at all -----------------------------------------
def test_a_grouped_none_shows_its_real_overhead():
    res = sweep("tiny", ["none", "minimal", "full"], batch=2, seq=16, groups=(2, 2))
    overhead = {r.label: r.recompute_overhead for r in res.reports}
    assert overhead["none"] > 0.2 and overhead["minimal"] > overhead["none"]
    flat = sweep("tiny", ["none"], batch=2, seq=16)
    assert flat.reports[0].recompute_overhead == 0.0


# -- 5d. kept matmuls counted whatever keeps them ------------------------------------------------------
@pytest.mark.parametrize(("family", "policy", "kept", "total"), [
    ("llama", "minimal", 24, 37), ("gpt2", "minimal", 20, 33),
    ("gpt2", "dots_with_no_batch_dims_saveable", 20, 33),
])
def test_kept_matmuls_are_counted_through_bias_adds(family, policy, kept, total):
    r = inspect_policy(train_step_setup(get_config("tiny", family=family), batch=2, seq=16), policy)
    assert (r.dots_kept, r.dots_forward) == (kept, total)


def test_no_deprecated_jax_api_is_used():
    """Tests run with warnings as errors (pyproject.toml); this walks a jaxpr
    with sub-jaxprs through the one walker, which once used a deprecated API."""
    assert count_checkpoints(jax.make_jaxpr(unrolled("full"))(W4, X4)) == 4
