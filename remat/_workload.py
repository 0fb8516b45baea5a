"""Workloads: any model's train step, as ``inspect``, ``sweep`` and ``tune`` take it.

A :class:`Workload` is a function from a :class:`Configuration` (a remat
policy plus the knobs the workload reads: global batch, micro-batches,
nested groups, loss chunks, attention) and a device mesh to a
:class:`TrainStep` (the step function, its abstract arguments, which of
them are parameters, optimizer state and batch, what it donates and how its
outputs are sharded). The built-in model presets are workloads of the same
kind (:func:`remat.step.lm_workload`), so there is one path through the
tools. :func:`bind` fixes a workload's configuration, mesh and target: a
:class:`TrainStepSetup`, which traces the step under any policy.

A knob counts as declared when the workload's function reads it: the
attributes of the configuration it reads are recorded at each build, and a
knob set to something other than its default that the function never read
is an error, never a silent no-op. Segments (``"8x SPEC; 24x SPEC"``
policies) need the layer count the policy's segments split
(:attr:`Workload.layers`).

The pattern follows how JAX itself takes a step: ``jax.jit(fn,
donate_argnums=..., out_shardings=...).trace(*args)`` on
``jax.ShapeDtypeStruct`` arguments (JAX's "ahead-of-time lowering and
compilation" docs), so nothing is allocated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from remat import _compat
from remat._analysis import Traced, device_bytes, trace, trace_without_remat
from remat._apply import PolicyLike, check_offload
from remat._errors import OffloadUnsupportedError, RematError
from remat._mesh import batch_factor, check_batch, make_mesh
from remat._report import Report
from remat._scan import Groups, is_segment_text
from remat._targets import TARGETS, Target, get_target, prepare_environment, target_mesh
from remat.policies import get as get_policy

_compat.hide_frames(__file__)

__all__ = ["KNOBS", "ROLES", "Configuration", "TrainStep", "TrainStepSetup", "Workload", "bind", "knobs_read",
           "load_workload"]

KNOBS: tuple[str, ...] = ("batch", "microbatches", "groups", "loss_chunks", "attention")
"""The knobs of a :class:`Configuration` beside its policy, each a lever a
workload may read."""

ROLES: tuple[str, ...] = ("parameters", "optimizer state", "batch")
"""What a step's argument is, as the peak by term names it (anything that is
neither parameters nor optimizer state, e.g. a PRNG key, is ``"batch"``)."""


@dataclasses.dataclass(frozen=True)
class Configuration:
    """One point of a workload's space: a remat policy and the knobs.

    Attributes:
      policy: a policy name, spec string, :class:`remat.Policy` or JAX
        policy callable; segments ``"8x SPEC; 24x SPEC"`` where the workload
        states :attr:`Workload.layers`. The workload passes it to its own
        :func:`remat.scan_layers` or :func:`remat.remat`.
      batch: global examples per step (>= 1).
      microbatches: gradient accumulation over this many micro-batches of
        ``batch / microbatches`` examples (>= 1).
      groups: nested checkpointing of a layer scan, ``None``, ``(G, K)`` or
        ``"sqrt"`` (:func:`remat.scan_layers`).
      loss_chunks: compute the loss head in this many chunks (>= 1).
      attention: the attention implementation, or None for the workload's
        default (:data:`remat.models.config.ATTENTION_IMPLS` for the presets).
    """

    policy: PolicyLike = "full"
    batch: int = 1
    microbatches: int = 1
    groups: Groups = None
    loss_chunks: int = 1
    attention: str | None = None

    def __post_init__(self) -> None:
        """Raises :class:`remat.RematError` for a count below 1."""
        for k in ("batch", "microbatches", "loss_chunks"):
            v = object.__getattribute__(self, k)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                raise RematError(f"{k}={v!r} must be a positive integer")


class _Recording(Configuration):
    """A :class:`Configuration` that records which knobs are read."""

    def __getattribute__(self, name: str) -> Any:
        if name in KNOBS:
            with contextlib.suppress(AttributeError):  # a copy the build made: not recorded
                object.__getattribute__(self, "_read").add(name)
        return object.__getattribute__(self, name)


def _recording(c: Configuration) -> _Recording:
    r = _Recording(**{f.name: getattr(c, f.name) for f in dataclasses.fields(Configuration)})
    object.__setattr__(r, "_read", set())
    return r


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A built train step, as ``jax.jit`` takes it.

    Attributes:
      fn: the step, e.g. ``(params, opt_state, batch) -> (params, opt_state, loss)``,
        not jitted; it computes gradients (the residual rows are empty without
        a backward pass).
      args: its positional arguments: pytrees of ``jax.ShapeDtypeStruct``
        (or arrays). Under a mesh, a leaf without a sharding is replicated on it.
      roles: a pytree prefix of ``args`` whose leaves are :data:`ROLES`, e.g.
        ``("parameters", "optimizer state", "batch")``: the peak by term and
        ``parameter_bytes``/``optimizer_bytes``/``batch_bytes`` follow it.
      donate_argnums: arguments whose buffers the outputs may reuse (the
        parameters and optimizer state, as in training).
      out_shardings: as ``jax.jit``'s (None: the compiler's choice).
      context: a zero-argument callable returning a context manager to trace
        under besides ``jax.set_mesh(mesh)`` (e.g. flax's
        ``nn.logical_axis_rules``), or None.
      rules: the logical-axis rules the shardings follow, recorded in the
        report under a mesh (``Report.rules``); () when there are none.
    """

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    roles: Any
    donate_argnums: int | tuple[int, ...] = ()
    out_shardings: Any = None
    context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
    rules: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class Workload:
    """A train step that the tools measure and search, whoever wrote it.

    Attributes:
      name: what tables and reports call it.
      build: ``build(configuration, mesh) -> TrainStep``: the step under
        ``configuration.policy`` with the knobs it reads (see the module doc),
        its arguments sharded on ``mesh`` (None: one device). Called once per
        configuration traced, so keep it cheap (``jax.eval_shape`` for the
        abstract state).
      defaults: the configuration a knob left out takes.
      batch_axes: the mesh axes that split the batch (``batch="auto"``
        searches multiples of their product; a batch they do not divide is an
        error).
      layers: the layer count of the scan the policy applies to, if its
        segments may split it (``"8x SPEC; 24x SPEC"``); None: no segments.
      seq: tokens (or positions) per example, shown in titles; None: not a sequence model.
      notes: what every report of it says besides (e.g. the defaults a
        config file left to apply).
    """

    name: str
    build: Callable[[Configuration, Mesh | None], TrainStep]
    defaults: Configuration = Configuration()
    batch_axes: tuple[str, ...] = ("data", "fsdp")
    layers: int | None = None
    seq: int | None = None
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Raises :class:`remat.RematError` when ``build`` is not callable."""
        if not callable(self.build):
            raise RematError(f"Workload {self.name!r}: build={self.build!r} is not callable")


def bind(workload: Workload, *, mesh: Mesh | Mapping[str, int] | None = None, target: str | Target = "cpu",
         mem_fraction: float | None = None, **knobs: Any) -> TrainStepSetup:
    """Fix ``workload``'s knobs, mesh and target: the :class:`TrainStepSetup`
    that traces its step under any policy.

    Args:
      workload: a :class:`Workload`.
      mesh: a ``jax.sharding.Mesh``, or sizes of the axes ``data``/``fsdp``/
        ``tensor`` (``{"fsdp": 8}``) on ``target``'s devices; None: one
        device (on a target other than cpu, one of its compile-only devices).
      target: a :data:`remat.TARGETS` name or :class:`remat.Target`.
      mem_fraction: the fraction of the target's memory the runtime may
        allocate (None: the target's default).
      **knobs: :data:`KNOBS` values; None (or left out) takes ``workload.defaults``'.

    Raises:
      RematError: an unknown knob; a knob set that the workload never reads
        (the message names the knobs it reads); an argument that is not an
        array or ``jax.ShapeDtypeStruct`` (named by its path); roles that are
        not a prefix of the arguments or not :data:`ROLES`; a batch the batch
        axes and micro-batches do not divide; and the errors of the target and mesh.
    """
    if not isinstance(workload, Workload):
        raise RematError(f"{workload!r} is not a remat.Workload")
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise RematError(f"unknown knob(s) {', '.join(unknown)}: valid are {', '.join(KNOBS)}")
    tgt = get_target(target)
    prepare_environment(tgt)  # before JAX starts its backends
    tgt.usable_bytes(mem_fraction)  # checks the fraction
    given = {k: v for k, v in knobs.items() if v is not None}
    configuration = dataclasses.replace(workload.defaults, **given)
    on = _make_mesh(mesh, tgt)
    if on is not None and (missing := sorted(set(workload.batch_axes) - set(on.axis_names))):
        raise RematError(f"workload {workload.name!r}: batch axes {', '.join(missing)} are not axes of the "
                         f"mesh ({', '.join(on.axis_names)})")
    s = TrainStepSetup(workload, configuration, on, tgt, mem_fraction)
    s.step(configuration.policy)  # records the knobs read, checks the arguments and roles
    unread = sorted(k for k in given if k not in s.knobs and given[k] != getattr(workload.defaults, k))
    if unread:
        raise RematError(f"workload {workload.name!r} does not read {', '.join(unread)} (the knobs it reads: "
                         f"{', '.join(sorted(s.knobs)) or 'none'}): leave "
                         f"{'it' if len(unread) == 1 else 'them'} out")
    if "batch" in s.knobs:  # the batch splits over the batch axes, each micro-batch too
        check_batch(configuration.batch, on, (("activation_batch", workload.batch_axes),),
                    configuration.microbatches if "microbatches" in s.knobs else 1)
    return s


def _make_mesh(mesh: Mesh | Mapping[str, int] | None, target: Target) -> Mesh | None:
    """The mesh of ``mesh`` on ``target``'s devices (None: one device on cpu)."""
    if mesh is None and target.platform == "cpu":
        return None
    if target.platform == "cpu" or isinstance(mesh, Mesh):
        return make_mesh(mesh)  # type: ignore[arg-type]
    return target_mesh(target, mesh or {})


def knobs_read(workload: Workload, *, mesh: Mesh | Mapping[str, int] | None = None,
               target: str | Target = "cpu") -> frozenset[str]:
    """The knobs ``workload``'s function reads at its default configuration
    (one build, nothing checked), e.g. to know which levers a search has."""
    tgt = get_target(target)
    prepare_environment(tgt)
    s = TrainStepSetup(workload, workload.defaults, _make_mesh(mesh, tgt), tgt)
    s.step(workload.defaults.policy)
    return frozenset(s.knobs)


@dataclasses.dataclass(frozen=True)
class TrainStepSetup:
    """A workload bound to its knobs, mesh and target (see :func:`bind`):
    the abstract train step shared by every policy.

    Attributes:
      workload: the :class:`Workload`.
      configuration: its knobs (the policy is given per trace).
      mesh: the device mesh, or None for one device.
      target: what the step is compiled for (:class:`remat.Target`; ``cpu``
        is this host's XLA:CPU).
      mem_fraction: the fraction of the target's memory the runtime may
        allocate (None: the target's default); see :meth:`remat.Target.usable_bytes`.
      knobs: the knobs the workload's function read (see the module doc).
    """

    workload: Workload
    configuration: Configuration
    mesh: Mesh | None = None
    target: Target = TARGETS["cpu"]
    mem_fraction: float | None = None
    knobs: set[str] = dataclasses.field(default_factory=set, compare=False)

    @property
    def batch(self) -> int | None:
        """Global examples per step, None where the workload does not read the batch."""
        return self.configuration.batch if "batch" in self.knobs else None

    @property
    def seq(self) -> int | None:
        """The workload's :attr:`Workload.seq`."""
        return self.workload.seq

    @property
    def groups(self) -> Groups:
        """The nested groups (None where the workload does not read them)."""
        return self.configuration.groups if "groups" in self.knobs else None

    @property
    def microbatches(self) -> int:
        """The micro-batches (1 where the workload does not read them)."""
        return self.configuration.microbatches if "microbatches" in self.knobs else 1

    def batch_factor(self) -> int:
        """How many ways the mesh splits the batch: the product of the
        workload's batch axes (1 without a mesh)."""
        if self.mesh is None:
            return 1
        return batch_factor(self.mesh, (("activation_batch", self.workload.batch_axes),))

    def device(self) -> jax.Device:
        """A device the step is compiled for (the mesh's, else JAX's default)."""
        return self.mesh.devices.flat[0] if self.mesh is not None else jax.devices()[0]

    def can_offload(self) -> bool:
        """Whether the target's devices can offload residuals to host memory
        (:func:`remat._apply.check_offload`: its memories and a probe compile)."""
        try:
            check_offload(get_policy("minimal_offloaded"), self.device())
        except OffloadUnsupportedError:
            return False
        return True

    def step(self, policy: PolicyLike) -> TrainStep:
        """The workload's step under ``policy`` at this setup's knobs; the
        knobs it reads are added to :attr:`knobs`. Under a mesh, argument
        leaves without a sharding are replicated on it.

        Raises:
          RematError: a policy with segments for a workload without
            :attr:`Workload.layers`, ``build`` returned no :class:`TrainStep`, an argument
            leaf is not an array, or the roles are not a prefix of the
            arguments with :data:`ROLES` leaves.
        """
        if is_segment_text(policy) and self.workload.layers is None:
            raise RematError(f"workload {self.workload.name!r} states no layer count (Workload.layers), so "
                             f"its policy cannot have segments: {policy!r}")
        c = _recording(dataclasses.replace(self.configuration, policy=policy))
        built = self.workload.build(c, self.mesh)
        self.knobs.update(object.__getattribute__(c, "_read"))
        if not isinstance(built, TrainStep):
            raise RematError(f"workload {self.workload.name!r}: build returned a {type(built).__name__}, "
                             "not a remat.TrainStep")
        args = tuple(built.args)
        for path, leaf in jax.tree_util.tree_leaves_with_path(args):
            if not isinstance(leaf, jax.ShapeDtypeStruct | jax.Array | np.ndarray):
                where, what = f"args{jax.tree_util.keystr(path)}", type(leaf).__name__
                raise RematError(f"workload {self.workload.name!r}: argument {where} is a {what} "
                                 f"({leaf!r:.60}), not an array: give a jax.ShapeDtypeStruct (or close over "
                                 "it in fn)")
        if self.mesh is not None:
            whole = NamedSharding(self.mesh, PartitionSpec())
            args = jax.tree.map(lambda x: x if getattr(x, "sharding", None) is not None
                                else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole), args)
        _flat_roles(self.workload.name, built.roles, args)
        return dataclasses.replace(built, args=args)

    def context(self, step: TrainStep) -> contextlib.ExitStack:
        """Where ``step`` is traced: under ``jax.set_mesh(mesh)`` and its own context."""
        stack = contextlib.ExitStack()
        if self.mesh is not None:
            stack.enter_context(jax.set_mesh(self.mesh))
        if step.context is not None:
            stack.enter_context(step.context())
        return stack

    def trace(self, policy: PolicyLike, label: str) -> Traced:
        """Trace and lower the step under ``policy``, its arguments labelled by role."""
        step = self.step(policy)
        with self.context(step):
            t = trace(step.fn, step.args, {}, label, donate_argnums=step.donate_argnums,
                      out_shardings=step.out_shardings)
        return _with_roles(t, self.workload.name, step)

    def baseline(self) -> Traced:
        """The step with no ``jax.checkpoint`` that remat applies
        (:func:`remat._analysis.trace_without_remat`): the baseline of every overhead."""
        step = self.step("full")
        with self.context(step):
            t = trace_without_remat(step.fn, step.args, {}, donate_argnums=step.donate_argnums,
                                    out_shardings=step.out_shardings)
        return _with_roles(t, self.workload.name, step)

    def argument_split(self, step: TrainStep | None = None) -> dict[str, int]:
        """Bytes per device of the step's arguments by role: ``parameter_bytes``,
        ``optimizer_bytes`` and ``batch_bytes`` (``step``: the built step, else
        built under the configuration's policy)."""
        step = step or self.step(self.configuration.policy)
        split = dict.fromkeys(ROLES, 0)
        for role, leaf in zip(_flat_roles(self.workload.name, step.roles, step.args),
                              jax.tree.leaves(step.args), strict=True):
            split[role] += device_bytes(leaf)
        return {"parameter_bytes": split["parameters"], "optimizer_bytes": split["optimizer state"],
                "batch_bytes": split["batch"]}

    def finish(self, report: Report) -> Report:
        """``report`` with what the setup knows: the mesh, the argument split
        the logical-axis rules under it and the target (its name, usable memory
        and rates)."""
        mesh = tuple(self.mesh.shape.items()) if self.mesh is not None else ()
        step, t = self.step(self.configuration.policy), self.target
        return report.replace(
            mesh=mesh, rules=step.rules if mesh else (), target=t.name,
            notes=(*report.notes, *self.workload.notes),
            limit_bytes=t.usable_bytes(self.mem_fraction), peak_flops_per_s=t.peak_flops_per_s,
            host_link_bytes_per_s=t.host_link_bytes_per_s, **self.argument_split(step))


def _flat_roles(name: str, roles: Any, args: tuple) -> list[str]:
    """One role per leaf of ``args`` (``roles`` is a prefix of it)."""
    try:
        per = jax.tree.map(lambda r, sub: [r] * len(jax.tree.leaves(sub)), roles, args)
    except (ValueError, TypeError) as e:
        raise RematError(f"workload {name!r}: roles {roles!r:.120} are not a pytree prefix of the arguments "
                         f"({e})") from None
    flat = [r for rs in jax.tree.leaves(per, is_leaf=lambda x: isinstance(x, list)) for r in rs]
    if bad := sorted({r for r in flat if r not in ROLES}, key=str):
        raise RematError(f"workload {name!r}: roles {bad!r} are not among {', '.join(map(repr, ROLES))}")
    return flat


def _with_roles(t: Traced, name: str, step: TrainStep) -> Traced:
    """``t`` with the role of each argument by JAX's argument name (what the
    compiled program's parameters carry as ``op_name``)."""
    names = t.traced.jaxpr.jaxpr.debug_info.arg_names
    roles = _flat_roles(name, step.roles, step.args)
    t.roles = dict(zip(names, roles, strict=True)) if names and len(names) == len(roles) else {}
    return t


def load_workload(text: str) -> Workload:
    """The workload that ``"module:attribute"`` names (the ecosystem's entry-point
    form, as uvicorn and gunicorn take an app): the attribute is a
    :class:`Workload` or a zero-argument function returning one. The
    current directory is importable, as it is for ``python -m``.

    Raises:
      RematError: the text is not ``module:attribute``, the module cannot be
        imported, it has no such attribute, or it is not a workload.
    """
    module, sep, attribute = text.partition(":")
    if not sep or not module or not attribute:
        raise RematError(f"{text!r} is not module:attribute (e.g. mypkg.train:workload)")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise RematError(f"cannot import {module!r} (from {text!r}): {e}") from None
    value: Any = mod
    for part in attribute.split("."):
        if not hasattr(value, part):
            found = sorted(k for k, v in vars(mod).items() if isinstance(v, Workload))
            raise RematError(f"module {module!r} has no attribute {attribute!r}"
                             + (f" (its workloads: {', '.join(found)})" if found else ""))
        value = getattr(value, part)
    if callable(value) and not isinstance(value, Workload):
        value = value()
    if not isinstance(value, Workload):
        raise RematError(f"{text} is a {type(value).__name__}, not a remat.Workload (or a zero-argument "
                         "function returning one)")
    return value
