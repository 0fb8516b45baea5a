"""The one walker over jaxprs: every equation of a jaxpr and of its
sub-jaxprs (``jit``/``pjit`` and ``remat`` bodies, ``scan``/``while``/``cond``
bodies, custom-derivative functions), with the product of the enclosing scan
lengths. Name validation, residual analysis, FLOP and matmul counting all
walk through :func:`walk`; nothing else in ``remat`` recurses into jaxprs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from jax.extend import core as jcore

from remat import _compat

_compat.hide_frames(__file__)

CALL_BODY = {"jit": "jaxpr", "pjit": "jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr",
             "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
             "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
             "custom_vjp_call_jaxpr": "fun_jaxpr"}
"""Call-like primitives, with the parameter that holds their body: the body
maps the equation's inputs to its outputs one to one, so it can be inlined."""
CHECKPOINT = frozenset({"remat2", "checkpoint"})
"""The primitive of ``jax.checkpoint`` (``remat2`` in the jaxpr of a step)."""


def open_jaxpr(j: Any) -> jcore.Jaxpr:
    """The ``Jaxpr`` of a ``ClosedJaxpr`` (or the ``Jaxpr`` itself)."""
    return j.jaxpr if isinstance(j, jcore.ClosedJaxpr) else j


def nbytes(aval: Any) -> int:
    """Bytes of an abstract value: ``prod(shape) * itemsize``."""
    return int(math.prod(aval.shape)) * np.dtype(aval.dtype).itemsize


def call_body(eqn: Any) -> jcore.Jaxpr | None:
    """The body of a call-like equation (see :data:`CALL_BODY`) whose inputs
    and outputs match the equation's one to one; None otherwise."""
    key = CALL_BODY.get(eqn.primitive.name)
    if key is None or key not in eqn.params:
        return None
    body = open_jaxpr(eqn.params[key])
    return body if len(body.invars) == len(eqn.invars) else None


def sub_jaxprs(eqn: Any) -> list[tuple[jcore.Jaxpr, int]]:
    """``(sub-jaxpr, trips)`` for every jaxpr in the parameters of ``eqn``;
    ``trips`` is the scan length for a ``scan`` body, the number of grid
    points for a Pallas kernel (``pallas_call``: its body runs once per
    point of ``grid_mapping.grid``, on one block), the number of shards for
    a ``shard_map`` body (it runs on one shard, once per device of its
    manual mesh axes), and 1 otherwise (a ``while`` body's trip count is
    unknown). So FLOPs and host traffic counted through :func:`walk` stay
    global, inside a ``shard_map`` too."""
    name = eqn.primitive.name
    if name == "scan":
        trips = eqn.params["length"]
    elif name == "pallas_call":
        trips = math.prod(eqn.params["grid_mapping"].grid)
    elif name == "shard_map":
        mesh = eqn.params["mesh"]
        manual = eqn.params.get("newly_manual_axes", eqn.params.get("manual_axes", mesh.axis_names))
        trips = math.prod(mesh.shape[a] for a in manual)
    else:
        trips = 1
    return [(open_jaxpr(j), trips) for j in jcore.jaxprs_in_params(eqn.params)]


@dataclasses.dataclass(frozen=True)
class Scope:
    """Where an equation sits.

    Attributes:
      trips: how many times it runs per call: the product of the lengths of
        the enclosing scans.
      enclosing: the equations whose sub-jaxprs hold it, outermost first.
      ctx: an id of the sub-jaxpr instance it belongs to (0: the top level);
        one body reached twice gets two ids.
    """

    trips: int = 1
    enclosing: tuple[Any, ...] = ()
    ctx: int = 0

    @property
    def transposed(self) -> bool:
        """Inside an equation of a backward pass (see :func:`remat._compat.is_transposed`)."""
        return any(_compat.is_transposed(e) for e in self.enclosing)


@dataclasses.dataclass(frozen=True)
class Step:
    """One equation of :func:`walk`: ``eqn`` at ``scope``; ``inner`` are the
    scopes its sub-jaxprs get, in :func:`sub_jaxprs` order (empty when the
    walk does not go into them)."""

    eqn: Any
    scope: Scope
    inner: tuple[Scope, ...]


def walk(jaxpr: Any, into: Callable[[Any], bool] = lambda eqn: True) -> Iterator[Step]:
    """Every equation of ``jaxpr`` and, where ``into(eqn)`` is true, of its
    sub-jaxprs, depth first, each equation before its sub-jaxprs.

    Args:
      jaxpr: a ``Jaxpr`` or ``ClosedJaxpr``.
      into: which equations to go into; default all.
    """
    ids = itertools.count(1)

    def go(j: jcore.Jaxpr, scope: Scope) -> Iterator[Step]:
        for eqn in j.eqns:
            subs = sub_jaxprs(eqn) if into(eqn) else []
            inner = tuple(Scope(scope.trips * trips, (*scope.enclosing, eqn), next(ids)) for _, trips in subs)
            yield Step(eqn, scope, inner)
            for (sub, _), s in zip(subs, inner, strict=True):
                yield from go(sub, s)

    return go(open_jaxpr(jaxpr), Scope())


def checkpoint_names(jaxpr: Any) -> frozenset[str]:
    """Every checkpoint name (``jax.ad_checkpoint.checkpoint_name``) in a
    jaxpr and its sub-jaxprs."""
    return frozenset(n for s in walk(jaxpr) if (n := _compat.eqn_checkpoint_name(s.eqn)) is not None)
