"""How a remat wrapper takes a call apart: static arguments (trace-time
constants, by name or by position) and the traced rest, passed on exactly as
the caller wrote them.

The rules are those of ``jax.checkpoint`` and ``nn.remat``: only what the
caller passed is traced (a default the caller never passed stays a Python
value), positional arguments stay positional (so positional-only, keyword-only
and ``*args`` signatures work), and ``static_argnums`` counts positions as
the wrapped callable sees them (for a linen or NNX method, ``self`` is 0, as
in Flax). JAX doc: "jax.checkpoint", ``static_argnums``.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from remat import _compat
from remat._errors import RematError

_compat.hide_frames(__file__)

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@dataclasses.dataclass(frozen=True, eq=False)
class Statics:
    """The static part of one call: values by position (in the whole
    positional argument list) and by keyword, and how many positional
    arguments the call had. Equal (and hashed) by value *and* type, so
    ``True``, ``1`` and ``1.0`` are three traces, as in ``jax.jit``."""

    nargs: int
    positions: tuple[tuple[int, Any], ...]
    keywords: tuple[tuple[str, Any], ...]

    def _key(self) -> tuple[Any, ...]:
        return (self.nargs, tuple((i, type(v), v) for i, v in self.positions),
                tuple((k, type(v), v) for k, v in self.keywords))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Statics) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``fn`` called with the traced ``args`` and ``kwargs`` and these static values put back."""
        at = dict(self.positions)
        rest = iter(args)
        full = [at[i] if i in at else next(rest) for i in range(self.nargs)]
        return fn(*full, **dict(self.keywords), **kwargs)


class ArgSplitter:
    """Splits the calls of one wrapped callable into :class:`Statics` and the
    traced arguments.

    Args:
      fn: the wrapped function or method (with ``self``).
      static_argnames: parameter names that are static when passed (a
        keyword-only one too); needs an inspectable signature.
      static_argnums: positions that are static when passed; negative ones
        count from the end of the call's positional arguments.
      where: how messages name ``fn``.
      method: ``fn`` is a method: position 0 (``self``) is never static.
      kind: how messages name the list (``"static"``, ``"broadcast"``).

    Raises:
      RematError: a name that is not a parameter of ``fn`` (listing them), a
        name when ``fn``'s signature cannot be inspected, a position that is
        not an int, or ``self`` made static.
    """

    def __init__(self, fn: Callable[..., Any], static_argnames: str | Sequence[str] = (),
                 static_argnums: int | Sequence[int] = (), *, where: str, method: bool = False,
                 kind: str = "static"):
        self.where = where
        self.argnames = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
        self.argnums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
        bad = [d for d in self.argnums if type(d) is not int]
        if bad:
            raise RematError(f"{where}: static_argnums must be ints, got {bad!r}")
        if method and any(d == 0 for d in self.argnums):
            raise RematError(f"{where}: static_argnums counts self as argument 0, which cannot be static; "
                             "the method's first argument is 1")
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # a builtin or C function: positions only
            params = None
        if params is None and self.argnames:
            raise RematError(f"{where}: its signature cannot be inspected, so {kind} argument names "
                             f"{', '.join(map(repr, self.argnames))} cannot be resolved; give positions "
                             "(static_argnums) instead")
        self.params = params
        names = [p.name for p in params or []][1 if method else 0:]
        for name in self.argnames:
            if name not in names:
                qualname = getattr(fn, "__qualname__", repr(fn))
                raise RematError(f"{kind} argument name {name!r} is not a parameter of {qualname}; "
                                 f"its parameters: {', '.join(names)}")
        self.positional = [p.name for p in params or [] if p.kind in _POSITIONAL]

    def split(self, args: tuple[Any, ...], kwargs: dict[str, Any]
              ) -> tuple[Statics, tuple[Any, ...], dict[str, Any]]:
        """``(statics, traced args, traced kwargs)`` of one call.

        Raises:
          ValueError: a ``static_argnums`` position outside the call's
            positional arguments (as ``jax.checkpoint`` raises).
          TypeError: a static argument with an unhashable value (an array, say).
        """
        n = len(args)
        for d in self.argnums:
            if not -n <= d < n:
                raise ValueError(f"{self.where}: static_argnums {self.argnums} out of range for a call "
                                 f"with {n} positional argument(s)")
        at = {d % n for d in self.argnums}
        keywords = {}
        for name in self.argnames:
            if name in kwargs:
                keywords[name] = kwargs[name]
            elif name in self.positional and self.positional.index(name) < n:
                at.add(self.positional.index(name))
        statics = Statics(n, tuple((i, args[i]) for i in sorted(at)), tuple(keywords.items()))
        for where_, value in [*((self.name(i), v) for i, v in statics.positions), *keywords.items()]:
            _check_static(where_, value, self.where)
        return (statics, tuple(a for i, a in enumerate(args) if i not in at),
                {k: v for k, v in kwargs.items() if k not in keywords})

    def split_named(self, args: tuple[Any, ...], kwargs: dict[str, Any]
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(static, traced)`` of one call, each by parameter name (for
        callers that call by name, as the layer scan does); ``self`` dropped.

        Raises:
          TypeError: a positional argument past the named parameters (``*args``),
            or an unhashable static value.
        """
        statics, dyn_args, dyn_kwargs = self.split(args, kwargs)
        static = {self.name(i): v for i, v in statics.positions} | dict(statics.keywords)
        at = dict(statics.positions)
        names = [self.name(i) for i in range(1, statics.nargs) if i not in at]
        if any(n.startswith("args[") for n in names):
            raise TypeError(f"{self.where}: *args parameters are not supported here; pass by name")
        return static, dict(zip(names, dyn_args[1:], strict=True)) | dyn_kwargs

    def name(self, i: int) -> str:
        """The name of positional argument ``i`` (``args[i]`` where unknown)."""
        return self.positional[i] if i < len(self.positional) else f"args[{i}]"

    def traced_names(self, statics: Statics, kwargs: dict[str, Any], *, method: bool = False) -> list[str]:
        """The names of a call's traced arguments, for messages."""
        static = dict(statics.positions)
        positions = range(1 if method else 0, statics.nargs)
        return [self.name(i) for i in positions if i not in static] + list(kwargs)


def _check_static(name: str, value: Any, where: str) -> None:
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"{where}: static argument {name!r} got an unhashable value of type "
            f"{type(value).__name__}; static arguments must be hashable Python values (bool, int, "
            "str, ...). Pass arrays as ordinary (traced) arguments.") from None
    if isinstance(value, float):
        seen = _STATIC_FLOATS.setdefault((where, name), set())
        if len(seen) < 8 and value not in seen:
            seen.add(value)
            if len(seen) == 8:
                warnings.warn(
                    f"{where}: static argument {name!r} has taken 8 different float values; "
                    "each one retraces and recompiles. Pass it as an ordinary (traced) argument.",
                    stacklevel=5)


_STATIC_FLOATS: dict[tuple[str, str], set[float]] = {}
"""Per (wrapper, argument): the first float values seen, at most 8 each."""
