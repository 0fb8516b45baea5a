"""The peak by term: XLA's buffer-assignment dump read (on committed dumps of
CPU, GPU and TPU compiles, ``tests/dumps/regenerate.py``), attributed to terms,
and checked against the compiled peak on both model families; the chunked
loss head's term."""

import json
import pathlib
import re
import shutil
import tarfile

import pytest
from rich.console import Console

from remat import DumpFormatError, models as M
from remat._analysis import compile_traced, measure
from remat._buffers import device_memory, read_dump
from remat._format import byte_unit
from remat._memory import TERMS, advice, peak_terms
from remat._sweep import SweepResult, plot_sweep, train_step_setup

DUMPS = pathlib.Path(__file__).parent / "dumps"
EXPECTED = json.loads((DUMPS / "expected.json").read_text())
CASES = ("llama_minimal", "gpt2_full_chunked", "llama_minimal_h100", "llama_minimal_v5p")


def unpack(name: str, into: pathlib.Path) -> pathlib.Path:
    with tarfile.open(DUMPS / f"{name}.tar.xz") as tar:
        tar.extractall(into, filter="data")
    return into


# -- the reader, on committed dumps --------------------------------------------------------
def test_every_committed_dump_is_tested():
    assert sorted(CASES) == sorted(p.name.removesuffix(".tar.xz") for p in DUMPS.glob("*.tar.xz"))
    assert {EXPECTED[n]["platform"] for n in CASES} == {"cpu", "gpu", "tpu"}


@pytest.mark.parametrize("name", CASES)
def test_committed_dump_adds_up_to_the_compiled_peak(name, tmp_path):
    """Terms from the dump alone (no residual rows: residuals count as
    workspace) and memory_analysis()'s temp_size_in_bytes (the ``reserved``
    term) sum to the peak memory_analysis() gave for the same compile, on
    CPU, GPU (H100) and TPU (v5p)."""
    case = EXPECTED[name]
    dump = read_dump(unpack(name, tmp_path), case["platform"])
    assert dump.module == "jit_step"
    terms, _, buffers, host = peak_terms(dump, rows=(), temp_bytes=case["temp_bytes"])
    assert list(terms) == list(TERMS)
    peak = case["peak_bytes"]
    assert abs(sum(terms.values()) - peak) <= 0.01 * peak
    assert terms["unattributed"] <= 0.05 * peak
    assert host == 0
    assert 0 <= dump.fragmentation_bytes < dump.temp_allocation_bytes
    # memory_analysis()'s temporaries are the dump's temporary allocation, but on a TPU
    assert (terms["reserved"] > 0) == (case["platform"] == "tpu")
    assert terms["reserved"] == case["temp_bytes"] - dump.temp_allocation_bytes
    # arguments by their path
    embedding = "state.params['embed']['embedding']"
    assert any(b.name.startswith(embedding) for b in buffers if b.term == "parameters")
    assert all(b.name.startswith("state.opt_state[") for b in buffers if b.term == "optimizer state")


def test_tpu_on_chip_memory_is_not_in_the_peak(tmp_path):
    """XLA:TPU's buffer assignment lists VMEM (and SMEM, sync flag) allocations
    beside the HBM ones; memory_analysis() counts HBM only, and so do the terms.
    Read as if every space were device memory, the terms overshoot the peak."""
    d = unpack("llama_minimal_v5p", tmp_path)
    assert device_memory(0, "tpu") and not device_memory(1, "tpu") and device_memory(1, "gpu")
    assert not device_memory(5, "tpu") and not device_memory(5, "gpu")
    hbm, every = read_dump(d, "tpu"), read_dump(d, "gpu")
    assert all(v.memory_space == 0 for v in hbm.live)
    assert any(v.memory_space == 1 for v in every.live)
    assert every.temp_allocation_bytes > hbm.temp_allocation_bytes
    case = EXPECTED["llama_minimal_v5p"]
    over = sum(peak_terms(every, rows=())[0].values()) - case["peak_bytes"]
    assert over > 0.01 * case["peak_bytes"]


def test_argument_buffers_count_whole(tmp_path):
    """A donated argument's buffer is held all step: where no value in it is
    live at the peak (XLA:TPU lends it to temporaries between the parameter's
    last read and its update), its free bytes count as that argument."""
    d = unpack("llama_minimal_v5p", tmp_path)
    dump = read_dump(d, "tpu")
    ranges = next(d.glob("*-live-range.txt")).read_text()
    at_peak = set(re.findall(r"^\s+(\S+): \d+ bytes \(cumulative", ranges, re.M))
    filled = [v for v in dump.live if v.parameter and v.value not in at_peak]
    assert "state.params['embed']['embedding']" in {v.op_name for v in filled}
    assert not any(v.in_temp for v in filled)
    # XLA's copies of an argument (a cast to bf16, a relayout) are workspace, not the argument
    assert any(v.copy_of for v in dump.live)
    buffers = peak_terms(dump, rows=())[2]
    assert {b.term for b in buffers if b.op_name.startswith("state.params")} == {"workspace"}


def test_loop_outputs_resolve_to_what_the_loop_writes(tmp_path):
    """A scanned weight's gradient is an output of the backward layer loop
    (``while.N{i}``); its maker is what the loop body writes, a
    dynamic-update-slice under ``transpose``, so it counts as gradients."""
    dump = read_dump(unpack("llama_minimal", tmp_path))
    outputs = [v for v in dump.live if v.value.startswith("while.")]
    assert len(outputs) >= 3
    for v in outputs:
        assert v.op_name.startswith("jit(step)/transpose(jvp(Transformer))/layers/layers.run/while/body/")
        assert v.op_name.endswith("dynamic_update_slice") and v.source.endswith("_scan.py:263")
    _, _, buffers, _ = peak_terms(dump, rows=())
    assert {b.term for b in buffers if b.shape in {v.shape for v in outputs} and b.op_name.endswith(
        "dynamic_update_slice")} == {"gradients"}


def test_a_changed_format_fails_clearly(tmp_path):
    d = unpack("llama_minimal", tmp_path / "a")
    live = next(d.glob("*-live-range.txt"))
    live.write_text(live.read_text().replace("(peak):", "(top):"))
    with pytest.raises(DumpFormatError, match=r"no 'Live ranges at N \(peak\):' section in module_0004\.jit_"
                                              r"step\.cpu_after_optimizations-live-range\.txt"):
        read_dump(d)
    next(d.glob("*optimizations.txt")).unlink()
    with pytest.raises(DumpFormatError, match=r"module_0004\.jit_step\.cpu_after_optimizations\.txt missing "
                                              r"beside module_0004"):
        read_dump(d)
    shutil.rmtree(d)
    d.mkdir()
    with pytest.raises(DumpFormatError, match=r"no \*after_optimizations-live-range\.txt in "):
        read_dump(d)


# -- on compiled steps, both families ------------------------------------------------------
def _report(family: str, chunks: int, policy: str = "full"):
    cfg = M.get_config("tiny", family=family, vocab_size=4096, loss_chunks=chunks)
    s = train_step_setup(cfg, batch=4, seq=128)
    t = s.trace(policy, policy)
    return s, t, s.finish(measure(t, *compile_traced(t, None)))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def reports(request):
    return {chunks: _report(request.param, chunks) for chunks in (1, 8)}


def test_breakdown_adds_up_and_names_the_loss_head(reports):
    """Terms + unattributed = peak_bytes within 1%, unattributed <= 5%; with
    the whole logits the loss head holds at least the float32 logits [B, T-1, V]
    and is the largest term (advice names it), with 8 chunks it is >= 4x smaller."""
    (_, _, whole), (_, _, chunked) = reports[1], reports[8]
    for r in (whole, chunked):
        terms = dict(r.peak_terms)
        assert abs(sum(terms.values()) - r.peak_bytes) <= 0.01 * r.peak_bytes
        assert terms.get("unattributed", 0) <= 0.05 * r.peak_bytes
        assert [k for k, _ in r.peak_terms] == [k for k in TERMS if k in terms]
        assert {"parameters", "optimizer state", "gradients", "stacked layer inputs"} <= set(terms)
    head = dict(whole.peak_terms)["loss head"]
    assert head >= 4 * 127 * 4096 * 4
    assert dict(chunked.peak_terms).get("loss head", 0) * 4 <= head
    assert chunked.peak_bytes < whole.peak_bytes
    lead = "the largest term at the peak (fragmentation aside) is loss head"
    assert any(n.startswith(lead) for n in whole.notes)
    d = whole.to_dict()
    assert d["peak_terms"]["loss head"] == head
    assert d["peak_buffers"][0]["size_bytes"] == whole.peak_buffers[0].size_bytes


def test_report_renders_the_breakdown_and_the_largest_buffers(reports):
    console = Console(record=True, width=200)
    console.print(reports[1][2])
    text = console.export_text()
    assert "by term" in text and "largest buffers live at the peak" in text and "loss head" in text


def test_without_a_dump_the_report_falls_back_with_a_note(reports):
    _, t, _ = reports[1]
    compiled = compile_traced(t, None)[0]
    r = measure(t, compiled, 0.0, "XLA's buffer-assignment dump could not be read (no file)")
    assert r.peak_terms == () and r.host_peak_bytes is None
    assert "no peak breakdown by term: XLA's buffer-assignment dump could not be read (no file)" in r.notes
    assert r.peak_bytes == reports[1][2].peak_bytes  # today's figures, from memory_analysis()


def test_sweep_plot_draws_the_terms_as_stacked_bars(reports):
    r1, r8 = reports[1][2], reports[8][2]
    result = SweepResult("tiny", 4, 128, (r1, r8), (0, 1), 0.0)
    fig = plot_sweep(result)
    bars = fig.axes[1]
    assert bars.get_title() == "the peak by term"
    labels = [c.get_label() for c in bars.containers]
    assert labels == [t for t in TERMS if dict(r1.peak_terms).get(t) or dict(r8.peak_terms).get(t)]
    heights = sum(c.patches[0].get_height() for c in bars.containers)
    first = min(r1, r8, key=lambda r: r.peak_bytes)  # bars in the order of the points: by peak
    unit, size = byte_unit(max(r1.peak_bytes, r8.peak_bytes))
    assert bars.get_ylabel() == f"peak memory per device ({unit})" and unit == "MiB"
    assert heights == pytest.approx(sum(n for _, n in first.peak_terms) / size, rel=1e-9)


# -- advice in numbers --------------------------------------------------------------------
def test_advice_names_the_dominant_term_and_its_levers():
    gib = 2**30
    terms = {"parameters": 2 * gib, "optimizer state": 4 * gib, "gradients": 2 * gib, "residuals": gib,
             "stacked layer inputs": gib, "loss head": gib, "workspace": 0}
    (note,) = advice(terms, 11 * gib, devices=1)
    assert note == (
        "the largest term at the peak (fragmentation aside) is optimizer state (4.00 GiB of 11.00 GiB), "
        "not the activations (2.00 GiB): a remat policy cannot shrink it. Levers: shard parameters, "
        "optimizer state and gradients (8.00 GiB) with FSDP over 8 devices (--mesh fsdp=8): saves about "
        "7.00 GiB; halve the per-device batch: saves about 1.50 GiB (activations, loss head and workspace "
        "scale with it); offload the residuals to host (offload:NAME): up to 2.00 GiB")
    assert advice({**terms, "residuals": 5 * gib}, 15 * gib, devices=1) == []  # activations dominate
