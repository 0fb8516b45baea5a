"""A plain (non-editable) install ships remat, remat.policies and remat.models
under the single top-level name ``remat``, with ``py.typed``."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_wheel_installs_one_top_level_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "-q", "-w", str(tmp_path)], check=True)
    (wheel,) = tmp_path.glob("remat-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.startswith("remat-")} == {"remat"}
    for path in ("remat/__init__.py", "remat/py.typed", "remat/policies/__init__.py",
                 "remat/policies/vocab.py", "remat/models/__init__.py", "remat/models/transformer.py",
                 "remat/targets/h100_sxm.txtpb"):
        assert path in names, path
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(wheel)], check=True)
    out = subprocess.run([sys.executable, "-c", "import remat, remat.policies, remat.models; "
                          "print(remat.__file__); print(remat.policies.get('minimal').is_full)"],
                         cwd=tmp_path, env={"PYTHONPATH": str(target)}, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [str(target / "remat" / "__init__.py"), "False"]
