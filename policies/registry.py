"""The policy registry and the spec-string grammar.

Spec grammar: a ``+``-joined list of terms; each term is a registered preset
name, ``save:NAME[,NAME...]``, ``offload:NAME[,NAME...]``, ``dots``,
``dots:no_batch``, ``offload_dots`` or ``offload_dots:no_batch``. Terms are
combined by union (:meth:`Policy.__or__`), e.g.
``"minimal + offload:decoder_layer_input"``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable
from typing import Any

from remat import _compat
from remat._errors import PolicySpecError, RematError, UnknownPolicyError
from remat.policies.policy import OpaquePolicy, Policy, require_text

_compat.hide_frames(__file__)

_PRESET_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_KEYWORDS = ("save", "offload", "dots", "offload_dots")
_GRAMMAR = ("a preset name, save:NAME[,NAME], offload:NAME[,NAME], dots, dots:no_batch, "
            "offload_dots or offload_dots:no_batch")


@dataclasses.dataclass(frozen=True)
class _Entry:
    policy: Policy
    doc: str


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, policy: Policy | str, *, doc: str, overwrite: bool = False) -> Policy:
    """Register a named policy (a preset), usable wherever a spec is taken.

    Args:
      name: lower-case identifier (``[a-z][a-z0-9_]*``), not a grammar keyword
        (``save``, ``offload``, ``dots``, ``offload_dots``).
      policy: a :class:`Policy` or a spec string (not a JAX policy callable).
      doc: one paragraph: what it keeps, and the source it follows.
      overwrite: replace an existing entry instead of raising.

    Returns:
      The registered :class:`Policy`.

    Raises:
      ValueError: an invalid or reserved name, an empty doc, or a name
        already registered while ``overwrite`` is False.
      PolicyNotTextError: ``policy`` is a JAX policy callable.
    """
    if not _PRESET_RE.match(name) or name in _KEYWORDS:
        raise RematError(
            f"invalid policy name {name!r}: use [a-z][a-z0-9_]*, not one of {', '.join(_KEYWORDS)}")
    if not doc.strip():
        raise RematError(f"policy {name!r} needs a doc")
    if name in _REGISTRY and not overwrite:
        raise RematError(f"policy {name!r} is already registered; pass overwrite=True to replace it")
    require_text(policy, f"register({name!r})")
    resolved = get(policy)
    _REGISTRY[name] = _Entry(resolved, " ".join(doc.split()))
    return resolved


def names() -> list[str]:
    """Every registered policy name, in registration order."""
    return list(_REGISTRY)


def _lookup(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = names()
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise UnknownPolicyError(f"unknown remat policy {name!r}{hint}; valid names: {', '.join(valid)}",
                                 name=name) from None


def describe(name: str) -> str:
    """The doc paragraph of a registered policy.

    Raises:
      UnknownPolicyError: ``name`` is not registered.
    """
    return _lookup(name).doc


def get(spec: str | Policy | Callable[..., Any]) -> Policy:
    """Resolve a preset name, a spec string or a :class:`Policy` to a
    :class:`Policy`; a JAX policy object or callable (what
    ``jax.checkpoint(policy=...)`` takes) to an :class:`OpaquePolicy`, applied
    as it is.

    Example:
      >>> from remat.policies import get
      >>> str(get("save:query_proj,key_proj + dots:no_batch"))
      'save:key_proj,query_proj + dots:no_batch'
      >>> get("minimal + offload:decoder_layer_input").offload
      frozenset({'decoder_layer_input'})
      >>> get(str(get("minimal"))) == get("minimal")
      True

    Raises:
      UnknownPolicyError: a term names no registered preset.
      PolicySpecError: a term is malformed; the message gives the term and its
        position.
      ValueError: the terms conflict (a name both saved and offloaded, ``none``
        combined with anything).
      TypeError: ``spec`` is neither a string, a :class:`Policy` nor a
        callable (``None`` is rejected: write ``"full"`` or ``"none"``).
    """
    if isinstance(spec, Policy):
        return spec
    if callable(spec):
        return OpaquePolicy.of(spec)
    if not isinstance(spec, str):
        raise TypeError(
            f"a remat policy is a name, a spec string, a Policy or a JAX policy callable, got {spec!r}; "
            "for no remat write 'none', for recompute-everything write 'full'")
    return _parse(spec)[0]


def written_names(spec: str | Policy) -> frozenset[str]:
    """The checkpoint names written out in ``save:``/``offload:`` terms of a
    spec string (names that come from a preset term are not), or every name
    of a :class:`Policy` (every name a JAX policy object lists, too: the
    user wrote them out).

    >>> sorted(written_names("minimal + save:mlpwo"))
    ['mlpwo']

    Raises:
      The errors of :func:`get` for a bad spec.
    """
    if isinstance(spec, Policy):
        return spec.names
    return _parse(spec)[1]


def _parse(spec: str) -> tuple[Policy, frozenset[str]]:
    """The one parse of a spec string: its :class:`Policy` (the union of its
    ``+``-joined terms, in order) and the names its ``save:``/``offload:``
    terms write out.

    Raises:
      The errors of :func:`get` for a bad spec.
    """
    result: Policy | None = None
    written: frozenset[str] = frozenset()
    pos = 0
    for raw in spec.split("+"):
        start = pos + len(raw) - len(raw.lstrip())
        pos += len(raw) + 1
        key, term = _term(raw.strip(), start, spec)
        if key in ("save", "offload"):
            written |= term.names
        try:
            result = term if result is None else result | term
        except ValueError as e:
            raise RematError(f"in spec {spec!r}, term {raw.strip()!r} at position {start}: {e}") from None
    assert result is not None
    return result, written


def _term(term: str, pos: int, spec: str) -> tuple[str, Policy]:
    """One term of a spec: its keyword (a preset name, ``save``, ``offload``,
    ``dots`` or ``offload_dots``) and its :class:`Policy`.

    Raises:
      PolicySpecError: a malformed term, naming it and its position.
      UnknownPolicyError: an unregistered preset name.
    """
    def bad(why: str) -> PolicySpecError:
        return PolicySpecError(f"bad term {term!r} at position {pos} in spec {spec!r}: {why}")

    if not term:
        raise bad(f"empty term; expected {_GRAMMAR}")
    key, sep, value = term.partition(":")
    key = key.strip()
    if not sep:
        if key in ("dots", "offload_dots"):
            return key, Policy(**{key: "all"})
        if key in _KEYWORDS:
            raise bad(f"{key!r} needs names, as {key}:NAME[,NAME]")
        if not _PRESET_RE.match(key):
            raise bad(f"expected {_GRAMMAR}")
        return key, _lookup(key).policy
    if key in ("save", "offload"):
        parts = [n.strip() for n in value.split(",")]
        if not all(parts):
            raise bad("empty checkpoint name in the list")
        try:
            return key, Policy(**{key: frozenset(parts)})
        except ValueError as e:
            raise bad(str(e)) from None
    if key in ("dots", "offload_dots"):
        rule = value.strip()
        if rule not in ("all", "no_batch"):
            raise bad(f"unknown matmul rule {rule!r}; valid: all, no_batch")
        return key, Policy(**{key: rule})
    raise bad(f"unknown key {key!r}; expected {_GRAMMAR}")
