"""Applying policies: ``remat.checkpoint`` (functions), ``remat.remat`` (linen
modules), ``remat.checkpoint_names`` and the tag validation they share.

Validation rule: when a wrapped function or module is first traced (for
instance by ``model.init`` or the first jitted step), every checkpoint name
that its policy saves or offloads must be emitted inside it, else
:class:`MissingCheckpointNameError`, and at least one of them must really be
kept for the backward pass, else :class:`NeverKeptError`. A misspelt tag, or
a tag on a value JAX never keeps, therefore never silently means "recompute
everything". The check traces the gradient of the wrapped function once more
on abstract inputs (:func:`probe_jaxpr`), at trace time only, and is cached
per (function, policy, input shapes), so a jitted step pays nothing per call.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import warnings
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from remat import _compat, _jaxpr
from remat._call import ArgSplitter, Statics
from remat._errors import (
    MissingCheckpointNameError,
    NeverKeptError,
    NeverKeptWarning,
    OffloadUnsupportedError,
    RematTargetError,
    ScanCarryOffloadError,
)
from remat._residuals import output_names, residual_rows
from remat.policies import OpaquePolicy, Policy, get, vocab
from remat.policies.registry import written_names
from remat.policies.vocab import missing_names

_compat.hide_frames(__file__)

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=type[nn.Module])


_DISABLED = contextvars.ContextVar("remat_disabled", default=False)


@contextlib.contextmanager
def without_remat() -> Iterator[None]:
    """Within this context, the wrappers of :func:`checkpoint`, :func:`remat`
    and :func:`remat.scan_layers` apply no ``jax.checkpoint`` at all (the
    layer scan keeps its parameter layout): what a step costs with no
    rematerialization, the baseline of :func:`remat.analyze`."""
    token = _DISABLED.set(True)
    try:
        yield
    finally:
        _DISABLED.reset(token)


def remat_disabled() -> bool:
    """True inside :func:`without_remat`."""
    return _DISABLED.get()


Probe = Callable[[Any], tuple[Any, Callable[[Any, Any], Any]]]
"""``make(dynamic) -> (params, apply)``: the parameters of a wrapped
function or module (made inside, from its initialiser) and ``apply(params,
dynamic) -> outputs``; see :func:`function_probe` and :func:`module_probe`."""


def function_probe(fn: Callable[[Any], Any]) -> Probe:
    """The probe of a plain function of one pytree argument (no parameters)."""
    return lambda dyn: ({}, lambda _, d: fn(d))


def _inexact(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


def probe_jaxpr(make: Probe, dynamic: Any, policy: Policy | None = None) -> Any:
    """The jaxpr of the gradient of ``apply`` (of the sum of its float
    outputs, with respect to the parameters and every float input) under
    ``jax.checkpoint`` with ``policy`` (None: no checkpoint). Its outputs
    are ``apply``'s outputs, then the gradients.

    This is what a policy meets: JAX applies policies while differentiating,
    so the names it sees are those of this program, including names tagged in
    a ``custom_vjp`` forward rule (which a plain trace of the function never
    runs). ``dynamic`` may hold ``jax.ShapeDtypeStruct`` leaves; nothing is
    computed.
    """

    def run(dyn: Any) -> Any:
        params, apply = make(dyn)
        if policy is not None:
            apply = jax.checkpoint(apply, policy=policy.to_jax())
        flat, tree = jax.tree.flatten(dyn)
        diff = [i for i, x in enumerate(flat) if _inexact(x)]

        def loss(p: Any, xs: list[Any]) -> tuple[jax.Array, Any]:
            leaves = list(flat)
            for i, x in zip(diff, xs, strict=True):
                leaves[i] = x
            out = apply(p, tree.unflatten(leaves))
            total = sum((jnp.sum(y.astype(jnp.float32)) for y in jax.tree.leaves(out) if _inexact(y)),
                        jnp.float32(0))
            return total, out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            params, [flat[i] for i in diff])
        return out, grads

    return jax.make_jaxpr(run)(dynamic)


def checkpoint_names(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> frozenset[str]:
    """Every checkpoint name ``fn(*args, **kwargs)`` emits where a policy can
    act on it: in ``fn`` and, since JAX applies policies while
    differentiating, in the program of its gradient (which runs the forward
    rules of ``custom_vjp`` functions, with the names tagged there).

    Traces ``fn`` with ``jax.make_jaxpr`` (arguments may be
    ``jax.ShapeDtypeStruct``; nothing is computed), looking inside scan,
    remat, pjit, cond and while bodies.

    Returns:
      The names, e.g. ``frozenset({"query_proj", "mlpwo"})``.
    """
    call = lambda d: fn(*d["args"], **d["kwargs"])
    dyn = abstract({"args": args, "kwargs": kwargs})
    return _jaxpr.checkpoint_names(jax.make_jaxpr(call)(dyn)) | _jaxpr.checkpoint_names(
        probe_jaxpr(function_probe(call), dyn))


def check_names(policy: Policy, jaxpr: Any, where: str, label: str | None = None, *,
                carry_outputs: int = 0) -> None:
    """Check a policy against the :func:`probe_jaxpr` of what it wraps.

    1. Every name the policy saves or offloads is emitted, or an alternative
       spelling of it that the policy also names is (``minimal`` lists both
       ``qkv_proj`` and ``query_proj``; ``save:mlpwi`` alone does not accept a
       gated MLP's ``mlpwi_0``), see :func:`remat.policies.vocab.missing_names`.
    2. At least one of them is kept for the backward pass; a name that the
       user wrote in a ``save:``/``offload:`` term and that is never kept gets
       a :class:`NeverKeptWarning` (names that come from a preset do not: a
       preset lists every projection MaxText lists).
    3. With ``carry_outputs=n`` (a layer scan), no offloaded name tags one of
       the first ``n`` outputs, the scan carry.

    Raises:
      MissingCheckpointNameError, NeverKeptError, ScanCarryOffloadError.
    """
    emitted = _jaxpr.checkpoint_names(jaxpr)
    missing = missing_names(policy.names, emitted)
    if missing:
        raise MissingCheckpointNameError(
            f"remat policy {_quote(policy, label)} names checkpoint name(s) that {where} never emits: "
            f"{', '.join(sorted(missing))}; it emits: {', '.join(sorted(emitted)) or '(none)'}. "
            "Tag values with jax.ad_checkpoint.checkpoint_name, or fix the policy.",
            missing=missing, emitted=emitted)
    carried = {n for n in output_names(jaxpr)[:carry_outputs] if n in policy.offload}
    if carried:
        raise ScanCarryOffloadError(
            f"remat policy {_quote(policy, label)} offloads {', '.join(sorted(carried))}, which tags the "
            f"output of {where}: the scan carry, which the layer scan itself keeps on device for every "
            "layer. Tag the block's input instead, e.g. "
            f"x = checkpoint_name(x, {vocab.DECODER_LAYER_INPUT!r}), and offload that name.")
    kept = {r.name for r in residual_rows(jaxpr) if r.source == "checkpoint_name"}
    never = (policy.names & emitted) - kept
    if not policy.names & kept:
        is_, it = ("is", "it") if len(never) == 1 else ("are", "them")
        raise NeverKeptError(
            f"remat policy {_quote(policy, label)} keeps nothing on {where}: {', '.join(sorted(never))} "
            f"{is_} emitted, but the backward pass never reads {it} (e.g. a value whose only use is an "
            f"addition, or the output of a nonlinearity whose derivative reads its own untagged result), "
            f"so JAX drops {it} whatever the policy says. Tag and save a value the backward pass reads, "
            "e.g. a matmul output before its nonlinearity.", names=frozenset(never))
    written = never & written_names(policy if label is None or isinstance(policy, OpaquePolicy) else label)
    if written:
        warnings.warn(
            f"{where}: remat policy {_quote(policy, label)} names {', '.join(sorted(written))}, which "
            "is emitted but never kept: the backward pass never reads it, so JAX drops it whatever the "
            "policy says.", NeverKeptWarning, stacklevel=5)


def _quote(policy: Policy, label: str | None) -> str:
    return repr(str(policy)) if label in (None, str(policy)) else f"{label!r} ({policy})"


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


_VALIDATED: weakref.WeakKeyDictionary[Any, set[Any]] = weakref.WeakKeyDictionary()
"""Per wrapped function or module class (held weakly, so a wrapper created and
dropped by the user is freed with it): the checks already passed."""


_NOTES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("remat_notes", default=None)


@contextlib.contextmanager
def collect_notes() -> Iterator[list[str]]:
    """Within this context, the wrappers add to the yielded list a note for
    each policy they apply that remat cannot check (an :class:`OpaquePolicy`
    that is not ``known``): :func:`remat.analyze` puts them in its report."""
    notes: list[str] = []
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)


def opaque_note(policy: Policy, where: str) -> str | None:
    """The note for a policy remat cannot check, or None."""
    if not isinstance(policy, OpaquePolicy) or policy.known:
        return None
    return (f"{where}: remat policy {policy} is a callable remat cannot see into, so its checkpoint names "
            "are not checked: if it matches nothing, it silently recomputes everything (as 'full'); "
            "compare residual_bytes with the report of 'full'")


def _note_opaque(policy: Policy, where: str) -> None:
    notes, note = _NOTES.get(), opaque_note(policy, where)
    if notes is not None and note is not None and note not in notes:
        notes.append(note)


def validation_key(policy: Policy, statics: Hashable, state: Hashable, inputs: Any) -> tuple[Any, ...]:
    """The key of :func:`validate_once`, the same shape for every wrapper: the
    policy, the static argument values, what of the wrapped module's state
    the check depends on (its constructor fields or the signature of its
    variables; None for a function), and the shapes and dtypes of the traced
    ``inputs`` (a pytree of arrays or abstract values). Unhashable parts make
    the key unhashable, which :func:`validate_once` checks every time."""
    return (policy, statics, state, str(abstract(inputs)))


def validate_once(policy: Policy, owner: Any, key: Any, make: Probe, dynamic: Any, where: str,
                  label: str | None = None, *, carry_outputs: int = 0) -> None:
    """Check, once per ``owner`` (the wrapped function or module class) and
    hashable ``key`` (:func:`validation_key`), that the
    backend can do what ``policy`` asks (:func:`check_offload`) and that the
    policy fits what it wraps (:func:`check_names` on the :func:`probe_jaxpr`
    of ``make`` on the abstract ``dynamic`` inputs). A policy without names is
    never traced; an unhashable key or an owner that cannot be weakly
    referenced is checked every time. A policy remat cannot check (a custom
    JAX policy callable) gets a note in :func:`collect_notes`, every time.

    Raises:
      MissingCheckpointNameError, NeverKeptError, ScanCarryOffloadError: see
        :func:`check_names`.
      OffloadUnsupportedError: see :func:`check_offload`.
    """
    _note_opaque(policy, where)
    try:
        seen: set[Any] | None = _VALIDATED.setdefault(owner, set())
        if key in seen:  # type: ignore[operator]
            return
    except TypeError:
        seen = None
    check_offload(policy)
    _warn_prng(where)
    if policy.names:
        check_names(policy, probe_jaxpr(make, dynamic, policy), where, label, carry_outputs=carry_outputs)
    if seen is not None:
        seen.add(key)


def check_offload(policy: Policy, device: jax.Device | None = None) -> None:
    """Raise :class:`OffloadUnsupportedError` if ``policy`` offloads and the
    backend cannot: the device lists memories without ``pinned_host``
    (otherwise nothing moves, or the compiler crashes), or the backend fails
    :func:`offload_probe`. A compile-only GPU device lists no memories at
    all (JAX 0.10): there the probe alone decides, and it checks that the
    compiled program holds the offloaded value in host memory. The message
    names the backend, the JAX version and the explicit fallbacks:
    :meth:`Policy.on_device` (keep the offloaded values on device) or
    recompute them (the policy without its offloads). Never a silent change
    of policy.
    """
    if not policy.offloads:
        return
    device = device or jax.devices()[0]
    kinds = sorted(m.kind for m in device.addressable_memories())
    fallbacks = ("to keep those values on device instead, build the JAX policy with "
                 "names_which_can_be_offloaded=[] (or use a spec string)" if isinstance(policy, OpaquePolicy)
                 else f"to keep those values on device instead, use {str(policy.on_device())!r} "
                 f"(Policy.on_device()), or to recompute them, {str(policy.without_offload())!r}")
    if kinds and "pinned_host" not in kinds:
        raise OffloadUnsupportedError(
            f"remat policy {str(policy)!r} offloads to 'pinned_host', but backend "
            f"{device.platform!r} ({device.device_kind}) has memories {kinds}; {fallbacks}")
    failure = offload_probe(device)
    if failure:
        raise OffloadUnsupportedError(
            f"remat policy {str(policy)!r} offloads to 'pinned_host', but on backend {device.platform!r} "
            f"({device.device_kind}) with JAX {jax.__version__} an offload inside a scan fails: {failure}; "
            f"{fallbacks}")


PROBE_NAME = "offload_probe"
"""The checkpoint name the offload probe offloads."""


@functools.cache
def _probe(device: jax.Device, version: str, remat3: bool) -> str | None:
    """:func:`offload_probe`, once per device, JAX version and ``jax_remat3`` setting."""
    policy = jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[PROBE_NAME],
        offload_src="device", offload_dst="pinned_host")

    def layer(c: jax.Array, w: jax.Array) -> tuple[jax.Array, None]:
        return jnp.sin(checkpoint_name(c @ w, PROBE_NAME)), None

    def loss(c: jax.Array, ws: jax.Array) -> jax.Array:
        return jnp.sum(jax.lax.scan(jax.checkpoint(layer, policy=policy, prevent_cse=False), c, ws)[0])

    on = jax.sharding.SingleDeviceSharding(device)
    args = (jax.ShapeDtypeStruct((2, 8), jnp.float32, sharding=on),
            jax.ShapeDtypeStruct((2, 8, 8), jnp.float32, sharding=on))
    grad = jax.grad(loss, argnums=(0, 1))
    try:
        rows = residual_rows(jax.make_jaxpr(grad)(*args))
        compiled = jax.jit(grad).lower(*args).compile()
    except Exception as e:  # any failure to trace or compile is the answer
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    if not any(r.name == PROBE_NAME and r.memory_kind == "host" for r in rows):
        return "the offloaded residual is not kept on host (JAX dropped it: is a mode such as jax_remat3 on?)"
    analysis = compiled.memory_analysis()
    if device.platform != "cpu" and analysis is not None and not analysis.host_temp_size_in_bytes:
        return "the compiled program holds nothing in host memory (host_temp_size_in_bytes=0): XLA dropped it"
    return None


def offload_probe(device: jax.Device | str | None = None) -> str | None:
    """Whether offloading works on a device's backend: a tiny program (a
    two-step ``lax.scan`` whose layer offloads one checkpoint name to
    ``pinned_host``, the shape public reports show failing to compile on
    some backends and JAX versions) is traced, its residuals checked (the
    offloaded value must be kept on host: a mode such as ``jax_remat3``
    drops it) and compiled for that device; off the CPU, the compiled
    program must hold host memory (``memory_analysis().host_temp_size_in_bytes``;
    XLA:CPU reports none). Run once per device, JAX version and
    ``jax_remat3`` setting, cached for the process, on a thread of its own
    (outside whatever trace or mesh the caller is in).

    Args:
      device: a ``jax.Device`` (e.g. a target's compile-only device), a
        platform (``"cpu"``, ``"gpu"``: its first device), or None (the
        default backend's first device).

    Returns:
      None when it works, else why not (one line).
    """
    if not isinstance(device, jax.Device):
        device = jax.devices(device)[0]
    # On a thread of its own: outside the caller's trace and mesh context (both thread-local).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_probe, device, jax.__version__, bool(jax.config.jax_remat3)).result()


def _warn_prng(where: str) -> None:
    """remat regenerates dropout masks in the backward pass from the
    same key; only the default threefry PRNG guarantees the same bits there."""
    impl = jax.config.jax_default_prng_impl
    if impl != "threefry2x32":
        warnings.warn(
            f"{where}: the default PRNG implementation is {impl!r}; random bits recomputed by remat "
            "(dropout masks) may differ from the forward pass, so gradients can differ from no remat. "
            "Use jax.config.update('jax_default_prng_impl', 'threefry2x32') for exact parity.",
            stacklevel=4)


def label(policy: str | Policy | Callable[..., Any]) -> str:
    """How a policy argument is named in messages: the user's own string
    (e.g. ``"minimal"``), else the canonical spec."""
    return policy if isinstance(policy, str) else str(get(policy))


@contextlib.contextmanager
def traced_flag_hint(where: str, traced: Sequence[str]) -> Iterator[None]:
    """Add to JAX's concretization errors inside a remat wrapper (raised as
    they are, so ``except jax.errors.TracerBoolConversionError`` still
    catches them) a note that names the traced arguments and the fix."""
    try:
        yield
    except jax.errors.ConcretizationTypeError as e:
        e.add_note(f"remat: in {where}, the arguments {', '.join(traced) or '(none)'} are traced; "
                   "name the Python flags among them (e.g. deterministic) in static_argnames or "
                   "static_argnums")
        raise


PolicyLike = str | Policy | Callable[..., Any]
"""A preset name, a spec string, a :class:`Policy`, or a JAX policy object or
callable (applied as it is, see :class:`remat.policies.OpaquePolicy`)."""


def checkpoint(fn: F, policy: PolicyLike, *, static_argnames: str | Sequence[str] = (),
               static_argnums: int | Sequence[int] = (), prevent_cse: bool | Sequence[Any] = True) -> F:
    """``jax.checkpoint`` with a policy name, spec string or :class:`Policy`.

    ``"none"`` returns ``fn`` unchanged (no checkpoint at all). Otherwise the
    result is called, caches and fails as ``jax.checkpoint(fn, policy=...)``
    does: arguments pass through as given (positional-only, keyword-only and
    ``*args`` signatures too), defaults the caller never passed stay Python
    values, a repeat call with the same abstract signature and static values
    traces nothing new, and JAX's own errors (e.g.
    ``jax.errors.TracerBoolConversionError``) are raised as they are, with a
    note naming the traced arguments. In addition, when first traced with a
    signature, it checks that every name the policy saves or offloads is
    emitted by ``fn`` (one more trace, of the gradient, on abstract inputs).

    Args:
      fn: the function to rematerialize; arrays in, arrays out.
      policy: e.g. ``"minimal"``, ``"save:out_proj + dots:no_batch"``, or a
        JAX policy (``jax.checkpoint_policies.dots_saveable``, a predicate
        ``fn(prim, *args, **params)``), passed to ``jax.checkpoint`` as it
        is; the names of JAX's name-based policies are checked as a spec's.
      static_argnames: parameters of ``fn`` that are trace-time constants
        (Python values such as ``deterministic``), by name, wherever the
        caller passes them; hashable values only. Needs an inspectable
        signature.
      static_argnums: the same by position, as ``jax.checkpoint`` takes it.
      prevent_cse: keep XLA from merging the recomputation with the forward
        pass: a bool, or a pytree prefix of the traced arguments (one bool
        per argument), as in ``jax.checkpoint``. Leave True outside a scan;
        inside ``lax.scan`` it is not needed and costs speed
        (``remat.scan_layers`` passes False). JAX doc: "jax.checkpoint",
        ``prevent_cse``.

    Raises:
      UnknownPolicyError, PolicySpecError: a bad ``policy``.
      RematError: a name in ``static_argnames`` that is not a parameter of
        ``fn`` (or ``fn``'s signature cannot be inspected), a non-int in
        ``static_argnums``.
      MissingCheckpointNameError: at first trace, a policy name ``fn`` never emits.
      NeverKeptError: at first trace, none of the policy's names is ever kept
        (a :class:`NeverKeptWarning` names each name written in the spec that is not).
      UnsupportedJaxModeError: an offload policy under JAX's ``jax_remat3`` mode.
      TypeError: at call time, an unhashable value for a static argument.
      ValueError: at call time, a ``static_argnums`` position out of range.
    """
    pol = get(policy)
    if pol.is_none:
        return fn
    where = f"function {getattr(fn, '__qualname__', fn)!r}"
    splitter = ArgSplitter(fn, static_argnames, static_argnums, where=where)

    @functools.lru_cache(maxsize=64)
    def checkpointed(statics: Statics) -> Callable[..., Any]:
        # One jax.checkpoint per static values: JAX caches its trace on the function.
        return jax.checkpoint(functools.partial(statics.call, fn), policy=pol.to_jax(),
                              prevent_cse=prevent_cse)

    @functools.wraps(fn)
    @_compat.api_boundary
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if remat_disabled():
            return fn(*args, **kwargs)
        statics, dyn_args, dyn_kwargs = splitter.split(args, kwargs)
        dynamic = abstract((dyn_args, dyn_kwargs))
        probe = function_probe(lambda d: statics.call(fn, *d[0], **d[1]))
        validate_once(pol, fn, validation_key(pol, statics, None, (dyn_args, dyn_kwargs)), probe, dynamic,
                      where, label(policy))
        with traced_flag_hint(where, splitter.traced_names(statics, dyn_kwargs)):
            return checkpointed(statics)(*dyn_args, **dyn_kwargs)

    return wrapper  # type: ignore[return-value]


def module_fields(module: nn.Module, cls: type[nn.Module]) -> dict[str, Any]:
    """The constructor attributes of a linen module (without parent and name)."""
    return {f.name: getattr(module, f.name) for f in dataclasses.fields(cls)
            if f.init and f.name not in ("parent", "name")}


def check_target(target: Any, base: type, api: str) -> None:
    """Raise :class:`RematTargetError` unless ``target`` is a subclass of
    ``base`` (``nn.Module`` for ``api="remat.remat"``, ``nnx.Module`` for
    ``remat.nnx...``), or a ``functools.partial`` of one.

    Raises:
      RematTargetError: naming what was passed and what to pass instead.
    """
    if isinstance(target, functools.partial):
        target = target.func
    if isinstance(target, type) and issubclass(target, base):
        return
    kind = f"a {'linen nn.Module' if base is nn.Module else 'Flax NNX nnx.Module'} subclass (the class)"
    if isinstance(target, type):
        other = ("a Flax NNX module class; for NNX use remat.nnx" if base is nn.Module
                 and _is_nnx_class(target) else
                 "a linen module class; for linen use remat.remat / remat.scan_layers"
                 if issubclass(target, nn.Module) else f"not a subclass of {base.__module__}.{base.__name__}")
        got = f"the class {target.__qualname__}, {other}"
    elif isinstance(target, (nn.Module,)) or type(target).__module__.startswith("flax.") or hasattr(
            type(target), "__flax_module__") or _is_nnx_instance(target):
        got = (f"an instance of {type(target).__qualname__} (a module object, not its class); pass the "
               f"class, e.g. {api}({type(target).__qualname__}, ...), and build the module from the result")
    elif inspect.ismethod(target):
        owner = type(target.__self__).__qualname__
        got = (f"the bound method {owner}.{target.__func__.__name__}; pass the class and name the method: "
               f"{api}({owner}, ..., methods=[{target.__func__.__name__!r}])")
    elif callable(target):
        name = getattr(target, "__qualname__", type(target).__qualname__)
        got = f"the callable {name}; for a function use remat.checkpoint (jax.checkpoint with a policy)"
    else:
        got = f"{type(target).__qualname__} {target!r:.80}"
    raise RematTargetError(f"{api} takes {kind}, got {got}")


def _is_nnx_class(cls: type) -> bool:
    from flax import nnx

    return issubclass(cls, nnx.Module)


def _is_nnx_instance(x: Any) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Module)


def remat(module_cls: M, policy: str | Policy, *, static_argnames: str | Sequence[str] = (),
          static_argnums: int | Sequence[int] = (), prevent_cse: bool = True,
          methods: Sequence[str] | None = None) -> M:
    """Linen's ``nn.remat`` with a policy name, static arguments by *name*.

    Returns a subclass of ``module_cls`` with the same constructor, the same
    parameter tree and the same results, whose methods are rematerialized
    with the policy. Static arguments are given by name (keyword-only ones
    too), so there is no ``self``-is-argument-0 off-by-one; arguments pass
    through as given, and defaults the caller never passed stay Python
    values, as under ``nn.remat``. ``"none"`` returns ``module_cls`` itself.

    Args:
      module_cls: a linen ``nn.Module`` subclass.
      policy: a preset name, spec string or :class:`Policy`.
      static_argnames: parameters that are Python constants at trace time
        (e.g. ``"deterministic"``); hashable values only.
      static_argnums: the same by position, numbered as ``nn.remat`` numbers
        them: ``self`` is 0, the first argument 1.
      prevent_cse: as in :func:`checkpoint` (a bool).
      methods: the methods to wrap; default ``["__call__"]``.

    Nested, ``remat.remat(remat.remat(C, p), q)`` runs ``C.setup`` once per
    call, as ``nn.remat(nn.remat(C))`` does.

    Raises:
      RematTargetError: ``module_cls`` is not a linen module class (an
        instance, a function, an NNX class); also a Flax ``TransformTargetError``.
      RematError: a static name that is not a parameter of a wrapped method,
        or ``self`` (0) in ``static_argnums``.
      MissingCheckpointNameError: at first trace, a policy name the module
        never emits.
      NeverKeptError: at first trace, none of the policy's names is ever kept.
      TypeError: at call time, an unhashable value for a static argument.
    """
    check_target(module_cls, nn.Module, "remat.remat")
    return remat_class(module_cls, policy, static_argnames, static_argnums, methods, _linen_remat,
                       prevent_cse=prevent_cse)


@dataclasses.dataclass(frozen=True)
class RematMethod:
    """One method that :func:`remat_class` rematerializes: what a
    :class:`RematBody` needs besides the call.

    Attributes:
      owner: the class given to ``remat`` (it owns the :func:`validate_once`
        cache; the probe builds a fresh one).
      policy: the resolved policy (never ``"none"``).
      label: how messages name the policy (:func:`label`).
      where: the method, for messages (``"module Block.__call__"``).
      prevent_cse: as given to ``remat``.
    """

    owner: type
    policy: Policy
    label: str
    where: str
    prevent_cse: bool

    def validate(self, call: MethodCall, state: Hashable, dynamic: Any, make: Probe, inputs: Any) -> None:
        """:func:`validate_once` for one call: ``call`` (its static values),
        ``state`` (what of the module's state the check depends on) and the
        traced ``dynamic`` arguments key it; ``make`` probes ``inputs``.

        Raises:
          MissingCheckpointNameError, NeverKeptError, OffloadUnsupportedError:
            see :func:`validate_once`.
        """
        key = validation_key(self.policy, call, state, dynamic)
        validate_once(self.policy, self.owner, key, make, inputs, self.where, self.label)


class RematBody(Protocol):
    """How one Flax API runs one call of a rematerialized method, once
    :func:`remat_class` has split its arguments: linen's and NNX's ``remat``
    each pass one."""

    def __call__(self, method: RematMethod, module: Any, call: MethodCall,
                 dynamic: tuple[tuple[Any, ...], dict[str, Any]]) -> Any:
        """Run ``call`` on ``module`` (the instance, ``self``) with the traced
        ``dynamic = (args, kwargs)`` under ``jax.checkpoint`` with
        ``method.policy``, after :meth:`RematMethod.validate`; returns the
        method's outputs."""
        ...


def remat_class(module_cls: M, policy: str | Policy, static_argnames: str | Sequence[str],
                static_argnums: int | Sequence[int], methods: Sequence[str] | None, body: RematBody, *,
                prevent_cse: bool) -> M:
    """A subclass of ``module_cls`` whose ``methods`` (default ``__call__``)
    split their arguments into static and traced ones (:class:`ArgSplitter`)
    and run ``body``; outside it, with remat switched off
    (:func:`without_remat`), they run as they are. ``"none"`` returns
    ``module_cls`` itself. Shared by the linen and NNX ``remat``. A
    ``functools.partial`` of a class gives the same partial of the subclass.

    The wrapped methods carry Flax's ``method_handler_wrapped`` mark, as the
    methods of Flax's own transformed classes are entered: linen does not
    run ``setup`` for them on the outer module, only inside the transform's
    clone, so a nested remat runs ``setup`` once, as nested ``nn.remat`` does.

    Raises:
      RematError: a static name that is not a parameter of a wrapped method.
    """
    if isinstance(module_cls, functools.partial):
        inner = remat_class(module_cls.func, policy, static_argnames, static_argnums, methods, body,
                            prevent_cse=prevent_cse)
        return functools.partial(inner, *module_cls.args, **module_cls.keywords)  # type: ignore[return-value]
    pol = get(policy)
    if pol.is_none:
        return module_cls

    def wrap(orig: Callable[..., Any]) -> Callable[..., Any]:
        where = f"module {module_cls.__name__}.{orig.__name__}"
        splitter = ArgSplitter(orig, static_argnames, static_argnums, where=where, method=True)
        rematerialized = RematMethod(module_cls, pol, label(policy), where, prevent_cse)

        @functools.wraps(orig)
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            if remat_disabled():
                return orig(self, *args, **kwargs)
            statics, dyn_args, dyn_kwargs = splitter.split((self, *args), kwargs)
            call = MethodCall(statics, orig)
            with traced_flag_hint(where, splitter.traced_names(statics, dyn_kwargs, method=True)):
                return body(rematerialized, self, call, (dyn_args[1:], dyn_kwargs))

        method.method_handler_wrapped = True  # type: ignore[attr-defined]
        return method

    overrides = {name: wrap(getattr(module_cls, name)) for name in methods or ["__call__"]}
    return type(f"Remat{module_cls.__name__}", (module_cls,), overrides)  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class MethodCall:
    """One call of a wrapped method, bound to its static values:
    ``call(module, (args, kwargs))`` runs the method on ``module`` with the
    traced ``args`` and ``kwargs`` (``self`` left out). Hashable by value, so
    it keys the name check."""

    statics: Statics
    method: Callable[..., Any]

    def __call__(self, module: Any, dynamic: tuple[tuple[Any, ...], dict[str, Any]]) -> Any:
        args, kwargs = dynamic
        return self.statics.call(self.method, module, *args, **kwargs)


def _linen_remat(method: RematMethod, module: nn.Module, call: MethodCall,
                 dynamic: tuple[tuple[Any, ...], dict[str, Any]]) -> Any:
    """Linen's :class:`RematBody`: ``nn.remat`` of the call."""
    fields = module_fields(module, method.owner)
    method.validate(call, tuple(sorted(fields.items())), dynamic, module_probe(method.owner, fields, call),
                    abstract(dynamic))
    run = lambda mdl, dyn: call(mdl, dyn)
    run.method_handler_wrapped = True  # setup runs in the clone, when the method is entered
    return nn.remat(run, policy=method.policy.to_jax(), prevent_cse=method.prevent_cse)(module, dynamic)


def module_probe(cls: type[nn.Module], fields: dict[str, Any], call: Callable[[Any, Any], Any]) -> Probe:
    """The :data:`Probe` of a fresh ``cls(**fields)`` run by ``call(module,
    dynamic)``: its parameters from ``init`` and a pure ``apply`` (every
    collection mutable, the new state dropped), with the streams ``params``
    and ``dropout`` seeded by a fixed key; traced on abstract inputs, nothing
    is allocated."""
    key = jax.random.key(0)

    def make(dyn: Any) -> tuple[Any, Callable[[Any, Any], Any]]:
        mdl = cls(**fields, parent=None)
        run = lambda m, d: call(m, d)
        variables = mdl.init({"params": key, "dropout": key}, dyn, method=run)

        def apply(params: Any, d: Any) -> Any:
            return mdl.apply({**variables, "params": params}, d, method=run,
                             rngs={"dropout": key}, mutable=True)[0]

        return variables.get("params", {}), apply

    return make
