"""Failures users of JAX rematerialization hit in public reports (JAX, Flax,
MaxText, Levanter, Praxis issue threads), by kind, with the inputs not tested
next to their feature. Where each kind is tested:

- the policy keeps the wrong thing silently: tests/test_apply.py (missing tags),
  tests/test_policies.py (none vs full, save+offload), tests/test_silent_paths.py
  (alternative spellings, names never kept, jax_remat3), here (dots rule under vmap);
- scan over layers and CSE: tests/test_apply.py (groups cut memory, prevent_cse=False
  under scan), tests/test_silent_paths.py (an unrolled remat merged away by CSE);
  the two-level rule: remat/scan.py;
- offload: tests/test_apply.py (capability check, offload under groups),
  tests/test_sweep.py (offloaded layer input: host bytes > 0),
  tests/test_silent_paths.py (the scan carry);
- static flags and arguments: tests/test_apply.py (static by name, kwargs, unhashable
  static, changing floats);
- linen composition: tests/test_apply.py (one layer, (1, 1) groups, per-layer dropout
  masks), tests/test_silent_paths.py (every variable collection under scan);
- custom kernels and side effects: tests/test_silent_paths.py (names in custom_vjp
  forward rules, the kernel runs once), tests/test_apply.py (debug callbacks run twice);
- numbers differ with remat: tests/test_apply.py (dropout parity, weak-typed floats),
  tests/test_models.py (bf16 tolerances), here (PRNG);
- observability: tests/test_analysis.py (residual rows by name x layers, trip-count
  FLOPs), tests/test_silent_paths.py (missing memory analysis, one baseline, claims
  checked against the compiled memory, kept matmuls).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import checkpoint_name

import remat
from remat.policies import vocab

# 8 pipeline stages (or experts), each with its own weights, under an outer vmap
W = jax.ShapeDtypeStruct((8, 2, 16, 16), jnp.float32)
X = jax.ShapeDtypeStruct((8, 32, 16), jnp.float32)


def layer(w, x):
    h = jnp.tanh(checkpoint_name(x @ w[0], vocab.MLPWI))
    return jnp.tanh(checkpoint_name(h @ w[1], vocab.MLPWO))


def step(policy):
    f = jax.vmap(remat.checkpoint(layer, policy))
    return jax.grad(lambda w, x: f(w, x).sum())


def test_dots_rule_under_vmap_keeps_nothing_and_the_report_says_so():
    """Under an outer vmap every matmul has a batch dimension, so
    dots_with_no_batch_dims keeps none; name-based policies still work."""
    shape_rule = remat.analyze(step("dots_with_no_batch_dims_saveable"), W, X)
    assert shape_rule.dots_kept == 0 and shape_rule.dots_forward == shape_rule.dots_forward_batched == 2
    assert any("a dots:no_batch rule keeps none of them" in n for n in shape_rule.notes)
    named = remat.analyze(step("save:mlpwi,mlpwo"), W, X)
    assert "mlpwi" in {r.name for r in named.residuals}


def test_a_non_default_prng_warns_that_recomputed_dropout_may_differ():
    """Only threefry guarantees the recomputed masks equal the forward ones."""
    f = remat.checkpoint(layer, "save:mlpwi")
    with jax.default_prng_impl("rbg"), pytest.warns(UserWarning, match="the default PRNG implementation "
                                                                        "is 'rbg'; random bits recomputed"):
        jax.make_jaxpr(f)(jnp.ones((2, 16, 16)), jnp.ones((3, 16)))
