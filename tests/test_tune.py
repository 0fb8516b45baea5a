"""``remat tune``: the search against a fake compiler oracle (the traps of
public estimators), then once on a real model with the command line."""

import json
import shlex
import types

import pytest

import remat
from remat import cli
from remat._errors import RematError
from remat._tune import Candidate, SearchPoint, _largest_batch, search, tune
from remat.policies import get as get_policy

MiB = 2**20
NAMES = {"a": (40 * MiB, 100), "b": (30 * MiB, 60), "c": (20 * MiB, 10), "never": (0, 0)}
"""name -> (residual bytes, recompute FLOPs saved by keeping it)."""
FULL_RECOMPUTE = 200  # every layer recomputed (FLOPs above no remat)


class FakeOracle:
    """Peaks add up: parameters/optimizer 100 MiB + per-batch activations +
    the saved names' bytes (+ ``extra`` for saving both a and b: a non-additive
    compiler); micro-batches divide the activations, groups take 5 MiB off."""

    def __init__(self, budget, extra=0, activations=50 * MiB, cap=99):
        self.budget, self.extra, self.activations, self.cap = budget, extra, activations, cap
        self.names = tuple(NAMES)
        self.compiles = 0
        self.log = []

    def _kept(self, config, field):
        """The names a configuration saves (``field="save"``) or keeps at all
        (``"names"``: saved or offloaded); segments count as their union."""
        if config.policy == "none":
            return set(NAMES)
        parts = config.policy if isinstance(config.policy, tuple) else [(4, config.policy)]
        return set().union(*(getattr(get_policy(p), field) for _, p in parts))

    def traced(self, config, batch):
        by_name = {n: NAMES[n][0] * batch // 4 for n in self._kept(config, "save") if NAMES[n][0]}
        return by_name, 1000 + FULL_RECOMPUTE - sum(NAMES[n][1] for n in self._kept(config, "names"))

    def peak(self, config, batch):
        saved = self._kept(config, "save")
        act = (self.activations * batch // 4) // config.microbatches - (5 * MiB if config.groups else 0)
        both = self.extra if {"a", "b"} <= saved else 0
        return 100 * MiB + act + sum(NAMES[n][0] * batch // 4 for n in saved) + both

    def compiled(self, config, batch, role):
        self.compiles += 1
        assert self.compiles <= self.cap
        peak = self.peak(config, batch)
        _, flops = self.traced(config, batch)
        self.log.append((config, batch, peak))
        return Candidate(config, role, batch, peak, peak, flops, flops - 1000, peak <= self.budget)

    def report(self, config, batch):
        peak = self.peak(config, batch)
        return types.SimpleNamespace(peak_terms=(("optimizer state", 60 * MiB), ("parameters", 40 * MiB),
                                                 ("residuals", peak - 100 * MiB)),
                                     peak_bytes=peak, devices=1, peak_source="memory_analysis")


def run(budget, **kw):
    o = FakeOracle(budget, **{k: v for k, v in kw.items() if k in ("extra", "activations", "cap")})
    found = search(o, budget, batch=4, layers=4, chunks=False,
                   **{k: v for k, v in kw.items() if k in ("allow_offload", "groups")})
    assert found.pick in found.candidates and found.pick.fits
    return o, found.pick.config, list(found.candidates), found.preset, list(found.dropped_names)


def test_no_remat_already_fitting_is_the_answer():
    """``none`` fits: it is the result (not an error, not a search), after one compile."""
    o, pick, _, preset, _ = run(1000 * MiB)
    assert pick == SearchPoint("none") and o.compiles == 1 and preset.config == pick


@pytest.mark.parametrize("budget_mib", [160, 185, 215])
def test_the_pick_fits_and_is_the_least_recompute_that_fits(budget_mib):
    """The least recompute among every configuration that fits, by brute
    force over the fake's subsets; never a configuration that did not fit."""
    budget = budget_mib * MiB
    o, pick, seen, _, dropped = run(budget)
    assert dropped == ["never"]
    assert o.peak(pick, 4) <= budget
    names = [n for n in NAMES if n != "never"]
    best = min(FULL_RECOMPUTE - sum(NAMES[n][1] for n in subset)
               for k in range(len(names) + 1) for subset in __import__("itertools").combinations(names, k)
               if 150 * MiB + sum(NAMES[n][0] for n in subset) <= budget)
    chosen = next(c for c in seen if c.config == pick)
    assert chosen.fits and chosen.recompute_flops == best


def test_a_compiler_that_disagrees_is_repaired_and_the_last_misfit_is_not_returned():
    """Saving a and b together costs 30 MiB more than the model says: the
    pick a+b does not fit; the repair's pick does and is returned."""
    o, pick, seen, _, _ = run(225 * MiB, extra=30 * MiB)
    assert any(not c.fits and {"a", "b"} <= get_policy(c.config.policy).names for c in seen)
    assert o.peak(pick, 4) <= 225 * MiB
    assert next(c for c in seen if c.config == pick).fits


def test_nothing_fits_names_the_smallest_peak_its_term_and_levers():
    """Below even ``full`` with groups and 8 micro-batches: an error naming
    the smallest peak reached, by what, and the dominant term's levers."""
    with pytest.raises(RematError) as e:
        run(100 * MiB)
    msg = str(e.value)
    # 100 MiB of state + 50 MiB of activations / 4 micro-batches - 5 MiB for groups
    assert msg.startswith("nothing fits the budget of 100.00 MiB per device: the smallest peak reached is "
                          "107.50 MiB, by --policy full --groups sqrt --microbatches 4: the largest term at "
                          "the peak (fragmentation aside) is optimizer state (60.00 MiB of 107.50 MiB)")
    assert "shard parameters, optimizer state and gradients" in msg


def test_offload_is_its_own_option():
    """With offload allowed, a name can be kept on host (its bytes leave the
    device peak), which the fake's budget needs for the least recompute."""
    _, pick, _, _, _ = run(175 * MiB, allow_offload=True)
    assert get_policy(pick.policy).offload, pick


def test_the_compile_cap_holds_and_is_reported():
    with pytest.raises(RematError, match="the compile cap was reached before anything fit the budget"):
        o = FakeOracle(160 * MiB, cap=99)
        o.compiled = _capped(o.compiled, 1)
        search(o, 160 * MiB, batch=4, layers=4, chunks=False)
    o = FakeOracle(160 * MiB)
    o.compiled = _capped(o.compiled, 2)  # none, then full (which fits): no room for the search
    found = search(o, 160 * MiB, batch=4, layers=4, chunks=False)
    assert found.capped and found.pick.config == SearchPoint("full") and found.preset is None


def _capped(f, n):
    from remat._tune import _CapReached

    calls = []

    def g(*a):
        if len(calls) >= n:
            raise _CapReached
        calls.append(a)
        return f(*a)

    return g


@pytest.mark.parametrize("config", [
    SearchPoint("minimal"), SearchPoint("save:a,b + dots:no_batch", "sqrt", 8, 2),
    SearchPoint(((3, "save:a,b + offload:c"), (1, "full")), (2, 2), 1, 4)])
def test_flags_round_trip(config):
    """``pick.flags()`` parses back to the pick (the CLI's own parser, at the
    CLI edge), and ``inspect`` takes them too."""
    assert cli.search_point(shlex.split(config.flags())) == config
    args = cli.build_parser().parse_args(["inspect", "--model", "tiny", *shlex.split(config.flags())])
    parsed = (args.policy, args.groups, args.loss_chunks or 1, args.microbatches or 1)
    assert parsed == (config.policy_text, config.groups_text, config.loss_chunks, config.microbatches)


def test_a_search_point_names_bad_fields():
    with pytest.raises(RematError, match=r"SearchPoint.groups='2,2': valid values are None, 'sqrt' or \(G, "):
        SearchPoint("full", "2,2")
    with pytest.raises(RematError, match=r"segments must be \(count, spec\) pairs, got \(\(0, 'full'\),\)"):
        SearchPoint(((0, "full"),))


def test_the_old_names_warn_and_still_work():
    """``remat.TuneConfig`` and ``from_flags`` are deprecated aliases for one release."""
    with pytest.warns(DeprecationWarning, match="remat.TuneConfig is deprecated: it is remat.SearchPoint"):
        assert remat.TuneConfig is SearchPoint
    with pytest.warns(DeprecationWarning, match="SearchPoint.from_flags is deprecated"):
        assert SearchPoint.from_flags("--policy minimal --groups 2,2") == SearchPoint("minimal", (2, 2))


def test_batch_auto_is_the_largest_fitting_multiple():
    """Doubling then bisecting over multiples of the batch factor (2): the
    answer fits with the frugal configuration and the next multiple was
    compiled and does not."""
    o = FakeOracle(400 * MiB, activations=40 * MiB)
    best, tried = _largest_batch(o, 400 * MiB, factor=2, groups="sqrt", max_microbatches=8,
                                 chunks=True)
    assert best % 2 == 0 and o.peak(tried[[c.batch for c in tried].index(best)].config, best) <= 400 * MiB
    above = next(c for c in tried if c.batch == best + 2)
    assert not above.fits
    assert {c.role for c in tried} == {"batch"}
    assert all(c.config.policy == "full" and c.config.loss_chunks == 8 for c in tried)


# -- on a real model --------------------------------------------------------------------
def test_tune_on_tiny_fits_and_beats_the_best_preset(capsys):
    """``remat tune`` on tiny (batch 4 x 128) at a budget between the full and
    none peaks: the pick fits, every compile is counted and within the cap,
    and the JSON carries the flags that reproduce it."""
    assert cli.main(["tune", "--model", "tiny", "--batch", "4", "--seq", "128", "--budget", "30MiB",
                     "--json", "-"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["headroom_bytes"] >= 0 and d["compiles"] <= 15
    assert d["report"]["peak_bytes"] <= 30 * MiB
    assert cli.search_point(shlex.split(d["pick"]["flags"])).policy_text == d["pick"]["policy"]
    assert set(d["pick"]) == {"policy", "groups", "loss_chunks", "microbatches", "flags"}
    assert set(d["candidates"][0]["config"]) == {"policy", "groups", "loss_chunks", "microbatches"}
    assert d["preset"] is not None and d["recompute_saved_flops"] >= 0
    assert len(d["candidates"]) >= d["compiles"]


def test_tune_rejects_bad_input():
    with pytest.raises(RematError, match=r"invalid size '30': write a number and a unit"):
        tune("tiny", "30", batch=4, seq=128)
    with pytest.raises(RematError, match=r"batch=0 must be a positive integer or 'auto'"):
        tune("tiny", "30MiB", batch=0, seq=128)
