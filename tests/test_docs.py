"""The README and the documentation say what the code does.

- The README's Python example runs as written, from a folder of its own.
- The README keeps the lines ``.ci/run`` and a new user rely on.
- The policy table of the user guide is the registry's (``remat policies --markdown``).
- The API reference leaves out of the ``remat`` page only names documented on another page.

The documentation build itself (``sphinx-build -W``, in ``.ci/run``) checks every
cross-reference and runs the pages' code cells.
"""

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import remat

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def _block_after(text: str, marker: str) -> str:
    """The fenced code block that follows ``marker``."""
    match = re.search(re.escape(marker) + r"\n```\w*\n(.*?)\n```", text, re.DOTALL)
    assert match, f"no code block after {marker}"
    return match.group(1)


def test_readme_is_short_and_keeps_its_commands():
    assert len(README.splitlines()) < 150
    assert _block_after(README, "<!-- main-command -->").startswith("pip install -e . && remat sweep")
    # .ci/run reads the test command as the second line after the marker
    lines = README.splitlines()
    test_command = lines[lines.index("<!-- test-command -->") + 2]
    assert test_command.startswith('pip install -e ".[test') and "pytest" in test_command
    assert "3.11" in README and "python3 -m venv" in README


def test_readme_example_runs(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_block_after(README, "<!-- readme-example -->"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-W", "error", str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("save:mlpwi: keeps ['mlpwi', 'layer input'], peak "), done.stdout
    # the documentation runs the same example as a code cell
    page = (ROOT / "docs" / "getting-started.md").read_text()
    assert _block_after(README, "<!-- readme-example -->") in page


def test_policy_table_is_generated_from_the_registry():
    from remat.cli import policy_table_markdown

    page = (ROOT / "docs" / "guide" / "policies.md").read_text()
    table = page.split("<!-- policy-table:start -->\n")[1].split("<!-- policy-table:end -->")[0]
    assert table == policy_table_markdown(), \
        "docs/guide/policies.md out of date: paste `remat policies --markdown`"


def test_api_pages_leave_out_only_names_documented_elsewhere():
    page = (ROOT / "docs" / "api" / "remat.rst").read_text()
    excluded = re.search(r":exclude-members: (.*)", page).group(1).split(", ")
    submodules = {name for name in remat.__all__ if inspect.ismodule(getattr(remat, name))}
    elsewhere = submodules | set(remat.policies.__all__)  # each has a page of its own
    assert set(excluded) <= elsewhere, set(excluded) - elsewhere
