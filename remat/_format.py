"""Sizes and FLOP counts as people write them: ``"40GiB"`` in, ``"1.50 GiB"`` out."""

from __future__ import annotations

import re

from remat import _compat
from remat._errors import RematError

_compat.hide_frames(__file__)

__all__ = ["format_bytes", "format_flops", "parse_bytes"]

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
      ValueError: no number, no unit or an unknown unit (the message lists the valid units).
    """
    m = _SIZE_RE.match(text)
    valid = "B, kB, MB, GB, TB, KiB, MiB, GiB, TiB"
    if not m or not m.group(2):
        raise RematError(f"invalid size {text!r}: write a number and a unit, e.g. 40GiB; units: {valid}")
    unit = m.group(2).lower()
    if unit not in _UNITS:
        raise RematError(f"unknown size unit {m.group(2)!r} in {text!r}; valid: {valid}")
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float | None) -> str:
    """``n`` bytes in binary units; ``"-"`` for None.

    >>> format_bytes(1.5 * 2**30), format_bytes(512), format_bytes(None)
    ('1.50 GiB', '512 B', '-')
    """
    if n is None:
        return "-"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_flops(n: float | None) -> str:
    """``n`` FLOPs in decimal units, e.g. ``"99.06 TFLOP"``; ``"-"`` for None."""
    if n is None:
        return "-"
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} FLOP"
