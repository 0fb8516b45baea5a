"""remat.sweep and the ``remat inspect`` / ``remat sweep`` commands: residual
orderings the policy definitions imply, the Pareto frontier, the plot, JSON."""

from __future__ import annotations

import json

import pytest

import remat
from remat import cli, policies
from remat._format import flop_unit
from remat._sweep import default_policies, pareto_frontier, plot_sweep, train_step_setup

# the order the definitions imply: each keeps a subset of what the one before keeps
ORDER = ["none", "minimal", "save_dot_except_mlpwi", "save_dot_except_mlp", "save_qkv_proj", "full"]


@pytest.fixture(scope="module")
def tiny_sweep() -> remat.SweepResult:
    return remat.sweep("tiny", [*ORDER, "qkv_proj_offloaded", "dots_with_no_batch_dims_saveable"],
                       batch=2, seq=64)


def test_residual_bytes_follow_the_definitions(tiny_sweep):
    by = {r.label: r for r in tiny_sweep.reports}
    residual = [by[p].residual_bytes for p in ORDER]
    assert residual == sorted(residual, reverse=True), dict(zip(ORDER, residual, strict=True))
    assert by["none"].residual_bytes > by["minimal"].residual_bytes > by["full"].residual_bytes


def test_overheads_rise_as_less_is_kept(tiny_sweep):
    by = {r.label: r for r in tiny_sweep.reports}
    overhead = [by[p].recompute_overhead for p in ORDER]
    assert overhead == sorted(overhead)
    assert overhead[0] == 0.0 and 0.20 <= overhead[-1] <= 0.34


def test_offload_moves_bytes_to_host(tiny_sweep):
    by = {r.label: r for r in tiny_sweep.reports}
    off, keep = by["qkv_proj_offloaded"], by["save_qkv_proj"]
    assert off.host_residual_bytes == keep.residual_bytes - by["full"].residual_bytes > 0
    assert off.residual_bytes == by["full"].residual_bytes


def test_identical_programs_share_a_compile(tiny_sweep):
    by = {r.label: r for r in tiny_sweep.reports}
    # tiny's only unbatched matmuls outside the named projections: none, so both keep the same
    shared = by["dots_with_no_batch_dims_saveable"]
    assert shared.compile_seconds == 0.0
    assert shared.notes[-1] == "the same XLA program as 'minimal': its compile was reused"
    assert shared.peak_bytes == by["minimal"].peak_bytes
    labels = {tiny_sweep.group_label(g) for g in tiny_sweep.groups()}
    assert "minimal = dots_with_no_batch_dims_saveable" in labels  # one row, one point


def test_frontier_is_exactly_the_undominated_reports(tiny_sweep):
    reports = tiny_sweep.reports
    front = set(tiny_sweep.frontier)
    for i, r in enumerate(reports):
        dominated = any(o.peak_bytes <= r.peak_bytes and o.flops <= r.flops
                        and (o.peak_bytes, o.flops) != (r.peak_bytes, r.flops) for o in reports)
        assert (i in front) == (not dominated), r.label
    assert reports.index(min(reports, key=lambda r: r.flops)) in front


def test_pareto_frontier_on_given_points(tiny_sweep):
    r0 = tiny_sweep.reports[0]
    points = [(10, 5), (8, 7), (9, 9), (12, 4), (8, 8)]
    reports = [r0.replace(peak_bytes=p, flops=f) for p, f in points]
    assert pareto_frontier(reports) == (1, 0, 3)  # by peak bytes; (9,9) and (8,8) are dominated


def test_to_dict_is_json(tiny_sweep):
    d = json.loads(json.dumps(tiny_sweep.to_dict()))
    assert (d["model"], d["batch"], d["seq"]) == ("tiny", 2, 64)
    assert [r["label"] for r in d["reports"]] == [*ORDER, "qkv_proj_offloaded",
                                                  "dots_with_no_batch_dims_saveable"]
    assert set(d["frontier"]) <= set(ORDER) | {"qkv_proj_offloaded", "dots_with_no_batch_dims_saveable"}


def test_plot_marks_frontier_and_labels_points(tiny_sweep, tmp_path):
    path = tmp_path / "sweep.png"
    fig = plot_sweep(tiny_sweep, str(path))
    ax = fig.axes[0]
    assert path.stat().st_size > 10_000
    groups = tiny_sweep.groups()
    assert [t.get_text() for t in ax.texts] == [str(k) for k in range(1, len(groups) + 1)]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [tiny_sweep.group_label(g) for g in groups]
    assert len(groups) < len(tiny_sweep.reports)  # policies that cost the same are one point
    # units the data reads in: a tiny model's peak in MiB and FLOPs in GFLOP, not 0.016 GiB and 0.0009 TFLOP
    assert ax.get_xlabel() == "peak memory per device (MiB)"
    assert ax.get_ylabel() == f"train step FLOPs ({flop_unit(max(r.flops for r in tiny_sweep.reports))[0]})"
    assert ax.get_ylabel() in ("train step FLOPs (MFLOP)", "train step FLOPs (GFLOP)")


def test_the_table_fits_80_columns_and_never_cuts_a_policy_name(tiny_sweep):
    from rich.console import Console

    console = Console(record=True, width=80)
    console.print(tiny_sweep)  # fitted to the console
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for g in tiny_sweep.groups():
        for label in tiny_sweep.group_label(g).split(" = "):
            assert label in text, label  # whole, on one line
    assert "left out to fit 80 columns: transfer/compute" in " ".join(text.split())
    assert "…" not in text
    wide = Console(record=True, width=200)
    wide.print(tiny_sweep)
    text = wide.export_text()
    assert "left out" not in text and "transfer/compute" in text
    assert str(tiny_sweep).startswith(" " * 10) and "remat sweep: tiny" in str(tiny_sweep)  # print(result)


def test_table_sorted_by_peak_with_frontier_marked(tiny_sweep):
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(tiny_sweep.table())
    lines = [ln for ln in console.export_text().splitlines() if ln.startswith("│")]
    assert len(lines) == len(tiny_sweep.groups())
    assert lines[-1].split("│")[2].strip() == "none"  # the most memory


def test_default_policies_dedupe_and_respect_emitted_names():
    every = default_policies(policies.vocab.ALL_NAMES)
    assert "none" in every and "full" in every
    assert "save_nothing" not in every  # equal to full
    # a policy of its own (JAX's, under jax.checkpoint), left out: it keeps what none keeps
    assert policies.get("everything_saveable") != policies.get("none") and "everything_saveable" not in every
    assert len({policies.get(p) for p in every}) == len(every)
    without_context = default_policies([n for n in policies.vocab.ALL_NAMES if n != "context"])
    assert "minimal_with_context" in every and "minimal_with_context" not in without_context


def test_setup_rejects_bad_sizes():
    with pytest.raises(ValueError, match=r"seq=600 must be in 1\.\.512"):
        train_step_setup("tiny", seq=600)
    with pytest.raises(ValueError, match="batch=0 must be a positive integer"):
        train_step_setup("tiny", batch=0)


def test_sweep_rejects_duplicates_before_compiling():
    with pytest.raises(ValueError, match="duplicated policies"):
        remat.sweep("tiny", ["full", "full"], seq=16)


# -- CLI ------------------------------------------------------------------------------------
def test_cli_sweep_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    rc = cli.main(["sweep", "--model", "tiny", "--seq", "32", "--policies", "none, full",
                   "--json", str(out), "--plot", str(png)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert [r["label"] for r in d["reports"]] == ["none", "full"]
    assert png.stat().st_size > 0
    assert "remat sweep: tiny, batch 1 x seq 32" in capsys.readouterr().out


def test_cli_inspect_prints_residuals_by_name(capsys):
    rc = cli.main(["inspect", "--model", "tiny", "--policy", "save_qkv_proj", "--seq", "32", "--json", "-"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    names = {r["name"]: r for r in d["residuals"]}
    assert names["query_proj"]["layers"] == 4 and names["query_proj"]["shape"] == [1, 32, 4, 32]
    assert d["recompute_overhead"] > 0


def test_cli_errors_name_the_bad_value(capsys):
    assert cli.main(["inspect", "--model", "tiny", "--policy", "nosuch", "--seq", "32"]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert cli.main(["sweep", "--model", "tiny", "--policies", "none,,full"]) == 2
    assert "--policies 'none,,full' has an empty entry" in capsys.readouterr().err
    assert cli.main(["sweep", "--model", "nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err


@pytest.mark.slow
def test_llama3_8b_compiles_on_cpu_and_full_remat_saves_memory():
    result = remat.sweep("llama3-8b", ["none", "full"], batch=1, seq=2048)
    none, full = result.reports
    assert none.residual_bytes > 30 * full.residual_bytes
    assert full.peak_bytes < none.peak_bytes
    assert 0.20 <= full.recompute_overhead <= 0.34
