"""Hardware targets (remat._targets): the table, names and errors, devices and
meshes, and deviceless compilation for NVIDIA GPUs on this (CPU-only) machine.

The GPU tests need JAX's CUDA plugin (``pip install 'remat[gpu]'``) and are
skipped without it; ``tests/conftest.py`` sets ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK``
before JAX starts.
"""

from __future__ import annotations

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

from remat import RematError
from remat import _targets as targets
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


def test_names_and_table():
    assert target_names() == ["cpu", "h100", "h100-pcie", "h200", "a100-80gb", "a100-40gb", "b200"]
    for name, t in TARGETS.items():
        assert t.name == name and t.platform in ("cpu", "gpu") and t.peak_flops_per_s > 0
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


def test_unknown_name():
    with pytest.raises(RematError) as e:
        get_target("h10")
    assert str(e.value) == ("unknown target 'h10'; did you mean 'h100'? valid: cpu, h100, h100-pcie, h200, "
                            "a100-80gb, a100-40gb, b200")
    with pytest.raises(RematError) as e:
        target_devices("tpu-v5", 1)
    assert str(e.value) == ("unknown target 'tpu-v5'; valid: cpu, h100, h100-pcie, h200, a100-80gb, "
                            "a100-40gb, b200")


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
    monkeypatch.setattr(targets, "NVIDIA_DRIVER", "/")  # a machine with a driver: cpu keeps the check
    prepare_environment("cpu")
    assert "JAX_SKIP_CUDA_CONSTRAINTS_CHECK" not in os.environ
    monkeypatch.setattr(targets, "NVIDIA_DRIVER", "/no/such/driver")  # none: the check can only fail
    prepare_environment("cpu")
    assert os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] == "1"
    monkeypatch.delenv("JAX_SKIP_CUDA_CONSTRAINTS_CHECK")
    prepare_environment("h100")
    assert os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] == "1"
    assert "JAX_PLATFORMS" not in os.environ
    monkeypatch.setenv("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "yes")
    prepare_environment("h200")
    assert os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] == "yes"


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
    monkeypatch.setattr(targets, "_plugin_missing", lambda: False)
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
from remat import RematError
from remat._targets import target_devices
{before}
try:
    print(target_devices("h100", 1)[0].device_kind)
except RematError as e:
    print("RematError:", e)
"""


@needs_plugin
@pytest.mark.parametrize(("before", "expect"), [
    ("", "NVIDIA H100 80GB HBM3"),  # JAX imported, no backend yet: target_devices sets the variable in time
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
    assert s.config.attention == "cudnn"  # the kernel follows the target, not this host
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
    from remat._sweep import default_attention
    from remat.models import get_config

    bf16 = get_config("tiny", dtype="bf16")
    assert default_attention(bf16, TARGETS["h100"]) == "cudnn"
    assert default_attention(bf16, TARGETS["cpu"]) == bf16.attention == "xla"
    assert default_attention(get_config("tiny"), TARGETS["h100"]) == "xla"  # f32: cuDNN takes bf16/f16
    assert remat.train_step_setup(bf16, seq=32, attention="xla").config.attention == "xla"


@needs_plugin
def test_offload_on_a_deviceless_gpu_is_an_error_not_a_silent_drop():
    import remat

    s = remat.train_step_setup("tiny", batch=2, seq=32, target="h100")
    assert not s.can_offload()
    with pytest.raises(remat.OffloadUnsupportedError, match=(
            r"offloads to 'pinned_host', but backend 'gpu' \(NVIDIA H100 80GB HBM3\) has memories \[\]")):
        remat.inspect_policy(s, "qkv_proj_offloaded")


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
    assert cli.main(["inspect", "--model", "tiny", "--policy", "full", "--target", "h100", "--devices",
                     "4"]) == 2
    assert "--devices 4 on target h100: give the mesh too, e.g. --mesh fsdp=4" in capsys.readouterr().err


def test_a_maxtext_batch_default_counts_the_targets_devices():
    """per_device_batch_size x the target's devices, not JAX's (this host's CPU) count."""
    import argparse

    from remat import cli

    count = lambda **kw: cli._device_count(argparse.Namespace(**{"devices": None, "mesh": None, **kw}))
    assert count(target="h100", devices=8, mesh="fsdp=8") == 8
    assert count(target="h100", mesh="data=2,fsdp=4") == 8
    assert count(target="h100") == 1
    assert count(target="cpu") == jax.device_count()
