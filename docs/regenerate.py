"""Run the shell commands the documentation shows with their output, and
record that output in ``docs/_recorded/NAME.txt``::

    python docs/regenerate.py [NAME ...]

These commands compile big models (Llama 3 8B, Llama 2 70B) or need the
``gpu``/``tpu`` extras, too slow for a documentation build; the pages include
the recorded files with ``literalinclude``, as the notebooks keep the outputs
``notebooks/regenerate.py`` wrote. Each file starts with the command line
(``$ ...``); then its standard output and error as a terminal would show them,
except the lines the CUDA plugin logs on a machine without an NVIDIA driver,
and with paths relative to the folder it ran in (or this checkout). The commands run this
checkout's code (it is put first on ``PYTHONPATH``).
The compile cache is off (``REMAT_CACHE_DIR=``), so the wall times printed are
those of real compiles. Run it from the repository's root, in a virtual
environment with ``pip install -e ".[test,gpu,tpu,docs]"``.
"""

import argparse
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "_recorded"

# name -> (command, folder it runs in, relative to the repository root; None: a fresh temporary folder)
COMMANDS: dict[str, tuple[str, str | None]] = {
    "targets": ("remat targets", "."),
    "sweep-llama3-8b": ("remat sweep --model llama3-8b --batch 1 --seq 2048", "."),
    "sweep-llama3-8b-fsdp8": ("remat sweep --model llama3-8b --batch 8 --seq 2048 --devices 8 "
                              "--mesh fsdp=8", "."),
    "sweep-offload": ("remat sweep --model llama3-8b --batch 8 --seq 4096 --devices 8 --mesh fsdp=8 "
                      "--policies minimal_offloaded,qkv_proj_offloaded,full", "."),
    "inspect-gpt2-small": ("remat inspect --model gpt2-small --policy full --batch 8 --seq 1024", "."),
    "tune-llama3-8b": ("remat tune --model llama3-8b --batch 8 --seq 4096 --devices 8 --mesh fsdp=8 "
                       "--budget 40GiB", "."),
    "tune-batch-auto": ("remat tune --model llama3.2-1b --seq 2048 --batch auto --budget 32GiB", "."),
    "sweep-qwen2.5-7b": ("remat sweep --model notebooks/configs/Qwen2.5-7B.json --batch 1 --seq 2048", "."),
    "sweep-vit-workload": ("remat sweep --model vit_workload:workload", "tests"),
    "tune-vit-workload": ("remat tune --model vit_workload:workload --budget 3.9MiB", "tests"),
    "train-tiny": ("remat train --model tiny --policy minimal --out runs/tiny", None),
    "sweep-h100": ("remat sweep --model llama3-8b --batch 8 --seq 2048 --target h100 --devices 8 "
                   "--mesh fsdp=8", "."),
    "inspect-llama2-70b-h100": ("remat inspect --model notebooks/configs/Llama-2-70b-hf.json --batch 128 "
                                "--seq 4096 --dtype bf16 --target h100 --devices 64 --mesh fsdp=64 "
                                "--policy save_dot_except_mlpwi --mem-fraction 0.94", "."),
    "sweep-tpu-v5p": ("remat sweep --model llama3-8b --batch 8 --seq 2048 --target tpu-v5p --devices 8 "
                      "--policies none,minimal,full", "."),
}
NO_DRIVER = re.compile(r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
                       r"STDERR|I\d{4} [\d:.]+ +\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on "
                       r"your machine.*")


def record(name: str) -> float:
    """Run command ``name`` and write its output; returns the seconds it took."""
    command, folder = COMMANDS[name]
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # targets need their backends
    env["REMAT_CACHE_DIR"] = ""
    # this checkout's code, whichever checkout the environment has installed
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = ROOT / folder if folder is not None else pathlib.Path(tmp)
        done = subprocess.run(shlex.split(command), cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, check=False)
        here = f"{cwd.resolve()}/"  # paths under the folder it ran in, relative to it
    lines = [line.rstrip().replace(here, "").replace(f"{ROOT}/", "") for line in done.stdout.splitlines()
             if not NO_DRIVER.fullmatch(line.strip())]
    if done.returncode != 0:
        sys.exit(f"{name}: `{command}` exited {done.returncode}:\n" + "\n".join(lines[-20:]))
    prefix = f"cd {folder} && " if folder not in (".", None) else ""
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.txt").write_text(f"$ {prefix}{command}\n" + "\n".join(lines) + "\n")
    return time.perf_counter() - t0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", choices=[[], *COMMANDS], metavar="NAME",
                        help=f"commands to run (default: all): {', '.join(COMMANDS)}")
    args = parser.parse_args()
    for name in args.names or COMMANDS:
        print(f"{name}: {record(name):.1f} s", flush=True)
