"""Hardware targets (remat._targets): the table, names and errors, devices and
meshes, and deviceless compilation for NVIDIA GPUs on this (CPU-only) machine.

The GPU tests need JAX's CUDA plugin (``pip install 'remat[gpu]'``) and are
skipped without it; ``tests/conftest.py`` sets ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK``
before JAX starts.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from remat import RematError, _environment, _targets as targets
from remat._flops import count_flops
from remat._memory import default_compiler_options
from remat._targets import (
    TARGETS,
    get_target,
    prepare_environment,
    target_devices,
    target_mesh,
    target_names,
)

HAS_PLUGIN = importlib.util.find_spec("jax_plugins") is not None and \
    importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
# CI installs remat[gpu]: there a missing plugin fails these tests instead of skipping them.
needs_plugin = pytest.mark.skipif(not HAS_PLUGIN and not os.environ.get("CI"),
                                  reason="JAX's CUDA plugin is not installed (remat[gpu])")
GPU_TARGETS = [n for n, t in TARGETS.items() if t.platform == "gpu"]
TPU_TARGETS = [n for n, t in TARGETS.items() if t.platform == "tpu"]
# CI installs remat[tpu] too: there a missing libtpu fails the TPU tests instead of skipping them.
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None and not os.environ.get("CI"),
                                  reason="libtpu is not installed (remat[tpu])")


def test_names_and_table():
    assert target_names() == ["cpu", "h100", "h100-pcie", "h200", "a100-80gb", "a100-40gb", "b200", "tpu-v4",
                              "tpu-v5e", "tpu-v5p", "tpu-v6e"]
    for name, t in TARGETS.items():
        assert t.name == name and t.platform in ("cpu", "gpu", "tpu") and t.peak_flops_per_s > 0
        assert get_target(name) is t and get_target(t) is t
    cpu = TARGETS["cpu"]
    assert (cpu.spec_file, cpu.memory_bytes, cpu.usable_bytes()) == (None, None, None)
    assert "assumed" in cpu.source


@pytest.mark.parametrize("name", GPU_TARGETS)
def test_spec_file_matches_table(name):
    t = TARGETS[name]
    text = t.spec_text()
    first = text.splitlines()[0]
    assert first.startswith("# Source: openxla/xla xla/backends/gpu/target_config/specs/" + t.spec_file)
    assert re.search(r"@ [0-9a-f]{40} \(Apache-2.0", first) and first.split("@ ")[1][:40] in t.source
    assert "collective_memory_granularity:" not in text  # unknown to jax 0.10.2's proto
    assert int(re.search(r"device_memory_size: (\d+)", text).group(1)) == t.memory_bytes
    assert f'device_description_str: "{t.device_kind}"' in text


def test_usable_bytes():
    h100 = get_target("h100")
    assert h100.usable_bytes() == int(84942979072 * 0.75) - (1 << 30) == 62633492480
    assert h100.usable_bytes(1.0) == 84942979072 - (1 << 30)
    for bad in (0, 1.5, -0.1):
        with pytest.raises(RematError, match=rf"mem_fraction {bad}: must be in \(0, 1\]"):
            h100.usable_bytes(bad)
    v5p = get_target("tpu-v5p")
    assert v5p.usable_bytes() == round(95.74 * (1 << 30)) and v5p.memory_bytes == 96 << 30
    with pytest.raises(RematError) as e:
        v5p.usable_bytes(0.9)
    assert str(e.value) == ("mem_fraction 0.9: target 'tpu-v5p' is a TPU, whose runtime takes no memory "
                            "fraction (its usable memory is what libtpu states)")


def test_unknown_name():
    with pytest.raises(RematError) as e:
        get_target("h10")
    valid = "cpu, h100, h100-pcie, h200, a100-80gb, a100-40gb, b200, tpu-v4, tpu-v5e, tpu-v5p, tpu-v6e"
    assert str(e.value) == f"unknown target 'h10'; did you mean 'h100'? valid: {valid}"
    with pytest.raises(RematError) as e:
        target_devices("v5p", 1)
    assert str(e.value) == f"unknown target 'v5p'; did you mean 'tpu-v5p'? valid: {valid}"


def test_cpu_devices_and_mesh():
    have = jax.devices("cpu")
    assert target_devices("cpu", 1) == have[:1]
    mesh = target_mesh("cpu", {"data": 1})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    n = len(have) + 1
    with pytest.raises(RematError) as e:
        target_devices("cpu", n)
    assert str(e.value) == (f"target cpu: {n} devices asked, but JAX has {len(have)} CPU device(s); "
                            f"simulate {n} CPU devices with --devices {n} (remat._mesh.set_cpu_devices({n}) "
                            "before any JAX computation)")
    with pytest.raises(RematError, match="device count 0 must be an integer >= 1"):
        target_devices("cpu", 0)
    with pytest.raises(RematError, match=r"mesh axes \['pipe'\] unknown; valid: data, fsdp, tensor"):
        target_mesh("h100", {"pipe": 2})
    with pytest.raises(RematError, match=r"sizes \{'fsdp': 0\} must be integers >= 1"):
        target_mesh("cpu", {"fsdp": 0})


def test_prepare_environment(monkeypatch):
    monkeypatch.delenv("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", raising=False)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(_environment, "NVIDIA_DRIVER", "/")  # a machine with a driver: cpu keeps the check
    prepare_environment("cpu")
    assert "JAX_SKIP_CUDA_CONSTRAINTS_CHECK" not in os.environ
    monkeypatch.setattr(_environment, "NVIDIA_DRIVER", "/no/such/driver")  # none: the check can only fail
    prepare_environment("cpu")
    assert os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] == "1"
    monkeypatch.delenv("JAX_SKIP_CUDA_CONSTRAINTS_CHECK")
    monkeypatch.setattr(_environment, "NVIDIA_DRIVER", "/")
    prepare_environment("h100")  # a GPU target: with a driver too
    assert os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] == "1"
    assert "JAX_PLATFORMS" not in os.environ
    monkeypatch.setenv("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "yes")
    prepare_environment("h200")
    assert os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] == "yes"


def test_prepare_environment_for_tpu(monkeypatch):
    """No TPU attached: libtpu needs no metadata server, logs no hostname
    errors and takes no exclusive lock, for every target where libtpu is
    installed (JAX starts it with its backends) and for a TPU target; a TPU
    VM is left as it is."""
    tpu = _environment.TPU_ENVIRONMENT
    for k in tpu:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(_environment, "tpu_attached", lambda: True)
    prepare_environment("tpu-v5p")
    assert not set(tpu) & set(os.environ)
    monkeypatch.setattr(_environment, "tpu_attached", lambda: False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    prepare_environment("cpu")  # no libtpu: nothing to quiet
    assert not set(tpu) & set(os.environ)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2")
    prepare_environment("tpu-v5p")
    assert {k: os.environ[k] for k in tpu} == {
        "TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "10.0.0.2", "TPU_HOST_BOUNDS": "1,1,1",
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    for k in tpu:
        monkeypatch.delenv(k)
    monkeypatch.setattr(importlib.util, "find_spec", real)
    if real("libtpu") is not None:
        prepare_environment("cpu")  # libtpu installed: quiet for every target
        assert set(tpu) <= set(os.environ)


def test_import_quiets_libtpu_and_the_cuda_check():
    """A fresh ``import remat`` then ``jax.devices()`` on this machine prints
    neither libtpu's start-up errors nor the CUDA plugin's traceback."""
    env = {k: v for k, v in os.environ.items()
           if k not in (*_environment.TPU_ENVIRONMENT, "JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "JAX_PLATFORMS")}
    done = subprocess.run([sys.executable, "-c", "import remat, jax; print(jax.devices()[0].platform)"],
                          env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "cpu"
    for noise in ("unexpected worker hostname", "Failed to find host bounds", "Traceback"):
        assert noise not in done.stderr


@pytest.mark.parametrize(("name", "n", "topology", "kwargs"), [
    ("tpu-v5p", 1, "v5p:1x1x1", {"chip_config_name": "default", "chips_per_host_bounds": (1, 1, 1)}),
    ("tpu-v5p", 2, "v5p:2x1x1", {"chip_config_name": "default", "chips_per_host_bounds": (2, 1, 1)}),
    ("tpu-v5p", 4, "v5p:2x2x1", {"chip_config_name": "default"}),
    ("tpu-v5p", 8, "v5p:2x2x2", {"chip_config_name": "default"}),
    ("tpu-v5p", 16, "v5p:2x2x4", {"chip_config_name": "default"}),
    ("tpu-v5p", 64, "v5p:4x4x4", {"chip_config_name": "default"}),
    ("tpu-v4", 8, "v4:2x2x2", {"chip_config_name": "megacore"}),
    ("tpu-v5e", 1, "v5e:1x1", {"chip_config_name": "default", "chips_per_host_bounds": (1, 1, 1)}),
    ("tpu-v5e", 8, "v5e:2x4", {"chip_config_name": "default"}),
    ("tpu-v6e", 256, "v6e:16x16", {"chip_config_name": "default"}),
])
def test_tpu_topology(name, n, topology, kwargs):
    assert targets.tpu_topology(name, n) == (topology, kwargs)


def test_tpu_topology_errors():
    with pytest.raises(RematError) as e:
        targets.tpu_topology("tpu-v5p", 6)
    assert str(e.value) == "target 'tpu-v5p': 6 chips; a TPU slice has a power of two (1, 2, 4, 8, ...)"
    with pytest.raises(RematError) as e:
        targets.tpu_topology("h100", 4)
    assert str(e.value) == "target 'h100' is not a TPU; TPU targets: tpu-v4, tpu-v5e, tpu-v5p, tpu-v6e"


def test_no_libtpu_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(RematError) as e:
        target_devices("tpu-v6e", 4)
    assert str(e.value) == ("target 'tpu-v6e' needs libtpu to compile for a TPU without one: "
                            "pip install 'remat[tpu]'")


def test_compiler_options_on_gpu():
    assert default_compiler_options("gpu") == {"xla_disable_hlo_passes": "rematerialization"}


def test_no_plugin_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("jax_plugins") else real(name, *a))
    with pytest.raises(RematError) as e:
        target_devices("h100", 1)
    assert str(e.value) == ("target 'h100' needs JAX's CUDA plugin to compile for a GPU without one: "
                            "pip install 'remat[gpu]'")


@needs_plugin
def test_plugin_not_registered_error(monkeypatch):
    """JAX started before JAX_SKIP_CUDA_CONSTRAINTS_CHECK was set: the plugin is
    installed but not registered, and JAX says so with NotImplementedError."""
    from jax.experimental import topologies

    def not_registered(*args, **kwargs):
        raise NotImplementedError("topology not implemented for cuda")

    monkeypatch.setattr(topologies, "get_topology_desc", not_registered)
    with pytest.raises(RematError, match=r"Set JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 in the environment "
                                         r"before JAX starts .*pip install 'remat\[gpu\]'"):
        target_devices("a100-40gb", 3)  # a count no other test caches


def test_attached_gpus_preferred(monkeypatch):
    """Real GPUs of the target's kind are used as they are; other kinds are not."""
    monkeypatch.setattr(targets, "_missing", lambda platform: False)
    fake = [types.SimpleNamespace(platform="gpu", device_kind=k, id=i)
            for i, k in enumerate(["NVIDIA H200", "NVIDIA H200", "NVIDIA A100-SXM4-80GB"])]
    monkeypatch.setattr(jax, "devices", lambda *a: fake)
    assert target_devices("h200", 2) == fake[:2]
    assert target_devices("a100-80gb", 1) == fake[2:]


@needs_plugin
@pytest.mark.parametrize("name", GPU_TARGETS)
def test_compile_only_device_kind(name):
    (dev,) = target_devices(name, 1)
    assert (dev.platform, dev.device_kind) == ("gpu", TARGETS[name].device_kind)
    assert target_devices(name, 1) == [dev]  # cached


def _train_step(x, w_qkv, w_o):
    """A bf16 matmul + cuDNN attention loss, and its gradient."""
    def loss(w_qkv, w_o):
        b, s, _ = x.shape
        q, k, v = jnp.split((x @ w_qkv).reshape(b, s, 3 * 4, 32), 3, axis=2)
        a = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        return jnp.mean((a.reshape(b, s, 128) @ w_o).astype(jnp.float32) ** 2)

    return jax.value_and_grad(loss, argnums=(0, 1))(w_qkv, w_o)


@needs_plugin
@pytest.mark.parametrize("n", [1, 2])
def test_compile_h100_deviceless(n):
    mesh = target_mesh("h100", {"fsdp": n})
    assert mesh.devices.size == n and mesh.devices.flat[0].device_kind == "NVIDIA H100 80GB HBM3"

    def sds(shape, *spec):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec(*spec)))

    args = (sds((2 * n, 256, 128), "fsdp"), sds((128, 384), "fsdp"), sds((128, 128), "fsdp"))
    compiled = jax.jit(_train_step).lower(*args).compile(default_compiler_options("gpu"))
    memory = compiled.memory_analysis()
    assert memory.temp_size_in_bytes > 0
    assert memory.argument_size_in_bytes == (2 * 256 * 128 + (128 * 384 + 128 * 128) // n) * 2
    hlo = compiled.as_text()
    assert "__cudnn$fmha" in hlo
    assert ("all-gather" in hlo) == (n > 1)


@needs_plugin
def test_compile_b200_matmul():
    (dev,) = target_devices("b200", 1)
    x = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16, sharding=jax.sharding.SingleDeviceSharding(dev))
    compiled = jax.jit(jax.grad(lambda a, b: jnp.sum((a @ b).astype(jnp.float32)))).lower(x, x).compile()
    assert compiled.memory_analysis().output_size_in_bytes == 256 * 256 * 2


LATE = """
import jax
{before}
from remat import RematError
from remat._targets import target_devices
try:
    print(target_devices("h100", 1)[0].device_kind)
except RematError as e:
    print("RematError:", e)
"""


@needs_plugin
@pytest.mark.parametrize(("before", "expect"), [
    ("", "NVIDIA H100 80GB HBM3"),  # JAX imported, no backend yet: importing remat sets the variable in time
    ("jax.devices()", "RematError: target 'h100': JAX did not register its CUDA plugin (topology not "
                      "implemented for cuda). Set JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1"),
])
def test_environment_in_a_fresh_process(before, expect):
    """Without the variable in the environment, as a user's script starts."""
    unset = ("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "JAX_PLATFORMS")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    out = subprocess.run([sys.executable, "-c", LATE.format(before=before)], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith(expect), out


# -- the tools on a GPU target: tiny models, compiled deviceless --------------------------------------


@needs_plugin
def test_inspect_on_h100_reports_the_target_and_its_limit():
    import remat
    from remat._memory import NO_XLA_REMAT
    from remat.models import get_config

    s = remat.train_step_setup(get_config("tiny", dtype="bf16"), batch=2, seq=32, target="h100",
                               mesh={"fsdp": 2})
    assert s.configuration.attention == "cudnn"  # the kernel follows the target, not this host
    r = remat.inspect_policy(s, "minimal")
    h100 = TARGETS["h100"]
    assert (r.target, r.backend, r.device_kind, r.devices) == ("h100", "gpu", h100.device_kind, 2)
    assert r.limit_bytes == h100.usable_bytes() and r.headroom_bytes == r.limit_bytes - r.peak_bytes
    assert r.fits and (r.peak_flops_per_s, r.host_link_bytes_per_s) == (h100.peak_flops_per_s,
                                                                       h100.host_link_bytes_per_s)
    assert r.peak_bytes == r.argument_bytes + r.output_bytes + r.temp_bytes - r.alias_bytes
    assert 0 < r.recompute_flops and r.peak_terms  # the peak by term reads the GPU dump
    assert abs(sum(dict(r.peak_terms).values()) - r.peak_bytes) <= 0.01 * r.peak_bytes
    assert default_compiler_options("gpu") == NO_XLA_REMAT
    fraction = remat.train_step_setup("tiny", batch=2, seq=32, target="h100", mem_fraction=0.94)
    assert remat.inspect_policy(fraction, "full").limit_bytes == h100.usable_bytes(0.94)


def test_attention_follows_the_target():
    import remat
    from remat.models import get_config
    from remat.step import default_attention

    bf16 = get_config("tiny", dtype="bf16")
    assert default_attention(bf16, "gpu", 128) == "cudnn"
    assert default_attention(bf16, "cpu", 128) == bf16.attention == "xla"
    assert default_attention(get_config("tiny"), "gpu", 128) == "xla"  # f32: cuDNN takes bf16/f16
    assert default_attention(get_config("tiny"), "tpu", 256) == "pallas"
    assert default_attention(get_config("tiny"), "tpu", 100) == "xla"  # not a multiple of 128
    assert remat.train_step_setup(bf16, seq=32, attention="xla").configuration.attention == "xla"


@needs_plugin
def test_offload_on_a_deviceless_gpu_lowers_the_device_peak_by_the_host_bytes():
    """Compile-only GPU devices list no memories, but XLA:GPU compiles the
    offload: the compiled host figure holds the offloaded residuals, and the
    device peak (compiled, not an estimate) falls by about as much against
    the same values kept on device."""
    import remat
    from remat import policies
    from remat._analysis import compile_figures, measure

    cfg = remat.models.get_config("tiny", family="llama", dtype="bf16")
    s = remat.train_step_setup(cfg, batch=8, seq=256, target="h100", mesh={"fsdp": 2}, attention="xla")
    assert s.can_offload()
    offload = policies.get("qkv_proj_offloaded")
    offloaded, on_device = (s.finish(measure(t, *compile_figures(t, None)))
                            for t in (s.trace(p, str(p)) for p in (offload, offload.on_device())))
    assert offloaded.peak_source == "memory_analysis"
    assert offloaded.host_temp_bytes == offloaded.host_residual_bytes > 0
    saved = on_device.peak_bytes - offloaded.peak_bytes
    assert saved == pytest.approx(offloaded.host_residual_bytes, rel=0.05)


def test_tune_needs_a_budget_on_cpu():
    import remat

    with pytest.raises(RematError, match="target 'cpu' states no device memory: give a budget"):
        remat.tune("tiny", batch=2, seq=32)


@needs_plugin
def test_cli_sweep_and_targets_on_h100(capsys, tmp_path):
    from remat import cli

    assert cli.main(["targets"]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H100 80GB HBM3" in out and "b200" in out
    path = tmp_path / "sweep.json"
    assert cli.main(["sweep", "--model", "tiny", "--batch", "2", "--seq", "32", "--dtype", "bf16",
                     "--target", "h100", "--devices", "2", "--mesh", "fsdp=2", "--policies", "none,minimal",
                     "--json", str(path)]) == 0
    import json

    from remat._sweep import default_policies

    result = json.loads(path.read_text())
    assert [r["label"] for r in result["reports"]] == ["none", "minimal"]
    assert {r["target"] for r in result["reports"]} == {"h100"}
    assert all(r["fits"] and r["limit_bytes"] == TARGETS["h100"].usable_bytes() for r in result["reports"])
    assert "target h100 (NVIDIA H100 80GB HBM3)" in capsys.readouterr().out
    names = ["key_proj", "query_proj", "value_proj", "mlpwi_0", "mlpwi_1", "out_proj", "context"]
    assert "qkv_proj_offloaded" in default_policies(names)
    assert not any("offload" in p for p in default_policies(names, offload=False))
    assert cli.main(["inspect", "--model", "tiny", "--policy", "full", "--xla-remat"]) == 2
    assert "--xla-remat is XLA:GPU's rematerialization pass: give a GPU --target" in capsys.readouterr().err
    alone = argparse.Namespace(target="h100", devices=4, mesh=None)
    cli._check_devices(alone)
    assert alone.mesh == "fsdp=4"  # --devices alone: all on FSDP, as MaxText's default


def test_a_maxtext_batch_default_counts_the_targets_devices():
    """per_device_batch_size x the target's devices, not JAX's (this host's CPU) count."""
    import argparse

    from remat import cli

    count = lambda **kw: cli._device_count(argparse.Namespace(**{"devices": None, "mesh": None, **kw}))
    assert count(target="h100", devices=8, mesh="fsdp=8") == 8
    assert count(target="h100", mesh="data=2,fsdp=4") == 8
    assert count(target="h100") == 1
    assert count(target="cpu") == jax.device_count()


# -- TPU targets: compiled deviceless with libtpu --------------------------------------------------------


@needs_libtpu
@pytest.mark.parametrize("name", TPU_TARGETS)
def test_tpu_usable_memory_is_libtpus_own(name):
    """The table's usable bytes are what libtpu itself says is available."""
    from remat._analysis import out_of_memory

    (dev,) = target_devices(name, 1)
    assert (dev.platform, dev.device_kind) == ("tpu", TARGETS[name].device_kind)
    arg = jax.ShapeDtypeStruct((1 << 30, 200), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(dev))
    with pytest.raises(jax.errors.JaxRuntimeError) as e:
        jax.jit(lambda a: jnp.sin(a) * 2 + jnp.cos(a[::-1])).lower(arg).compile()
    oom = out_of_memory(e.value)
    assert oom is not None and oom.temporaries_only
    assert abs(oom.available_bytes - TARGETS[name].usable_bytes()) < 0.006 * (1 << 30)  # "95.74G": 2 decimals


def test_out_of_memory_messages():
    from remat._analysis import OutOfMemory, out_of_memory

    text = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
            "(126.20G) exceeds available HBM (95.74G).")
    assert out_of_memory(jax.errors.JaxRuntimeError(text)) == OutOfMemory(
        round(126.20 * (1 << 30)), round(95.74 * (1 << 30)), True, text)
    maxtext = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
               "Used 33.27G of 30.75G hbm. Exceeded hbm capacity by 2.52G.")
    oom = out_of_memory(jax.errors.JaxRuntimeError(maxtext))
    assert (oom.needed_bytes, oom.available_bytes, oom.temporaries_only) == (
        round(33.27 * (1 << 30)), round(30.75 * (1 << 30)), False)
    assert out_of_memory(jax.errors.JaxRuntimeError("INTERNAL: something else")) is None
    assert out_of_memory(ValueError("RESOURCE_EXHAUSTED: no sizes")) is None


@needs_libtpu
def test_inspect_on_tpu_with_pallas_flash_attention():
    """A tiny bf16 model on 2 TPU v5p chips: Pallas flash attention by
    default (seq a multiple of 128), the kernel's FLOPs counted over its
    grid, the target's usable memory as the limit."""
    import remat

    s = remat.train_step_setup("tiny", batch=4, seq=128, dtype="bf16", target="tpu-v5p", mesh={"fsdp": 2})
    assert s.configuration.attention == "pallas"
    r = remat.inspect_policy(s, "minimal")
    assert (r.backend, r.device_kind, r.target, r.devices) == ("tpu", "TPU v5", "tpu-v5p", 2)
    assert r.limit_bytes == TARGETS["tpu-v5p"].usable_bytes() and r.fits
    assert r.peak_source == "memory_analysis" and r.peak_bytes > r.argument_bytes
    assert "context" in r.checkpoint_names and "attn_scores" not in r.checkpoint_names
    # both backward kernels recompute the scores: more FLOPs than the einsum attention's backward pass
    xla = remat.train_step_setup("tiny", dtype="bf16", batch=4, seq=128, target="tpu-v5p", mesh={"fsdp": 2},
                                 attention="xla")
    assert r.flops > count_flops(xla.trace("minimal", "minimal").traced.jaxpr)[0]


def test_pallas_attention_equals_the_einsum_attention():
    """The control: the Pallas kernel (run by Pallas' TPU interpreter on this
    CPU) gives the einsum attention's outputs and gradients, grouped
    keys/values included (query head k * G + g with kv head k)."""
    import chex
    from jax.experimental.pallas import tpu as pltpu

    from remat.models import get_config
    from remat.models.layers import _einsum_attention, pallas_attention

    cfg = get_config("tiny", family="llama")  # f32, 4 query heads over 2 kv heads
    assert cfg.num_heads == 2 * cfg.num_kv_heads
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (2, 128, cfg.num_heads, cfg.head_dim))
    k, v = (jax.random.normal(key, (2, 128, cfg.num_kv_heads, cfg.head_dim)) for key in ks[1:])
    einsum = lambda q, k, v: _einsum_attention(cfg, q, k, v, lambda p: p)
    loss = lambda f: lambda *a: jnp.sum(f(*a) ** 2)
    with pltpu.force_tpu_interpret_mode():
        out, grads = pallas_attention(q, k, v), jax.grad(loss(pallas_attention), argnums=(0, 1, 2))(q, k, v)
    chex.assert_trees_all_close(out, einsum(q, k, v), atol=1e-5)
    chex.assert_trees_all_close(grads, jax.grad(loss(einsum), argnums=(0, 1, 2))(q, k, v), atol=1e-4)
    with pytest.raises(RematError) as e:
        pallas_attention(q[:, :100], k[:, :100], v[:, :100])
    assert str(e.value) == (
        "attention='pallas': sequence length 100 (keys 100) is not a multiple of 128, the Pallas TPU flash "
        "attention's block; use a multiple of 128 or attention='xla'")


@pytest.mark.parametrize("shards", [1, 2])
def test_pallas_flash_attention_flops(shards):
    """A Pallas kernel counts its body once per grid point, and a
    ``shard_map`` body once per shard, so the count is global: forward 4
    B N T S H (two matmuls) plus the softmax, backward 14 (the dK/dV
    kernel and the dQ kernel each recompute the scores). Traced only."""
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention

    b, n, t, h = 4, 2, 256, 64
    q = jax.ShapeDtypeStruct((b, n, t, h), jnp.bfloat16)
    mesh = jax.sharding.AbstractMesh((shards,), ("x",))
    attn = jax.shard_map(lambda q, k, v: flash_attention(q, k, v, causal=True), mesh=mesh,
                         in_specs=(PartitionSpec("x"),) * 3, out_specs=PartitionSpec("x"), check_vma=False)
    loss = lambda q, k, v: attn(q, k, v).astype(jnp.float32).sum()
    unit = b * n * t * t * h
    forward = count_flops(jax.make_jaxpr(loss)(q, q, q))[0] / unit
    both = count_flops(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, q, q))[0] / unit
    assert 4 < forward < 4.3 and 18 < both < 18.8, (forward, both)


@needs_libtpu
def test_a_step_libtpu_refuses_is_a_result(capsys):
    """On TPU a step that does not fit is a compile error: inspect, sweep
    and the CLI give a report that does not fit, with libtpu's figures."""
    import remat
    from remat import cli

    s = remat.train_step_setup("tiny", batch=2048, seq=512, target="tpu-v5e")  # 4 GiB of f32 logits a layer
    r = remat.inspect_policy(s, "full")
    assert r.peak_source == "out-of-memory error" and r.fits is False
    assert r.limit_bytes == TARGETS["tpu-v5e"].usable_bytes()
    assert r.peak_bytes == r.temp_bytes + r.argument_bytes > r.limit_bytes
    assert r.notes[0].startswith("does not fit: the tpu compiler refused the step, which needs ")
    assert r.recompute_flops > 0  # the baseline's FLOPs come from its jaxpr
    result = remat.sweep(s, policies=["full"])
    assert [x.fits for x in result.reports] == [False]
    with pytest.raises(RematError, match="the compile cap was reached before anything fit the budget of "
                                         "15.75 GiB: raise max_compiles"):  # refused compiles do not fit
        remat.tune("tiny", batch=2048, seq=512, target="tpu-v5e", max_compiles=2)
    assert cli.main(["inspect", "--model", "tiny", "--batch", "2048", "--seq", "512", "--target", "tpu-v5e",
                     "--policy", "full"]) == 0
    assert "does not fit" in capsys.readouterr().out


def test_compiles_are_cached_across_runs(monkeypatch, tmp_path):
    """A second compile of the same program comes from the cache folder:
    the same figures and peak buffers, no compile."""
    import remat
    from remat import _analysis

    monkeypatch.setenv("REMAT_CACHE_DIR", str(tmp_path))
    s = remat.train_step_setup("tiny", batch=2, seq=32)
    t, t2 = (s.trace("minimal", "minimal") for _ in range(2))  # one call site: one key
    first = _analysis.compile_figures(t, None)
    assert len(list(tmp_path.glob("*.json"))) == 1

    def no_compile(*a, **k):
        raise AssertionError("compiled again")

    monkeypatch.setattr(_analysis, "compile_traced", no_compile)
    again = _analysis.compile_figures(t2, None)
    assert again == first
    assert _analysis.measure(t, *again) == _analysis.measure(t, *first)
    (tmp_path / next(tmp_path.glob("*.json")).name).write_text("{truncated")  # a damaged entry is a miss
    with pytest.raises(AssertionError, match="compiled again"):
        _analysis.compile_figures(t, None)
    monkeypatch.setenv("REMAT_CACHE_DIR", "")  # off
    with pytest.raises(AssertionError, match="compiled again"):
        _analysis.compile_figures(t, None)


@needs_plugin
def test_tune_may_offload_on_a_gpu_target():
    """--allow-offload is accepted on a deviceless GPU (its offloads compile);
    with the target's usable memory as the budget, no remat fits at once."""
    import remat

    result = remat.tune("tiny", batch=2, seq=32, target="h100", allow_offload=True)
    assert result.budget_bytes == TARGETS["h100"].usable_bytes()
    assert result.pick.policy == "none" and result.compiles == 1
    assert not any(c.estimate for c in result.candidates)
