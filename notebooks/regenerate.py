"""Execute every numbered notebook in place, in order, so that the committed
outputs are those of the code in this repository::

    python notebooks/regenerate.py [NAME.ipynb ...]

Each runs in a fresh kernel from the ``notebooks`` folder, cells in order
(``nbclient``, as ``pytest --nbmake`` runs them in CI); execution counts are
renumbered from 1 and no timing is recorded, so the files change only when
an output does. The notebooks fix their seeds and print no wall times.
The lines the CUDA plugin's libraries log when JAX is imported on a machine
without an NVIDIA driver (``cudart_stub.cc ... Could not find cuda drivers``,
through absl before its logging starts) are not kept: they tell of the
machine that ran the notebook, not of the notebook.
"""

import argparse
import pathlib
import re
import time

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).parent
NO_DRIVER = re.compile(r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
                       r"STDERR|I\d{4} [\d:.]+ +\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on "
                       r"your machine.*")


def _machine_lines_dropped(nb: nbformat.NotebookNode) -> None:
    """Drop the stderr outputs made only of :data:`NO_DRIVER` lines."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (
                o.output_type == "stream" and o.name == "stderr"
                and all(NO_DRIVER.fullmatch(line) for line in o.text.splitlines()))]


def regenerate(path: pathlib.Path) -> float:
    """Execute ``path`` in place; returns the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(HERE)}}).execute()
    _machine_lines_dropped(nb)
    nb.metadata.get("language_info", {}).pop("version", None)  # the machine's Python, not the notebook's
    nbformat.write(nb, path)
    return time.perf_counter() - t0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: every NN_*.ipynb)")
    args = parser.parse_args()
    for path in [HERE / n for n in args.names] or sorted(HERE.glob("[0-9][0-9]_*.ipynb")):
        print(f"{path.name}: {regenerate(path):.1f} s")
