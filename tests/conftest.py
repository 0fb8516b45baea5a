"""Test-wide JAX settings: implicit rank promotion is an error, so a shape bug
(a ``[B]`` added to a ``[B, T]``) cannot pass silently; and, where JAX's CUDA
plugin is installed, it registers without a GPU driver
(``JAX_SKIP_CUDA_CONSTRAINTS_CHECK``, read when JAX first uses a backend), so
``tests/test_targets.py`` compiles for GPU targets on a CPU-only machine;
libtpu, where installed, starts without errors on a machine with no TPU;
and no compile comes from the cache of earlier runs (``REMAT_CACHE_DIR`` empty)."""

import os

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ["REMAT_CACHE_DIR"] = ""  # every test compiles: no results of earlier runs (remat._cache)

import jax

from remat import _environment

_environment.quiet_start()  # before any backend starts: no libtpu start-up errors where no TPU is attached
jax.config.update("jax_numpy_rank_promotion", "raise")
