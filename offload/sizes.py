"""Byte sizes as people write them: "512MiB", "2GB", "1.5 GiB", "1073741824"."""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

ACCEPTED_SIZES = "a byte count such as '1073741824', '512MiB', '2GB' or '1.5GiB' (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"


def parse_bytes(value: str | int | float, name: str) -> int:
    """Parse a byte size; `name` (a field or variable) is named in the error."""
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a byte size; expected {ACCEPTED_SIZES}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{name}={value!r} is not a byte size; expected a finite, non-negative whole number of bytes")
        if value < 0 or value != int(value):
            raise ValueError(f"{name}={value!r} is not a byte size; expected a non-negative whole number of bytes")
        return int(value)
    match = _SIZE_RE.match(str(value))
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{name}={value!r} is not a byte size; expected {ACCEPTED_SIZES}")
    number, unit = match.groups()
    size = float(number) * _UNITS[unit.lower()]
    if size != int(size):
        raise ValueError(f"{name}={value!r} is not a whole number of bytes")
    return int(size)


def format_bytes(num_bytes: float) -> str:
    """Human-readable binary size: 1536 -> '1.50 KiB'."""
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
