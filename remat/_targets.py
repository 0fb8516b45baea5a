"""Hardware targets: what a step is compiled for, and that device's budget.

A :class:`Target` names one accelerator model (``"h100"``, ``"a100-80gb"``,
...) with its memory, its public peak rates and, for a GPU, the XLA
``GpuTargetConfigProto`` spec file that lets XLA:GPU compile for it on a
machine without that GPU (*deviceless* compilation: compile-only devices from
``jax.experimental.topologies.get_topology_desc``; ``memory_analysis()``
works, nothing runs). ``"cpu"`` is this host's XLA:CPU, as before: nothing
changes.

Deviceless GPU compilation needs the CUDA plugin (``pip install
'remat[gpu]'``: ``jax-cuda12-plugin``, ``jax-cuda12-pjrt``, ``ptxas`` from
``nvidia-cuda-nvcc-cu12`` and cuDNN for ``implementation="cudnn"``
attention), and, on a machine without a GPU driver, the environment variable
``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`` set before JAX initialises its
backends: else the plugin's CUDA version check fails, the plugin is not
registered, and JAX answers ``topology not implemented for cuda``.
:func:`prepare_environment` sets it; :func:`target_devices` does too, and says
what to do when JAX already started without it.

==============  ======================  ========  ===================================
name            device_kind             memory    spec file (openxla/xla specs)
==============  ======================  ========  ===================================
``cpu``         ``cpu``                 (host)    none: this host's XLA:CPU
``h100``        NVIDIA H100 80GB HBM3   79.1 GiB  ``h100_sxm.txtpb``
``h100-pcie``   NVIDIA H100 PCIe        79.1 GiB  ``h100_pcie.txtpb``
``h200``        NVIDIA H200 141GB HBM3e 141 GiB   ``h200.txtpb``
``a100-80gb``   NVIDIA A100-SXM4-80GB   79.3 GiB  ``a100_sxm_80.txtpb``
``a100-40gb``   NVIDIA A100-SXM4-40GB   39.4 GiB  ``a100_sxm_40.txtpb``
``b200``        NVIDIA B200             178 GiB   ``b200.txtpb`` (compiles to sm_100a)
==============  ======================  ========  ===================================
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import importlib.util
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import Mesh

from remat import _compat
from remat._errors import RematError
from remat._mesh import AXES, make_mesh

_compat.hide_frames(__file__)

__all__ = [
    "JAX_DEFAULT_MEM_FRACTION",
    "RUNTIME_RESERVE_BYTES",
    "SKIP_CHECK_VAR",
    "TARGETS",
    "Target",
    "get_target",
    "prepare_environment",
    "target_devices",
    "target_mesh",
    "target_names",
]

SKIP_CHECK_VAR = "JAX_SKIP_CUDA_CONSTRAINTS_CHECK"
"""The environment variable that lets the CUDA plugin register without a GPU
driver (``jax_plugins/xla_cuda12/__init__.py``, ``initialize``): read once,
when JAX discovers its plugins (its first backend use)."""

JAX_DEFAULT_MEM_FRACTION = 0.75
"""The fraction of a GPU's memory JAX's allocator takes by default
(``XLA_CLIENT_MEM_FRACTION``, formerly ``XLA_PYTHON_CLIENT_MEM_FRACTION``;
https://docs.jax.dev/en/latest/gpu_memory_allocation.html)."""

RUNTIME_RESERVE_BYTES = 1 << 30
"""Bytes per GPU kept back from the allocator's share for the runtime: 1 GiB.

A stated margin, not a measurement. What it covers, from public sources:
the CUDA context (a few hundred MiB on Hopper, driver-dependent); cuBLAS
workspaces (32 MiB per handle recommended on Hopper, 4 MiB before:
cuBLAS docs, ``cublasSetWorkspace``); cuDNN handles and NCCL communicators
(NCCL's ``NCCL_BUFFSIZE`` defaults to 4 MiB per channel per peer:
NCCL docs, Environment Variables); and allocator fragmentation. With JAX's
default 0.75 fraction most of these live in the 25% JAX leaves alone; with a
fraction near 1.0 they must fit in the remainder, so the margin is kept either
way."""

# The old single-device assumption of `remat._report` (an H200's rates), kept for "cpu".
_ASSUMED_PEAK_FLOPS_PER_S = 989e12
_ASSUMED_HBM_BYTES_PER_S = 4.8e12
_ASSUMED_HOST_LINK_BYTES_PER_S = 64e9

_PCIE_GEN4_X16 = 32e9  # bytes/s per direction (64 GB/s both ways)
_PCIE_GEN5_X16 = 64e9  # bytes/s per direction (128 GB/s both ways)

_SPEC_URL = "openxla/xla xla/backends/gpu/target_config/specs/{} @ {}"


@dataclasses.dataclass(frozen=True)
class Target:
    """One hardware model a step is compiled for; rates are per device.

    Attributes:
      name: the key in :data:`TARGETS`, e.g. ``"h100"``.
      platform: ``"cpu"`` or ``"gpu"``.
      device_kind: ``jax.Device.device_kind`` as XLA reports it, e.g.
        ``"NVIDIA H100 80GB HBM3"`` (``"cpu"`` for the host).
      memory_bytes: device memory, bytes; for a GPU the spec file's
        ``device_memory_size`` (what XLA:GPU plans with). None for ``cpu``.
      mem_fraction: the fraction of ``memory_bytes`` the runtime may
        allocate by default (:data:`JAX_DEFAULT_MEM_FRACTION`).
      reserve_bytes: bytes the runtime keeps for itself on top
        (:data:`RUNTIME_RESERVE_BYTES`); 0 for ``cpu``.
      peak_flops_per_s: dense bf16 tensor-core FLOP/s (NVIDIA spec sheets;
        for ``cpu`` the assumed H200 rate, as before).
      hbm_bytes_per_s: device memory bandwidth, bytes per second (NVIDIA
        spec sheets; assumed H200 for ``cpu``).
      host_link_bytes_per_s: host link bandwidth per direction, bytes per
        second (PCIe Gen4 x16 about 32e9, Gen5 x16 about 64e9; assumed Gen5
        for ``cpu``).
      spec_file: the ``GpuTargetConfigProto`` text file under
        ``remat/targets/``; None for ``cpu``.
      source: where the figures come from.
    """

    name: str
    platform: str
    device_kind: str
    memory_bytes: int | None
    mem_fraction: float
    reserve_bytes: int
    peak_flops_per_s: float
    hbm_bytes_per_s: float
    host_link_bytes_per_s: float
    spec_file: str | None
    source: str

    def usable_bytes(self, mem_fraction: float | None = None) -> int | None:
        """Bytes per device a program may use: ``memory_bytes x mem_fraction
        - reserve_bytes`` (``mem_fraction`` default: the target's). None for
        ``cpu`` (no stated memory).

        Raises:
          RematError: ``mem_fraction`` not in (0, 1].
        """
        fraction = self.mem_fraction if mem_fraction is None else mem_fraction
        if not 0 < fraction <= 1:
            raise RematError(f"mem_fraction {fraction!r}: must be in (0, 1], e.g. {JAX_DEFAULT_MEM_FRACTION} "
                             "(JAX's default, XLA_CLIENT_MEM_FRACTION)")
        if self.memory_bytes is None:
            return None
        return int(self.memory_bytes * fraction) - self.reserve_bytes

    def spec_text(self) -> str:
        """The spec file's text (a ``GpuTargetConfigProto``), as
        ``get_topology_desc(target_config=...)`` takes it.

        Raises:
          RematError: the target has no spec file (``cpu``).
        """
        if self.spec_file is None:
            raise RematError(f"target {self.name!r} has no GPU spec file; GPU targets: "
                             f"{', '.join(n for n in TARGETS if TARGETS[n].spec_file)}")
        return importlib.resources.files("remat").joinpath("targets", self.spec_file).read_text()


def _gpu(name: str, device_kind: str, memory_bytes: int, peak: float, hbm: float, link: float,
         spec_file: str, commit: str, sheet: str) -> Target:
    return Target(name=name, platform="gpu", device_kind=device_kind, memory_bytes=memory_bytes,
                  mem_fraction=JAX_DEFAULT_MEM_FRACTION, reserve_bytes=RUNTIME_RESERVE_BYTES,
                  peak_flops_per_s=peak, hbm_bytes_per_s=hbm, host_link_bytes_per_s=link,
                  spec_file=spec_file, source=f"{_SPEC_URL.format(spec_file, commit)}; {sheet}")


TARGETS: dict[str, Target] = {
    "cpu": Target(
        name="cpu", platform="cpu", device_kind="cpu", memory_bytes=None,
        mem_fraction=JAX_DEFAULT_MEM_FRACTION, reserve_bytes=0,
        peak_flops_per_s=_ASSUMED_PEAK_FLOPS_PER_S, hbm_bytes_per_s=_ASSUMED_HBM_BYTES_PER_S,
        host_link_bytes_per_s=_ASSUMED_HOST_LINK_BYTES_PER_S, spec_file=None,
        source="this host's XLA:CPU; rates assumed (an H200's: 989e12 FLOP/s dense bf16, "
               "4.8e12 B/s HBM, PCIe Gen5 x16 64e9 B/s), not measured"),
    "h100": _gpu("h100", "NVIDIA H100 80GB HBM3", 84942979072, 989e12, 3.35e12, _PCIE_GEN5_X16,
                 "h100_sxm.txtpb", "0774019d97e77dc433ce97604295f6fc0f5b3b65",
                 "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: 989 TFLOPS dense bf16, 3.35 TB/s, "
                 "PCIe Gen5 x16"),
    "h100-pcie": _gpu("h100-pcie", "NVIDIA H100 PCIe", 84942979072, 756e12, 2.0e12, _PCIE_GEN5_X16,
                      "h100_pcie.txtpb", "4336d12e0706168f6a382ddb231f3a83853b0657",
                      "NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe: 756 TFLOPS dense bf16, "
                      "2.0 TB/s, PCIe Gen5 x16"),
    "h200": _gpu("h200", "NVIDIA H200 141GB HBM3e", 151397597184, 989e12, 4.8e12, _PCIE_GEN5_X16,
                 "h200.txtpb", "4336d12e0706168f6a382ddb231f3a83853b0657",
                 "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: 989 TFLOPS dense bf16, 4.8 TB/s, "
                 "PCIe Gen5 x16"),
    "a100-80gb": _gpu("a100-80gb", "NVIDIA A100-SXM4-80GB", 85100068864, 312e12, 2.039e12, _PCIE_GEN4_X16,
                      "a100_sxm_80.txtpb", "4336d12e0706168f6a382ddb231f3a83853b0657",
                      "NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM: 312 TFLOPS dense bf16, "
                      "2,039 GB/s, PCIe Gen4 x16"),
    "a100-40gb": _gpu("a100-40gb", "NVIDIA A100-SXM4-40GB", 42331013120, 312e12, 1.555e12, _PCIE_GEN4_X16,
                      "a100_sxm_40.txtpb", "4336d12e0706168f6a382ddb231f3a83853b0657",
                      "NVIDIA A100 Tensor Core GPU datasheet, A100 40GB SXM: 312 TFLOPS dense bf16, "
                      "1,555 GB/s, PCIe Gen4 x16"),
    "b200": _gpu("b200", "NVIDIA B200", 191514411008, 2.25e15, 8e12, _PCIE_GEN5_X16,
                 "b200.txtpb", "300ec95ab85fa9f40af388054f7d43707407cb52",
                 "NVIDIA DGX/HGX B200 datasheet, per GPU: 2.25 PFLOPS dense bf16 (4.5 sparse), 8 TB/s, "
                 "PCIe Gen5 x16"),
}
"""Every target by name (see the module doc's table)."""

# device_kind strings real GPUs of a target have been seen to report besides the
# spec file's (cudaDeviceProp.name differs between boards and drivers).
_OTHER_DEVICE_KINDS: dict[str, tuple[str, ...]] = {"h200": ("NVIDIA H200",)}


def target_names() -> list[str]:
    """The names of :data:`TARGETS`, in table order."""
    return list(TARGETS)


def get_target(name: str | Target) -> Target:
    """The :class:`Target` called ``name`` (a ``Target`` is returned as is).

    Raises:
      RematError: an unknown name; the message suggests the closest name and
        lists the valid ones.
    """
    if isinstance(name, Target):
        return name
    if name not in TARGETS:
        close = difflib.get_close_matches(str(name), TARGETS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RematError(f"unknown target {name!r}; {hint}valid: {', '.join(TARGETS)}")
    return TARGETS[name]


def prepare_environment(target: str | Target) -> None:
    """Make a GPU ``target`` compilable here: set ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1``
    unless the environment already sets it. Also for ``cpu`` on a machine
    without an NVIDIA driver (no ``/proc/driver/nvidia``), where the CUDA
    plugin's check (installed with ``remat[gpu]``) can only fail, printing a
    traceback at every JAX start. Call it before JAX initialises its backends
    (before any computation or ``jax.devices()``; importing JAX is fine).
    ``JAX_PLATFORMS`` is left alone, and a machine with a driver keeps the
    check for ``cpu``, so a real GPU is used as before.

    Raises:
      RematError: an unknown target name.
    """
    if get_target(target).platform == "gpu" or not os.path.exists(NVIDIA_DRIVER):
        os.environ.setdefault(SKIP_CHECK_VAR, "1")


NVIDIA_DRIVER = "/proc/driver/nvidia"
"""Where Linux's NVIDIA kernel driver shows itself; absent on a machine without one."""


def _plugin_missing() -> bool:
    return (importlib.util.find_spec("jax_plugins") is None
            or importlib.util.find_spec("jax_plugins.xla_cuda12") is None)


def _matches(target: Target, device: Any) -> bool:
    return device.platform == "gpu" and device.device_kind in (
        target.device_kind, *_OTHER_DEVICE_KINDS.get(target.name, ()))


@functools.cache
def _compile_only_devices(name: str, n: int) -> tuple[Any, ...]:
    from jax.experimental import topologies

    target = TARGETS[name]
    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=target.spec_text(),
                                                topology=f"1x1x{n}")
    except NotImplementedError as e:
        raise RematError(
            f"target {name!r}: JAX did not register its CUDA plugin ({e}). Set {SKIP_CHECK_VAR}=1 in "
            f"the environment before JAX starts (in the shell, or remat._targets.prepare_environment("
            f"{name!r}) first thing in the process), and check that jax-cuda12-plugin and jax-cuda12-pjrt "
            f"match jax {jax.__version__} (pip install 'remat[gpu]')") from None
    return tuple(topology.devices)


def target_devices(target: str | Target, n: int) -> list[Any]:
    """``n`` devices to compile for ``target``, one host.

    ``cpu``: the first ``n`` of ``jax.devices("cpu")``. A GPU target: the
    attached GPUs of that kind when JAX has at least ``n`` of them, else
    ``n`` compile-only devices from the target's spec file (cached per
    target and ``n``): they compile and report ``memory_analysis()``, but
    cannot run or hold arrays. Sets ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK``
    first (:func:`prepare_environment`).

    Raises:
      RematError: an unknown target; ``n < 1``; too few CPU devices (says
        how to simulate more); the CUDA plugin not installed (names
        ``pip install 'remat[gpu]'``) or not registered (names
        ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK``).
    """
    t = get_target(target)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RematError(f"target {t.name!r}: device count {n!r} must be an integer >= 1")
    if t.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise RematError(f"target cpu: {n} devices asked, but JAX has {len(devices)} CPU device(s); "
                             f"simulate {n} CPU devices with --devices {n} (remat._mesh.set_cpu_devices({n}) "
                             "before any JAX computation)")
        return list(devices[:n])
    if _plugin_missing():
        raise RematError(f"target {t.name!r} needs JAX's CUDA plugin to compile for a GPU without one: "
                         "pip install 'remat[gpu]'")
    prepare_environment(t)
    attached = [d for d in jax.devices() if _matches(t, d)]
    if len(attached) >= n:
        return attached[:n]
    return list(_compile_only_devices(t.name, n))


def target_mesh(target: str | Target, axes: Mapping[str, int]) -> Mesh:
    """A mesh of :func:`target_devices` with the axes ``data``, ``fsdp``,
    ``tensor`` (:func:`remat._mesh.make_mesh`: missing axes have size 1),
    e.g. ``target_mesh("h100", {"fsdp": 8})``.

    Raises:
      RematError: an unknown axis or target, a size that is not a positive
        integer, or what :func:`target_devices` raises.
    """
    if set(axes) - set(AXES):
        return make_mesh(axes, devices=())  # raises make_mesh's unknown-axis error
    bad = {a: s for a, s in axes.items() if isinstance(s, bool) or not isinstance(s, int) or s < 1}
    if bad:
        raise RematError(f"mesh {dict(axes)}: sizes {bad} must be integers >= 1")
    return make_mesh(axes, devices=target_devices(target, math.prod(axes.values())))
