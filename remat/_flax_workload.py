"""A :class:`remat.Workload` for your own Flax model in one call: a model, a
loss and the batch's abstract shape, in linen (:func:`linen_workload`) or NNX
(:func:`nnx_workload`).

The train step they build is the usual one: the loss and its gradient with
respect to the parameters (``jax.value_and_grad``), then the optimizer's
update (``optax``; default :func:`remat.step.make_optimizer`, what
``remat train`` trains with), the parameters and optimizer state donated.
Its arguments are ``(params, opt_state, other, batch)``, labelled parameters,
optimizer state, parameters (``other``: the model's variables that are not
trained, linen's other collections or NNX's RNG state, read but not
updated) and batch for the peak by term. Under a mesh the batch is split on
its leading axis over the workload's batch axes and everything else is
replicated; a model sharded otherwise (FSDP, tensor parallelism), one with
state the step updates (batch statistics) or several optimizers is a
:class:`remat.TrainStep` written by hand, the general case.

What the workload reads of its :class:`remat.Configuration`: ``batch`` (the
leading dimension of every batch leaf), and whatever ``make_model`` reads
(``policy`` always; ``groups`` if it passes them to its layer scan), so
``remat tune`` searches nested groups only for a model that takes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from remat._errors import RematError
from remat._workload import Configuration, TrainStep, Workload
from remat.step import make_optimizer

__all__ = ["linen_workload", "nnx_workload"]

_ARG_ROLES = ("parameters", "optimizer state", "parameters", "batch")
"""The roles of the step's ``(params, opt_state, other, batch)``."""


def _leading(name: str, batch: Any) -> int:
    """The global batch: the leading dimension every leaf of ``batch`` shares."""
    leaves = jax.tree.leaves_with_path(batch)
    if not leaves:
        raise RematError(f"workload {name!r}: the batch has no arrays")
    dims = {}
    for path, leaf in leaves:
        shape = getattr(leaf, "shape", None)
        if shape is None or not hasattr(leaf, "dtype") or len(shape) == 0:
            raise RematError(f"workload {name!r}: batch leaf batch{jax.tree_util.keystr(path)} is "
                             f"{leaf!r}, not an array with a leading batch axis: give a jax.ShapeDtypeStruct")
        dims[jax.tree_util.keystr(path)] = shape[0]
    if len(set(dims.values())) > 1:
        raise RematError(f"workload {name!r}: the batch leaves disagree on their leading (batch) dimension: "
                         + ", ".join(f"batch{k}: {d}" for k, d in dims.items()))
    return next(iter(dims.values()))


def _batch_at(batch: Any, size: int, mesh: Mesh | None, axes: tuple[str, ...]) -> Any:
    """``batch`` with a leading dimension of ``size``, split over ``axes`` on ``mesh``."""
    split = tuple(a for a in axes if mesh is not None and a in mesh.shape)
    sharding = NamedSharding(mesh, PartitionSpec(split or None)) if mesh is not None else None
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((size, *x.shape[1:]), x.dtype, sharding=sharding),
                        batch)


def _workload(name: str, batch: Any, init: Callable[[Configuration], tuple[Any, Any, Callable[..., Any]]],
              optimizer: optax.GradientTransformation | None, defaults: Configuration | None,
              layers: int | None, batch_axes: tuple[str, ...]) -> Workload:
    """The workload both APIs share; ``init(c) -> (params, other, loss)``, the
    abstract parameters and other variables of the model under ``c`` and
    ``loss(params, other, batch) -> scalar``."""
    size = _leading(name, batch)
    tx = optimizer if optimizer is not None else make_optimizer()

    def build(c: Configuration, mesh: Mesh | None) -> TrainStep:
        params, other, loss = init(c)
        opt_state = jax.eval_shape(tx.init, params)

        def step(params: Any, opt_state: Any, other: Any, batch: Any) -> tuple[Any, Any, jax.Array]:
            value, grads = jax.value_and_grad(loss)(params, other, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value

        return TrainStep(step, (params, opt_state, other, _batch_at(batch, c.batch, mesh, batch_axes)),
                         _ARG_ROLES, donate_argnums=(0, 1))

    return Workload(name, build, defaults or Configuration(batch=size), batch_axes=batch_axes, layers=layers)


def linen_workload(make_model: Callable[[Configuration], nn.Module],
                   loss: Callable[[nn.Module, Any], jax.Array], batch: Any, *, name: str = "model",
                   optimizer: optax.GradientTransformation | None = None,
                   defaults: Configuration | None = None, layers: int | None = None,
                   batch_axes: tuple[str, ...] = ("data", "fsdp")) -> Workload:
    """A linen model's train step as a :class:`remat.Workload` (see the module doc).

    Example::

        def loss(model, batch):  # model: bound, as in nn.Module.apply(..., method=loss)
            logits = model(batch["images"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

        workload = remat.linen_workload(
            lambda c: ViT(policy=c.policy, groups=c.groups), loss,
            {"images": jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32),
             "labels": jax.ShapeDtypeStruct((8,), jnp.int32)}, name="vit", layers=4)
        remat.sweep(workload)

    Args:
      make_model: ``make_model(configuration) -> nn.Module``, the model with
        ``configuration.policy`` (and the ``groups``, segments it reads)
        applied to its own layers (:func:`remat.scan_layers`, :func:`remat.remat`).
        Its variables are initialized once (abstractly), from the first
        configuration built: a policy, groups or batch size does not change them.
      loss: ``loss(model, batch) -> float[]``, run as the model's method
        (``model.init`` / ``model.apply(..., method=loss)``); ``rngs``
        ``params`` and ``dropout`` are given.
      batch: a pytree of ``jax.ShapeDtypeStruct`` (or arrays), every leaf
        ``[B, ...]``; ``Configuration.batch`` replaces ``B``.
      name: what tables and reports call it.
      optimizer: default :func:`remat.step.make_optimizer` ``()``.
      defaults: the configuration a knob left out takes (default: ``batch=B``).
      layers: the layer count of the model's scan, if segments may split it.
      batch_axes: the mesh axes that split the batch.

    Raises:
      RematError: a batch leaf that is not an array with a leading axis, or
        leaves that disagree on it.
    """
    keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    first: list[Any] = []  # the abstract variables, from the first build (``model.init`` traces the forward)

    def init(c: Configuration) -> tuple[Any, Any, Callable[..., Any]]:
        model = make_model(c)
        if not first:
            first.append(nn.meta.unbox(jax.eval_shape(lambda b: model.init(keys, b, method=loss), batch)))
        variables = first[0]
        other = {k: v for k, v in variables.items() if k != "params"}

        def apply(params: Any, other: Any, batch: Any) -> jax.Array:
            return model.apply({"params": params, **other}, batch, method=loss,
                               rngs={"dropout": keys["dropout"]})

        return variables["params"], other, apply

    return _workload(name, batch, init, optimizer, defaults, layers, batch_axes)


def nnx_workload(make_model: Callable[[Configuration], nnx.Module],
                 loss: Callable[[nnx.Module, Any], jax.Array], batch: Any, *, name: str = "model",
                 optimizer: optax.GradientTransformation | None = None,
                 defaults: Configuration | None = None, layers: int | None = None,
                 batch_axes: tuple[str, ...] = ("data", "fsdp")) -> Workload:
    """An NNX model's train step as a :class:`remat.Workload` (see the module doc).

    The model is built abstractly (``nnx.eval_shape``: nothing allocated) and
    split into its ``nnx.Param`` variables, which are trained, and the rest
    (RNG state), which is read; the step merges them (``nnx.merge``) and
    calls ``loss``. Example::

        workload = remat.nnx_workload(
            lambda c: ViT(policy=c.policy, groups=c.groups, rngs=nnx.Rngs(0)), loss,
            {"images": jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32),
             "labels": jax.ShapeDtypeStruct((8,), jnp.int32)}, name="vit-nnx", layers=4)

    Args:
      make_model: ``make_model(configuration) -> nnx.Module``, the model with
        ``configuration.policy`` (and the ``groups``, segments it reads)
        applied to its own layers (:func:`remat.nnx.scan_layers`, :func:`remat.nnx.remat`).
      loss: ``loss(model, batch) -> float[]``.
      batch, name, optimizer, defaults, layers, batch_axes: as for :func:`linen_workload`.

    Raises:
      RematError: as :func:`linen_workload`.
    """
    def init(c: Configuration) -> tuple[Any, Any, Callable[..., Any]]:
        graphdef, params, other = nnx.split(nnx.eval_shape(lambda: make_model(c)), nnx.Param, ...)

        def apply(params: Any, other: Any, batch: Any) -> jax.Array:
            return loss(nnx.merge(graphdef, params, other), batch)

        return params, other, apply

    return _workload(name, batch, init, optimizer, defaults, layers, batch_axes)
