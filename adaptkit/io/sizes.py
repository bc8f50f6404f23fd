"""Human-readable byte sizes: ``parse_size("5GB")`` and ``format_size(n)``."""
from __future__ import annotations

import re

from adaptkit.errors import ConfigError

# Decimal units follow the Hugging Face convention (``"5GB" == 5 * 10**9``); binary units are explicit
# (``"2GiB"``); a bare letter (``"5G"``) is binary, as in ``ls -h`` / ``docker``.
_UNITS: dict[str, int] = {
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
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int) -> int:
    """Parse ``"5GB"`` (10**9), ``"500MB"``, ``"2GiB"`` (2**30), ``"1.5G"``, ``"4096"`` or an int into bytes.

    Raises ``ConfigError`` for anything else, or for a size that is not positive.
    """
    if isinstance(value, bool):
        raise ConfigError(f"invalid size {value!r}: expected a number of bytes or e.g. '5GB', '500MB', '2GiB'")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.match(str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ConfigError(
                f"invalid size {value!r}: expected a number of bytes or e.g. '5GB', '500MB', '2GiB'"
            )
        number = m.group(1)
        if "." in number:
            n = int(float(number) * _UNITS[unit])
        else:
            n = int(number) * _UNITS[unit]
    if n <= 0:
        raise ConfigError(f"invalid size {value!r}: must be positive")
    return n


def format_size(n: int) -> str:
    """``1536 -> '1.5 KiB'``: a short binary-unit rendering for messages."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover
