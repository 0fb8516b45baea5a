"""What the accelerator libraries read at start, set where that accelerator is absent.

With the ``gpu`` extra, JAX's CUDA plugin checks its CUDA libraries when JAX
starts its backends and, on a machine without an NVIDIA driver, prints a
traceback; with the ``tpu`` extra, JAX starts libtpu, which on a machine
without a TPU logs an ``INVALID_ARGUMENT: unexpected worker hostname``
error and a "Failed to find host bounds" line, may query the Cloud TPU
metadata server, and takes an exclusive lock file that fails a second
process. :func:`quiet_start` sets, unless the environment already does, what
turns each of these off, only where that hardware is absent: a machine with
an NVIDIA driver keeps the CUDA check, a TPU VM keeps libtpu's defaults.
``import remat`` calls it, and so does the ``remat`` command, before JAX
starts its backends (importing JAX does not start them; the first
computation or ``jax.devices()`` does). Nothing here imports JAX.
"""

from __future__ import annotations

import glob
import importlib.util
import os

__all__ = ["NVIDIA_DRIVER", "SKIP_CHECK_VAR", "TPU_ENVIRONMENT", "quiet_start", "tpu_attached"]

SKIP_CHECK_VAR = "JAX_SKIP_CUDA_CONSTRAINTS_CHECK"
"""The environment variable that lets the CUDA plugin register without a GPU
driver (``jax_plugins/xla_cuda12/__init__.py``, ``initialize``): read once,
when JAX discovers its plugins (its first backend use)."""

NVIDIA_DRIVER = "/proc/driver/nvidia"
"""Where Linux's NVIDIA kernel driver shows itself; absent on a machine without one."""

TPU_ENVIRONMENT: dict[str, str] = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_HOST_BOUNDS": "1,1,1",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}
"""What libtpu reads at start, for a machine with no TPU attached: no query of
the Cloud TPU metadata server (``TPU_SKIP_MDS_QUERY``, which JAX's own
``cloud_tpu_init`` sets where it finds no chips); one local worker and host,
else libtpu logs an ``INVALID_ARGUMENT: unexpected worker hostname`` error
and a "Failed to find host bounds" line at start (a topology asked of
``jax.experimental.topologies`` still applies); and no exclusive
``/tmp/libtpu_lockfile``, so that two processes (two notebooks, pytest
workers) can both start and compile."""


def tpu_attached() -> bool:
    """Whether this machine has a TPU chip: the device files a Cloud TPU VM
    has (``/dev/accel*`` on v4 and v5e, ``/dev/vfio/<n>`` on v5p and v6e;
    JAX's ``hardware_utils`` reads the PCI bus for the same answer)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def quiet_start() -> None:
    """Set :data:`SKIP_CHECK_VAR` to ``1`` on a machine without an NVIDIA
    driver, and :data:`TPU_ENVIRONMENT` where libtpu is installed and no TPU
    is attached; variables the environment sets are left alone, and so is
    ``JAX_PLATFORMS``."""
    if not os.path.exists(NVIDIA_DRIVER):
        os.environ.setdefault(SKIP_CHECK_VAR, "1")
    if importlib.util.find_spec("libtpu") is not None and not tpu_attached():
        for k, v in TPU_ENVIRONMENT.items():
            os.environ.setdefault(k, v)
