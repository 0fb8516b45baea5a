"""Regenerate the committed XLA dumps that test the buffer-assignment reader
(``remat._buffers``): ``python tests/dumps/regenerate.py [NAME ...]`` (default: all).

Each archive holds the three files the reader needs, for the train step of a
2-layer ``tiny`` model (vocabulary 1024), compiled with ``xla_dump_to``:

- ``llama_minimal``, ``gpt2_full_chunked``: on this host's CPU, batch 2 x 32 tokens;
- ``llama_minimal_h100``: deviceless for an H100 (``remat[gpu]``), FSDP over 2
  GPUs, batch 2 x 32, with :func:`remat._memory.default_compiler_options`;
- ``llama_minimal_v5p``: deviceless for TPU v5p (``libtpu``; compile-only
  devices of the ``v5p:2x2x1`` topology), FSDP over its 4 chips, batch 4 x 32.

``expected.json`` records, per case, the platform, ``peak_bytes`` and
``temp_bytes`` from ``compiled.memory_analysis()`` (``temp_bytes`` feeds the
``reserved`` term), and the JAX, jaxlib and libtpu versions. Regenerating a
subset keeps the other cases' records.
"""

import json
import os
import pathlib
import sys
import tarfile
import tempfile

# Before JAX starts: the CUDA plugin registers without a driver, and libtpu
# compiles for a TPU topology without chips (and without taking the lock file
# of a libtpu process running beside it: nothing here opens a chip).
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
for k, v in {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost", "TPU_HOST_BOUNDS": "1,1,1",
             "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}.items():
    os.environ.setdefault(k, v)

import jax  # noqa: E402
import jaxlib  # noqa: E402

from remat import models  # noqa: E402
from remat._analysis import compile_traced  # noqa: E402
from remat._memory import compiled_memory, default_compiler_options  # noqa: E402
from remat._mesh import make_mesh  # noqa: E402
from remat._sweep import train_step_setup  # noqa: E402

HERE = pathlib.Path(__file__).parent
# name: (family, policy, loss chunks, target, batch)
CASES = {"llama_minimal": ("llama", "minimal", 1, "cpu", 2),
         "gpt2_full_chunked": ("gpt2", "full", 4, "cpu", 2),
         "llama_minimal_h100": ("llama", "minimal", 1, "h100", 2),
         "llama_minimal_v5p": ("llama", "minimal", 1, "v5p", 4)}
FILES = ("optimizations.txt", "-live-range.txt", "-buffer-assignment.txt")


def setup(family: str, chunks: int, target: str, batch: int):
    cfg = models.get_config("tiny", family=family, num_layers=2, vocab_size=1024, loss_chunks=chunks)
    if target == "cpu":
        return train_step_setup(cfg, batch=batch, seq=32)
    if target == "h100":
        return train_step_setup(cfg, batch=batch, seq=32, target="h100", mesh={"fsdp": 2})
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices
    return train_step_setup(cfg, batch=batch, seq=32, mesh=make_mesh({"fsdp": len(devices)}, devices=devices))


def main(names: list[str]) -> None:
    path = HERE / "expected.json"
    expected = json.loads(path.read_text()) if path.exists() else {}
    expected.update({"jax": jax.__version__, "jaxlib": jaxlib.__version__})
    for name in names or CASES:
        family, policy, chunks, target, batch = CASES[name]
        t = setup(family, chunks, target, batch).trace(policy, policy)
        with tempfile.TemporaryDirectory() as d:
            options = {} if target == "cpu" else default_compiler_options(t.platform)
            compiled = compile_traced(t, {**options, "xla_dump_to": d})[0]
            m = compiled_memory(compiled)
            expected[name] = {"platform": t.platform, "device_kind": t.device.device_kind,
                              "peak_bytes": m["argument"] + m["output"] + m["temp"] - m["alias"],
                              "temp_bytes": m["temp"]}
            if t.platform == "tpu":
                from importlib.metadata import version

                expected["libtpu"] = version("libtpu")
            with tarfile.open(HERE / f"{name}.tar.xz", "w:xz") as tar:
                for f in sorted(pathlib.Path(d).glob("*after_optimizations*.txt")):
                    if f.name.endswith(FILES):
                        tar.add(f, arcname=f.name)
        print(name, expected[name], f"{(HERE / f'{name}.tar.xz').stat().st_size} bytes")
    path.write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
