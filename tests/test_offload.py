"""Offloading to host: the per-backend probe, its failure path, the
transfer/compute figures of every report, host bytes in groups and segments."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import checkpoint_name

import remat
from remat import _apply, cli
from remat._format import format_bytes
from remat._report import HOST_LINK_BYTES_PER_S, PEAK_FLOPS_PER_S


def test_the_probe_passes_here_and_sees_a_dropped_offload():
    assert _apply.offload_probe() is None  # XLA:CPU offloads inside a scan
    jax.config.update("jax_remat3", True)
    try:
        assert _apply.offload_probe() == (
            "the offloaded residual is not kept on host (JAX dropped it: is a mode such as jax_remat3 on?)")
    finally:
        jax.config.update("jax_remat3", False)


def test_a_failing_probe_is_a_clear_error_and_nothing_is_compiled(monkeypatch):
    """Forced: the backend's offload-in-scan program does not compile. An
    offload policy raises, naming the backend, the JAX version and both
    fallbacks; nothing runs under another policy."""
    monkeypatch.setattr(_apply, "offload_probe", lambda platform=None: "XlaRuntimeError: boom")
    fn = lambda x: jnp.sin(checkpoint_name(jnp.sin(x), "mlpwi"))
    compiled = []
    monkeypatch.setattr(_apply, "probe_jaxpr", lambda *a, **k: compiled.append(a))
    with pytest.raises(remat.OffloadUnsupportedError, match=(
            rf"^remat policy 'save:mlpwo \+ offload:mlpwi' offloads to 'pinned_host', but on backend 'cpu' "
            rf"\(cpu\) with JAX {jax.__version__} an offload inside a scan fails: XlaRuntimeError: boom; to "
            r"keep those values on device instead, use 'save:mlpwi,mlpwo' \(Policy.on_device\(\)\), or to "
            r"recompute them, 'save:mlpwo'\n")):  # then the note JAX adds to errors it filters
        remat.checkpoint(fn, "save:mlpwo + offload:mlpwi")(jnp.ones(3))
    assert compiled == []
    monkeypatch.undo()
    assert remat.checkpoint(fn, "save:mlpwi")(jnp.ones(3)).shape == (3,)  # no offload: no probe


@pytest.fixture(scope="module")
def offloaded():
    setup = remat.train_step_setup("tiny", batch=2, seq=32)
    return remat.inspect_policy(setup, "minimal_offloaded")


def test_every_report_has_the_transfer_against_the_compute(offloaded):
    r = offloaded
    assert r.host_residual_bytes > 0
    assert r.host_transfer_bytes == 2 * r.host_residual_bytes  # to host and back
    assert r.transfer_seconds == r.host_transfer_bytes / HOST_LINK_BYTES_PER_S == r.host_transfer_bytes / 64e9
    assert r.compute_seconds == r.flops / PEAK_FLOPS_PER_S == r.flops / 989e12
    assert r.transfer_compute_ratio == pytest.approx(r.transfer_seconds / r.compute_seconds)
    slow = r.with_rates(host_link_bytes_per_s=1e9)
    assert slow.transfer_seconds == pytest.approx(64 * r.transfer_seconds)
    assert slow.compute_seconds == r.compute_seconds
    d = r.to_dict()
    for k in ("host_transfer_bytes", "transfer_seconds", "compute_seconds", "transfer_compute_ratio",
              "host_link_bytes_per_s", "peak_flops_per_s"):
        assert d[k] == getattr(r, k)
    assert r.transfer_line().startswith(f"{format_bytes(r.host_transfer_bytes)} to host and back: ")
    with pytest.raises(remat.RematError, match=r"peak_flops_per_s=0 must be a positive rate"):
        r.with_rates(peak_flops_per_s=0)


def test_inspect_and_sweep_show_it(capsys):
    flags = ["--model", "tiny", "--batch", "2", "--seq", "32", "--host-bandwidth", "1e9"]
    assert cli.main(["inspect", *flags, "--policy", "qkv_proj_offloaded"]) == 0
    out = capsys.readouterr().out
    assert "host transfer per step" in out and "at 1 GB/s vs compute" in out
    assert cli.main(["sweep", *flags, "--policies", "full,qkv_proj_offloaded"]) == 0
    out = capsys.readouterr().out
    assert "transfer/compute" in out and "at 1 GB/s and 989 TFLOP/s" in out


@pytest.mark.parametrize("policy, groups", [("minimal_offloaded", (2, 2)),
                                            ("2x minimal_offloaded; 2x qkv_proj_offloaded", None)])
def test_host_bytes_in_groups_and_segments(policy, groups, offloaded):
    setup = remat.train_step_setup("tiny", batch=2, seq=32, groups=groups)
    r = remat.inspect_policy(setup, policy)
    ungrouped = offloaded
    assert r.host_transfer_bytes > 0 and r.transfer_seconds > 0
    if groups:  # the same values cross, transients of each group recomputed in the backward pass
        assert r.host_residual_bytes == 0 and r.host_transfer_bytes == ungrouped.host_transfer_bytes
    else:
        assert r.host_transfer_bytes == 2 * r.host_residual_bytes < ungrouped.host_transfer_bytes
    assert all(row.memory_kind == "host" for row in r.residuals if row.name == "decoder_layer_input")


def test_the_gpu_check_measures_with_the_device_statistics():
    """The GPU script's measurement path, on CPU with a faked
    ``memory_stats`` (XLA:CPU gives none): prediction, steps, MFU/HFU."""
    path = pathlib.Path(__file__).parent / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)

    class FakeGpu:
        def memory_stats(self):
            return {"peak_bytes_in_use": 123_456}

    job = {"model": "tiny", "dtype": "f32", "batch": 2, "seq": 32, "steps": 10, "peak_flops": 1e12,
           "model_flops": 1e9, "policy": "minimal_offloaded"}
    out = gpu_check.run_one(job, FakeGpu())
    assert "error" not in out and out["peak_bytes_in_use"] == 123_456
    assert out["predicted_peak_bytes"] > 0 and out["host_transfer_bytes"] > 0 and out["median_s"] > 0
    assert out["hfu"] == pytest.approx(out["flops"] / out["median_s"] / 1e12)
    assert out["mfu"] == pytest.approx(1e9 / out["median_s"] / 1e12)
    assert gpu_check.model_flops_per_step(10, 2, 4, 3, 5) == (6 * 10 + 12 * 2 * 4 * 3) * 5
    # the deviceless prediction compiles for the attached GPU's kind
    assert [gpu_check.target_of(k) for k in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "cpu", "TPU v5")] == [
        "h100", "h200", None, None]
