"""Your own model through the tools: a :class:`remat.Workload` (a ViT,
``vit_workload.py``: its train step written by hand, and in one call in
linen and NNX) through ``inspect``, ``sweep`` and ``tune`` from Python and
the CLI, and every bad workload as one clear error."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import optax
import pytest
from vit_workload import linen, nnx_vit, workload

import remat
from remat import RematError, cli
from remat._flops import count_flops
from remat._residuals import residual_rows
from remat._sweep import NO_NAMES
from remat._workload import load_workload
from remat.models.vit import LAYERS, batch_shapes, classification_loss


@pytest.fixture(scope="module")
def vit_sweep():
    return remat.sweep(workload, ["none", "minimal", "save_qkv_proj", "full"])


def test_a_vit_is_inspected_with_its_names_and_its_arguments_by_role():
    s = remat.train_step_setup(workload)
    assert s.knobs == {"batch", "groups"} and (s.batch, s.seq) == (8, None)
    r = remat.inspect_policy(s, "minimal")
    assert set(r.checkpoint_names) == {"qkv_proj", "attn_scores", "attn_probs", "context", "out_proj",
                                       "mlpwi", "mlpwo"}
    # the step's arguments are called weights/adam/batch: the roles, not the paths, name the terms
    terms = dict(r.peak_terms)
    params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(s.step("full").args[0]))
    assert r.parameter_bytes == params and r.optimizer_bytes == 2 * params + 4  # mu, nu and the count
    assert r.batch_bytes == 8 * (32 * 32 * 3 * 4 + 4)
    assert terms["parameters"] > 0.9 * params and terms["optimizer state"] > 1.8 * params
    assert abs(sum(terms.values()) - r.peak_bytes) <= 0.01 * r.peak_bytes
    assert {b.term for b in r.peak_buffers if b.name.startswith("adam")} == {"optimizer state"}
    assert 0 < r.recompute_overhead < 0.2


def test_a_vit_sweep_orders_its_policies(vit_sweep):
    r = {x.label: x for x in vit_sweep.reports}
    assert (vit_sweep.model, vit_sweep.batch, vit_sweep.seq) == ("vit", 8, None)
    assert r["full"].peak_bytes < r["minimal"].peak_bytes < r["none"].peak_bytes
    assert r["none"].flops < r["minimal"].flops < r["full"].flops
    assert r["save_qkv_proj"].residual_bytes > r["full"].residual_bytes
    assert vit_sweep.reports[vit_sweep.frontier[0]].label == "full"
    assert "remat sweep: vit, batch 8 (4 policies" in vit_sweep.table().title


def test_a_vit_is_tuned_with_the_levers_it_reads(vit_sweep):
    r = {x.label: x for x in vit_sweep.reports}
    budget = (r["full"].peak_bytes + r["none"].peak_bytes) // 2
    t = remat.tune(linen, budget)  # the step written by hand, built once: see the test below
    assert t.levers == ("save, recompute per checkpoint name", "dots rules", "segments", "nested groups")
    assert t.chosen.device_peak_bytes <= budget and t.chosen.recompute_flops < r["full"].recompute_flops
    assert all(c.config.microbatches == 1 and c.config.loss_chunks == 1 for c in t.candidates)
    assert (t.model, t.batch, t.seq) == ("vit-linen", 8, None)
    assert t.candidates_table().caption is None  # no offload, no estimate: no footnote for it
    assert str(t).lstrip().startswith("remat tune: vit-linen, batch 8")  # print(result)
    assert str(t).count("yes (chosen)") == 1  # the chosen row is marked, whatever stage compiled it
    assert t.report.parameter_bytes == r["full"].parameter_bytes


def test_the_cli_takes_a_workload_as_module_attribute(capsys, tmp_path):
    out = tmp_path / "sweep.json"
    assert cli.main(["sweep", "--model", "vit_workload:workload", "--policies", "minimal,full",
                     "--json", str(out)]) == 0
    assert "remat sweep: vit, batch 8" in capsys.readouterr().out
    d = json.loads(out.read_text())
    assert (d["model"], d["batch"]) == ("vit", 8)
    assert [r["label"] for r in d["reports"]] == ["minimal", "full"]
    assert cli.main(["sweep", "--model", "vit_workload:workload", "--microbatches", "2"]) == 2
    assert capsys.readouterr().err == ("error: workload 'vit' does not read microbatches (the knobs it "
                                       "reads: batch, groups): leave it out\n")


@pytest.mark.parametrize("text, message", [
    ("no_such_module_here:workload",
     "cannot import 'no_such_module_here' (from 'no_such_module_here:workload'): No module named "
     "'no_such_module_here'"),
    ("vit_workload:nope",
     "module 'vit_workload' has no attribute 'nope' (its workloads: linen, nnx_vit, workload)"),
    ("vit_workload:LAYERS", "vit_workload:LAYERS is a int, not a remat.Workload (or a zero-argument function "
                            "returning one)"),
    ("vit_workload", "'vit_workload' is not module:attribute (e.g. mypkg.train:workload)"),
])
def test_a_workload_that_cannot_be_loaded_is_one_line(text, message):
    with pytest.raises(RematError) as e:
        load_workload(text)
    assert str(e.value) == message


def test_a_zero_argument_function_gives_the_workload():
    assert load_workload("vit_workload:make").name == "vit-2"


def _mlp(build_args=None, roles=("parameters", "optimizer state", "batch")):
    """A workload whose step emits no checkpoint name: an MLP on x[B, 16]."""
    tx = optax.sgd(0.1)

    def build(c, mesh):
        params = {"w1": jax.ShapeDtypeStruct((16, 32), jnp.float32),
                  "w2": jax.ShapeDtypeStruct((32, 1), jnp.float32)}
        x = lambda: jax.ShapeDtypeStruct((c.batch, 16), jnp.float32)  # read only where used

        def loss(p, x):
            layer = remat.checkpoint(lambda h: jnp.tanh(h @ p["w1"]), c.policy)
            return (layer(x) @ p["w2"]).mean()

        def step(p, s, x):
            g = jax.grad(loss)(p, x)
            u, s = tx.update(g, s)
            return optax.apply_updates(p, u), s

        args = build_args(params, x) if build_args else (params, jax.eval_shape(tx.init, params), x())
        return remat.TrainStep(step, args, roles)

    return remat.Workload("mlp", build, remat.Configuration(batch=4))


def test_a_step_without_names_gets_a_note_and_the_rules_that_apply():
    result = remat.sweep(_mlp())
    assert NO_NAMES in result.notes
    assert {r.label for r in result.reports} >= {"none", "full", "dots_saveable"}
    assert NO_NAMES in remat.inspect_policy(_mlp(), "full").notes  # a workload, bound with its defaults


@pytest.mark.parametrize("workload_, knobs, message", [
    (_mlp(lambda p, x: (p, "sgd", x())), {},
     "workload 'mlp': argument args[1] is a str ('sgd'), not an array: give a jax.ShapeDtypeStruct (or close "
     "over it in fn)"),
    (_mlp(roles=("parameters", "batch")), {},
     "workload 'mlp': roles ('parameters', 'batch') are not a pytree prefix of the arguments"),
    (_mlp(roles=("params", "optimizer state", "batch")), {},
     "workload 'mlp': roles ['params'] are not among 'parameters', 'optimizer state', 'batch'"),
    (_mlp(), {"loss_chunks": 4}, "workload 'mlp' does not read loss_chunks (the knobs it reads: batch): "
                                 "leave it out"),
    (_mlp(), {"batch": 0}, "batch=0 must be a positive integer"),
    (_mlp(), {"speed": 2}, "unknown knob(s) speed: valid are batch, microbatches, groups, loss_chunks, "
                           "attention"),
    (dataclasses.replace(_mlp(), batch_axes=("batch",)), {"mesh": {"fsdp": 1}},
     "workload 'mlp': batch axes batch are not axes of the mesh (data, fsdp, tensor)"),
])
def test_a_bad_workload_is_one_clear_error(workload_, knobs, message):
    from remat._workload import bind

    with pytest.raises(RematError) as e:
        bind(workload_, **knobs)
    assert str(e.value).startswith(message)


def test_the_options_of_a_preset_are_refused_for_a_workload():
    with pytest.raises(RematError, match=r"^seq, api set a model preset's step; workload 'vit' builds its"):
        remat.train_step_setup(workload, seq=64, api="nnx")
    with pytest.raises(RematError, match=r"does not read the batch"):
        remat.tune(_mlp(lambda p, x: (p, jax.eval_shape(optax.sgd(0.1).init, p),
                                      jax.ShapeDtypeStruct((4, 16), jnp.float32))), "1GiB", batch="auto")


def test_batch_auto_stops_at_the_compile_cap():
    with pytest.raises(RematError, match=r"^batch='auto': the compile cap \(3\) was reached before the"):
        remat.tune(_mlp(), "1GiB", batch="auto", max_compiles=3)


def test_segments_need_the_layer_count():
    no_layers = remat.Workload("vit", workload.build, workload.defaults)
    with pytest.raises(RematError, match=r"states no layer count \(Workload.layers\)"):
        remat.train_step_setup(no_layers).trace(f"2x minimal; {LAYERS - 2}x full", "segments")


# -- one call: remat.linen_workload and remat.nnx_workload ------------------------------
def test_a_linen_workload_is_the_hand_written_step():
    """The same residuals, FLOPs and arguments by role as the step written by hand
    (the same optimizer), traced only."""
    by_hand, one_call = remat.train_step_setup(workload), remat.train_step_setup(linen)
    assert one_call.knobs == by_hand.knobs == {"batch", "groups"}
    assert one_call.argument_split() == by_hand.argument_split()
    for policy in ("minimal", "full"):
        a, b = (s.trace(policy, policy).traced.jaxpr for s in (by_hand, one_call))
        assert count_flops(a) == count_flops(b)
        assert residual_rows(a) == residual_rows(b)


def test_an_nnx_model_goes_through_inspect_sweep_and_tune(capsys):
    s = remat.train_step_setup(nnx_vit)
    assert s.knobs == {"batch", "groups"}
    r = remat.inspect_policy(s, "save_qkv_proj")
    assert set(r.checkpoint_names) == {"qkv_proj", "attn_scores", "attn_probs", "context", "out_proj",
                                       "mlpwi", "mlpwo"}
    assert {x.name for x in r.residuals if x.source == "checkpoint_name"} == {"qkv_proj"}
    terms = dict(r.peak_terms)
    assert r.parameter_bytes == remat.train_step_setup(linen).argument_split()["parameter_bytes"]
    assert terms["parameters"] > 0.9 * r.parameter_bytes
    assert terms["optimizer state"] > 0.9 * r.optimizer_bytes
    result = remat.sweep(nnx_vit, ["none", "full"])
    none, full = result.reports
    assert full.peak_bytes < r.peak_bytes < none.peak_bytes and none.flops < r.flops < full.flops
    budget = (r.peak_bytes + none.peak_bytes) // 2
    assert cli.main(["tune", "--model", "vit_workload:nnx_vit", "--budget", f"{budget}B",
                     "--max-compiles", "5", "--json", "-"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["report"]["peak_bytes"] <= budget and d["model"] == "vit-nnx" and d["compiles"] <= 5
    assert d["report"]["flops"] < full.flops and d["levers"][-1] == "nested groups"


@pytest.mark.parametrize("batch, message", [
    ({"images": 3}, "workload 'model': batch leaf batch['images'] is 3, not an array with a leading batch "
                    "axis: give a jax.ShapeDtypeStruct"),
    ({**batch_shapes(8), "labels": jax.ShapeDtypeStruct((4,), jnp.int32)},
     "workload 'model': the batch leaves disagree on their leading (batch) dimension: batch['images']: 8, "
     "batch['labels']: 4"),
    ({}, "workload 'model': the batch has no arrays"),
])
def test_a_bad_batch_shape_is_one_clear_error(batch, message):
    with pytest.raises(RematError) as e:
        remat.linen_workload(lambda c: None, classification_loss, batch)
    assert str(e.value) == message
