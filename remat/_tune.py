"""``remat tune``: the configuration with the least recomputation whose train
step fits a memory budget per device, and the largest batch that fits.

The search space (one :class:`SearchPoint`): for each checkpoint name the
model emits, save it, recompute it, or (``allow_offload``) offload it to host;
a dots rule (``dots``, ``dots:no_batch``); two policy segments over the layer
stack (one more name saved on the first ``m`` layers only); nested groups;
the chunked loss head; gradient accumulation over micro-batches.

How (compile few, solve exactly, confirm):

1. Compile ``none``: if it fits, it is the answer (no recomputation at all).
2. Compile ``full``, also with an 8-chunk loss head where the loss head is a
   large term of its peak, and keep the lower. If even ``full`` does not fit,
   escalate: nested groups, then 2, 4, ... micro-batches (no more FLOPs, but
   smaller matmuls, which FLOPs do not show, so only when nothing fits
   without them), the first that fits; nothing fits is an error naming the
   smallest peak reached, by what, and its dominant term with its levers.
3. A cost model from traces (no compile): each name's residual bytes per
   device (all layers) and the recompute FLOPs saving it avoids
   (``flops(full) - flops(save:NAME)``); names that are never residuals are
   dropped. The peak is modelled as piecewise linear in the residual bytes
   saved, through compiled anchors: ``full`` (nothing saved), one compile of
   "save every name", and every configuration compiled after.
4. Solve exactly: every save/offload/recompute assignment and dots rule is
   evaluated on the model (3^n x 3 for n names, a few hundred thousand at
   most); the :data:`RERANK` best of each dots rule are traced for their
   exact residual bytes and FLOPs (a dots rule overlaps the names it keeps:
   the items' FLOPs do not add up) and the least recompute that the model
   says fits wins; then one more name on the first ``m`` layers where the
   headroom allows (segments).
5. Confirm by compiling; the compiled peak becomes an anchor and the model
   is solved again (a repair when the pick did not fit, an improvement when
   it left headroom), until its answer is one already compiled (at most 4
   rounds); then the model's next :data:`RUNNERS_UP` answers are compiled
   too, all within the compile cap.

Every compile is of the step ``remat train`` runs
(:meth:`remat.TrainStepSetup.step`: same dtypes, optimizer, mesh and compile
options) and is counted; ``max_compiles`` caps them. On a backend that does
not account host memory (XLA:CPU), an offloading configuration's device peak
is the compiled peak minus its host residual bytes, labelled an estimate.

``batch="auto"``: the largest global batch (a multiple of the batch-sharding
factor) whose most memory-frugal configuration (``full``, 8 loss chunks,
the most micro-batches, with nested groups too where it does not fit
without: they are not always more frugal) fits: doubling from the smallest until
one does not fit, then bisecting. Peak memory is not always monotone in the
batch (XLA's choices change with shapes), so the answer is checked: the next
multiple above it was compiled and did not fit; a larger batch that would fit
after one that does not is not searched.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import shlex
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from jax.sharding import Mesh
from rich.console import Group
from rich.table import Table

from remat import _compat
from remat._analysis import compile_figures, measure
from remat._apply import check_offload
from remat._errors import NeverKeptError, OffloadUnsupportedError, RematError
from remat._flops import count_flops
from remat._format import check_size, format_bytes, format_flops, parse_bytes
from remat._memory import advice
from remat._mesh import Rules
from remat._report import Report, render_text
from remat._residuals import residual_rows
from remat._scan import Groups, parse_groups
from remat._sweep import ModelLike, as_workload, default_policies, shape_text
from remat._targets import Target, get_target, prepare_environment, target_devices
from remat._workload import TrainStepSetup, Workload, bind, knobs_read
from remat.policies import get as get_policy, require_text

_compat.hide_frames(__file__)

__all__ = ["Candidate", "Found", "SearchPoint", "Segments", "TuneResult", "search", "tune"]

LOSS_CHUNKS = 8
"""The chunked loss head's chunks the search tries."""

DEFAULT_MAX_COMPILES = 15
"""Compiles one ``tune`` call may make unless told otherwise (40 with ``batch="auto"``)."""

RUNNERS_UP = 3
"""After the pick, the next best answers of the model that are compiled too
(the model is approximate: one of them may recompute less and still fit)."""
RERANK = 3
"""How many of the items' best answers per dots rule are traced and ranked exactly."""

_DOTS = ("", "dots:no_batch", "dots")


Segments = tuple[tuple[int, str], ...]
"""A policy per run of layers, ``((8, "minimal"), (24, "full"))``: the first 8
layers under ``minimal``, the next 24 under ``full`` (as ``"8x minimal; 24x full"``)."""


@dataclasses.dataclass(frozen=True)
class SearchPoint:
    """One point of :func:`tune`'s search space: how the train step is
    rematerialized. With the batch (and the workload's attention) it is a
    :class:`remat.Configuration`, which is what ``remat train`` runs.

    Attributes:
      policy: a policy spec (text, e.g. ``"save:qkv_proj + dots:no_batch"``),
        or :data:`Segments`, a spec per run of layers.
      groups: nested checkpointing of the layer scan: ``None``, ``"sqrt"`` or
        ``(G, K)`` (:func:`remat.scan_layers`).
      loss_chunks: the loss head's chunks (1: the whole logits).
      microbatches: gradient accumulation over this many micro-batches.

    Raises:
      PolicyNotTextError: ``policy`` is a JAX policy callable: a search point
        is written out as flags (:meth:`flags`).
      RematError: segments that are not ``(count, spec)`` pairs; ``groups``
        that is not None, ``"sqrt"`` or two positive ints.
    """

    policy: str | Segments
    groups: Groups = None
    loss_chunks: int = 1
    microbatches: int = 1

    def __post_init__(self) -> None:
        where = "SearchPoint.policy (remat tune writes it as --policy)"
        if isinstance(self.policy, tuple):
            if not self.policy or not all(isinstance(n, int) and n > 0 and isinstance(spec, str)
                                          for n, spec in self.policy):
                raise RematError(f"{where}: segments must be (count, spec) pairs, got {self.policy!r}")
        else:
            require_text(self.policy, where)
        g = self.groups
        if not (g is None or g == "sqrt" or (isinstance(g, tuple) and len(g) == 2
                                             and all(isinstance(n, int) and n > 0 for n in g))):
            raise RematError(f"SearchPoint.groups={g!r}: valid values are None, 'sqrt' or (G, K), two "
                             "positive ints (flag text 'G,K' is read by remat.cli.search_point)")

    @property
    def policy_text(self) -> str:
        """``policy`` as ``--policy`` takes it (segments as ``"8x SPEC; 24x SPEC"``)."""
        if isinstance(self.policy, str):
            return self.policy
        return "; ".join(f"{n}x {spec}" for n, spec in self.policy)

    @property
    def groups_text(self) -> str | None:
        """``groups`` as ``--groups`` takes it (``"sqrt"`` or ``"G,K"``)."""
        if self.groups is None or isinstance(self.groups, str):
            return self.groups
        return f"{self.groups[0]},{self.groups[1]}"

    def flags(self) -> str:
        """The command-line flags that reproduce it (for ``remat train``,
        ``inspect`` and ``sweep``), e.g. ``--policy minimal --loss-chunks 8``."""
        out = ["--policy", shlex.quote(self.policy_text)]
        if self.groups is not None:
            out += ["--groups", self.groups_text]
        if self.loss_chunks != 1:
            out += ["--loss-chunks", str(self.loss_chunks)]
        if self.microbatches != 1:
            out += ["--microbatches", str(self.microbatches)]
        return " ".join(out)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, as ``--json`` writes it: policy and groups as their flag text."""
        return {"policy": self.policy_text, "groups": self.groups_text, "loss_chunks": self.loss_chunks,
                "microbatches": self.microbatches}

    @classmethod
    def from_flags(cls, text: str) -> SearchPoint:
        """Deprecated: parse the flags with ``remat.cli.search_point`` (the CLI's own parser)."""
        warnings.warn("SearchPoint.from_flags is deprecated: use remat.cli.search_point(shlex.split(text))",
                      DeprecationWarning, stacklevel=2)
        from remat import cli  # this deprecated alias only: otherwise the library never imports the CLI

        return cli.search_point(shlex.split(text))


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A compiled configuration.

    Attributes:
      config: what was compiled.
      role: why: ``"none"``, ``"full"``, ``"frugal"`` (an escalation),
        ``"calibration"``, ``"pick"``, ``"repair"``, ``"segments"``,
        ``"preset"``, ``"batch"`` (``batch="auto"``).
      batch: the global batch it was compiled at (None: the workload does not read it).
      peak_bytes: the compiled peak per device (``memory_analysis()``).
      device_peak_bytes: the peak per device that the budget is checked
        against: ``peak_bytes``, less the host residual bytes where the
        backend does not account host memory (then ``estimate``).
      flops: the step's FLOPs (global, every layer).
      recompute_flops: ``flops`` minus the step's with no ``jax.checkpoint``.
      fits: ``device_peak_bytes <= budget``.
      estimate: ``device_peak_bytes`` is an estimate (see above).
    """

    config: SearchPoint
    role: str
    batch: int | None
    peak_bytes: int
    device_peak_bytes: int
    flops: int
    recompute_flops: int
    fits: bool
    estimate: bool = False


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """What :func:`tune` found.

    Attributes:
      model, batch, seq: the workload's name and shapes (``batch`` the chosen
        one for ``"auto"``; None where the workload does not read it; ``seq``
        None where it is not a sequence model).
      budget_bytes: the budget per device.
      chosen: the pick's compiled candidate (:attr:`pick` is its configuration).
      report: its :class:`remat.Report`.
      candidates: every configuration compiled, in order.
      compiles: how many compiles the call made (<= its cap).
      preset: the best registered preset that fits at the pick's chunks,
        micro-batches and groups (least recompute), or None if none fits.
      dropped_names: checkpoint names the model emits that are never
        residuals (saving them keeps nothing), left out of the search.
      wall_seconds: the whole call.
      batches: for ``batch="auto"``, the most frugal configuration compiled
        at every batch tried.
      capped: the compile cap stopped the search: a better pick, or the best
        preset, may not have been compiled.
      levers: what the search could change, as the workload reads its knobs
        (e.g. ``"nested groups"``, ``"micro-batches"``, ``"loss chunks"``).
    """

    model: str
    batch: int | None
    seq: int | None
    budget_bytes: int
    chosen: Candidate
    report: Report
    candidates: tuple[Candidate, ...]
    compiles: int
    preset: Candidate | None
    dropped_names: tuple[str, ...]
    wall_seconds: float
    batches: tuple[Candidate, ...] = ()
    capped: bool = False
    levers: tuple[str, ...] = ()

    @property
    def pick(self) -> SearchPoint:
        """The configuration; ``pick.flags()`` reproduces it."""
        return self.chosen.config

    @property
    def headroom_bytes(self) -> int:
        """``budget_bytes`` minus the pick's device peak (bytes per device)."""
        return self.budget_bytes - self.chosen.device_peak_bytes

    @property
    def recompute_saved_flops(self) -> int | None:
        """Recompute FLOPs the pick saves against :attr:`preset` (None without one)."""
        return None if self.preset is None else self.preset.recompute_flops - self.chosen.recompute_flops

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the pick as flags and fields, every candidate, the report."""
        cand = lambda c: {**dataclasses.asdict(c), "config": c.config.to_dict(), "flags": c.config.flags()}
        return {"model": self.model, "batch": self.batch, "seq": self.seq, "budget_bytes": self.budget_bytes,
                "pick": {**self.pick.to_dict(), "flags": self.pick.flags()},
                "headroom_bytes": self.headroom_bytes, "compiles": self.compiles,
                "preset": None if self.preset is None else cand(self.preset),
                "recompute_saved_flops": self.recompute_saved_flops,
                "dropped_names": list(self.dropped_names), "wall_seconds": self.wall_seconds,
                "capped": self.capped, "levers": list(self.levers),
                "candidates": [cand(c) for c in self.candidates], "batches": [cand(c) for c in self.batches],
                "report": self.report.to_dict()}

    def summary(self, timings: bool = True) -> Table:
        """The pick, its peak, headroom and recompute, and the best preset
        that fits (a rich table); ``timings=False`` leaves the wall time out."""
        c = self.chosen
        took = f", {self.wall_seconds:.1f} s" if timings else ""
        head = Table(title=f"remat tune: {self.model}{shape_text(self.batch, self.seq)}, budget "
                           f"{format_bytes(self.budget_bytes)} per device ({self.compiles} compiles{took})",
                     show_header=False)
        head.add_column("what", style="bold")
        head.add_column("value")
        est = " (estimate: host memory not accounted)" if c.estimate else ""
        rows = [("pick", self.pick.flags()),
                ("peak per device", format_bytes(c.device_peak_bytes) + est),
                ("headroom", format_bytes(self.headroom_bytes)),
                ("recompute", f"{format_flops(c.recompute_flops)} ({c.recompute_flops / max(c.flops, 1):.1%} "
                              "of the step)")]
        if self.preset is not None:
            rows.append(("best preset that fits", f"{self.preset.config.flags()}: peak "
                         f"{format_bytes(self.preset.device_peak_bytes)}, recompute "
                         f"{format_flops(self.preset.recompute_flops)}; the pick saves "
                         f"{format_flops(self.recompute_saved_flops)}"))
        else:
            rows.append(("best preset that fits", "none compiled within the compile cap" if self.capped
                         else "none fits"))
        if self.capped:
            rows.append(("compile cap", f"reached ({self.compiles} compiles): raise --max-compiles to search "
                                        "further"))
        if self.dropped_names:
            rows.append(("never residuals (left out)", ", ".join(self.dropped_names)))
        if self.levers:
            rows.append(("levers searched", ", ".join(self.levers)))
        r = self.report
        rows.append(("compiled for", f"target {r.target}: {r.backend} ({r.device_kind})"))
        if r.backend == "gpu":
            rows.append(("train it with", "XLA_FLAGS=--xla_disable_hlo_passes=rematerialization: the program "
                                          "measured (XLA:GPU's own rematerialization pass off)"))
        for k, v in rows:
            head.add_row(k, v)
        return head

    def candidates_table(self) -> Table:
        """Every configuration compiled (batches tried first), with its peak,
        recompute and whether it fits, the chosen one marked (a rich table)."""
        rows = (*self.batches, *self.candidates)
        estimated = any(x.estimate for x in rows)  # the footnote only where a row is marked
        t = Table(title="every configuration compiled",
                  caption="* estimate: the backend does not account host memory, so the device peak is the "
                          "compiled peak minus the offloaded residuals" if estimated else None)
        for col in ("role", "batch", "flags", "peak per device", "recompute", "fits"):
            t.add_column(col, justify="right" if col in ("batch", "peak per device", "recompute") else "left",
                         overflow="fold")
        for x in rows:
            t.add_row(x.role, str(x.batch), x.config.flags(),
                      format_bytes(x.device_peak_bytes) + ("*" if x.estimate else ""),
                      format_flops(x.recompute_flops),
                      "yes (chosen)" if x is self.chosen else "yes" if x.fits else "no")
        return t

    def __rich__(self) -> Group:
        return Group(self.summary(), self.candidates_table())

    def __str__(self) -> str:
        """The text rich renders: ``print(result)`` reads as ``remat tune`` prints it."""
        return render_text(self)


class Oracle(Protocol):
    """What the search asks of a model: cheap traces and counted compiles."""

    names: tuple[str, ...]
    """The checkpoint names the step emits."""

    def traced(self, config: SearchPoint, batch: int) -> tuple[dict[str, int], int]:
        """Device residual bytes per checkpoint name, and the step's FLOPs (no compile)."""

    def compiled(self, config: SearchPoint, batch: int, role: str) -> Candidate:
        """Compile and measure (one counted compile)."""

    def report(self, config: SearchPoint, batch: int) -> Report:
        """The report of a configuration compiled before."""


class _CapReached(Exception):
    pass


def _spec(saved: Sequence[str], offloaded: Sequence[str] = (), dots: str = "") -> str:
    terms = [f"save:{','.join(saved)}"] if saved else []
    terms += [f"offload:{','.join(offloaded)}"] if offloaded else []
    terms += [dots] if dots else []
    return " + ".join(terms) or "full"


@dataclasses.dataclass
class _Item:
    name: str
    bytes: int
    flops: int


class _Search:
    """The search over one model and batch against one oracle (see the module doc)."""

    def __init__(self, oracle: Oracle, budget: int, *, layers: int, allow_offload: bool, groups: Groups,
                 max_microbatches: int, batch: int, factor: int, chunks: bool):
        self.o, self.budget, self.layers = oracle, budget, layers
        self.allow_offload, self.groups, self.max_mb = allow_offload, groups, max_microbatches
        self.batch, self.factor, self.chunks = batch, factor, chunks
        self.seen: list[Candidate] = []
        self.best: Candidate | None = None  # the confirmed spec with the least recompute that fits
        self.capped = False

    def compile(self, config: SearchPoint, role: str) -> Candidate:
        c = self.o.compiled(config, self.batch, role)
        self.seen.append(c)
        return c

    def confirm(self, spec: str, role: str, base: SearchPoint, model: _PeakModel) -> Candidate | None:
        """Compile ``spec`` at ``base``'s options unless done (then None); it
        becomes an anchor of ``model``, and :attr:`best` if it fits with less recompute."""
        config = dataclasses.replace(base, policy=str(get_policy(spec)))
        if self.done(config) is not None:
            return None
        c = self.compile(config, role)
        model.add(self.exact(base, config.policy)[0], c.device_peak_bytes)
        if c.fits and (self.best is None or c.recompute_flops < self.best.recompute_flops):
            self.best = c
        return c

    def done(self, config: SearchPoint) -> Candidate | None:
        """The candidate of ``config`` if it was compiled already."""
        return next((c for c in self.seen if c.config == config), None)

    def base(self) -> Candidate:
        """The least frugal configuration whose ``full`` fits; raises if none does."""
        full = self.compile(SearchPoint("full"), "full")
        best = full
        if self.chunks and (not full.fits or self._head_share(full) >= 0.05):
            chunked = self.compile(SearchPoint("full", loss_chunks=LOSS_CHUNKS), "full")
            best = min(full, chunked, key=lambda c: c.device_peak_bytes)
        if best.fits:
            return best
        counts = _microbatches(self.batch, self.factor, self.max_mb)
        ladder = [(g, k) for k in counts for g in (None, self.groups) if (g, k) != (None, 1)]
        for g, k in dict.fromkeys(ladder):
            c = self.compile(dataclasses.replace(best.config, groups=g, microbatches=k), "frugal")
            if c.fits:
                return c
        smallest = min(self.seen, key=lambda c: c.device_peak_bytes)
        report = self.o.report(smallest.config, self.batch)
        if report.peak_source == "out-of-memory error":  # no terms: the compiler's own words
            why = [n for n in report.notes if n.startswith("does not fit")]
        else:
            why = advice(dict(report.peak_terms), report.peak_bytes, report.devices) or [
                "The activations (residuals, stacked layer inputs) are its largest term: a smaller batch, or "
                "more devices (FSDP)"]
        raise RematError(
            f"nothing fits the budget of {format_bytes(self.budget)} per device: the smallest peak reached "
            f"is {format_bytes(smallest.device_peak_bytes)}, by {smallest.config.flags()}: {' '.join(why)}")

    def _head_share(self, c: Candidate) -> float:
        terms = dict(self.o.report(c.config, self.batch).peak_terms)
        return terms.get("loss head", 0) / max(c.peak_bytes, 1)

    def items(self, base: SearchPoint) -> tuple[list[_Item], list[str]]:
        """Each name's device bytes and FLOP saving over ``full``, from traces,
        and the names dropped (never residuals)."""
        base = dataclasses.replace(base, groups=None)  # a group's residuals are transient: not in the rows
        _, full_flops = self.o.traced(base, self.batch)
        items, dropped = [], []
        for n in self.o.names:
            try:
                by_name, flops = self.o.traced(dataclasses.replace(base, policy=f"save:{n}"), self.batch)
            except NeverKeptError:
                by_name, flops = {}, full_flops
            if by_name.get(n, 0) <= 0:
                dropped.append(n)
            else:
                items.append(_Item(n, by_name[n], max(0, full_flops - flops)))
        for rule in _DOTS[1:]:
            by_name, flops = self.o.traced(dataclasses.replace(base, policy=rule), self.batch)
            items.append(_Item(rule, sum(by_name.values()), max(0, full_flops - flops)))
        return items, dropped

    def exact(self, base: SearchPoint, spec: str) -> tuple[int, int]:
        """``(residual device bytes beyond full's, step FLOPs)`` of ``spec`` at
        ``base``'s options, from its trace (no compile): the model's inputs
        for a configuration, exact where the items only add up (a dots rule
        overlaps the names it keeps)."""
        at = dataclasses.replace(base, groups=None)  # a group's residuals are transient: not in the rows
        full, _ = self.o.traced(dataclasses.replace(at, policy="full"), self.batch)
        by_name, flops = self.o.traced(dataclasses.replace(at, policy=str(get_policy(spec))), self.batch)
        return sum(by_name.values()) - sum(full.values()), flops

    def solve(self, items: list[_Item], model: _PeakModel, budget: int, base: SearchPoint,
              top: int = 1) -> list[str]:
        """The ``top`` specs with the least recompute whose modelled peak
        fits ``budget``, best first: every assignment of the names (and dots
        rule) is evaluated on the items at once, then the :data:`RERANK` best
        of each dots rule are traced (:meth:`exact`) and ranked by their
        exact FLOPs and bytes."""
        exact = []
        for spec in self._solve_items(items, model, budget, max(top, RERANK)):
            saved, flops = self.exact(base, spec)
            if model.predict(saved) <= budget:
                exact.append((flops, saved, spec))
        return [spec for *_, spec in sorted(exact)[:top]]

    def _solve_items(self, items: list[_Item], model: _PeakModel, budget: int, top: int) -> list[str]:
        """The ``top`` specs of each dots rule (none, ``dots:no_batch``,
        ``dots``) by the items' additive bytes and FLOPs."""
        names = [i for i in items if i.name not in _DOTS]
        dots = {i.name: i for i in items if i.name in _DOTS}
        choices = 3 if self.allow_offload else 2  # 0 recompute, 1 save, 2 offload
        grid = np.array(list(itertools.product(range(choices), repeat=len(names))), dtype=np.int8)
        grid = grid.reshape(-1, len(names))
        nbytes = np.array([n.bytes for n in names], dtype=np.float64)
        flops = np.array([n.flops for n in names], dtype=np.float64)
        found: list[tuple[float, float, str]] = []
        for rule in _DOTS:
            extra_bytes, extra_flops = (dots[rule].bytes, dots[rule].flops) if rule else (0, 0)
            dev = (grid == 1) @ nbytes + extra_bytes
            gain = (grid > 0) @ flops + extra_flops
            ok = model.predict(dev) <= budget
            rows, dev, gain = grid[ok], dev[ok], gain[ok]
            for k in np.lexsort((dev, -gain))[:top]:
                found.append((-float(gain[k]), float(dev[k]), _spec(
                    [n.name for n, a in zip(names, rows[k], strict=True) if a == 1],
                    [n.name for n, a in zip(names, rows[k], strict=True) if a == 2], rule)))
        return [spec for *_, spec in sorted(found)]

    def segments(self, spec: str, items: list[_Item], model: _PeakModel, budget: int,
                 base: SearchPoint) -> Segments | None:
        """``spec`` plus one more name saved on the first ``m`` layers (and
        ``spec`` on the rest), the most FLOPs the headroom allows by the
        model; None when no layer fits."""
        policy = get_policy(spec)
        dev = self.exact(base, spec)[0]
        best = None
        for i in items:
            if i.name in _DOTS or i.name in policy.names:
                continue
            per_layer = i.bytes / self.layers
            room = [m for m in range(1, self.layers) if model.predict(dev + per_layer * m) <= budget]
            m = max(room, default=0)
            if m and (best is None or i.flops * m > best[0]):
                more = get_policy(f"{spec} + save:{i.name}" if spec != "full" else f"save:{i.name}")
                best = (i.flops * m, ((m, str(more)), (self.layers - m, str(policy))))
        return None if best is None else best[1]


class _PeakModel:
    """The device peak as a function of the residual bytes saved: piecewise
    linear through the compiled anchors (``full`` at 0, every name saved, and
    each configuration compiled since), extended by the outer segments' slopes."""

    def __init__(self) -> None:
        self.anchors: dict[float, float] = {}

    def add(self, saved: float, peak: float) -> None:
        self.anchors[float(saved)] = float(peak)

    def predict(self, saved: Any) -> Any:
        x = np.array(sorted(self.anchors))
        y = np.array([self.anchors[k] for k in x])
        v = np.asarray(saved, dtype=np.float64)
        if len(x) == 1:
            return y[0] + np.maximum(v - x[0], 0)
        lo = y[0] + (v - x[0]) * (y[1] - y[0]) / (x[1] - x[0])
        hi = y[-1] + (v - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2])
        return np.where(v < x[0], lo, np.where(v > x[-1], hi, np.interp(v, x, y)))


def _microbatches(batch: int | None, factor: int, limit: int) -> list[int]:
    """The micro-batch counts up to ``limit`` that split ``batch`` evenly, each
    over ``factor`` devices ([1] where the workload does not read the batch)."""
    if batch is None:
        return [1]
    return [k for k in range(1, limit + 1) if batch % (factor * k) == 0]


@dataclasses.dataclass(frozen=True)
class Found:
    """What :func:`search` found.

    Attributes:
      pick: the compiled candidate with the least recompute that fits (ties:
        fewer micro-batches, no groups, fewer loss chunks, lower peak).
      candidates: every configuration compiled, in order.
      preset: the best registered preset that fits (None: none, or the cap).
      dropped_names: checkpoint names that are never residuals, left out.
      capped: the compile cap stopped the search.
    """

    pick: Candidate
    candidates: tuple[Candidate, ...]
    preset: Candidate | None
    dropped_names: tuple[str, ...]
    capped: bool


def search(oracle: Oracle, budget: int, *, batch: int | None, layers: int | None, allow_offload: bool = False,
           groups: Groups = "sqrt", max_microbatches: int = 8, factor: int = 1, chunks: bool = True) -> Found:
    """The search of :func:`tune` against any :class:`Oracle` (a fake one in tests).

    Raises:
      RematError: nothing fits (see :func:`tune`).
    """
    s = _Search(oracle, budget, layers=layers, allow_offload=allow_offload, groups=groups,
                max_microbatches=max_microbatches, batch=batch, factor=factor, chunks=chunks)
    preset, dropped = None, []
    try:
        none = s.compile(SearchPoint("none"), "none")
        if none.fits:
            return Found(none, tuple(s.seen), none, (), False)
        base = s.base()
        items, dropped = s.items(base.config)
        if items:
            all_names = [i.name for i in items if i.name not in _DOTS]
            every = s.compile(dataclasses.replace(base.config, policy=_spec(all_names)), "calibration")
            model = _PeakModel()
            model.add(0, base.device_peak_bytes)
            model.add(s.exact(base.config, every.config.policy)[0], every.device_peak_bytes)
            role = "pick"
            for _ in range(4):  # pick, then repair (over budget) or improve (headroom): each adds an anchor
                solved = s.solve(items, model, budget, base.config)
                c = s.confirm(solved[0], role, base.config, model) if solved else None
                if c is None:
                    break  # no answer, or the model's answer did not change
                role = "improve" if c.fits else "repair"
            for spec in s.solve(items, model, budget, base.config, top=RUNNERS_UP + 1)[1:]:  # approximate
                s.confirm(spec, "runner-up", base.config, model)
            if s.best is not None and layers:
                seg = s.segments(s.best.config.policy, items, model, budget, base.config)
                if seg is not None:
                    s.compile(dataclasses.replace(s.best.config, policy=seg), "segments")
            preset = _best_preset(s, base.config, model)
    except _CapReached:
        preset, s.capped = None, True
    fits = [c for c in s.seen if c.fits]
    if not fits:
        raise RematError(f"the compile cap was reached before anything fit the budget of "
                         f"{format_bytes(budget)}: raise max_compiles")
    pick = min(fits, key=lambda c: (c.recompute_flops, c.config.microbatches, c.config.groups is not None,
                                    c.config.loss_chunks, c.device_peak_bytes))
    return Found(pick, tuple(s.seen), preset, tuple(dropped), s.capped)


def _best_preset(s: _Search, base: SearchPoint, model: _PeakModel) -> Candidate | None:
    """The registered preset with the least recompute (FLOPs from traces) that
    fits at ``base``'s chunks, micro-batches and groups, by the model then by
    compiling, in order of recompute."""
    by_flops = []
    floor, _ = s.o.traced(dataclasses.replace(base, policy="full"), s.batch)
    for name in [*default_policies(s.o.names), "full"]:
        p = get_policy(name)
        if (p.offload or p.offload_dots) and not s.allow_offload:
            continue
        config = dataclasses.replace(base, policy=name)
        by_name, flops = s.o.traced(config, s.batch)
        predicted = float(model.predict(sum(max(0, v - floor.get(k, 0)) for k, v in by_name.items())))
        by_flops.append((flops, predicted, config))
    for _, predicted, config in sorted(by_flops, key=lambda x: x[0]):
        if predicted > s.budget * 1.05:
            continue
        c = s.done(config) or s.compile(config, "preset")
        if c.fits:
            return dataclasses.replace(c, role="preset")
    return None


class _CompileOracle:
    """The real oracle: traces and compiles a workload's train step."""

    def __init__(self, workload: Workload, mesh: Any, budget: int, max_compiles: int,
                 compiler_options: dict[str, Any] | None, target: Target, mem_fraction: float | None,
                 knobs: Mapping[str, Any]):
        self.workload, self.mesh, self.target, self.mem_fraction = workload, mesh, target, mem_fraction
        self.budget, self.max_compiles, self.options = budget, max_compiles, compiler_options
        self.knobs = knobs
        self.compiles = 0
        self.on_candidate: Callable[[Candidate], None] | None = None
        self._setups: dict[tuple, TrainStepSetup] = {}
        self._traced: dict[tuple, Any] = {}
        self._reports: dict[tuple, Report] = {}
        self._by_program: dict[str, Report] = {}
        self._baseline: dict[tuple, int] = {}
        self.names: tuple[str, ...] = ()

    def setup(self, config: SearchPoint, batch: int | None) -> TrainStepSetup:
        key = (batch, config.groups, config.loss_chunks, config.microbatches)
        if key not in self._setups:
            self._setups[key] = bind(
                self.workload, mesh=self.mesh, target=self.target, mem_fraction=self.mem_fraction,
                **{**self.knobs, "batch": batch,
                   "groups": config.groups,
                   "loss_chunks": config.loss_chunks if config.loss_chunks != 1 else None,
                   "microbatches": config.microbatches if config.microbatches != 1 else None})
        return self._setups[key]

    def _trace(self, config: SearchPoint, batch: int | None) -> Any:
        key = (config, batch)
        if key not in self._traced:
            self._traced[key] = self.setup(config, batch).trace(config.policy_text, config.policy_text)
        return self._traced[key]

    def baseline_flops(self, config: SearchPoint, batch: int | None) -> int:
        key = (batch, config.groups, config.loss_chunks, config.microbatches)
        if key not in self._baseline:
            b = self.setup(config, batch).baseline()
            self._baseline[key] = count_flops(b.traced.jaxpr.jaxpr)[0]
        return self._baseline[key]

    def traced(self, config: SearchPoint, batch: int | None) -> tuple[dict[str, int], int]:
        t = self._trace(config, batch)
        by_name: dict[str, int] = {}
        for r in residual_rows(t.traced.jaxpr.jaxpr):
            if r.memory_kind == "device":
                by_name[r.name] = by_name.get(r.name, 0) + r.device_bytes
        return by_name, count_flops(t.traced.jaxpr.jaxpr)[0]

    def compiled(self, config: SearchPoint, batch: int | None, role: str) -> Candidate:
        t = self._trace(config, batch)
        report = self._by_program.get(t.program)
        if report is None:
            if self.compiles >= self.max_compiles:
                raise _CapReached
            self.compiles += 1
            s = self.setup(config, batch)
            report = self._by_program[t.program] = s.finish(measure(t, *compile_figures(t, self.options)))
        self._reports[(config, batch)] = report
        if not self.names:
            self.names = report.checkpoint_names
        host = report.host_residual_bytes if report.host_residual_bytes and not report.host_temp_bytes else 0
        device = report.peak_bytes - host
        c = Candidate(config, role, batch, report.peak_bytes, device, report.flops,
                      report.flops - self.baseline_flops(config, batch), device <= self.budget, bool(host))
        if self.on_candidate is not None:
            self.on_candidate(c)
        return c

    def report(self, config: SearchPoint, batch: int | None) -> Report:
        return self._reports[(config, batch)]


def tune(model: ModelLike, budget: int | str | None = None, *, batch: int | str | None = None,
         seq: int | None = None, dtype: str | None = None, mesh: Mesh | Mapping[str, int] | None = None,
         rules: Rules | None = None, allow_offload: bool = False, groups: Groups | str = "sqrt",
         max_microbatches: int = 8, max_compiles: int | None = None,
         compiler_options: dict[str, Any] | None = None,
         on_candidate: Callable[[Candidate], None] | None = None, api: str | None = None,
         target: str | Target = "cpu", attention: str | None = None,
         mem_fraction: float | None = None) -> TuneResult:
    """The configuration with the least recompute FLOPs whose train step fits
    ``budget`` bytes per device (see the module doc for how it searches).

    The search uses only the levers the workload reads
    (:class:`remat.Configuration`'s knobs): nested groups, micro-batches,
    the chunked loss head and ``batch="auto"`` where it reads them, segments
    where it states its layer count; save, recompute or offload per
    checkpoint name and the dots rules always. :attr:`TuneResult.levers`
    lists what was available.

    Args:
      model: a preset name, a ``ModelConfig`` or a :class:`remat.Workload`.
      budget: bytes per device (int) or a size with its unit (``"40GiB"``, ``"4e10B"``);
        None: the target's usable memory (:meth:`remat.Target.usable_bytes`),
        required on ``cpu``, which states none.
      batch: global examples per step (default: the workload's), or
        ``"auto"``: the largest batch that fits.
      seq, dtype, rules, api: a preset's options (:func:`remat.train_step_setup`).
      mesh: a ``jax.sharding.Mesh``, or sizes of the axes ``data``/``fsdp``/``tensor``.
      allow_offload: let names be offloaded to host memory.
      groups: the nested grouping the search may use: ``"sqrt"``, ``(G, K)`` (or its
        flag text ``"G,K"``), or None.
      max_microbatches: the most micro-batches the search may use.
      max_compiles: the cap on compiles (the result says how many it made);
        None: :data:`DEFAULT_MAX_COMPILES`, 40 with ``batch="auto"``.
      compiler_options: as :func:`remat.analyze`.
      on_candidate: called with each configuration as it is compiled.
      target, attention, mem_fraction: as :func:`remat.train_step_setup`.

    Returns:
      A :class:`TuneResult`.

    Raises:
      OffloadUnsupportedError: ``allow_offload`` on a backend without ``pinned_host`` memory.
      RematError: a bad budget or batch, ``batch="auto"`` for a workload
        that does not read the batch, nothing fits (the message names the
        smallest peak reached, by which configuration, its dominant term and
        the levers that shrink it), or the compile cap reached before
        anything fit (with ``batch="auto"``: before the largest batch was found).
    """
    t0 = time.perf_counter()
    tgt = get_target(target)
    prepare_environment(tgt)
    if budget is None:
        budget = tgt.usable_bytes(mem_fraction)
        if budget is None:
            raise RematError(f"target {tgt.name!r} states no device memory: give a budget (bytes per device)")
    budget_bytes = parse_bytes(budget) if isinstance(budget, str) else check_size(budget, budget)
    if budget_bytes <= 0:
        raise RematError(f"budget={budget!r} must be a positive size")
    if max_compiles is not None and (not isinstance(max_compiles, int) or max_compiles < 1):
        raise RematError(f"max_compiles={max_compiles!r} must be a positive integer (the cap on compiles)")
    if batch != "auto" and batch is not None and (not isinstance(batch, int) or batch < 1):
        raise RematError(f"batch={batch!r} must be a positive integer or 'auto'")
    if allow_offload:
        try:
            check_offload(get_policy("minimal_offloaded"), target_devices(tgt, 1)[0])
        except OffloadUnsupportedError as e:
            raise OffloadUnsupportedError(f"allow_offload: {e}. Tune without offloading.") from e
    workload = as_workload(model, seq=seq, dtype=dtype, api=api, rules=rules, target=tgt)
    if max_compiles is None:
        max_compiles = 40 if batch == "auto" else DEFAULT_MAX_COMPILES
    knobs = {"attention": attention}
    oracle = _CompileOracle(workload, mesh, budget_bytes, max_compiles, compiler_options, tgt, mem_fraction,
                            knobs)
    oracle.on_candidate = on_candidate
    read = knobs_read(workload, mesh=mesh, target=tgt)
    if batch == "auto" and "batch" not in read:
        raise RematError(f"batch='auto': workload {workload.name!r} does not read the batch (the knobs it "
                         f"reads: {', '.join(sorted(read)) or 'none'})")
    devices = mesh.size if isinstance(mesh, Mesh) else math.prod(mesh.values()) if mesh else 1
    probe = oracle.setup(SearchPoint("full"), devices if batch == "auto" else batch)  # all batch axes divide
    groups = (parse_groups(groups) if isinstance(groups, str) else groups) if "groups" in read else None
    max_microbatches = max_microbatches if "microbatches" in read else 1
    chunks = "loss_chunks" in read
    levers = ("save, recompute, offload per checkpoint name" if allow_offload
              else "save, recompute per checkpoint name", "dots rules",
              *(("segments",) if workload.layers else ()), *(("nested groups",) if groups else ()),
              *(("micro-batches",) if max_microbatches > 1 else ()), *(("loss chunks",) if chunks else ()),
              *(("batch auto",) if batch == "auto" else ()))
    factor = probe.batch_factor()
    batches: list[Candidate] = []
    if batch == "auto":
        try:
            batch, batches = _largest_batch(oracle, budget_bytes, factor, groups, max_microbatches, chunks)
        except _CapReached:
            raise RematError(f"batch='auto': the compile cap ({max_compiles}) was reached before the largest "
                             "batch that fits was found: raise max_compiles, or give a batch") from None
    else:
        batch = probe.batch
    found = search(oracle, budget_bytes, batch=batch, layers=workload.layers, allow_offload=allow_offload,
                   groups=groups, max_microbatches=max_microbatches, factor=factor, chunks=chunks)
    return TuneResult(
        model=workload.name, batch=batch, seq=workload.seq, budget_bytes=budget_bytes, chosen=found.pick,
        report=oracle.report(found.pick.config, batch), candidates=found.candidates,
        compiles=oracle.compiles, preset=found.preset, dropped_names=found.dropped_names,
        wall_seconds=time.perf_counter() - t0, batches=tuple(batches), capped=found.capped, levers=levers)


def _frugal(batch: int, factor: int, groups: Groups, max_microbatches: int, chunks: bool) -> SearchPoint:
    k = max(_microbatches(batch, factor, max_microbatches))
    return SearchPoint("full", groups=groups, loss_chunks=LOSS_CHUNKS if chunks else 1, microbatches=k)


def _largest_batch(oracle: _CompileOracle, budget: int, factor: int, groups: Groups,
                   max_microbatches: int, chunks: bool) -> tuple[int, list[Candidate]]:
    """The largest multiple of ``factor`` whose most frugal configuration fits
    (doubling, then bisecting; see the module doc), and every batch tried."""
    tried: dict[int, Candidate] = {}

    def fits(b: int) -> bool:
        if b not in tried:  # nested groups are not always more frugal: without them first
            for g in dict.fromkeys((None, groups)):
                tried[b] = oracle.compiled(_frugal(b, factor, g, max_microbatches, chunks), b, "batch")
                if tried[b].fits:
                    break
        return tried[b].fits

    lo, hi = 0, factor
    while fits(hi):
        lo, hi = hi, hi * 2
    if lo == 0:
        c = tried[factor]
        raise RematError(f"no batch fits the budget of {format_bytes(budget)} per device: the smallest, "
                         f"{factor}, peaks at {format_bytes(c.device_peak_bytes)} with {c.config.flags()}")
    while hi - lo > factor:
        mid = (lo + hi) // 2 // factor * factor
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    fits(lo + factor)  # the next batch up was compiled and does not fit
    return lo, [tried[b] for b in sorted(tried)]


def __getattr__(name: str) -> Any:
    if name == "TuneConfig":  # the old name, for one release
        warnings.warn("remat.TuneConfig is deprecated: it is remat.SearchPoint (one point of the search)",
                      DeprecationWarning, stacklevel=2)
        return SearchPoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
