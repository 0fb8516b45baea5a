"""Issue 3's measured acceptance: activation memory of a 64-layer MLP stack
under per-layer full remat, nested sqrt-N remat, Flax's nn.remat_scan, and no
remat. Compile-only on abstract shapes (nothing allocated); prints
``temp_size_in_bytes`` and the ratios.

Run: ``python tests/benchmarks/nested_remat.py``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

import remat
from remat.policies import vocab

L, B, T, D, F = 64, 8, 512, 256, 1024


class MLPBlock(nn.Module):
    """Pre-norm residual MLP block, ``x[B, T, D] -> [B, T, D]``, f32, tagged."""

    hidden: int = F

    @nn.compact
    def __call__(self, x):
        x = checkpoint_name(x, vocab.DECODER_LAYER_INPUT)
        h = checkpoint_name(nn.LayerNorm()(x), vocab.MLP_NORM)
        h = checkpoint_name(nn.Dense(self.hidden)(h), vocab.MLPWI)
        h = checkpoint_name(nn.Dense(x.shape[-1])(nn.gelu(h)), vocab.MLPWO)
        return x + h


class RematScanStack(nn.Module):
    """The same stack with Flax's ``nn.remat_scan(lengths=(8, 8))``."""

    @nn.compact
    def __call__(self, x):
        return nn.remat_scan(MLPBlock, lengths=(8, 8))()(x)


def temp_bytes(module: nn.Module) -> int:
    """``temp_size_in_bytes`` of the compiled gradient of ``sum(module(x))``."""
    x = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
    params = jax.eval_shape(module.init, jax.random.key(0), x)

    def loss(p, x):
        return module.apply(p, x).sum()

    compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
    stack = lambda policy, groups=None: remat.scan_layers(
        MLPBlock, num_layers=L, policy=policy, groups=groups)()
    figures = {
        "none": temp_bytes(stack("none")),
        "full": temp_bytes(stack("full")),
        "full, groups=sqrt": temp_bytes(stack("full", "sqrt")),
        "nn.remat_scan(8, 8)": temp_bytes(RematScanStack()),
    }
    for k, v in figures.items():
        print(f"{k:>22}: {v / 2**20:9.1f} MiB")
    print(f"sqrt / full           = {figures['full, groups=sqrt'] / figures['full']:.3f} (target <= 0.6)")
    print(f"sqrt / nn.remat_scan  = {figures['full, groups=sqrt'] / figures['nn.remat_scan(8, 8)']:.3f} "
          "(target <= 0.5)")
    print(f"full / none           = {figures['full'] / figures['none']:.3f} (target <= 0.1)")


if __name__ == "__main__":
    main()
