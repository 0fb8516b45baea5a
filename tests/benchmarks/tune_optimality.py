"""Benchmark (not a test): ``remat.tune`` against the optimum found by
compiling every save/recompute combination of the checkpoint names that can
be residuals, each alone and with each dots rule (``+ dots``,
``+ dots:no_batch``: the space tune searches, less offloading, groups and
segments), on a workload: ``tiny`` (batch 4 x 128) of both decoder
families, and the ViT of :mod:`remat.models.vit` (batch 8, six names that can be
residuals: 192 combinations), at budgets 25 %, 50 % and 75 % of the way from the
``full`` peak to the ``none`` peak.

Prints, per budget: the tuned recompute over the optimum's (target <= 1.02),
whether the pick fits, and the tuned recompute against the best registered
preset that fits (target: strictly less at >= 2 of the 3 budgets). Identical
lowered programs share one compile. Expect tens of minutes on 2 cores::

    python tests/benchmarks/tune_optimality.py [llama] [gpt2] [vit] [--cache DIR]

With ``--cache DIR`` the combinations' costs are kept in ``DIR/NAME.json``
and read back on the next run (the tune calls are always run anew).
"""

import argparse
import itertools
import json
import pathlib
import time

import optax

from remat import NeverKeptError, models
from remat._analysis import compile_traced, measure
from remat._flax_workload import linen_workload
from remat._flops import count_flops
from remat._jaxpr import checkpoint_names
from remat._sweep import as_workload, default_policies
from remat._tune import tune
from remat._workload import TrainStepSetup, Workload, bind
from remat.models import vit
from remat.policies import get

BATCH, SEQ = 4, 128


def workload(name: str) -> tuple[Workload, int]:
    """The workload called ``name`` and its batch."""
    if name == "vit":
        return linen_workload(lambda c: vit.ViT(policy=c.policy, groups=c.groups), vit.classification_loss,
                              vit.batch_shapes(8), name="vit", optimizer=optax.adamw(1e-3),
                              layers=vit.LAYERS), 8
    return as_workload(models.get_config("tiny", family=name), seq=SEQ), BATCH


class Costs:
    """``(peak bytes, recompute FLOPs)`` of a spec, one compile per distinct program."""

    def __init__(self, s: TrainStepSetup):
        self.s = s
        self.base_flops = count_flops(s.baseline().traced.jaxpr.jaxpr)[0]
        self.programs: dict[str, tuple[int, int]] = {}

    def __call__(self, spec: str) -> tuple[int, int]:
        t = self.s.trace(spec, spec)
        if t.program not in self.programs:
            r = measure(t, *compile_traced(t, None))
            self.programs[t.program] = (r.peak_bytes, r.flops - self.base_flops)
        return self.programs[t.program]


def run(name: str, cache: pathlib.Path | None) -> None:
    t0 = time.perf_counter()
    w, batch = workload(name)
    s = bind(w, batch=batch)
    cost = Costs(s)
    peak_full, peak_none = cost("full")[0], cost("none")[0]
    emitted = sorted(checkpoint_names(s.trace("none", "none").traced.jaxpr.jaxpr))
    names, dropped = [], []
    for n in emitted:
        try:
            s.trace(f"save:{n}", n)
            names.append(n)
        except NeverKeptError:  # the backward pass never reads it: never a residual
            dropped.append(n)
    path = cache / f"{name}.json" if cache else None
    combos = {k: tuple(v) for k, v in json.loads(path.read_text()).items()} if path and path.exists() else {}
    cached = len(combos)
    for k in range(len(names) + 1):
        for subset in itertools.combinations(names, k):
            saved = [f"save:{','.join(subset)}"] if subset else []
            for rule in ([], ["dots"], ["dots:no_batch"]):  # the dots rules tune also searches
                spec = " + ".join(saved + rule) or "full"
                if spec not in combos:
                    combos[spec] = cost(spec)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(combos))
    presets = {p: cost(p) for p in default_policies(emitted) if not (get(p).offload or get(p).offload_dots)}
    print(f"\n{name}: {len(combos)} combinations of {len(names)} names ({', '.join(names)}; never "
          f"residuals: {', '.join(dropped) or '-'}), {cached} from the cache, {len(cost.programs)} distinct "
          "programs compiled, "
          f"{time.perf_counter() - t0:.0f} s")
    wins = 0
    for frac in (0.25, 0.5, 0.75):
        budget = int(peak_full + frac * (peak_none - peak_full))
        optimum = min(r for p, r in combos.values() if p <= budget)
        preset = min((r, name) for name, (p, r) in presets.items() if p <= budget)
        t1 = time.perf_counter()
        result = tune(w, budget, batch=batch)
        c = result.chosen
        wins += c.recompute_flops < preset[0]
        print(f"  budget {frac:.0%} ({budget / 2**20:.2f} MiB): tuned/optimum recompute "
              f"{c.recompute_flops / max(optimum, 1):.3f} ({c.recompute_flops:.4g} / {optimum:.4g} FLOPs), "
              f"fits {c.device_peak_bytes <= budget}, best preset {preset[1]} {preset[0]:.4g}, "
              f"tuned/preset {c.recompute_flops / max(preset[0], 1):.3f}, {result.compiles} compiles, "
              f"{time.perf_counter() - t1:.1f} s; pick {result.pick.flags()}")
    print(f"  strictly less recompute than the best fitting preset at {wins} of 3 budgets")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workloads", nargs="*", choices=("llama", "gpt2", "vit"),
                        default=("llama", "gpt2", "vit"))
    parser.add_argument("--cache", type=pathlib.Path, help="folder for the combinations' costs")
    args = parser.parse_args()
    for name in args.workloads:
        run(name, args.cache)
