"""Cross-references the API pages do not document, still checked.

The docstrings name private helpers (``remat._mesh.make_mesh``), type
variables and aliases (``remat._apply.F``), module constants, and public
objects by another import path (``remat.Policy`` is documented as
``remat.policies.Policy``). Sphinx would report each as a missing reference.
Here a missing ``py:`` reference is looked up by importing it, from the
referring module and class outward:

- an object documented under another name links there;
- an object that exists but has no page is shown as code, unlinked;
- a name that does not import stays a warning, so a stale name fails the
  ``-W`` build.

Every name in the ``__all__`` of the modules listed in ``remat_api_modules``
(conf.py) must be documented, under that name or another (a re-export):
else a warning, so a public name added without a page fails the build too.

A ``Raises:`` entry in prose (napoleon turns its words into exception
references) is shown as written when each name it contains resolves.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from docutils import nodes
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.ext.napoleon import _process_docstring as napoleon_process_docstring
from sphinx.util import logging
from sphinx.util.nodes import make_refnode

logger = logging.getLogger(__name__)

_MISSING = object()
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _import(path: str) -> Any:
    """The object at dotted ``path`` (a module, then attributes), or _MISSING."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        except Exception:
            return _MISSING
        for attr in parts[i:]:
            obj = getattr(obj, attr, _MISSING)
            if obj is _MISSING:
                break
        else:
            return obj
    return _MISSING


def _scopes(node: pending_xref) -> list[str]:
    """Where a name in ``node`` may be defined: the referring class and module
    as the page declares them, then the object whose docstring holds it (its
    source reads ``...:docstring of remat._sweep.sweep``) and its parents."""
    module, cls = node.get("py:module"), node.get("py:class")
    scopes = [f"{module}.{cls}" if module and cls else "", module or ""]
    where = re.search(r"docstring of ([\w.]+)", str(node.source or ""))
    if where:
        parts = where.group(1).split(".")
        scopes += [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    return [s for s in scopes if s] + [""]


def _lookup(target: str, scopes: list[str]) -> Any:
    target = target.lstrip("~.")
    for scope in scopes:
        obj = _import(f"{scope}.{target}" if scope else target)
        if obj is not _MISSING:
            return obj
    return _MISSING


def _documented(env: BuildEnvironment) -> dict[int, tuple[str, str]]:
    """id(object) -> (docname, fullname) of every Python object with a page."""
    cache = getattr(env, "_remat_documented", None)
    if cache is None:
        cache = {}
        for name, entry in env.get_domain("py").objects.items():
            obj = _import(name)
            if obj is not _MISSING and not isinstance(obj, (str, int, float, bool, tuple, frozenset)):
                cache.setdefault(id(obj), (entry.docname, name))
        env._remat_documented = cache  # type: ignore[attr-defined]
    return cache


def missing_reference(app: Sphinx, env: BuildEnvironment, node: pending_xref,
                      contnode: nodes.Element) -> nodes.Element | None:
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    scopes = _scopes(node)
    if not _NAME.fullmatch(target.lstrip("~.")):
        # napoleon's reading of a prose "Raises:" entry: fine when every dotted name in it resolves
        names = [w.rstrip(".") for w in re.findall(r"[A-Za-z_][\w.]*", target)]
        names = [w for w in names if "." in w or w.endswith(("Error", "Warning", "Exception"))]
        if all(_lookup(w, scopes) is not _MISSING for w in names):
            return nodes.Text(target)
        return None
    obj = _lookup(target, scopes)
    if obj is _MISSING:
        return None  # Sphinx warns: the name is stale
    documented = _documented(env).get(id(obj))
    if documented is not None:
        docname, fullname = documented
        return make_refnode(app.builder, node["refdoc"], docname, fullname, contnode, fullname)
    return contnode


def _napoleon_for_prose_attributes(app: Sphinx) -> None:
    """Keep napoleon from reading an attribute's first words as its type.

    For an attribute, napoleon takes ``Words: more`` on the first line as
    ``type: description`` (``Gated MLP: gate projection output`` would become
    the type "Gated MLP"). This project's attribute docstrings are prose, and
    their types are the annotations: napoleon reads them as it reads a
    module's docstring (sections, no inline type).
    """
    listeners = app.events.listeners["autodoc-process-docstring"]
    for listener in list(listeners):
        if listener.handler is napoleon_process_docstring:
            app.disconnect(listener.id)

    def process(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
        kind = "module" if what in ("attribute", "data", "property") else what
        napoleon_process_docstring(app, kind, name, obj, options, lines)

    app.connect("autodoc-process-docstring", process)


def check_api_documented(app: Sphinx, env: BuildEnvironment) -> None:
    """Warn for each public name (a module's ``__all__``) that no page documents."""
    documented = _documented(env)
    names = set(env.get_domain("py").objects)
    for modname in app.config.remat_api_modules:
        module = importlib.import_module(modname)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if f"{modname}.{name}" in names or (not isinstance(obj, (str, int, float, bool, tuple, frozenset))
                                                 and id(obj) in documented):
                continue
            logger.warning("%s.%s is in %s.__all__ but documented on no page (docs/api/)",
                           modname, name, modname, type="remat", subtype="undocumented")


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("remat_api_modules", [], "env")
    app.connect("env-check-consistency", check_api_documented)
    app.connect("builder-inited", _napoleon_for_prose_attributes)
    app.connect("missing-reference", missing_reference)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
