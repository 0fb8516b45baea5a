"""FLOPs and matmuls of a traced step, every ``scan`` iteration counted
(XLA's ``cost_analysis()`` counts a while-loop body once).

Backend independent, over the jaxpr through :func:`remat._jaxpr.walk`:
``dot_general`` costs ``2 * prod(output shape) * prod(contracting sizes)``;
``conv_general_dilated`` ``2 * prod(output shape) * prod(kernel shape) /
output features``; every elementwise arithmetic op (transcendentals included)
one FLOP per output element; every reduction one per input element;
cuDNN flash attention (``jax.nn.dot_product_attention(implementation="cudnn")``,
``q[B, T, N, H]``, ``k[B, S, K, H]``) ``4 * B * N * T * S * H`` forward (its
two matmuls over the whole ``T x S``, as the einsum attention counts them)
and 2.5 times that backward (the scores recomputed, then four matmuls:
Dao 2023, "FlashAttention-2", section 3). A Pallas kernel
(``pallas_call``, e.g. the TPU flash attention) counts its body once per
grid point, so what it runs is counted, recomputation in its backward
kernels included. A
``scan`` body counts ``length`` times, each ``cond`` its most expensive
branch, a ``while_loop`` (unknown trip count) once, with a note.
Recomputation is visible in the jaxpr (the ``remat`` equations of the
backward pass), so the recompute FLOPs are the difference to the same step
without remat.
"""

from __future__ import annotations

import math
from typing import Any

from jax.extend import core as jcore

from remat import _compat
from remat._jaxpr import walk

_compat.hide_frames(__file__)

__all__ = ["count_dots", "count_flops"]

_ELEMENTWISE = frozenset("""
    add add_any sub mul div rem neg max min abs sign pow integer_pow square sqrt rsqrt cbrt
    exp exp2 expm1 log log1p tanh logistic sin cos tan asin acos atan atan2 sinh cosh asinh
    acosh atanh erf erfc erf_inv lgamma digamma igamma floor ceil round nextafter
""".split())
_REDUCTIONS = frozenset("""
    reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin
    cumsum cumprod cummax cummin cumlogsumexp
""".split())


_FLASH_ATTENTION = {"dot_product_attention_fwd_wrapper": 4, "dot_product_attention_bwd_wrapper": 10}
"""FLOPs per ``B * N * T * S * H`` of JAX's cuDNN attention primitives."""


def _eqn_flops(eqn: Any) -> int:
    prim = eqn.primitive.name
    if prim == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval
        return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in lc)
    if prim == "conv_general_dilated":
        rhs = eqn.invars[1].aval
        out_feat = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
        return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs.shape) // out_feat
    if prim in _FLASH_ATTENTION:
        (b, t, n, h), s = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape[1]
        return _FLASH_ATTENTION[prim] * b * n * t * s * h
    if prim in _ELEMENTWISE:
        return math.prod(eqn.outvars[0].aval.shape)
    if prim in _REDUCTIONS:
        return math.prod(eqn.invars[0].aval.shape)
    return 0


def count_flops(jaxpr: jcore.Jaxpr | jcore.ClosedJaxpr) -> tuple[int, tuple[str, ...]]:
    """FLOPs of a jaxpr with every ``scan`` iteration counted (see the module doc).

    Args:
      jaxpr: e.g. ``jax.make_jaxpr(step)(*args)``.

    Returns:
      ``(flops, notes)``: the count (int, FLOPs) and caveats (a ``while_loop``
      counted once).
    """
    total, notes = 0, set()
    for s in walk(jaxpr, into=lambda e: e.primitive.name != "cond"):
        prim = s.eqn.primitive.name
        if prim == "cond":  # the most expensive branch
            branches = [count_flops(b) for b in s.eqn.params["branches"]]
            total += s.scope.trips * max(f for f, _ in branches)
            notes.update(n for _, ns in branches for n in ns)
        else:
            total += s.scope.trips * _eqn_flops(s.eqn)
        if prim == "while":
            notes.add("a while_loop (unknown trip count) is counted once")
    return total, tuple(sorted(notes))


def count_dots(jaxpr: jcore.Jaxpr | jcore.ClosedJaxpr) -> tuple[int, int]:
    """``(matmuls, matmuls with batch dimensions)`` of the forward pass of a
    traced step, every scan iteration counted: the ``dot_general`` equations
    outside any backward pass (:func:`remat._compat.is_transposed`)."""
    dots = batched = 0
    for s in walk(jaxpr):
        if s.eqn.primitive.name == "dot_general" and not (s.scope.transposed
                                                          or _compat.is_transposed(s.eqn)):
            dots += s.scope.trips
            batched += s.scope.trips if s.eqn.params["dimension_numbers"][1][0] else 0
    return dots, batched
