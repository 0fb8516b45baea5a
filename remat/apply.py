"""Applying policies: ``remat.checkpoint`` (functions), ``remat.remat`` (linen
modules), ``remat.checkpoint_names`` and the tag validation they share.

Validation rule: when a wrapped function or module is first traced (for
instance by ``model.init`` or the first jitted step), every checkpoint name
that its policy saves or offloads must be emitted inside it, else
:class:`MissingCheckpointNameError`. A misspelt tag therefore never silently
means "recompute everything" (FAULTS K1). The check traces the wrapped
function once more on abstract inputs, at trace time only, and is cached per
(function, policy, input shapes), so a jitted step pays nothing per call.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import flax.linen as nn
import jax
import numpy as np

from remat._compat import eqn_checkpoint_name
from remat.policies import Policy, get
from remat.policies.vocab import missing_names

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=type[nn.Module])


class MissingCheckpointNameError(ValueError):
    """A policy saves or offloads a checkpoint name that the function never
    emits. ``.missing`` and ``.emitted`` hold the two sets of names."""

    def __init__(self, policy: Policy, missing: frozenset[str], emitted: frozenset[str], where: str,
                 label: str | None = None):
        self.missing, self.emitted = missing, emitted
        name = repr(str(policy)) if label in (None, str(policy)) else f"{label!r} ({policy})"
        super().__init__(
            f"remat policy {name} names checkpoint name(s) that {where} never emits: "
            f"{', '.join(sorted(missing))}; it emits: {', '.join(sorted(emitted)) or '(none)'}. "
            "Tag values with jax.ad_checkpoint.checkpoint_name, or fix the policy.")


_OPAQUE = ("custom_vjp_call", "custom_jvp_call", "custom_vjp_call_jaxpr")


def _jaxpr_names(jaxpr: Any, visible: set[str], hidden: set[str], opaque: bool = False) -> None:
    for eqn in jaxpr.eqns:
        if (name := eqn_checkpoint_name(eqn)) is not None:
            (hidden if opaque else visible).add(name)
        inner = opaque or eqn.primitive.name in _OPAQUE
        for sub in jax.core.jaxprs_in_params(eqn.params):
            _jaxpr_names(sub, visible, hidden, inner)


def jaxpr_names(jaxpr: Any) -> tuple[frozenset[str], frozenset[str]]:
    """The checkpoint names in a (closed) jaxpr and all its sub-jaxprs, as
    ``(visible, hidden)``: hidden names occur only inside a
    ``custom_vjp``/``custom_jvp`` function, where policies cannot see them."""
    visible: set[str] = set()
    hidden: set[str] = set()
    _jaxpr_names(getattr(jaxpr, "jaxpr", jaxpr), visible, hidden)
    return frozenset(visible), frozenset(hidden - visible)


def _traced_names(fn: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[frozenset[str], frozenset[str]]:
    return jaxpr_names(jax.make_jaxpr(lambda a, k: fn(*a, **k))(args, kwargs))


def checkpoint_names(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> frozenset[str]:
    """Every checkpoint name ``fn(*args, **kwargs)`` emits.

    Traces ``fn`` with ``jax.make_jaxpr`` (arguments may be
    ``jax.ShapeDtypeStruct``; nothing is computed) and collects the names of
    ``jax.ad_checkpoint.checkpoint_name`` calls, looking inside scan, remat,
    pjit, custom_vjp/custom_jvp, cond and while bodies.

    Returns:
      The names, e.g. ``frozenset({"query_proj", "mlpwo"})``.
    """
    visible, hidden = _traced_names(fn, args, kwargs)
    return visible | hidden


def check_names(policy: Policy, emitted: frozenset[str], where: str,
                hidden: frozenset[str] = frozenset(), label: str | None = None) -> None:
    """Raise :class:`MissingCheckpointNameError` if ``policy`` saves or offloads
    a name that is not in ``emitted`` (fused/split alternatives such as
    ``qkv_proj`` vs ``query_proj`` count, see :mod:`remat.policies.vocab`).

    ``hidden`` are names emitted only inside a ``custom_vjp``/``custom_jvp``
    function: a policy cannot see them (FAULTS K6), so they count as missing,
    with advice to tag the custom function's output instead.
    """
    missing = missing_names(policy.names, emitted)
    if missing:
        err = MissingCheckpointNameError(policy, missing, emitted, where, label)
        if missing & hidden:
            err.args = (f"{err.args[0]} {', '.join(sorted(missing & hidden))} is tagged inside a "
                        "custom_vjp/custom_jvp function, where remat policies cannot see it: tag the "
                        "custom function's output instead.",)
        raise err


def abstract(tree: Any) -> Any:
    """Replace every array (or tracer, or Python number) leaf by a
    ``jax.ShapeDtypeStruct`` of its shape and dtype; other leaves are kept."""

    def leaf(x: Any) -> Any:
        if isinstance(x, (bool, int, float, complex)):
            return jax.ShapeDtypeStruct((), jax.numpy.result_type(type(x)), weak_type=True)
        if isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)) or (
                hasattr(x, "shape") and hasattr(x, "dtype")):
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        return x

    return jax.tree.map(leaf, tree)


_VALIDATED: set[Any] = set()


def validate_once(policy: Policy, key: Any, fn: Callable[..., Any], args: tuple, where: str,
                  label: str | None = None) -> None:
    """Check, once per hashable ``key``, that ``fn(*args)`` emits every name
    ``policy`` saves or offloads, and that the backend can offload if the
    policy offloads. A policy without names is never traced; unhashable keys
    are checked every time.

    Raises:
      MissingCheckpointNameError: see :func:`check_names`.
      OffloadUnsupportedError: see :func:`check_offload`.
    """
    try:
        if key in _VALIDATED:
            return
    except TypeError:
        key = None
    check_offload(policy)
    _warn_prng(where)
    if policy.names:
        visible, hidden = _traced_names(fn, args, {})
        check_names(policy, visible, where, hidden, label)
    if key is not None:
        _VALIDATED.add(key)


class OffloadUnsupportedError(ValueError):
    """The policy offloads to ``pinned_host`` memory, which the backend lacks."""


def check_offload(policy: Policy, device: jax.Device | None = None) -> None:
    """Raise :class:`OffloadUnsupportedError` if ``policy`` offloads and the
    device has no ``pinned_host`` memory (FAULTS K3: otherwise nothing moves,
    or the compiler crashes). The explicit fallback is
    :meth:`Policy.on_device`, which keeps the offloaded values on device.
    """
    if not policy.offloads:
        return
    device = device or jax.devices()[0]
    kinds = sorted(m.kind for m in device.addressable_memories())
    if "pinned_host" not in kinds:
        raise OffloadUnsupportedError(
            f"remat policy {str(policy)!r} offloads to 'pinned_host', but backend "
            f"{device.platform!r} ({device.device_kind}) has memories {kinds}; to keep those values on "
            f"device instead, use {str(policy.on_device())!r} (Policy.on_device())")


def _warn_prng(where: str) -> None:
    """FAULTS K7: remat regenerates dropout masks in the backward pass from the
    same key; only the default threefry PRNG guarantees the same bits there."""
    impl = jax.config.jax_default_prng_impl
    if impl != "threefry2x32":
        warnings.warn(
            f"{where}: the default PRNG implementation is {impl!r}; random bits recomputed by remat "
            "(dropout masks) may differ from the forward pass, so gradients can differ from no remat. "
            "Use jax.config.update('jax_default_prng_impl', 'threefry2x32') for exact parity.",
            stacklevel=4)


_STATIC_FLOATS: dict[tuple[str, str], set[float]] = {}


def _warn_changing_floats(static: dict[str, Any], where: str) -> None:
    """FAULTS K4: a Python float static argument that changes every step
    retraces and recompiles every step; warn once it has taken 8 values."""
    for name, value in static.items():
        if isinstance(value, float):
            seen = _STATIC_FLOATS.setdefault((where, name), set())
            seen.add(value)
            if len(seen) == 8:
                warnings.warn(
                    f"{where}: static argument {name!r} has taken {len(seen)} different float values; "
                    "each one retraces and recompiles. Pass it as an ordinary (traced) argument.",
                    stacklevel=3)


def static_indices(fn: Callable[..., Any], static_argnames: Sequence[str], *, skip_self: bool) -> None:
    """Check that every name in ``static_argnames`` is a parameter of ``fn``.

    Raises:
      ValueError: naming the bad name and listing ``fn``'s parameters.
    """
    params = list(inspect.signature(fn).parameters)
    if skip_self:
        params = params[1:]
    for name in static_argnames:
        if name not in params:
            raise ValueError(
                f"static argument name {name!r} is not a parameter of {fn.__qualname__}; "
                f"its parameters: {', '.join(params)}")


def split_static(sig: inspect.Signature, static_argnames: Sequence[str], args: tuple, kwargs: dict,
                 where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Bind a call and split it into (static, dynamic) keyword dictionaries.

    The first bound parameter (``self`` for methods) is dropped.

    Raises:
      TypeError: a static argument holds an unhashable value (an array, say),
        which cannot be a trace-time constant (FAULTS K4).
    """
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name in arguments:
            raise TypeError(f"{where}: *args/**kwargs parameters are not supported by remat wrappers")
    static = {n: arguments.pop(n) for n in static_argnames}
    for n, v in static.items():
        try:
            hash(v)
        except TypeError:
            raise TypeError(
                f"{where}: static argument {n!r} got an unhashable value of type "
                f"{type(v).__name__}; static arguments must be hashable Python values (bool, int, "
                "str, ...). Pass arrays as ordinary (traced) arguments.") from None
    _warn_changing_floats(static, where)
    return static, arguments


def label(policy: str | Policy) -> str:
    """How a policy argument is named in messages: the user's own string
    (e.g. ``"minimal"``), else the canonical spec."""
    return policy if isinstance(policy, str) else str(policy)


@contextlib.contextmanager
def traced_flag_hint(where: str, dynamic: dict[str, Any]) -> Iterator[None]:
    """Turn JAX's concretization errors inside a remat wrapper into a
    ``TypeError`` that names the traced arguments and the fix (FAULTS K4)."""
    try:
        yield
    except jax.errors.ConcretizationTypeError as e:
        raise TypeError(
            f"{where}: a traced argument was used as a Python value ({type(e).__name__}); under remat "
            f"the arguments {', '.join(sorted(dynamic))} are traced: name the Python flags among them "
            "(e.g. deterministic) in static_argnames") from e


def checkpoint(fn: F, policy: str | Policy, *, static_argnames: Sequence[str] = (),
               prevent_cse: bool = True) -> F:
    """``jax.checkpoint`` with a policy name, spec string or :class:`Policy`.

    ``"none"`` returns ``fn`` unchanged (no checkpoint at all). Otherwise the
    result behaves like ``fn`` and, when first traced, checks that every name
    the policy saves or offloads is emitted by ``fn``.

    Args:
      fn: the function to rematerialize; arrays in, arrays out.
      policy: e.g. ``"minimal"``, ``"save:out_proj + dots:no_batch"``.
      static_argnames: parameters of ``fn`` that are trace-time constants
        (Python values such as ``deterministic``); hashable values only.
      prevent_cse: keep XLA from merging the recomputation with the forward
        pass. Leave True outside a scan; inside ``lax.scan`` it is not needed
        and costs speed (``remat.scan_layers`` passes False). JAX doc:
        "jax.checkpoint", ``prevent_cse``.

    Raises:
      UnknownPolicyError, PolicySpecError: a bad ``policy``.
      ValueError: a name in ``static_argnames`` that is not a parameter of ``fn``.
      MissingCheckpointNameError: at first trace, a policy name ``fn`` never emits.
      TypeError: at call time, an unhashable value for a static argument.
    """
    pol = get(policy)
    if pol.is_none:
        return fn
    static_indices(fn, static_argnames, skip_self=False)
    sig = inspect.signature(fn)
    where = f"function {getattr(fn, '__qualname__', fn)!r}"

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        static, dynamic = split_static(sig, static_argnames, args, kwargs, where)
        inner = lambda dyn: fn(**static, **dyn)
        validate_once(pol, (fn, pol, tuple(sorted(static.items())), str(abstract(dynamic))),
                      inner, (abstract(dynamic),), where, label(policy))
        with traced_flag_hint(where, dynamic):
            return jax.checkpoint(inner, policy=pol.to_jax(), prevent_cse=prevent_cse)(dynamic)

    return wrapper  # type: ignore[return-value]


def module_fields(module: nn.Module, cls: type[nn.Module]) -> dict[str, Any]:
    """The constructor attributes of a linen module (without parent and name)."""
    import dataclasses

    return {f.name: getattr(module, f.name) for f in dataclasses.fields(cls)
            if f.init and f.name not in ("parent", "name")}


def remat(module_cls: M, policy: str | Policy, *, static_argnames: Sequence[str] = (),
          prevent_cse: bool = True, methods: Sequence[str] | None = None) -> M:
    """Linen's ``nn.remat`` with a policy name, static arguments by *name*.

    Returns a subclass of ``module_cls`` with the same constructor, the same
    parameter tree and the same results, whose methods are rematerialized
    with the policy. Static arguments are given by name (keyword-only ones
    too), so there is no ``self``-is-argument-0 off-by-one (FAULTS K4);
    keyword arguments pass through. ``"none"`` returns ``module_cls`` itself.

    Args:
      module_cls: a linen ``nn.Module`` subclass.
      policy: a preset name, spec string or :class:`Policy`.
      static_argnames: parameters that are Python constants at trace time
        (e.g. ``"deterministic"``); hashable values only.
      prevent_cse: as in :func:`checkpoint`.
      methods: the methods to wrap; default ``["__call__"]``.

    Raises:
      ValueError: a static name that is not a parameter of a wrapped method.
      MissingCheckpointNameError: at first trace, a policy name the module
        never emits.
      TypeError: at call time, an unhashable value for a static argument.
    """
    pol = get(policy)
    if pol.is_none:
        return module_cls
    overrides: dict[str, Any] = {}
    for method in methods or ["__call__"]:
        orig = getattr(module_cls, method)
        static_indices(orig, static_argnames, skip_self=True)
        overrides[method] = _remat_method(module_cls, orig, pol, tuple(static_argnames), prevent_cse,
                                          label(policy))
    return type(f"Remat{module_cls.__name__}", (module_cls,), overrides)  # type: ignore[return-value]


def _remat_method(cls: type[nn.Module], orig: Callable[..., Any], pol: Policy,
                  static_argnames: tuple[str, ...], prevent_cse: bool,
                  policy_label: str) -> Callable[..., Any]:
    sig = inspect.signature(orig)
    self_name = next(iter(sig.parameters))
    where = f"module {cls.__name__}.{orig.__name__}"

    @functools.wraps(orig)
    def method(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        static, dynamic = split_static(sig, static_argnames, (self, *args), kwargs, where)
        dynamic.pop(self_name)
        fields = module_fields(self, cls)
        validate_once(
            pol, (cls, orig, pol, tuple(sorted(static.items())), tuple(sorted(fields.items())),
                  str(abstract(dynamic))),
            module_init(cls, fields, orig, static), (abstract(dynamic),), where, policy_label)
        body = lambda mdl, dyn: orig(mdl, **static, **dyn)
        with traced_flag_hint(where, dynamic):
            return nn.remat(body, policy=pol.to_jax(), prevent_cse=prevent_cse)(self, dynamic)

    return method


def module_init(cls: type[nn.Module], fields: dict[str, Any], method: Callable[..., Any],
                static: dict[str, Any]) -> Callable[[dict[str, Any]], Any]:
    """A pure function ``dynamic_kwargs -> variables`` that initialises a fresh
    ``cls(**fields)`` through ``method``; traced on abstract inputs it shows
    which checkpoint names the module emits (nothing is allocated)."""
    key = jax.random.key(0)

    def run(dyn: dict[str, Any]) -> Any:
        return cls(**fields, parent=None).init({"params": key, "dropout": key}, **static, **dyn,
                                               method=method)

    return run
