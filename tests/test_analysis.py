"""remat.analyze (remat._analysis): residual rows by name x layers, trip-count-exact FLOPs,
memory figures and the report's JSON, on hand-written scans and on models."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import checkpoint_name

import remat
from remat import Report, analyze, models
from remat._flops import count_flops
from remat._format import format_bytes, parse_bytes
from remat._residuals import ResidualRow, residual_rows
from remat._sweep import train_step_setup

L, B, T, D, F = 3, 2, 8, 16, 32


def _body(x, w):
    h = checkpoint_name(x @ w["wi"], "mlpwi")
    h = jnp.tanh(h)
    return x + checkpoint_name(h @ w["wo"], "mlpwo"), None


def _step(spec: str):
    """A train step over a scan of ``L`` checkpointed MLP layers (SGD update)."""
    policy = remat.policies.get(spec)
    body = _body if policy.is_none else jax.checkpoint(_body, policy=policy.to_jax(), prevent_cse=False)

    def loss(params, x):
        y, _ = jax.lax.scan(body, x, params)
        return (y**2).mean()

    def step(params, x):
        value, grads = jax.value_and_grad(loss)(params, x)
        return value, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    return step


PARAMS = {"wi": jax.ShapeDtypeStruct((L, D, F), jnp.float32),
          "wo": jax.ShapeDtypeStruct((L, F, D), jnp.float32)}
X = jax.ShapeDtypeStruct((B, T, D), jnp.float32)


def _rows(spec: str) -> dict[str, ResidualRow]:
    return {r.name: r for r in residual_rows(jax.make_jaxpr(_step(spec))(PARAMS, X))}


# -- residuals -------------------------------------------------------------------------
def test_full_keeps_only_the_layer_input_per_layer():
    rows = _rows("full")
    assert rows["layer input"] == ResidualRow(
        name="layer input", source="scan carry", shape=(B, T, D), dtype="float32", memory_kind="device",
        layers=L, count=1, size_bytes=L * B * T * D * 4, from_dot=False)
    assert "mlpwi" not in rows and "mlpwo" not in rows


def test_saved_name_is_a_row_by_name_times_layers():
    row = _rows("save:mlpwi")["mlpwi"]
    assert (row.source, row.shape, row.layers, row.size_bytes, row.memory_kind, row.from_dot) == (
        "checkpoint_name", (B, T, F), L, L * B * T * F * 4, "device", True)


def test_dots_rule_rows_carry_the_tag_of_the_matmul():
    # dots_saveable keeps the dot_general output; the row is named by the tag on it
    assert _rows("dots")["mlpwi"].from_dot


def test_offloaded_name_is_a_host_row_and_counted_on_cpu():
    r = analyze(_step("offload:mlpwi"), PARAMS, X, donate_argnums=0)
    host = [row for row in r.residuals if row.memory_kind == "host"]
    assert [(row.name, row.size_bytes) for row in host] == [("mlpwi", L * B * T * F * 4)]
    assert r.host_residual_bytes == L * B * T * F * 4
    assert r.residual_bytes == sum(row.size_bytes for row in r.residuals if row.memory_kind == "device")
    if r.backend == "cpu":  # XLA:CPU has no separate host memory accounting
        assert r.host_temp_bytes == 0
        assert any("host_residual_bytes" in n for n in r.notes)


def test_function_without_backward_pass_has_no_residuals():
    assert residual_rows(jax.make_jaxpr(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((4, 4)))) == ()


def test_parameter_views_are_not_residuals():
    # the backward pass reads w.T (a transpose of an input): a view, not an activation
    def step(w, x):
        return jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w.T)))(w)

    rows = residual_rows(jax.make_jaxpr(step)(jnp.ones((4, 8)), jnp.ones((2, 8))))
    assert "tanh" in {r.name for r in rows}
    assert all(r.shape == (2, 4) for r in rows)  # activations only, no [4, 8] / [8, 4] weight view


# -- FLOPs -----------------------------------------------------------------------------
def test_scan_flops_count_every_iteration():
    def f(ws, x):
        return jax.lax.scan(lambda c, w: (c @ w, None), x, ws)[0]

    flops, notes = count_flops(jax.make_jaxpr(f)(jnp.ones((7, 16, 16)), jnp.ones((4, 16))))
    assert flops == 7 * 2 * 4 * 16 * 16
    assert notes == ()


def test_while_loop_is_counted_once_with_a_note():
    def f(x):
        return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] @ c[1]), (0, x))[1]

    flops, notes = count_flops(jax.make_jaxpr(f)(jnp.ones((8, 8))))
    assert flops == 2 * 8 * 8 * 8 + 1 + 0  # one matmul, one add; the compare is not arithmetic
    assert notes == ("a while_loop (unknown trip count) is counted once",)


def _formula_flops(name: str) -> tuple[int, int]:
    """(counted, formula) for the no-remat train step of a preset at batch 1:
    6 * N * tokens (Kaplan et al. 2020: forward 2N, backward 4N per token) plus
    attention's two [T, T] matmuls, 12 * L * B * T^2 * (heads * head_dim)
    (forward 2 * 2 * T^2 * N * H per layer and sequence, times 3 for the backward)."""
    s = train_step_setup(name, batch=1, seq=min(1024, models.get_config(name).max_seq_len))
    cfg = models.get_config(name)
    counted, _ = count_flops(s.trace("none", "none").traced.jaxpr)
    n = models.param_count(cfg)
    attention = 12 * cfg.num_layers * s.batch * s.seq**2 * cfg.num_heads * cfg.head_dim
    return counted, 6 * n * s.batch * s.seq + attention


@pytest.mark.parametrize("name", ["tiny", "gpt2-small", "llama3.2-1b"])
def test_no_remat_flops_match_6_n_tokens_plus_attention(name):
    counted, formula = _formula_flops(name)
    assert abs(counted / formula - 1) < 0.03, (counted, formula)


# -- the report ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_reports() -> dict[str, Report]:
    s = train_step_setup("tiny", batch=2, seq=64)
    none = remat.sweep(s, ["none", "full", "dots_with_no_batch_dims_saveable"])
    return {r.label: r for r in none.reports}


def test_peak_is_arguments_plus_outputs_plus_temp_minus_alias(tiny_reports):
    for r in tiny_reports.values():
        assert r.peak_source == "memory_analysis"
        assert r.peak_bytes == r.argument_bytes + r.output_bytes + r.temp_bytes - r.alias_bytes
        assert r.alias_bytes > 0  # the donated state


def test_full_remat_costs_one_forward_of_the_layers(tiny_reports):
    full, none = tiny_reports["full"], tiny_reports["none"]
    assert none.recompute_overhead == 0.0
    assert 0.20 <= full.recompute_overhead <= 0.34
    assert full.recompute_flops == full.flops - none.flops
    assert full.residual_bytes < none.residual_bytes
    assert full.peak_bytes < none.peak_bytes


def test_matmul_counts_and_the_no_batch_rule(tiny_reports):
    r = tiny_reports["dots_with_no_batch_dims_saveable"]
    layers = models.get_config("tiny").num_layers
    # per layer: q, k, v, out, gate, up, down projections + the 2 attention einsums; plus the head
    assert r.dots_forward == 9 * layers + 1
    assert r.dots_forward_batched == 2 * layers
    # the rule keeps the unbatched projections the backward pass reads: q, k, v, out, gate, up;
    # not mlpwo, whose output only feeds the residual add (the next layer's input, kept anyway)
    assert r.dots_kept == 6 * layers
    assert tiny_reports["full"].dots_kept == 0


def test_checkpoint_names_are_those_the_model_emits(tiny_reports):
    assert set(tiny_reports["full"].checkpoint_names) == {
        "decoder_layer_input", "attn_norm", "query_proj", "key_proj", "value_proj", "attn_scores",
        "attn_probs", "context", "out_proj", "mlp_norm", "mlpwi_0", "mlpwi_1", "mlpwo"}


def test_report_to_dict_is_json_with_units_in_names(tiny_reports):
    d = json.loads(json.dumps(tiny_reports["full"].to_dict()))
    assert d["label"] == "full" and d["backend"] == jax.default_backend()
    for key in ("temp_bytes", "argument_bytes", "output_bytes", "alias_bytes", "host_temp_bytes",
                "peak_bytes", "residual_bytes", "host_residual_bytes", "flops", "compile_seconds"):
        assert key in d
    row = d["residuals"][0]
    assert set(row) == {"name", "source", "shape", "dtype", "memory_kind", "layers", "count",
                        "size_bytes", "device_bytes", "from_dot", "gathered"}
    assert row["device_bytes"] == row["size_bytes"]  # one device
    for key in ("devices", "mesh", "rules", "flops_per_device"):
        assert key in d


def test_report_renders_as_rich_tables(tiny_reports):
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(tiny_reports["full"])
    text = console.export_text()
    assert "layer input" in text and "recompute overhead" in text and "+" in text


def test_bad_baseline_is_rejected():
    with pytest.raises(TypeError, match="baseline must be .no_remat., a Report, an int .FLOPs. or None, "
                                        "got float"):
        analyze(_step("full"), PARAMS, X, baseline=1.5)


# -- sizes -----------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "value"), [("40GiB", 40 * 2**30), ("1.5 GB", 1_500_000_000),
                                             ("512mib", 512 * 2**20), ("100B", 100)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize(("text", "match"), [("40", "write a number and a unit"),
                                             ("3 parsecs", "unknown size unit 'parsecs'")])
def test_parse_bytes_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        parse_bytes(text)


def test_format_bytes():
    assert format_bytes(3 * 2**30 // 2) == "1.50 GiB"
    assert format_bytes(12) == "12 B"
    assert format_bytes(None) == "-"


def test_fast_cpu_compile_options_leave_the_memory_figures_unchanged():
    """analyze compiles with FAST_CPU_COMPILE on CPU; remat train runs XLA's defaults.
    Buffer assignment, hence every memory figure, is the same to within alignment."""
    from remat._memory import FAST_CPU_COMPILE

    step = train_step_setup("tiny", batch=2, seq=32).step("minimal")
    fast, default = (analyze(step.fn, *step.args, baseline=None, donate_argnums=0, compiler_options=o)
                     for o in (FAST_CPU_COMPILE, {}))
    assert fast.argument_bytes == default.argument_bytes and fast.output_bytes == default.output_bytes
    assert abs(fast.temp_bytes - default.temp_bytes) <= 1024
    assert fast.residuals == default.residuals
