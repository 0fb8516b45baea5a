"""Per-device memory on a device mesh (8 simulated CPU devices).

The figures are computed once, in a subprocess of their own, so the device
count never leaks into the other tests (JAX fixes it when its backend starts).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from remat import RematError, cli
from remat._mesh import LOGICAL_RULES, make_mesh, parse_mesh

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from remat._mesh import set_cpu_devices
    set_cpu_devices(8)
    import remat
    from remat._sweep import default_policies
    from remat.policies import vocab

    from remat._flops import count_flops
    from remat._residuals import residual_rows
    out = {"figures": {}, "names": {}, "errors": {}}
    meshes = {"one": None, "fsdp": {"fsdp": 8}, "data": {"data": 8}, "data_fsdp": {"data": 2, "fsdp": 4}}
    setups = {k: remat.train_step_setup("tiny", batch=1 if m is None else 8, seq=64, mesh=m)
              for k, m in meshes.items()}
    for key, s in setups.items():
        for policy in ("none", "minimal", "full"):
            r = remat.inspect_policy(s, policy)
            out["figures"][f"{key}/{policy}"] = {k: getattr(r, k) for k in (
                "temp_bytes", "residual_bytes", "parameter_bytes", "optimizer_bytes", "batch_bytes",
                "devices", "flops", "flops_per_device")} | {"mesh": dict(r.mesh), "rules": len(r.rules)}

    offloaded = remat.inspect_policy(setups["fsdp"], "minimal_offloaded")  # the offload probe, under a mesh
    out["offload_fsdp"] = [offloaded.host_transfer_bytes, offloaded.host_residual_bytes]
    one8 = remat.train_step_setup("tiny", batch=8, seq=64)
    out["flops_one_device_batch_8"] = count_flops(one8.trace("full", "full").traced.jaxpr)[0]

    def kept(s, policy):
        rows = residual_rows(s.trace(policy, policy).traced.jaxpr)
        return sorted(f"{r.name}@{r.memory_kind}" for r in rows if r.source == "checkpoint_name")

    for policy in default_policies(vocab.ALL_NAMES):
        out["names"][policy] = [kept(setups["one"], policy), kept(setups["fsdp"], policy)]
    import jax.numpy as jnp
    from jax.ad_checkpoint import checkpoint_name
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = remat._mesh.make_mesh({"data": 8})
    along = lambda spec: NamedSharding(mesh, spec)

    def gathers(x, w):  # one value saved replicated (after an all-gather), one saved sharded
        x = jax.lax.with_sharding_constraint(x, along(P("data")))
        h = checkpoint_name(jax.lax.with_sharding_constraint(jnp.cos(x), along(P())), "gathered")
        k = checkpoint_name(jax.lax.with_sharding_constraint(jnp.cos(x), along(P("data"))), "sharded")
        return (jnp.sin(h) + jnp.sin(k)).sum()

    r = remat.analyze(jax.grad(remat.checkpoint(gathers, "save:gathered,sharded")),
                      jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=along(P("data"))),
                      jax.ShapeDtypeStruct((32, 32), jnp.float32, sharding=along(P())))
    out["gathered"] = {row.name: [row.device_bytes, row.gathered] for row in r.residuals}
    out["gathered_notes"] = list(r.notes)
    for name, call in {
        "indivisible": lambda: remat.train_step_setup("tiny", batch=4, seq=64, mesh={"fsdp": 8}),
        "mismatch": lambda: remat.train_step_setup("tiny", batch=8, seq=64, mesh={"fsdp": 4}),
        "devices_late": lambda: set_cpu_devices(4),
    }.items():
        try:
            call()
        except remat.RematError as e:
            out["errors"][name] = str(e)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def measured():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_fsdp_shards_parameters_and_optimizer_state(measured):
    one, fsdp = measured["figures"]["one/full"], measured["figures"]["fsdp/full"]
    for key in ("parameter_bytes", "optimizer_bytes"):
        assert fsdp[key] <= one[key] / 8 * 1.05, key
    assert fsdp["devices"] == 8 and fsdp["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert fsdp["rules"] == len(LOGICAL_RULES) and one["rules"] == 0  # recorded under a mesh only
    assert fsdp["batch_bytes"] == one["batch_bytes"]  # 8 sequences over 8 devices: one each
    assert fsdp["flops"] == measured["flops_one_device_batch_8"]  # the global count
    assert fsdp["flops_per_device"] == fsdp["flops"] / 8


def test_offloading_works_under_a_mesh_and_counts_per_device(measured):
    """The offload probe runs on one device whatever mesh the step is traced
    under; the host traffic is per device, twice the host residuals."""
    transfer, host = measured["offload_fsdp"]
    assert transfer == 2 * host > 0


@pytest.mark.parametrize("policy", ["none", "minimal", "full"])
@pytest.mark.parametrize("mesh", ["fsdp", "data", "data_fsdp"])
def test_per_device_activations_match_one_device_at_the_per_device_batch(measured, mesh, policy):
    one, got = measured["figures"][f"one/{policy}"], measured["figures"][f"{mesh}/{policy}"]
    assert got["residual_bytes"] == pytest.approx(one["residual_bytes"], rel=0.15)
    if mesh == "data":
        assert got["temp_bytes"] == pytest.approx(one["temp_bytes"], rel=0.15)
    else:  # FSDP also shards the gradients
        assert got["temp_bytes"] <= one["temp_bytes"] * 1.15


def test_every_preset_keeps_the_same_names_under_a_mesh(measured):
    differ = {p: names for p, names in measured["names"].items() if names[0] != names[1]}
    assert len(measured["names"]) >= 15 and differ == {}


def test_a_residual_saved_after_an_all_gather_is_flagged(measured):
    assert measured["gathered"]["gathered"] == [64 * 32 * 4, True]
    assert measured["gathered"]["sharded"] == [64 * 32 * 4 // 8, False]
    assert any(n.startswith("saved after an all-gather (replicated on a mesh axis their inputs were sharded "
                            "on): gathered; tag and save the value before the gather") for n in
               measured["gathered_notes"])


def test_mesh_errors_name_the_numbers(measured):
    assert measured["errors"] == {
        "indivisible": "global batch 4 does not split over the 8 devices the batch is sharded on "
                       "(mesh {'data': 1, 'fsdp': 8, 'tensor': 1}): use a multiple of 8",
        "mismatch": "mesh fsdp=4 has 4 devices, but JAX has 8; make the sizes multiply to 8, or simulate 4 "
                    "CPU devices with --devices 4",
        "devices_late": "--devices 4: JAX already runs with 8 device(s); set the device count before any JAX "
                        "computation (first thing in the process)",
    }


def test_parse_mesh():
    assert parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    for bad in ("model=2", "data=0", "data=2,data=2", "fsdp"):
        with pytest.raises(RematError, match=f"--mesh '{bad}': bad term .* axes data, fsdp, tensor"):
            parse_mesh(bad)
    with pytest.raises(RematError, match="mesh fsdp=8 has 8 devices, but JAX has 1"):
        make_mesh({"fsdp": 8})


def test_cli_mesh_without_devices_is_a_clear_error(capsys):
    assert cli.main(["inspect", "--model", "tiny", "--policy", "full", "--mesh", "fsdp=8"]) == 2
    assert "mesh fsdp=8 has 8 devices, but JAX has 1" in capsys.readouterr().err


TRAIN = textwrap.dedent("""
    import json, shutil, sys
    from dataclasses import replace
    from pathlib import Path
    from remat._mesh import set_cpu_devices
    set_cpu_devices(8)
    from rich.console import Console
    from remat._memory import FAST_CPU_COMPILE
    from remat.train import TrainConfig, train

    out = Path(sys.argv[1])
    cfg = TrainConfig(model="tiny", policy="minimal", steps=6, batch=8, seq=32, warmup=2, eval_every=100,
                      eval_windows=8, ckpt_every=2, data=(str(Path(json.__file__).parent),), val_fraction=0.3)
    run = lambda c, d, **kw: train(c, out / d, console=Console(quiet=True), progress=False,
                                   compiler_options=FAST_CPU_COMPILE, **kw)
    rows = lambda d: map(json.loads, (out / d / "metrics.jsonl").read_text().splitlines())
    losses = lambda d: [r["train_loss"] for r in rows(d) if r["train_loss"] is not None]
    run(cfg, "one")
    run(replace(cfg, mesh="data=2,fsdp=4"), "mesh")
    shutil.copytree(out / "mesh", out / "moved")
    shutil.rmtree(out / "moved" / "checkpoints" / "6")  # resume from step 4, on another mesh
    run(replace(cfg, mesh="fsdp=8"), "moved", resume=True)
    print(json.dumps({d: losses(d) for d in ("one", "mesh", "moved")}))
""")


def test_training_on_a_mesh_matches_one_device_and_resumes_on_another_mesh(tmp_path):
    run = subprocess.run([sys.executable, "-c", TRAIN, str(tmp_path)], capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(losses["one"]) == 6
    assert losses["mesh"][:5] == pytest.approx(losses["one"][:5], rel=1e-4)
    assert losses["moved"][4:] == pytest.approx(losses["mesh"][4:], rel=1e-5)


def test_two_processes_on_loopback_measure_one_mesh():
    """Multi-host through jax.distributed: two local CPU processes (gloo), one
    device each, form a data=2 mesh; each measures the same per-device step."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "remat.cli", "inspect", "--model", "tiny", "--policy", "minimal",
           "--batch", "2", "--seq", "32", "--mesh", "data=2", "--coordinator", f"127.0.0.1:{port}",
           "--num-processes", "2", "--json", "-", "--process-id"]
    procs = [subprocess.Popen([*cmd, str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    reports = [json.loads(o) for o, _ in outs]
    assert [r["devices"] for r in reports] == [2, 2] and reports[0]["mesh"]["data"] == 2
    assert reports[0]["peak_bytes"] == reports[1]["peak_bytes"]
