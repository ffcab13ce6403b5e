"""How every command writes sizes and ages for people: one place, so `status`, `list` and the cleanup
report say the same thing the same way."""

from __future__ import annotations

from typing import Optional


def human(n: float) -> str:
    """Bytes as B, KiB, MiB, GiB or TiB (binary units, one decimal)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def age(seconds: Optional[float]) -> str:
    """A duration as 12s, 3.5m, 2.0h or 1.5d; '-' for none; a negative one (clock skew) as 0s."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds / n:.1f}{unit}"
    return f"{seconds:.0f}s"
