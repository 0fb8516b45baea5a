"""Sphinx configuration of remat's documentation.

Build (warnings are errors, as in CI)::

    sphinx-build -W --keep-going -n -b html docs docs/_build/html

Markdown pages are MyST (through myst-nb); their ``{code-cell}`` cells are
executed at every build on tiny shapes. The notebooks under ``notebooks/``
(``docs/notebooks`` links there) are rendered with their committed outputs,
never executed here: CI executes them with nbmake, and
``notebooks/regenerate.py`` rewrites their outputs. Shell commands too big
for a build are shown with the output ``docs/regenerate.py`` recorded in
``docs/_recorded/``.
"""

import importlib.metadata
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

# Kernels inherit this: XLA:CPU only, so JAX neither starts the CUDA plugin nor
# libtpu (and their "no driver" lines stay out of the pages).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "remat"
author = "the remat authors"
copyright = "the remat authors, Apache-2.0"
release = version = importlib.metadata.version("remat")

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "remat_refs",  # docs/_ext: references to undocumented names checked by import
]
exclude_patterns = ["_build", "_recorded", "_ext", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints",
                    "notebooks/configs"]

# --- MyST and notebooks ---------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "force"  # the .md pages' code cells run at every build ...
nb_execution_excludepatterns = ["notebooks/*"]  # ... the notebooks never (their outputs are committed)
nb_execution_timeout = 300
nb_execution_raise_on_error = True  # a failing cell fails the build
nb_merge_streams = True
# Cells print to stdout. Their stderr is dropped: there JAX's CUDA plugin logs, at import on a
# machine without an NVIDIA driver, lines about that machine, not about the example.
nb_output_stderr = "remove"

# --- API reference --------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_default_options = {"show-inheritance": True}
# every name in these modules' __all__ must be documented (docs/_ext/remat_refs.py checks it)
remat_api_modules = ["remat", "remat.policies", "remat.nnx", "remat.models", "remat.models.nnx",
                     "remat.models.vit", "remat.step", "remat.train", "remat.testing"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -W -n: a stale name or a broken cross-reference fails the build. No intersphinx
# (the build is offline), so third-party targets are listed here as not documented.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|flax|optax|chex|orbax|numpy|np|nn|nnx|matplotlib|rich|yaml)(\..*)?"),
    (r"py:class", r"Table"),  # rich.table.Table, imported for annotations only (remat._report)
    (r"py:.*", r"(typing|collections|collections\.abc|pathlib|os|enum|dataclasses|contextlib)\..*"),
]

# --- HTML -----------------------------------------------------------------------
html_theme = "furo"
html_title = f"remat {release}"
