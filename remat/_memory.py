"""Compiled memory: XLA's ``compiled.memory_analysis()`` as bytes per
device, the compile options the analysis uses, and the peak by term (what
is live at the peak, attributed from XLA's buffer-assignment dump)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from remat import _compat
from remat._buffers import HOST_MEMORY_SPACE, LiveValue, PeakDump
from remat._format import format_bytes
from remat._residuals import ResidualRow
from remat.policies import vocab

_compat.hide_frames(__file__)

__all__ = ["ACTIVATION_TERMS", "FAST_CPU_COMPILE", "NO_XLA_REMAT", "PEAK_BUFFERS", "TERMS", "PeakBuffer",
           "advice", "compiled_memory", "default_compiler_options", "peak_terms"]

_MEMORY_FIELDS = ("temp", "argument", "output", "alias", "host_temp")


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """``{"temp": ..., "argument": ..., "output": ..., "alias": ..., "host_temp": ...}``
    (bytes per device) from ``compiled.memory_analysis()``, or None where the
    backend gives none: it raises, returns None, or returns all zeros (some
    backends do; a compiled step never needs zero bytes)."""
    try:
        mem = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, jax.errors.JaxRuntimeError):
        return None
    fields = None if mem is None else {k: int(getattr(mem, f"{k}_size_in_bytes", 0)) for k in _MEMORY_FIELDS}
    return fields if fields and any(fields.values()) else None


FAST_CPU_COMPILE: dict[str, Any] = {"xla_backend_optimization_level": 0,
                                    "xla_cpu_use_fusion_emitters": False}
"""XLA options :func:`analyze` uses on the CPU backend unless told otherwise:
LLVM optimisation off and the classic (non-MLIR) fusion emitters. Buffer
assignment, hence every memory figure, is unchanged (checked on the Llama 3 8B
train step: temp bytes equal to within 128 B) while compiling is 6-8x faster;
the executable is only measured, never run."""


NO_XLA_REMAT: dict[str, Any] = {"xla_disable_hlo_passes": "rematerialization"}
"""XLA options :func:`analyze` uses on a GPU unless told otherwise: XLA:GPU's
own rematerialization pass off. That pass runs when its estimate of the peak
exceeds a limit (about 80% of device memory less the inputs and outputs:
``GetSchedulerMemoryLimit`` in XLA's ``gpu_hlo_schedule.cc``) and then silently recomputes
values, so the compiled program is no longer the policy being compared;
NVIDIA's MaxText GPU recipes train with ``--xla_disable_hlo_passes=rematerialization``
in ``XLA_FLAGS`` too, which is what a measured program must be trained with."""


def default_compiler_options(platform: str | None = None) -> dict[str, Any]:
    """The options :func:`remat.analyze` compiles with on ``platform``
    (default: the default backend's): :data:`FAST_CPU_COMPILE` on ``"cpu"``,
    :data:`NO_XLA_REMAT` on ``"gpu"``, none elsewhere."""
    platform = platform or jax.default_backend()
    return dict({"cpu": FAST_CPU_COMPILE, "gpu": NO_XLA_REMAT}.get(platform, {}))


TERMS: tuple[str, ...] = ("parameters", "optimizer state", "gradients", "residuals", "stacked layer inputs",
                          "loss head", "batch", "workspace", "fragmentation", "reserved", "unattributed")
"""The terms of the peak, in the order reports list them (see :func:`peak_terms`)."""

ACTIVATION_TERMS = ("residuals", "stacked layer inputs")
"""The terms a remat policy changes."""

PEAK_BUFFERS = 10
"""How many of the largest buffers live at the peak a report keeps."""


@dataclasses.dataclass(frozen=True)
class PeakBuffer:
    """One buffer live at the compiled step's memory peak.

    Attributes:
      term: which term of :data:`TERMS` it counts in.
      name: the checkpoint name(s) of a residual (``"a / b"`` where residual
        rows of equal size and dtype share it), the argument's path (e.g.
        ``state.params['embed']['embedding'].value``), else "".
      size_bytes: bytes per device.
      shape: per-device shape and dtype, e.g. ``"f32[4,127,50257]"``.
      op_name: JAX's name stack of the op that made it (``jit(...)/`` dropped).
      source: ``file:line`` of that op, or "".
    """

    term: str
    name: str
    size_bytes: int
    shape: str
    op_name: str
    source: str


_COPY_OPS = ("convert_element_type", "transpose", "copy", "all_gather", "all-gather")
"""The last op of a name stack that makes a copy of a weight rather than a gradient."""


def _dims(shape: str) -> tuple[int, ...]:
    """``"f32[4,128]"`` -> ``(4, 128)``."""
    return tuple(int(n) for n in re.findall(r"\d+", shape.split("[", 1)[-1]))


def argument_role(op_name: str, roles: Mapping[str, str] | None = None) -> str:
    """The term of a step's argument, by JAX's argument name (its ``op_name``):
    its role in ``roles`` where given (a :class:`remat.TrainStep`'s), else by
    its path (``opt_state``: optimizer state; ``params``: parameters; anything else: batch)."""
    if roles:
        return roles.get(op_name, "batch")
    return "optimizer state" if "opt_state" in op_name else "parameters" if "params" in op_name else "batch"


def _term(v: LiveValue, residual: str | None, weights: set[tuple[int, ...]],
          roles: Mapping[str, str] | None) -> str:
    if v.parameter:
        return argument_role(v.op_name, roles)
    if v.copy_of:
        return "workspace"  # a cast, transpose or layout change of an argument
    made_by = v.op_name if v.op_name.startswith("jit(") else ""  # JAX's name stack, not XLA's own names
    recomputed = "rematted_computation" in made_by  # a forward value recomputed in the backward pass
    if _dims(v.shape) in weights and not recomputed:
        gradient = ("transpose(" in made_by or not made_by) and not made_by.endswith(_COPY_OPS)
        return "gradients" if gradient else "workspace"
    if re.search(rf"\b{vocab.LOSS_HEAD_SCOPE}\b", made_by):
        return "loss head"
    if residual is not None:
        return "stacked layer inputs" if residual == "layer input" else "residuals"
    return "workspace" if made_by else "unattributed"


def peak_terms(dump: PeakDump, rows: Sequence[ResidualRow], weight_shapes: Iterable[Sequence[int]] = (),
               temp_bytes: int | None = None, roles: Mapping[str, str] | None = None,
               ) -> tuple[dict[str, int], dict[str, int], list[PeakBuffer], int]:
    """Attribute every buffer live at the peak to one term of :data:`TERMS`.

    - **parameters / optimizer state / batch**: the step's arguments, by
      ``roles`` (JAX's argument name -> role, a workload's labels) where
      given, else by their path (``params``, ``opt_state``, anything else):
      :func:`argument_role`.
    - **gradients**: a weight's shape (``weight_shapes``: the global shapes of
      the float arguments; the per-device shapes of the parameters; their
      transposes), made in the backward pass or with no metadata (a
      zero-initialised accumulator), and not a forward value recomputed there
      (``rematted_computation`` on its name stack). Metadata here is JAX's: an ``op_name``
      under ``jit(...)``, not a name XLA gave an op it made. A weight-shaped buffer made in the
      forward pass (a cast, transpose or all-gather of a weight; the chunked
      loss head's gradient of its weight, computed in its forward pass) or by
      a copy op is workspace.
    - **loss head**: any other buffer made under ``jax.named_scope("loss_head")``
      (:data:`remat.policies.vocab.LOSS_HEAD_SCOPE`): the logits, the softmax
      and their gradients.
    - **residuals** (by checkpoint name) and **stacked layer inputs**: made in
      the forward pass (``jvp`` on the name stack, no ``transpose``) with the
      per-device element count of a residual row of the jaxpr (XLA may store a
      bfloat16 value as float32, e.g. on CPU), each row claiming as many
      buffers as it has values; the scan carry's row (``"layer input"``) is
      the stacked layer inputs.
    - **workspace**: any other buffer made by an op with JAX's metadata, and
      copies XLA made of an argument (a cast, transpose or layout change).
    - **fragmentation**: bytes of the temporary allocation that no value
      occupies at the peak (the holes XLA's heap packing leaves), from the
      allocation's size in the dump (:attr:`remat._buffers.PeakDump.fragmentation_bytes`).
    - **reserved**: what ``memory_analysis()`` counts as temporaries beyond
      the temporary allocation in the dump: ``temp_bytes`` (its
      ``temp_size_in_bytes``; the term is 0 where None) less
      :attr:`remat._buffers.PeakDump.temp_allocation_bytes`. Zero on CPU and
      GPU, whose ``temp_size_in_bytes`` is that allocation's size. On a TPU,
      libtpu's is the HBM temporary allocation + about 16 KiB (the "HLO temp"
      libtpu logs under "Program hbm requirement", ``TPU_LOG_DIR``) + that
      allocation's fragmentation as libtpu measures it (its size less the
      padded peak of its values: the "fragmentation" of the same log line)
      once more; the log's program requirement has it only once, within "HLO
      temp". Neither figure is in the dump, hence a term of its own (v5p, tiny
      Llama steps: the term = the logged fragmentation + 16 KiB, to the log's
      3 digits).
    - **unattributed**: buffers with no JAX metadata to go by.

    Buffers the heap places over each other (XLA reusing a buffer in place)
    count once, and the bytes of an argument's or output's buffer that no
    value live at the peak occupies count as that argument or output: see
    :func:`remat._buffers.read_dump`. So the terms sum to ``memory_analysis()``'s
    peak (arguments + outputs + temporaries - aliased) where ``temp_bytes`` is given.

    Returns:
      ``(terms, residuals, buffers, host_bytes)``: device bytes per term (all
      of :data:`TERMS`), device bytes per residual name, the device buffers
      largest first, and the bytes live in host memory at the peak (not in the terms).
    """
    weights = {tuple(s) for s in weight_shapes}
    weights |= {_dims(v.shape) for v in dump.live
                if v.parameter and argument_role(v.op_name, roles) == "parameters"}
    weights |= {w[::-1] for w in weights if len(w) == 2}
    queues: dict[int, list[str]] = {}
    for r in rows:
        if r.memory_kind == "device" and r.count:
            elements = r.device_bytes // (r.count * np.dtype(r.dtype).itemsize)
            queues.setdefault(elements, []).extend([r.name] * r.count)
    shared = {k: " / ".join(dict.fromkeys(q)) for k, q in queues.items()}
    terms = dict.fromkeys(TERMS, 0)
    residuals: dict[str, int] = {}
    buffers = []
    host = 0
    for v in dump.live:
        if v.memory_space == HOST_MEMORY_SPACE:
            host += v.size_bytes
            continue
        residual = None
        forward = "jvp(" in v.op_name and "transpose(" not in v.op_name
        key = math.prod(_dims(v.shape))
        if forward and not v.parameter and key in queues:
            residual = queues[key].pop(0) if queues[key] else shared[key]
        term = _term(v, residual, weights, roles)
        name = residual if term in ACTIVATION_TERMS else (v.op_name if v.parameter else "")
        if term == "residuals":
            residuals[name] = residuals.get(name, 0) + v.size_bytes  # type: ignore[index]
        terms[term] += v.size_bytes
        op = "" if v.parameter else v.op_name.split("/", 1)[-1] if v.op_name.startswith("jit(") else v.op_name
        buffers.append(PeakBuffer(term, name or "", v.size_bytes, v.shape, op, v.source))
    terms["fragmentation"] = dump.fragmentation_bytes
    terms["reserved"] = max(0, temp_bytes - dump.temp_allocation_bytes) if temp_bytes is not None else 0
    return terms, residuals, buffers, host


def advice(terms: dict[str, int], peak: int, devices: int) -> list[str]:
    """A note when the largest term of the peak is not the activations (the
    residuals and stacked layer inputs, which a remat policy changes), naming
    it and the levers that shrink it, with the bytes each would save (per
    device; estimates that scale the term, not compiled figures).

    Levers: a chunked loss head (``ModelConfig.loss_chunks``, ``--loss-chunks``;
    8 chunks keep about 1/8 of the logits), FSDP (parameters, optimizer state
    and gradients divided over the devices; ``--mesh fsdp=N``), a smaller
    per-device batch (activations, loss head and workspace scale with it),
    offloading residuals to host (``offload:NAME``).
    """
    not_levers = ("fragmentation", "reserved", "unattributed", "batch")
    candidates = {k: v for k, v in terms.items() if k not in not_levers}
    top = max(candidates, key=candidates.__getitem__, default=None)
    if top is None or top in ACTIVATION_TERMS or not candidates[top]:
        return []
    activations = sum(terms.get(k, 0) for k in ACTIVATION_TERMS)
    state = sum(terms.get(k, 0) for k in ("parameters", "optimizer state", "gradients"))
    scaled = sum(terms.get(k, 0) for k in (*ACTIVATION_TERMS, "loss head", "workspace"))
    levers = []
    if top == "loss head":
        levers.append("compute the loss head in 8 chunks (ModelConfig.loss_chunks=8, --loss-chunks 8): "
                      f"saves about {format_bytes(terms['loss head'] * 7 // 8)}")
    if top in ("parameters", "optimizer state", "gradients"):
        n = 8 if devices == 1 else 2 * devices
        levers.append(f"shard parameters, optimizer state and gradients ({format_bytes(state)}) with FSDP "
                      f"over {n} devices (--mesh fsdp={n}): saves about "
                      f"{format_bytes(state - state * devices // n)}")
    levers.append(f"halve the per-device batch: saves about {format_bytes(scaled // 2)} (activations, "
                  "loss head and workspace scale with it)")
    if activations:
        levers.append(f"offload the residuals to host (offload:NAME): up to {format_bytes(activations)}")
    return [f"the largest term at the peak (fragmentation aside) is {top} "
            f"({format_bytes(candidates[top])} of {format_bytes(peak)}), not the activations "
            f"({format_bytes(activations)}): a remat policy cannot shrink it. Levers: " + "; ".join(levers)]
