"""Sizes and FLOP counts as people write them: ``"40GiB"`` in, ``"1.50 GiB"`` out."""

from __future__ import annotations

import re

from remat import _compat
from remat._errors import RematError

_compat.hide_frames(__file__)

__all__ = ["MAX_BYTES", "byte_unit", "check_size", "flop_unit", "format_bytes", "format_flops", "parse_bytes"]

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str) -> int:
    """A size with its unit, e.g. ``"40GiB"``, ``"1.5 GB"``, ``"512MiB"``, ``"4e10B"``, in bytes.

    Units: B, kB/MB/GB/TB (powers of 1000) and KiB/MiB/GiB/TiB (powers of
    1024), case-insensitive. A bare number is rejected: say the unit.

    >>> parse_bytes("40GiB"), parse_bytes("1.5 GB"), parse_bytes("4e10B")
    (42949672960, 1500000000, 40000000000)

    Raises:
      ValueError: no number, no unit or an unknown unit (the message lists the valid units),
        or a size over :data:`MAX_BYTES` (:func:`check_size`).
    """
    m = _SIZE_RE.match(text)
    valid = "B, kB, MB, GB, TB, KiB, MiB, GiB, TiB"
    if not m or not m.group(2):
        raise RematError(f"invalid size {text!r}: write a number and a unit, e.g. 40GiB; units: {valid}")
    unit = m.group(2).lower()
    if unit not in _UNITS:
        raise RematError(f"unknown size unit {m.group(2)!r} in {text!r}; valid: {valid}")
    return check_size(float(m.group(1)) * _UNITS[unit], text)


MAX_BYTES = 2**50
"""The largest memory size taken per device: 1 PiB (no accelerator comes near it;
a larger number is a typo)."""


def check_size(n: float, text: object) -> int:
    """``n`` bytes as an int, if in ``0..MAX_BYTES`` (``text``: what the user wrote).

    Raises:
      ValueError: ``n`` negative, not finite, or over :data:`MAX_BYTES`.
    """
    if not 0 <= n <= MAX_BYTES:  # also false for nan; inf is over
        raise RematError(f"size {text!r} is outside 0 B..1 PiB per device: check the number and its unit")
    return int(n)


_BYTE_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))
_FLOP_UNITS = (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("FLOP", 1))


def byte_unit(n: float) -> tuple[str, int]:
    """The binary unit ``n`` bytes read best in, and its size: ``("MiB", 2**20)``."""
    return next(((u, s) for u, s in _BYTE_UNITS if abs(n) >= s), _BYTE_UNITS[-1])


def flop_unit(n: float) -> tuple[str, float]:
    """The decimal unit ``n`` FLOPs read best in, and its size: ``("GFLOP", 1e9)``."""
    return next(((u, s) for u, s in _FLOP_UNITS if abs(n) >= s), _FLOP_UNITS[-1])


def format_bytes(n: float | None) -> str:
    """``n`` bytes in binary units; ``"-"`` for None.

    >>> format_bytes(1.5 * 2**30), format_bytes(512), format_bytes(None)
    ('1.50 GiB', '512 B', '-')
    """
    if n is None:
        return "-"
    unit, size = byte_unit(n)
    return f"{int(n)} B" if size == 1 else f"{n / size:.2f} {unit}"


def format_flops(n: float | None) -> str:
    """``n`` FLOPs in decimal units, e.g. ``"99.06 TFLOP"``; ``"-"`` for None."""
    if n is None:
        return "-"
    unit, size = flop_unit(n)
    return f"{int(n)} FLOP" if size == 1 else f"{n / size:.2f} {unit}"
