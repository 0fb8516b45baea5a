"""Regenerate the committed XLA dumps that test the buffer-assignment reader
(``remat._buffers``): ``python tests/dumps/regenerate.py``.

Each archive holds the three files the reader needs, for the train step of a
2-layer ``tiny`` model (vocabulary 1024, batch 2 x 32 tokens), compiled on CPU
with ``xla_dump_to``; ``expected.json`` records each step's ``peak_bytes``
(``compiled.memory_analysis()``) and the JAX and jaxlib versions.
"""

import json
import pathlib
import tarfile
import tempfile

import jax
import jaxlib

from remat import models
from remat._analysis import compile_traced
from remat._memory import compiled_memory
from remat._sweep import trace_policy, train_step_setup

HERE = pathlib.Path(__file__).parent
CASES = {"llama_minimal": ("llama", "minimal", 1), "gpt2_full_chunked": ("gpt2", "full", 4)}


def main() -> None:
    expected = {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
    for name, (family, policy, chunks) in CASES.items():
        cfg = models.get_config("tiny", family=family, num_layers=2, vocab_size=1024, loss_chunks=chunks)
        t = trace_policy(train_step_setup(cfg, batch=2, seq=32), policy, policy)
        with tempfile.TemporaryDirectory() as d:
            compiled = compile_traced(t, {"xla_dump_to": d})[0]
            m = compiled_memory(compiled)
            expected[name] = {"peak_bytes": m["argument"] + m["output"] + m["temp"] - m["alias"]}
            with tarfile.open(HERE / f"{name}.tar.xz", "w:xz") as tar:
                for f in sorted(pathlib.Path(d).glob("*after_optimizations*.txt")):
                    if f.name.endswith(("optimizations.txt", "-live-range.txt", "-buffer-assignment.txt")):
                        tar.add(f, arcname=f.name)
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
