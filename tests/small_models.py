"""Shared by the linen and NNX model tests: the shrunk model config and one
name per distinct policy."""

from __future__ import annotations

from remat import models as M, policies as P

_FIRST_NAME: dict[P.Policy, str] = {}
for _name in P.names():
    _FIRST_NAME.setdefault(P.get(_name), _name)
UNIQUE_POLICIES = list(_FIRST_NAME.values())
"""One name per distinct :class:`remat.Policy` value, in registration order
(aliases such as ``nothing_saveable`` for ``full`` compile to the same program)."""


def small(family: str, dtype: str = "float32", **overrides) -> M.ModelConfig:
    """``tiny`` shrunk for fast compiles: 4 layers, D=32, N=4 heads of 8, F=64;
    GQA (K=2) for llama, MHA for gpt2."""
    kv = 2 if family == "llama" else 4
    return M.get_config("tiny", family=family, dtype=dtype, num_layers=4, d_model=32, num_heads=4,
                        num_kv_heads=kv, head_dim=8, mlp_dim=64, max_seq_len=32, **overrides)
