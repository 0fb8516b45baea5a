"""Test-wide JAX settings: implicit rank promotion is an error, so a shape bug
(a ``[B]`` added to a ``[B, T]``) cannot pass silently."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
