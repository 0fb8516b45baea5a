"""Device meshes and logical-axis rules: what each device holds.

JAX/XLA SPMD is the distributed engine (``jax.sharding``): a mesh with the
axes ``data``, ``fsdp`` and ``tensor`` (an axis not given has size 1), and
MaxText-style logical-axis rules that map the models' axis names onto it
(:data:`LOGICAL_RULES`). Parameters and activations have names of their own
(``embed`` vs ``activation_embed``, as MaxText's ``activation_*`` names), so
sharding a parameter never constrains an activation, and the reverse.

=======================  ===================  =====================================
logical name             mesh axes            meaning
=======================  ===================  =====================================
``activation_batch``     ``data``, ``fsdp``   the batch: data parallel and FSDP
``activation_heads``     ``tensor``           attention heads of activations
``activation_kv_heads``  ``tensor``           key/value heads of activations
``activation_mlp``       ``tensor``           the MLP hidden axis of activations
``activation_vocab``     ``tensor``           the logits' vocabulary axis
``embed``                ``fsdp``             parameters (and so gradients and
                                              optimizer state) sharded on D: FSDP
``heads``, ``kv_heads``  ``tensor``           tensor parallel attention weights
``mlp``, ``vocab``       ``tensor``           tensor parallel MLP and embedding
=======================  ===================  =====================================

Every other name (``activation_length``, ``activation_embed``,
``activation_kv``, ``head_dim``, ``norm``, ``layers``) is replicated. A mesh
axis is used at most once per array (flax drops a second use).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from remat import _compat
from remat._errors import RematError

_compat.hide_frames(__file__)

__all__ = [
    "AXES",
    "LOGICAL_RULES",
    "Rules",
    "batch_factor",
    "batch_sharding",
    "check_batch",
    "initialize_distributed",
    "make_mesh",
    "mesh_context",
    "parse_mesh",
    "replicated",
    "set_cpu_devices",
    "sharded_abstract",
]

AXES = ("data", "fsdp", "tensor")
"""The mesh axes, in mesh order."""

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]
"""Logical-axis rules: ``(logical name, mesh axis or axes or None)`` pairs."""

LOGICAL_RULES: Rules = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)
"""The default rules (see the module doc): data parallel, FSDP, tensor parallel."""


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}``.

    Raises:
      RematError: an unknown axis (the valid ones are :data:`AXES`), a size
        that is not a positive integer, or an axis given twice.
    """
    out: dict[str, int] = {}
    for part in text.split(","):
        name, sep, size = part.strip().partition("=")
        if name not in AXES or not sep or not size.strip().isdigit() or int(size) < 1 or name in out:
            raise RematError(f"--mesh {text!r}: bad term {part.strip()!r}; write AXIS=SIZE terms joined by "
                             f"commas, each axis once, axes {', '.join(AXES)}, e.g. data=2,fsdp=4")
        out[name] = int(size)
    return out


def set_cpu_devices(n: int) -> None:
    """Simulate ``n`` CPU devices (``jax_num_cpu_devices``); must run before
    JAX initialises its backend (before any computation or ``jax.devices()``):
    the first thing in a script or notebook, as ``--devices`` does. Calling
    it again with the same count is a no-op.

    Raises:
      RematError: ``n < 1``, or the backend already runs with another device count.
    """
    if n < 1:
        raise RematError(f"--devices {n}: must be >= 1")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        have = jax.device_count()
        if have != n:
            raise RematError(f"--devices {n}: JAX already runs with {have} device(s); set the device count "
                             "before any JAX computation (first thing in the process)") from None


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join a multi-process (multi-host) run: ``jax.distributed.initialize``
    with these arguments; those left None JAX takes from its environment
    (``JAX_COORDINATOR_ADDRESS``, or a detected cluster: SLURM, Cloud TPU,
    MPI, ...). On CPU the processes exchange data through gloo. Every process
    then sees every device (``jax.devices()``), so a mesh spans the processes.
    Must run before any JAX computation.

    Raises:
      RematError: JAX could not initialise (the message says why).
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    except (RuntimeError, ValueError) as e:
        raise RematError(f"jax.distributed.initialize(coordinator={coordinator!r}, num_processes="
                         f"{num_processes!r}, process_id={process_id!r}) failed: {e}") from None


def make_mesh(axes: Mapping[str, int] | Mesh, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``jax.sharding.Mesh`` with the axes ``data``, ``fsdp``, ``tensor``
    (missing ones of size 1) over ``devices`` (default: all).

    Raises:
      RematError: the product of the sizes is not the device count (both named),
        or an unknown axis.
    """
    if isinstance(axes, Mesh):
        return axes
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        raise RematError(f"mesh axes {unknown} unknown; valid: {', '.join(AXES)}")
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(axes.get(a, 1) for a in AXES)
    if math.prod(shape) != len(devices):
        given = ",".join(f"{a}={axes[a]}" for a in AXES if a in axes)
        raise RematError(f"mesh {given} has {math.prod(shape)} devices, but JAX has {len(devices)}; "
                         f"make the sizes multiply to {len(devices)}, or simulate {math.prod(shape)} CPU "
                         f"devices with --devices {math.prod(shape)}")
    # Auto axes: the compiler propagates shardings from the constraints (as
    # GSPMD/Shardy do), rather than the explicit-sharding mode's type checks.
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def batch_factor(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> int:
    """How many ways the batch is split: the product of the mesh axes
    ``activation_batch`` maps to."""
    target = dict(rules).get("activation_batch")
    names = (target,) if isinstance(target, str) else tuple(target or ())
    return math.prod(mesh.shape[a] for a in names)


def check_batch(batch: int, mesh: Mesh | None, rules: Rules = LOGICAL_RULES, microbatches: int = 1) -> None:
    """Raise :class:`RematError` when the global ``batch`` does not split
    evenly into ``microbatches``, each over the devices the batch is sharded on."""
    factor = batch_factor(mesh, rules) if mesh is not None else 1
    if batch % (factor * microbatches):
        on = f"{factor} devices the batch is sharded on (mesh {dict(mesh.shape)})" if mesh is not None else ""
        what = " and ".join(x for x in (f"{microbatches} micro-batches" if microbatches > 1 else "", on) if x)
        raise RematError(f"global batch {batch} does not split over the {what}: use a multiple of "
                         f"{factor * microbatches}")


def mesh_context(mesh: Mesh | None, rules: Rules = LOGICAL_RULES) -> contextlib.ExitStack:
    """Where a model is traced: under ``jax.set_mesh(mesh)`` and flax's
    logical-axis ``rules``, so its sharding constraints apply; nothing for
    ``mesh=None``."""
    import flax.linen as nn

    stack = contextlib.ExitStack()
    if mesh is not None:
        stack.enter_context(jax.set_mesh(mesh))
        stack.enter_context(nn.logical_axis_rules(rules))
    return stack


def sharded_abstract(fn: Any, *args: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> tuple[Any, Any]:
    """``(abstract, shardings)`` of ``fn(*args)`` (e.g. a train state's
    initialiser): ``jax.ShapeDtypeStruct`` leaves with the ``NamedSharding``
    their logical names get under ``rules``, flax's ``LogicallyPartitioned``
    boxes removed; unnamed leaves replicated."""
    import flax.linen as nn

    with mesh_context(mesh, rules):
        boxed = jax.eval_shape(fn, *args)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.meta.unbox(boxed), shardings)
    return abstract, shardings


def replicated(mesh: Mesh) -> NamedSharding:
    """A value held whole on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> NamedSharding:
    """The sharding of an ``int32[B, T]`` batch: B over the axes of ``activation_batch``."""
    import flax.linen as nn

    return NamedSharding(mesh, nn.logical_to_mesh_axes(("activation_batch", "activation_length"), rules))
