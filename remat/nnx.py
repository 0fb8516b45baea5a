"""``remat.nnx``: the policies of :mod:`remat` on Flax NNX modules.

The same policy names and specs, the same checks at first trace (a name the
module never emits, a name never kept), static arguments by name and keyword
arguments as :func:`remat.remat` and :func:`remat.scan_layers` for linen:

- :func:`remat`: an ``nnx.Module`` class whose methods are rematerialized.
- :func:`scan_layers`: a stack of identical NNX layers, scanned, each layer
  under a policy (or per-segment policies), with nested ``groups``.
- :func:`stack_layers`: the one recipe that creates the stacked layers with
  their own RNG streams per layer.

How state crosses the transforms (the NNX functional API, "split, merge,
update"; Flax guide "Flax NNX vs JAX transformations"): the module is split
into a graph definition and its state; a pure function merges a copy
(``nnx.merge(..., copy=True)``: flax 0.12 refuses to mutate variables that
were made outside the transform),
calls the method and returns its outputs together with the variables the
call changed (RNG counters, statistics, any variable the method assigns);
``jax.checkpoint`` / ``lax.scan`` run that pure function; the changes are
written back with ``nnx.update``. A method that mutates state is therefore
supported under remat (``nnx.remat`` on a bound method raises instead), and
nothing here closes over a live module inside a JAX transform (which fails
with Flax's ``TraceContextError`` once the module owns an RNG stream).
``jax.checkpoint`` is used rather than ``nnx.remat`` because ``nnx.remat``
takes static arguments by position only (flax 0.12) and a nested group scan
needs the layer state reshaped, which only the split state allows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import flax.errors
import jax
import jax.numpy as jnp
from flax import nnx

from remat import _compat
from remat._apply import (
    MethodCall,
    Probe,
    RematMethod,
    abstract,
    check_target,
    remat_class,
)
from remat._errors import RematError
from remat._scan import Groups, LayerScan, PolicyArg, ScanOps, Segment, check_num_layers
from remat.policies import Policy

__all__ = ["LayerAxes", "remat", "scan_layers", "stack_layers"]

_compat.hide_frames(__file__)

M = TypeVar("M", bound=type[nnx.Module])

LayerAxes = Mapping[type[nnx.Variable], int]
"""The layer axis of stacked variables, by variable type (the most derived
matching type wins; types not listed: axis 0), e.g. ``{nnx.RngState: 1}``.
Never inferred from an array's rank: an RNG key ``[L]`` and a bias ``[D]``
have the same rank."""


def _value(v: Any) -> Any:
    return v.get_value() if isinstance(v, nnx.Variable) else v


def _pure(graphdef: Any, call: Callable[[Any, Any], Any],
          statics: dict[str, Any] | None = None) -> Callable[..., Any]:
    """``fn(state, dynamic) -> (outputs, changed)``: merge a copy of the module,
    run ``call(module, dynamic)``, and return, besides its outputs, the
    variables the call assigned or created (an ``nnx.State`` of those only: a
    parameter the call does not touch is not returned, so no copy of it is
    made). The copy's plain (static) attributes after the call, which no JAX
    transform carries out, go to ``statics["after"]`` (:func:`_static_attrs`),
    at trace time."""

    def fn(state: nnx.State, dynamic: Any) -> tuple[Any, nnx.State]:
        before = {path: _value(v) for path, v in nnx.to_flat_state(state)}
        module = nnx.merge(graphdef, state, copy=True)
        out = call(module, dynamic)
        changed = [(path, v) for path, v in nnx.to_flat_state(nnx.state(module))
                   if path not in before or _value(v) is not before[path]]
        if statics is not None:
            statics["after"] = _static_attrs(module)
        return out, nnx.from_flat_state(changed)

    return fn


_INTERNAL = frozenset({"_pytree__state", "_pytree__nodes", "_object__state"})
Statics = dict[tuple[Any, ...], dict[str, Any]]
"""Per graph node path: its plain (static) attributes, see :func:`_static_attrs`."""


def _static_attrs(root: Any) -> Statics:
    """Per graph node of ``root`` (by path): its plain Python attributes, the
    static ones (``self.calls = 0``: not a Variable, not a submodule, not
    data), which live in the graph definition, not in the state."""
    out = {}
    for path, node in nnx.iter_graph(root):
        if not isinstance(node, nnx.Module):
            continue
        data = getattr(node, "_pytree__nodes", {})
        out[tuple(path)] = {
            k: v for k, v in vars(node).items()
            if k not in _INTERNAL and not data.get(k) and not isinstance(v, nnx.Variable)
            and not nnx.graph.is_graph_node(v)}
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return a is b or (type(a) is type(b) and bool(a == b))
    except Exception:  # arrays and other values without a plain == answer
        return False


def _static_changes(before: Statics, after: Statics) -> list[tuple[tuple[Any, ...], str, Any]]:
    """``(node path, attribute, new value)`` for each static attribute the call
    assigned (``_DELETED`` as the value of one it deleted)."""
    out = []
    for path, attrs in after.items():
        old = before.get(path, {})
        out += [(path, k, v) for k, v in attrs.items() if k not in old or not _same(old[k], v)]
        out += [(path, k, _DELETED) for k in old if k not in attrs]
    return out


_DELETED = object()


def _write_statics(module: nnx.Module, before: Statics, statics: dict[str, Any],
                   where: str, *, stacked: bool = False, prefix: str = "") -> None:
    """Write the plain attributes the call changed back to ``module``, as NNX
    writes them back (``nnx.remat(graph_updates=True)``, or no transform).

    Raises:
      RematError: a traced value (an array computed in the call) assigned to a
        plain attribute, which would leak a tracer; or, with ``stacked`` (a
        layer scan), any change: one plain attribute cannot hold a value per
        layer.
    """
    changes = _static_changes(before, statics.get("after", before))
    if not changes:
        return
    live = {tuple(p): n for p, n in nnx.iter_graph(module)}
    names = ", ".join(prefix + "/".join(map(str, (*p, k))) for p, k, _ in changes)
    if stacked:
        raise RematError(
            f"{where}: a layer changed the plain Python attribute(s) {names}, which one stacked module "
            "cannot hold per layer; keep such state in an nnx.Variable (e.g. nnx.BatchStat or a Variable "
            "subclass of your own), which is stacked and written back per layer")
    traced = [prefix + "/".join(map(str, (*p, k))) for p, k, v in changes
              if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(v))]
    if traced:
        raise RematError(
            f"{where}: the call assigned a traced array to the plain Python attribute(s) "
            f"{', '.join(traced)}, which cannot leave jax.checkpoint; make it an nnx.Variable "
            "(e.g. self.x = nnx.Variable(value), or nnx.BatchStat), which is written back")
    for path, k, v in changes:
        node = live.get(path)
        if node is None:
            raise RematError(f"{where}: the call created the submodule {prefix + '/'.join(map(str, path))}; "
                             "create submodules in __init__")
        try:
            if v is _DELETED:
                delattr(node, k)
            else:
                setattr(node, k, v)
        except flax.errors.TraceContextError as e:
            raise RematError(
                f"{where}: the call changed the plain attribute(s) {names} of a live NNX module that a plain "
                "JAX transform closes over; use the nnx transforms (nnx.jit, nnx.grad, ...)") from e


def _probe(fn: Callable[..., Any]) -> Probe:
    """The name-check probe of a pure function: its state and arguments are
    the differentiated inputs (every float leaf), its outputs the method's."""
    return lambda d: ({}, lambda _, dd: fn(dd["state"], dd["args"])[0])


def _update(module: nnx.Module, changed: nnx.State, where: str, prefix: str = "") -> None:
    """``nnx.update``, with Flax's trace-context error turned into what to do
    (the changed paths named from the user's module: ``prefix`` + path)."""
    try:
        nnx.update(module, changed)
    except flax.errors.TraceContextError as e:
        paths = ", ".join(prefix + "/".join(map(str, p)) for p, _ in nnx.to_flat_state(changed))
        raise RematError(
            f"{where}: the call changed variables ({paths}) of a live NNX module that a plain JAX "
            "transform (jax.grad, jax.jit, lax.scan, jax.checkpoint) closes over. Use the nnx "
            "transforms (nnx.grad, nnx.jit, ...), or thread the state: graphdef, state = "
            "nnx.split(model); inside the transform model = nnx.merge(graphdef, state, copy=True), "
            "call it, return nnx.state(model); then "
            "nnx.update(model, new_state).") from e


def _signature(state: nnx.State) -> tuple[Any, ...]:
    """A hashable summary of a state's structure, shapes and dtypes."""
    return tuple((path, type(v).__name__, tuple(jnp.shape(_value(v))), str(jnp.result_type(_value(v))))
                 for path, v in nnx.to_flat_state(state))


def remat(module_cls: M, policy: str | Policy, *, static_argnames: str | Sequence[str] = (),
          static_argnums: int | Sequence[int] = (), prevent_cse: bool = True,
          methods: Sequence[str] | None = None) -> M:
    """:func:`remat.remat` for NNX: an ``nnx.Module`` subclass of
    ``module_cls`` (same constructor, same state) whose methods run under
    ``jax.checkpoint`` with ``policy``.

    Static arguments are given by name (``nnx.remat`` takes only
    ``static_argnums``), or by position (``self`` is 0); arguments pass
    through as given, and defaults the caller never passed stay Python
    values; a method may
    assign variables (RNG counters advance, counters and statistics update)
    and plain Python attributes (``self.calls += 1``), which are written back
    to the module after the call, as without remat or under
    ``nnx.remat(graph_updates=True)``. ``"none"`` returns ``module_cls`` itself.

    Example::

        RematBlock = remat.nnx.remat(Block, "minimal", static_argnames=("deterministic",))
        block = RematBlock(config, rngs=nnx.Rngs(0))
        y_BxTxD = block(x_BxTxD, deterministic=False)

    Args:
      module_cls: an ``nnx.Module`` subclass.
      policy: a preset name, spec string or :class:`remat.Policy`.
      static_argnames: parameters that are Python constants at trace time
        (e.g. ``"deterministic"``); hashable values only.
      static_argnums: the same by position (``self`` is 0, the first argument 1).
      prevent_cse: as in :func:`remat.checkpoint` (a bool).
      methods: the methods to wrap; default ``["__call__"]``.

    Raises:
      RematTargetError: ``module_cls`` is not an ``nnx.Module`` class (an
        instance, a bound method, a function, a linen class).
      RematError: a static name that is not a parameter of a wrapped method;
        at call time, a change to a live module that a plain JAX transform
        closes over (the message says how to thread the state), or a traced
        array assigned to a plain attribute (it cannot leave the checkpoint).
      MissingCheckpointNameError: at first trace, a policy name the module
        never emits.
      NeverKeptError: at first trace, none of the policy's names is ever kept.
      TypeError: at call time, an unhashable value for a static argument.
    """
    check_target(module_cls, nnx.Module, "remat.nnx.remat")
    return remat_class(module_cls, policy, static_argnames, static_argnums, methods, _nnx_remat,
                       prevent_cse=prevent_cse)


def _nnx_remat(method: RematMethod, module: nnx.Module, call: MethodCall,
               dynamic: tuple[tuple[Any, ...], dict[str, Any]]) -> Any:
    """NNX's :class:`remat._apply.RematBody`: ``jax.checkpoint`` of the call
    on the split state, the changes written back."""
    graphdef, state = nnx.split(module)
    before, statics = _static_attrs(module), {}
    fn = _pure(graphdef, call, statics)
    method.validate(call, _signature(state), dynamic, _probe(fn), abstract({"state": state, "args": dynamic}))
    out, changed = jax.checkpoint(fn, policy=method.policy.to_jax(), prevent_cse=method.prevent_cse)(
        state, dynamic)
    _update(module, changed, method.where)
    _write_statics(module, before, statics, method.where)
    return out


_SCAN_OPS = ScanOps(checkpoint=lambda f, pol: jax.checkpoint(f, policy=pol, prevent_cse=False),
                    scan=lambda f, n: lambda carry, st: jax.lax.scan(f, carry, st))
"""NNX's :class:`remat._scan.ScanOps`: JAX's own transforms on functions of
the split state ``(carry, state) -> (carry, changed)``; the scan's length is
that of the state's leading axis."""


def _axis(v: nnx.Variable, layer_axes: LayerAxes) -> int:
    """The layer axis of variable ``v``: that of the most derived listed type."""
    matches = [t for t in layer_axes if isinstance(v, t)]
    if not matches:
        return 0
    return layer_axes[max(matches, key=lambda t: len(t.__mro__))]


def _move_layer_axis(state: nnx.State, layer_axes: LayerAxes, *, to_front: bool) -> nnx.State:
    """Move each variable's layer axis to the front (or back from it)."""
    out = []
    for path, v in nnx.to_flat_state(state):
        a = _axis(v, layer_axes)
        if a:
            v = v.replace(jnp.moveaxis(_value(v), *((a, 0) if to_front else (0, a))))
        out.append((path, v))
    return nnx.from_flat_state(out)


def stack_layers(make: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs,
                 layer_axes: LayerAxes | None = None) -> nnx.Module:
    """``num_layers`` layers made by ``make(rngs)``, as one module whose every
    variable has a layer axis (axis 0, or as ``layer_axes`` says per variable
    type), each layer with its own parameters and its own RNG streams.

    The recipe (flax 0.12): ``nnx.split_rngs(splits=num_layers)`` gives every
    stream of ``rngs`` ``num_layers`` keys, and ``nnx.vmap`` (graph mode with
    graph updates, pinned, since ``split_rngs`` acts on the ``Rngs`` graph
    node) calls ``make`` once per key. A module that keeps a stream (e.g.
    ``nnx.Dropout(rate, rngs=rngs)``) therefore has a ``[num_layers]`` key and
    counter: under :func:`scan_layers` each layer draws its own dropout mask,
    and the counters advance every call, so every step draws new masks.
    ``rngs`` itself is left as it was before the split, its counters advanced.

    Raises:
      RematError: ``num_layers < 1``.
    """
    check_num_layers(num_layers)

    @nnx.split_rngs(splits=num_layers, graph=True, graph_updates=True)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=num_layers, graph=True, graph_updates=True)
    def create(r: nnx.Rngs) -> nnx.Module:
        return make(r)

    stacked = create(rngs)
    if layer_axes:
        graphdef, state = nnx.split(stacked)
        stacked = nnx.merge(graphdef, _move_layer_axis(state, layer_axes, to_front=False))
    return stacked


def scan_layers(block_cls: type[nnx.Module], *, num_layers: int, policy: PolicyArg = "full",
                groups: Groups = None, static_argnames: Sequence[str] = (),
                broadcast_argnames: Sequence[str] = (),
                layer_axes: LayerAxes | None = None) -> type[nnx.Module]:
    """:func:`remat.scan_layers` for NNX: a module class that applies
    ``num_layers`` layers of ``block_cls`` as a ``lax.scan``, each layer
    rematerialized by ``policy``.

    The block is a plain NNX layer, ``__init__(self, ..., rngs)`` and
    ``__call__(self, x, ...) -> x`` (output of the shape and dtype of ``x``).
    The returned class takes the block's constructor arguments and is called
    like the block::

        Stack = remat.nnx.scan_layers(Block, num_layers=32, policy="minimal", groups="sqrt",
                                      static_argnames=("deterministic",))
        stack = Stack(config, rngs=nnx.Rngs(params=0, dropout=1))
        y_BxTxD = stack(x_BxTxD, deterministic=False)

    Its state is ``stack.block``: the block's variables, every type (params,
    RNG keys and counters, batch statistics, your own), stacked with a
    leading ``[num_layers]`` axis (or at ``layer_axes``), made by
    :func:`stack_layers`, the same whatever the grouping or segmentation
    (which only change how a call is scanned). Variables a layer changes
    (RNG counters, statistics) are written back after the call, per layer.

    Args:
      block_cls: an ``nnx.Module`` class; its first call argument after
        ``self`` is the carry ``x``.
      num_layers: L >= 1.
      policy: one policy for every layer, ``(num_layers_i, policy_i)``
        segments, or a ``"8x minimal; 24x full"`` string (:func:`remat.scan_layers`).
      groups: nested checkpointing, ``(G, K)`` or ``"sqrt"`` (Chen et al.
        2016): only the G group inputs are kept, a group of K layers is
        recomputed in the backward pass; NNX has no nested remat scan of
        its own, the group level is a ``jax.checkpoint`` around an inner scan.
      static_argnames: block arguments that are Python constants at trace
        time (``"deterministic"``); hashable values only.
      broadcast_argnames: block arguments (arrays) passed to every layer.
      layer_axes: the layer axis per variable type (:data:`LayerAxes`).

    Raises:
      RematError: bad ``num_layers``/``groups``/segments (:func:`remat._scan.plan`),
        a static or broadcast name that is not a parameter of the block.
      MissingCheckpointNameError, NeverKeptError, ScanCarryOffloadError: at
        first trace, as for :func:`remat.scan_layers`.
      TypeError: at call time, an argument neither static nor broadcast, or an
        unhashable static value.
      RematTargetError: ``block_cls`` is not an ``nnx.Module`` class.
      RematError: at call time, a layer changed a plain Python attribute
        (one stacked module cannot hold it per layer: use an ``nnx.Variable``).
    """
    spec = LayerScan.of(block_cls, num_layers, policy, groups, static_argnames, broadcast_argnames,
                        base=nnx.Module, api="remat.nnx.scan_layers")
    axes = dict(layer_axes or {})

    def run_segment(seg: Segment, fn: Callable[..., Any], x: Any, state: nnx.State, bcast: dict) -> Any:
        def layer(carry: Any, st: nnx.State) -> tuple[Any, nnx.State]:
            return fn(st, {spec.carry_name: carry, **bcast})

        scan = seg.scan(layer, _SCAN_OPS)
        if seg.groups is None:
            return scan(x, state)
        g, k = seg.groups
        x, changed = scan(x, jax.tree.map(lambda a: a.reshape(g, k, *a.shape[1:]), state))
        return x, jax.tree.map(lambda a: a.reshape(g * k, *a.shape[2:]), changed)

    class ScannedLayers(nnx.Module):
        def __init__(self, *args: Any, rngs: nnx.Rngs, **kwargs: Any):
            self.block = stack_layers(lambda r: block_cls(*args, rngs=r, **kwargs), num_layers, rngs, axes)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            static, x, dynamic = spec.split(self, args, kwargs)
            graphdef, stacked = nnx.split(self.block)
            state = _move_layer_axis(stacked, axes, to_front=True)
            before, statics = _static_attrs(self.block), {}
            fn = _pure(graphdef, lambda m, d: spec.orig(m, **static, **d), statics)
            one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), state)
            spec.validate(block_cls, static, _signature(stacked), x, dynamic, _probe(fn),
                          {"state": one, "args": abstract({spec.carry_name: x, **dynamic})})
            parts, start = [], 0
            with spec.traced_hint(dynamic):
                for seg in spec.segments_to_run():
                    part = jax.tree.map(lambda a, s=start, n=seg.num_layers: a[s:s + n], state)
                    x, changed = run_segment(seg, fn, x, part, dynamic)
                    parts.append(changed)
                    start += seg.num_layers
            changed = parts[0] if len(parts) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
            _update(self.block, _move_layer_axis(changed, axes, to_front=False),
                    f"module {type(self).__name__}", prefix="block/")
            _write_statics(self.block, before, statics, f"module {type(self).__name__}", stacked=True,
                           prefix="block/")
            return x

    ScannedLayers.__name__ = ScannedLayers.__qualname__ = f"Scanned{block_cls.__name__}"
    return ScannedLayers
