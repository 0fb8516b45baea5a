"""GPU truth check (a benchmark for when a GPU is at hand; never needed by the
tests or CI): what the compile-only predictions say against what a real
accelerator does, for ``llama3.2-1b`` in bf16, batch 8 x 2048.

For each policy (``none`` if it fits, ``full``, ``minimal``, ``selective``,
``minimal_offloaded``, ``qkv_proj_offloaded`` and the ``remat tune`` pick at
``--budget``), each in a fresh process:

- the peak predicted by the CPU compile (``remat inspect`` with
  ``JAX_PLATFORMS=cpu``, run beside the GPU work), by the deviceless compile
  for the attached GPU's kind that users without that GPU get (``remat
  inspect --target h100`` with the GPU hidden: ``CUDA_VISIBLE_DEVICES=""``)
  and by a compile on the GPU itself;
- the measured ``device.memory_stats()["peak_bytes_in_use"]`` after training
  steps on random tokens;
- the median step time over ``--steps`` (>= 10) steps after 2 warm-up steps;
- model FLOPs utilisation, MFU: ``(6 N + 12 L T D) x tokens`` per step (PaLM,
  Chowdhery et al. 2022, appendix B: parameters plus attention, no
  recompute) over the step time and ``--peak-flops`` (989e12, H200 dense
  bf16); hardware FLOPs utilisation, HFU: the FLOPs the step executes
  (recompute included, from the jaxpr) likewise;
- the bytes that cross the host link, and the transfer/compute figures;
- the ratio of the measured peak to each prediction.

The measured steps run with XLA:GPU's own rematerialization pass off
(``XLA_FLAGS=--xla_disable_hlo_passes=rematerialization``), as every
prediction compiles them, and with the preset's attention in all four.

The JSON (``--out``) is rewritten after each policy, so a run cut short keeps
what it measured; one table is printed at the end. The GPU machine may run
another JAX and Python: the versions are recorded, the project is installed
there without network when it is not importable (``pip install --no-deps
--no-build-isolation -e .``), and the run starts with an import smoke test::

    python tests/benchmarks/gpu_check.py [--seq 2048] [--batch 8] [--budget 40GiB] [--out gpu_check.json]

(``--model tiny --dtype f32 --batch 2 --seq 32 --budget 30MiB`` runs the
whole script on a CPU in a minute, without measured peaks.)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = "llama3.2-1b"
POLICIES = ("none", "full", "minimal", "selective", "minimal_offloaded", "qkv_proj_offloaded")


def smoke() -> dict[str, str]:
    """Import the project (installing it without network if needed) and
    return the versions of what runs."""
    try:
        importlib.import_module("remat")
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e",
                        str(ROOT)], check=True)
    import flax
    import jax
    import jaxlib

    import remat

    return {"python": sys.version.split()[0], "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "remat": remat.__version__, "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind}


def model_flops_per_step(n_params: int, layers: int, seq: int, d_model: int, tokens: int) -> float:
    """``(6 N + 12 L T D) x tokens``: the FLOPs of a train step without
    recompute (PaLM, Chowdhery et al. 2022, appendix B)."""
    return (6 * n_params + 12 * layers * seq * d_model) * tokens


def measure_steps(step: Any, args: tuple, device: Any, *, steps: int, warmup: int = 2) -> dict[str, Any]:
    """Run ``step(state, *rest) -> (state, metrics)`` ``warmup`` times, then
    ``steps`` timed times (each until its results are ready), the state fed back.

    Returns:
      ``median_s`` (seconds per step), ``loss`` (the last), and
      ``peak_bytes_in_use`` from ``device.memory_stats()`` (None where the
      device gives no statistics, e.g. XLA:CPU).
    """
    import jax

    times = []
    state, *rest = args
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = step(state, *rest)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    stats = device.memory_stats() or {}
    return {"median_s": statistics.median(times), "loss": float(metrics["loss"]),
            "peak_bytes_in_use": stats.get("peak_bytes_in_use")}


def concrete(x: Any) -> Any:
    """An array of an abstract argument's shape and dtype: zeros (a PRNG key
    for a key dtype); time and memory do not depend on the values."""
    import jax
    import jax.numpy as jnp

    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.split(jax.random.key(0), x.shape) if x.shape else jax.random.key(0)
    return jnp.zeros(x.shape, x.dtype)


def run_one(job: dict[str, Any], device: Any = None) -> dict[str, Any]:
    """One policy on ``device`` (default: this process's first device): the
    compiled prediction, then real steps of the same workload step on
    arguments of its abstract shapes (zeros). Returns the figures (``error``
    when it does not fit)."""
    import jax

    import remat
    from remat._scan import parse_groups

    s = remat.train_step_setup(job["model"], batch=job["batch"], seq=job["seq"], dtype=job["dtype"],
                               groups=parse_groups(job["groups"]) if job.get("groups") else None,
                               loss_chunks=job.get("loss_chunks"), microbatches=job.get("microbatches"))
    # compiled on the GPU itself
    report = remat.inspect_policy(s, job["policy"]).with_rates(peak_flops_per_s=job["peak_flops"])
    out = {"predicted_peak_bytes": report.peak_bytes, "flops": report.flops,
           "host_transfer_bytes": report.host_transfer_bytes, "transfer_compute_ratio":
           report.transfer_compute_ratio if report.host_transfer_bytes else None}
    try:
        built = s.step(job["policy"])
        step = jax.jit(built.fn, donate_argnums=built.donate_argnums)
        out |= measure_steps(step, jax.tree.map(concrete, built.args), device or jax.devices()[0],
                             steps=job["steps"])
    except Exception as e:  # out of memory, most often: recorded, the run goes on
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        return out
    seconds = out["median_s"]
    out["hfu"] = report.flops / seconds / job["peak_flops"]
    out["mfu"] = job["model_flops"] / seconds / job["peak_flops"]
    return out


def predicted_peak(job: dict[str, Any], target: str = "cpu") -> int | None:
    """The peak ``remat inspect --target TARGET`` predicts on this host's CPU
    (``JAX_PLATFORMS=cpu``; the GPU hidden, so a GPU target compiles
    deviceless, as on a machine without one)."""
    flags = ["--model", job["model"], "--batch", str(job["batch"]), "--seq", str(job["seq"]), "--dtype",
             job["dtype"], "--attention", job["attention"], "--policy", job["policy"], "--target", target,
             "--json", "-"]
    for k in ("groups", "loss_chunks", "microbatches"):
        if job.get(k):
            flags += [f"--{k.replace('_', '-')}", str(job[k])]
    done = subprocess.run([sys.executable, "-m", "remat.cli", "inspect", *flags], capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""},
                          cwd=ROOT)
    return json.loads(done.stdout)["peak_bytes"] if done.returncode == 0 else None


def target_of(device_kind: str) -> str | None:
    """The remat GPU target whose devices report ``device_kind``, if any."""
    from remat import TARGETS
    from remat._targets import _OTHER_DEVICE_KINDS

    return next((n for n, t in TARGETS.items() if t.platform == "gpu"
                 and device_kind in (t.device_kind, *_OTHER_DEVICE_KINDS.get(n, ()))), None)


def tune_pick(job: dict[str, Any], budget: str) -> dict[str, Any]:
    """The ``remat tune`` pick at ``budget`` (CPU compiles, as users run it)."""
    done = subprocess.run([sys.executable, "-m", "remat.cli", "tune", "--model", job["model"], "--batch",
                           str(job["batch"]), "--seq", str(job["seq"]), "--dtype", job["dtype"], "--budget",
                           budget, "--max-compiles", "8", "--json", "-"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    pick = json.loads(done.stdout)["pick"]
    return {"policy": pick["policy"], "groups": pick.get("groups"), "loss_chunks": pick.get("loss_chunks"),
            "microbatches": pick.get("microbatches", 1)}


def table(results: dict[str, dict[str, Any]]) -> Any:
    """One rich table of every measured policy."""
    from rich.table import Table

    from remat._format import format_bytes

    t = Table(title="gpu_check")
    for col in ("policy", "CPU-predicted peak", "deviceless-predicted peak", "GPU-predicted peak",
                "measured peak", "measured / deviceless", "measured / CPU", "step", "MFU", "HFU",
                "host traffic", "transfer/compute"):
        t.add_column(col, justify="left" if col == "policy" else "right")
    for name, r in results.items():
        fmt = lambda k, r=r: format_bytes(r[k]) if r.get(k) is not None else "-"
        ratio = lambda k, r=r: (f"{r['peak_bytes_in_use'] / r[k]:.3f}"
                                if r.get("peak_bytes_in_use") and r.get(k) else "-")
        t.add_row(name, fmt("cpu_predicted_peak_bytes"), fmt("deviceless_predicted_peak_bytes"),
                  fmt("predicted_peak_bytes"), r.get("error", fmt("peak_bytes_in_use")),
                  ratio("deviceless_predicted_peak_bytes"), ratio("cpu_predicted_peak_bytes"),
                  f"{r['median_s'] * 1e3:.1f} ms" if "median_s" in r else "-",
                  f"{r['mfu']:.1%}" if "mfu" in r else "-", f"{r['hfu']:.1%}" if "hfu" in r else "-",
                  fmt("host_transfer_bytes"),
                  f"{r['transfer_compute_ratio']:.2f}" if r.get("transfer_compute_ratio") else "-")
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--budget", default="40GiB", help="the remat tune budget per device")
    parser.add_argument("--peak-flops", type=float, default=989e12)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("gpu_check.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: one job, JSON in and out
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    from rich.console import Console

    versions = smoke()
    from remat import models

    cfg = models.get_config(args.model)
    flops = model_flops_per_step(cfg.num_params, cfg.num_layers, args.seq, cfg.d_model, args.batch * args.seq)
    base = {"model": args.model, "dtype": args.dtype, "batch": args.batch, "seq": args.seq,
            "attention": cfg.attention, "steps": max(10, args.steps), "peak_flops": args.peak_flops,
            "model_flops": flops}
    target = target_of(versions["device_kind"])  # None on a CPU or a GPU kind remat has no target for
    jobs = {p: {**base, "policy": p} for p in POLICIES}
    results: dict[str, Any] = {}
    record = {"versions": versions, "target": target,
              **{k: base[k] for k in ("model", "dtype", "batch", "seq", "attention")}, "results": results}
    no_xla_remat = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                                                + " --xla_disable_hlo_passes=rematerialization").strip()}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        pick = pool.submit(tune_pick, base, args.budget)
        cpu = {p: pool.submit(predicted_peak, j) for p, j in jobs.items()}
        deviceless = {p: pool.submit(predicted_peak, j, target) for p, j in jobs.items() if target}
        for name in [*POLICIES, "tune pick"]:
            if name == "tune pick":
                jobs[name] = {**base, **pick.result()}
                cpu[name] = pool.submit(predicted_peak, jobs[name])
                if target:
                    deviceless[name] = pool.submit(predicted_peak, jobs[name], target)
            done = subprocess.run([sys.executable, __file__, "--one", json.dumps(jobs[name])],
                                  capture_output=True, text=True, cwd=ROOT, env=no_xla_remat)
            out = (json.loads(done.stdout.splitlines()[-1]) if done.returncode == 0
                   else {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]})
            results[name] = {**jobs[name], **out, "cpu_predicted_peak_bytes": cpu[name].result(),
                             "deviceless_predicted_peak_bytes": deviceless[name].result() if target else None}
            args.out.write_text(json.dumps(record, indent=1))
    Console(width=230).print(table(results))


if __name__ == "__main__":
    main()
