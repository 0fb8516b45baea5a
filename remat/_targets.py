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
``tpu-v4``      TPU v4                  32 GiB    topology ``v4:AxBxC`` (megacore)
``tpu-v5e``     TPU v5 lite             16 GiB    topology ``v5e:AxB``
``tpu-v5p``     TPU v5                  96 GiB    topology ``v5p:AxBxC``
``tpu-v6e``     TPU v6 lite             32 GiB    topology ``v6e:AxB``
==============  ======================  ========  ===================================

A TPU target compiles deviceless the way MaxText's ``train_compile.py`` does:
``jax.experimental.topologies.get_topology_desc(topology_name="v5p:2x2x2",
platform="tpu")`` with ``libtpu`` installed (``pip install 'remat[tpu]'``,
the version ``jax[tpu]`` pins). The topology follows from the device count
(:func:`tpu_topology`). On a machine with no TPU attached,
:func:`prepare_environment` sets what libtpu reads at start so that it needs
no cloud metadata server and prints no errors about worker hostnames, and
lets several processes load it (``ALLOW_MULTIPLE_LIBTPU_LOAD``: there is no
chip to share). On TPU a program that does not fit is a compile error
(``RESOURCE_EXHAUSTED``), not a figure: :mod:`remat._analysis` turns it
into a result that does not fit.
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

from remat import _compat, _environment
from remat._errors import RematError
from remat._mesh import AXES, make_mesh

_compat.hide_frames(__file__)

__all__ = [
    "JAX_DEFAULT_MEM_FRACTION",
    "RUNTIME_RESERVE_BYTES",
    "TARGETS",
    "Target",
    "get_target",
    "prepare_environment",
    "target_devices",
    "target_mesh",
    "target_names",
    "tpu_topology",
]

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
      platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``.
      device_kind: ``jax.Device.device_kind`` as XLA reports it, e.g.
        ``"NVIDIA H100 80GB HBM3"``, ``"TPU v5"`` (``"cpu"`` for the host).
      memory_bytes: device memory, bytes; for a GPU the spec file's
        ``device_memory_size`` (what XLA:GPU plans with), for a TPU the
        chip's HBM. None for ``cpu``.
      mem_fraction: the fraction of ``memory_bytes`` the runtime may
        allocate by default (:data:`JAX_DEFAULT_MEM_FRACTION` on a GPU; 1 on
        a TPU, whose runtime has no such fraction).
      reserve_bytes: bytes the runtime keeps for itself on top
        (:data:`RUNTIME_RESERVE_BYTES` on a GPU; on a TPU what libtpu keeps
        back, from its own out-of-memory message; 0 for ``cpu``).
      peak_flops_per_s: dense bf16 FLOP/s (NVIDIA spec sheets, Cloud TPU
        system architecture pages; for ``cpu`` the assumed H200 rate, as before).
      hbm_bytes_per_s: device memory bandwidth, bytes per second (same
        sources; assumed H200 for ``cpu``).
      host_link_bytes_per_s: host link bandwidth per direction, bytes per
        second (PCIe Gen4 x16 about 32e9, Gen5 x16 about 64e9; assumed Gen5
        for ``cpu``).
      spec_file: the ``GpuTargetConfigProto`` text file under
        ``remat/targets/``; None for ``cpu`` and TPUs.
      source: where the figures come from.
      topology: a TPU's generation as ``get_topology_desc`` names it
        (``"v5p"``); None elsewhere.
      topology_dims: the number of torus dimensions of a TPU topology (3
        for v4 and v5p, 2 for v5e and v6e); 0 elsewhere.
      chip_config: ``get_topology_desc``'s ``chip_config_name``:
        ``"megacore"`` for v4 (one JAX device per chip, its two TensorCores
        together, as on a v4 VM), else ``"default"``.
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
    topology: str | None = None
    topology_dims: int = 0
    chip_config: str = "default"

    def usable_bytes(self, mem_fraction: float | None = None) -> int | None:
        """Bytes per device a program may use: ``memory_bytes x mem_fraction
        - reserve_bytes`` (``mem_fraction`` default: the target's). None for
        ``cpu`` (no stated memory).

        Raises:
          RematError: ``mem_fraction`` not in (0, 1], or given for a TPU.
        """
        if mem_fraction is not None and self.platform == "tpu":
            raise RematError(f"mem_fraction {mem_fraction!r}: target {self.name!r} is a TPU, whose runtime "
                             "takes no memory fraction (its usable memory is what libtpu states)")
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
                             f"{', '.join(_names('gpu'))}")
        return importlib.resources.files("remat").joinpath("targets", self.spec_file).read_text()


def _gpu(name: str, device_kind: str, memory_bytes: int, peak: float, hbm: float, link: float,
         spec_file: str, commit: str, sheet: str) -> Target:
    return Target(name=name, platform="gpu", device_kind=device_kind, memory_bytes=memory_bytes,
                  mem_fraction=JAX_DEFAULT_MEM_FRACTION, reserve_bytes=RUNTIME_RESERVE_BYTES,
                  peak_flops_per_s=peak, hbm_bytes_per_s=hbm, host_link_bytes_per_s=link,
                  spec_file=spec_file, source=f"{_SPEC_URL.format(spec_file, commit)}; {sheet}")


_TPU_SHEET = ("Cloud TPU docs, system architecture (per chip: HBM capacity, peak bf16 FLOP/s, HBM "
              "bandwidth); usable HBM from libtpu {version}'s out-of-memory message, '... exceeds "
              "available HBM ({usable}G)' (G: GiB); host link assumed PCIe Gen4 x16, not published per chip")


def _tpu(name: str, device_kind: str, topology: str, dims: int, hbm_gib: int, usable_gib: float,
         peak: float, hbm: float, chip_config: str = "default") -> Target:
    gib = 1 << 30
    return Target(name=name, platform="tpu", device_kind=device_kind, memory_bytes=hbm_gib * gib,
                  mem_fraction=1.0, reserve_bytes=hbm_gib * gib - round(usable_gib * gib),
                  peak_flops_per_s=peak, hbm_bytes_per_s=hbm, host_link_bytes_per_s=_PCIE_GEN4_X16,
                  spec_file=None, source=_TPU_SHEET.format(version="0.0.42", usable=usable_gib),
                  topology=topology, topology_dims=dims, chip_config=chip_config)


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
    "tpu-v4": _tpu("tpu-v4", "TPU v4", "v4", 3, 32, 30.75, 275e12, 1.2e12, chip_config="megacore"),
    "tpu-v5e": _tpu("tpu-v5e", "TPU v5 lite", "v5e", 2, 16, 15.75, 197e12, 819e9),
    "tpu-v5p": _tpu("tpu-v5p", "TPU v5", "v5p", 3, 96, 95.74, 459e12, 2.765e12),
    "tpu-v6e": _tpu("tpu-v6e", "TPU v6 lite", "v6e", 2, 32, 31.25, 918e12, 1.64e12),
}
"""Every target by name (see the module doc's table)."""

# device_kind strings real GPUs of a target have been seen to report besides the
# spec file's (cudaDeviceProp.name differs between boards and drivers).
_OTHER_DEVICE_KINDS: dict[str, tuple[str, ...]] = {"h200": ("NVIDIA H200",), "tpu-v5p": ("TPU v5p",),
                                                   "tpu-v5e": ("TPU v5e",), "tpu-v6e": ("TPU v6e",)}


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
    """Make ``target`` compilable here; call it before JAX initialises its
    backends (before any computation or ``jax.devices()``; importing JAX is
    fine). Variables the environment already sets are left alone, and so is
    ``JAX_PLATFORMS``.

    - Every target: :func:`remat._environment.quiet_start` (no CUDA check
      without an NVIDIA driver, no libtpu start-up errors without a TPU).
    - A GPU target: ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`` with a driver too,
      so that the CUDA plugin registers whatever GPU (or none) is attached.
    - A TPU target on a machine with no TPU attached: the TPU variables
      (:data:`remat._environment.TPU_ENVIRONMENT`) even before libtpu is
      installed. A TPU VM is left as it is.

    Raises:
      RematError: an unknown target name.
    """
    t = get_target(target)
    _environment.quiet_start()
    if t.platform == "gpu":
        os.environ.setdefault(_environment.SKIP_CHECK_VAR, "1")
    if t.platform == "tpu" and not _environment.tpu_attached():
        for k, v in _environment.TPU_ENVIRONMENT.items():
            os.environ.setdefault(k, v)


def tpu_topology(target: str | Target, n: int) -> tuple[str, dict[str, Any]]:
    """The ``get_topology_desc`` topology name and keyword arguments for
    ``n`` chips of a TPU target: ``n`` a power of two; the torus dimensions
    as equal as powers of two allow, ascending from 8 chips
    (``tpu_topology("tpu-v5p", 8) == ("v5p:2x2x2", ...)``, 4 -> ``2x2x1``,
    16 -> ``2x2x4``; ``"tpu-v5e"``: 8 -> ``2x4``),
    as Cloud TPU slices are shaped. Fewer chips than a host holds (1 or 2)
    get ``chips_per_host_bounds`` of the topology itself.

    Raises:
      RematError: not a TPU target; ``n`` not a power of two.
    """
    t = get_target(target)
    if t.platform != "tpu":
        raise RematError(f"target {t.name!r} is not a TPU; TPU targets: {', '.join(_names('tpu'))}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n & (n - 1):
        raise RematError(f"target {t.name!r}: {n!r} chips; a TPU slice has a power of two (1, 2, 4, 8, ...)")
    dims = [1] * t.topology_dims
    while math.prod(dims) < n:
        dims[dims.index(min(dims))] *= 2
    if n >= 8:  # below, the x and y of a host's 2x2x1 (v4, v5p) or 2x2 come first
        dims.sort()
    kwargs: dict[str, Any] = {"chip_config_name": t.chip_config}
    if n < 4:
        kwargs["chips_per_host_bounds"] = (*dims, 1, 1)[:3]
    return f"{t.topology}:{'x'.join(map(str, dims))}", kwargs


def _names(platform: str) -> list[str]:
    return [n for n, t in TARGETS.items() if t.platform == platform]


def _missing(platform: str) -> bool:
    """Whether the package that compiles for ``platform`` deviceless is absent."""
    if platform == "tpu":
        return importlib.util.find_spec("libtpu") is None
    return (importlib.util.find_spec("jax_plugins") is None
            or importlib.util.find_spec("jax_plugins.xla_cuda12") is None)


def _matches(target: Target, device: Any) -> bool:
    return device.platform == target.platform and device.device_kind in (
        target.device_kind, *_OTHER_DEVICE_KINDS.get(target.name, ()))


@functools.cache
def _compile_only_devices(name: str, n: int) -> tuple[Any, ...]:
    from jax.experimental import topologies

    target = TARGETS[name]
    if target.platform == "tpu":
        topology, kwargs = tpu_topology(target, n)
        return tuple(topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs).devices)
    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=target.spec_text(),
                                                topology=f"1x1x{n}")
    except NotImplementedError as e:
        raise RematError(
            f"target {name!r}: JAX did not register its CUDA plugin ({e}). Set "
            f"{_environment.SKIP_CHECK_VAR}=1 in the environment before JAX starts (in the shell, or "
            f"remat._targets.prepare_environment({name!r}) first thing in the process), and check that "
            "jax-cuda12-plugin and jax-cuda12-pjrt "
            f"match jax {jax.__version__} (pip install 'remat[gpu]')") from None
    return tuple(topology.devices)


def target_devices(target: str | Target, n: int) -> list[Any]:
    """``n`` devices to compile for ``target``, one host.

    ``cpu``: the first ``n`` of ``jax.devices("cpu")``. A GPU or TPU
    target: the attached devices of that kind when JAX has at least ``n``
    of them, else ``n`` compile-only devices (cached per target and ``n``)
    from the target's spec file (GPU) or its topology (TPU,
    :func:`tpu_topology`): they compile and report ``memory_analysis()``,
    but cannot run or hold arrays. Sets the environment first
    (:func:`prepare_environment`).

    Raises:
      RematError: an unknown target; ``n < 1``; too few CPU devices (says
        how to simulate more); a TPU chip count that is not a power of two;
        the CUDA plugin or libtpu not installed (names ``pip install
        'remat[gpu]'`` or ``'remat[tpu]'``) or the plugin not registered
        (names ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK``).
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
    if t.platform == "tpu":
        tpu_topology(t, n)  # checks n
    if _missing(t.platform):
        what = ("libtpu to compile for a TPU without one: pip install 'remat[tpu]'" if t.platform == "tpu"
                else "JAX's CUDA plugin to compile for a GPU without one: pip install 'remat[gpu]'")
        raise RematError(f"target {t.name!r} needs {what}")
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
