"""Benchmark (not a test): the NNX model's train step against the linen
model's, compile-only on this CPU, ``llama3.2-1b`` at batch 1 x 2048 under
``none``, ``minimal`` and ``full``: ``temp_size_in_bytes`` of each API and
their ratio (target: within 5 %).

Also the cost of NNX's own graph transforms: the gradient of the same model
taken with ``nnx.value_and_grad`` on a live module (graph mode) against
``jax.value_and_grad`` over its split parameters (no optimizer, the same
loss), to compare with a public report of 5.26 GB temp for an ``nnx.grad``
step against 2.76 GB under ``jax.grad``::

    python tests/benchmarks/nnx_vs_linen.py [MODEL] [--batch B] [--seq T]
"""

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from remat import inspect_policy, models, train_step_setup
from remat._memory import compiled_memory, default_compiler_options
from remat.models import nnx as MN


def grad_temp_bytes(config: models.ModelConfig, policy: str, batch: int, seq: int, graph: bool) -> int:
    """temp bytes of the compiled loss gradient of the NNX model, by ``nnx.value_and_grad`` on the module
    (``graph``) or ``jax.value_and_grad`` on its split parameters."""
    make = lambda: MN.Transformer(config, policy=policy, rngs=nnx.Rngs(params=0, dropout=0))
    abstract = nnx.eval_shape(make)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def loss(model: MN.Transformer, t: jax.Array) -> jax.Array:
        return model(t, targets=t)

    def step(params, rest, t):
        if graph:
            model = nnx.merge(graphdef, params, rest, copy=True)
            return nnx.value_and_grad(loss)(model, t)
        return jax.value_and_grad(lambda p: loss(nnx.merge(graphdef, p, rest, copy=True), t))(params)

    jitted = jax.jit(step, compiler_options=default_compiler_options())
    compiled = jitted.lower(params, rest, tokens).compile()
    return compiled_memory(compiled)["temp"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="llama3.2-1b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()
    gib = 2.0 ** 30
    print(f"{args.model}, batch {args.batch} x {args.seq}, train step (AdamW), compile-only on "
          f"{jax.devices()[0].platform}")
    for policy in ("none", "minimal", "full"):
        temp = {api: inspect_policy(train_step_setup(args.model, batch=args.batch, seq=args.seq, api=api),
                                    policy).temp_bytes for api in MN.APIS}
        print(f"  {policy:8s} temp linen {temp['linen'] / gib:7.3f} GiB, nnx {temp['nnx'] / gib:7.3f} GiB, "
              f"nnx/linen {temp['nnx'] / temp['linen']:.4f}")
    config = models.get_config(args.model)
    for policy in ("none", "full"):
        g = {graph: grad_temp_bytes(config, policy, args.batch, args.seq, graph) for graph in (True, False)}
        print(f"  gradient only, {policy:5s}: nnx.value_and_grad on the module {g[True] / gib:7.3f} GiB, "
              f"jax.value_and_grad on split params {g[False] / gib:7.3f} GiB, ratio {g[True] / g[False]:.4f}")


if __name__ == "__main__":
    main()
