"""``remat.testing``: assertions for your own models, built on chex.

Checks that a remat policy does what it promises on *your* function: same
numbers (:func:`assert_policy_parity`), the residuals you expect
(:func:`assert_saved_names`), memory in the order you expect
(:func:`assert_memory_ordered`), and how often an op runs in the compiled
gradient (:func:`compiled_op_count`, e.g. "my kernel runs once"). The first two take a plain function of
arrays and apply the policy to all of it with :func:`remat.checkpoint`; the
memory check takes ``build(policy) -> function`` so the policy is applied
per layer, where remat saves memory.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp

from remat import _compat
from remat._apply import checkpoint
from remat._errors import NoMemoryAnalysisError, RematError
from remat._memory import compiled_memory
from remat._residuals import residual_rows
from remat.policies import Policy, get

_compat.hide_frames(__file__)

__all__ = ["TOLERANCES", "NoMemoryAnalysisError", "assert_memory_ordered", "assert_policy_parity",
           "assert_saved_names", "compiled_op_count", "saved_names", "temp_bytes"]

TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-10),
    "float32": (1e-5, 1e-5),
    "bfloat16": (2e-2, 2e-2),
    "float16": (1e-2, 1e-2),
}
"""``(rtol, atol)`` per dtype of the compared arrays, used when the caller
gives none. Recomputation changes the order of XLA's fusions, so results
agree to rounding, not bit for bit; bf16 allows for its 8-bit mantissa."""


def _loss(fn: Callable[..., Any]) -> Callable[..., jax.Array]:
    def loss(*args: Any) -> jax.Array:
        out = fn(*args)
        return sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(out))

    return loss


def _argnums(args: Sequence[Any], caller: str) -> tuple[int, ...]:
    """Every argument's position (gradients are taken for all), once each leaf
    is checked to be a float array, which ``jax.grad`` can differentiate.

    Raises:
      RematError: a leaf that is not (an NNX RNG key or count, an integer array).
    """
    for i, a in enumerate(args):
        for path, leaf in jax.tree_util.tree_flatten_with_path(a)[0]:
            dtype = leaf.dtype if hasattr(leaf, "dtype") else jnp.result_type(leaf)
            if not jnp.issubdtype(dtype, jnp.inexact):
                raise RematError(
                    f"remat.testing.{caller}: argument {i}{jax.tree_util.keystr(path)} is {dtype}, not a "
                    "float array, and gradients are taken for every argument; an NNX state from nnx.split "
                    "holds RNG keys and counts: pass the parameters only (graphdef, params, rest = "
                    "nnx.split(model, nnx.Param, ...)) and close over the rest")
    return tuple(range(len(args)))


def _tolerance(tree: Any, rtol: float | None, atol: float | None) -> tuple[float, float]:
    dtypes = {str(jnp.asarray(x).dtype) for x in jax.tree.leaves(tree)}
    loosest = max((TOLERANCES.get(d, TOLERANCES["float32"]) for d in dtypes), default=TOLERANCES["float32"])
    return (loosest[0] if rtol is None else rtol, loosest[1] if atol is None else atol)


def assert_policy_parity(fn: Callable[..., Any], policy: str | Policy | Sequence[str | Policy], *args: Any,
                         rtol: float | None = None, atol: float | None = None) -> None:
    """Assert that ``fn`` under ``policy`` gives the same outputs and the same
    gradients (of the sum of all outputs, with respect to every argument) as
    without remat.

    Example:
      >>> import jax.numpy as jnp
      >>> from jax.ad_checkpoint import checkpoint_name
      >>> import remat
      >>> def mlp(w1, w2, x):
      ...     return jnp.tanh(checkpoint_name(x @ w1, "mlpwi")) @ w2
      >>> w1, w2, x = jnp.ones((4, 8)), jnp.ones((8, 4)), jnp.ones((2, 4))
      >>> remat.testing.assert_policy_parity(mlp, ["full", "save:mlpwi"], w1, w2, x)

    Args:
      fn: arrays in, a pytree of arrays out.
      policy: a preset name, spec string or :class:`Policy`, or a list of them
        (the reference is then computed once).
      *args: concrete arrays (pytrees allowed); gradients are taken for all.
      rtol, atol: tolerances; default per dtype from :data:`TOLERANCES`.

    Raises:
      AssertionError: outputs or gradients differ (chex names the leaf and
        the message names the policy).
    """
    argnums = _argnums(args, "assert_policy_parity")

    def outputs_and_grads(f: Callable[..., Any]) -> Any:
        return jax.jit(lambda *a: (f(*a), jax.grad(_loss(f), argnums=argnums)(*a)))(*args)

    want = outputs_and_grads(fn)
    for p in [policy] if isinstance(policy, (str, Policy)) or callable(policy) else policy:
        got = outputs_and_grads(checkpoint(fn, p))
        for what, w, g in zip(("outputs", "gradients"), want, got, strict=True):
            rt, at = _tolerance(w, rtol, atol)
            chex.assert_trees_all_close(g, w, rtol=rt, atol=at,
                                        custom_message=f"{what} under policy {str(get(p))!r}")


def saved_names(fn: Callable[..., Any], policy: str | Policy, *args: Any) -> dict[str, frozenset[str]]:
    """The checkpoint names that ``fn`` under ``policy`` keeps for the backward
    pass, by memory kind: ``{"device": {...}, "host": {...}}``.

    Found by JAX's residual analysis of the gradient (``remat._residuals``);
    arguments may be ``jax.ShapeDtypeStruct`` (nothing is computed).
    """
    loss = _loss(checkpoint(fn, policy))
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=_argnums(args, "saved_names")))(*args)
    out: dict[str, set[str]] = {"device": set(), "host": set()}
    for row in residual_rows(jaxpr):
        if row.source == "checkpoint_name":
            out[row.memory_kind].add(row.name)
    return {k: frozenset(v) for k, v in out.items()}


def assert_saved_names(fn: Callable[..., Any], policy: str | Policy, *args: Any,
                       names: Iterable[str], offloaded: Iterable[str] = ()) -> None:
    """Assert exactly which checkpoint names the policy keeps on device
    (``names``) and on host (``offloaded``).

    Example:
      >>> import jax.numpy as jnp
      >>> from jax.ad_checkpoint import checkpoint_name
      >>> import remat
      >>> mlp = lambda w1, w2, x: jnp.tanh(checkpoint_name(x @ w1, "mlpwi")) @ w2
      >>> w1, w2, x = jnp.ones((4, 8)), jnp.ones((8, 4)), jnp.ones((2, 4))
      >>> remat.testing.assert_saved_names(mlp, "save:mlpwi", w1, w2, x, names={"mlpwi"})
      >>> remat.testing.assert_saved_names(mlp, "offload:mlpwi", w1, w2, x, names=(), offloaded={"mlpwi"})

    Raises:
      AssertionError: listing the names kept, missing and unexpected.
    """
    got = saved_names(fn, policy, *args)
    for kind, want in (("device", frozenset(names)), ("host", frozenset(offloaded))):
        if got[kind] != want:
            raise AssertionError(
                f"policy {str(get(policy))!r} keeps on {kind} {sorted(got[kind])}, expected "
                f"{sorted(want)}: missing {sorted(want - got[kind])}, unexpected {sorted(got[kind] - want)}")


def temp_bytes(build: Callable[[Policy], Callable[..., Any]], policy: str | Policy, *args: Any) -> int:
    """``temp_size_in_bytes`` of the compiled gradient (of the sum of the
    outputs, with respect to every argument) of ``build(policy)``,
    compile-only: arguments may be ``jax.ShapeDtypeStruct``.

    Raises:
      NoMemoryAnalysisError: the backend gives no memory analysis (or all
        zeros), so there is no figure to compare.
    """
    grad = jax.grad(_loss(build(get(policy))), argnums=_argnums(args, "temp_bytes"))
    mem = compiled_memory(jax.jit(grad).lower(*args).compile())
    if mem is None:
        raise NoMemoryAnalysisError(
            f"the {jax.default_backend()!r} backend ({jax.devices()[0].device_kind}) gives no compiled "
            "memory analysis (none, or all zeros): remat.testing cannot compare memory on it")
    return mem["temp"]


def compiled_op_count(fn: Callable[..., Any], op: str, *args: Any, policy: str | Policy | None = None) -> int:
    """How many HLO instructions with opcode ``op`` (e.g. ``"exponential"``,
    ``"tanh"``, ``"dot"``, ``"custom-call"``) the compiled
    ``jax.value_and_grad`` of ``fn`` (of the sum of its outputs, with respect
    to every argument) holds, with ``policy`` applied to all of ``fn`` by
    :func:`remat.checkpoint` (None: no remat). Compile-only: arguments may be
    ``jax.ShapeDtypeStruct``.

    The value is computed too, since with ``jax.grad`` alone XLA drops the
    primal output and the count undercounts the forward pass. Use it to
    assert that a custom kernel's forward runs once under remat, e.g.
    ``compiled_op_count(f, "exponential", x, policy="save:kres,kout") == 1``.

    Example: full remat runs the forward again in the backward pass.

      >>> import jax.numpy as jnp
      >>> import remat
      >>> f = lambda x: jnp.exp(jnp.sin(x))
      >>> remat.testing.compiled_op_count(f, "exponential", jnp.ones(8))
      1
      >>> remat.testing.compiled_op_count(f, "exponential", jnp.ones(8), policy="full")
      2

    (For a ``jax.custom_vjp`` kernel that means saving both the residuals its
    forward rule tags and its tagged output; see the README's Limitations.)

    Returns:
      The count (int); 0 when the op does not occur, so a misspelt opcode
      cannot pass an ``== 1`` assertion.

    Raises:
      The errors of :func:`remat.checkpoint` for a bad ``policy``, and of
      tracing ``fn`` on ``args``.
    """
    f = fn if policy is None else checkpoint(fn, policy)
    lowered = jax.jit(jax.value_and_grad(_loss(f), argnums=_argnums(args, "compiled_op_count"))).lower(*args)
    return len(re.findall(rf"\s{re.escape(op)}\(", lowered.compile().as_text()))


def assert_memory_ordered(build: Callable[[Policy], Callable[..., Any]],
                          policies: Sequence[str | Policy], *args: Any) -> None:
    """Assert that the gradient's compile-time ``temp_size_in_bytes`` does
    not increase along ``policies`` (most memory first, e.g.
    ``["none", "minimal", "full"]``). Compile-only; arguments may be
    ``jax.ShapeDtypeStruct``.

    ``build(policy)`` returns the function to measure with the policy applied
    where it belongs, typically per layer inside a scan: rematerializing a
    whole function at once saves no memory, since the backward pass
    recomputes all of it before using any of it.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.ad_checkpoint import checkpoint_name
      >>> import remat
      >>> def build(policy):
      ...     layer = remat.checkpoint(lambda w, x: jnp.tanh(checkpoint_name(x @ w, "mlpwi")), policy)
      ...     return lambda ws, x: jax.lax.scan(lambda c, w: (layer(w, c), None), x, ws)[0]
      >>> ws = jax.ShapeDtypeStruct((8, 64, 64), jnp.float32)  # 8 layers, compile-only
      >>> x = jax.ShapeDtypeStruct((32, 64), jnp.float32)
      >>> remat.testing.assert_memory_ordered(build, ["none", "save:mlpwi", "full"], ws, x)

    Raises:
      AssertionError: giving every policy's bytes.
    """
    figures = [(str(get(p)), temp_bytes(build, p, *args)) for p in policies]
    if any(a[1] < b[1] for a, b in itertools.pairwise(figures)):
        table = ", ".join(f"{p}: {b} B" for p, b in figures)
        raise AssertionError(f"temp_size_in_bytes is not non-increasing along the policies: {table}")
