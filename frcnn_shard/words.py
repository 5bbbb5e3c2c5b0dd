"""How counts and sizes are worded for people: one place, so every command says "1 box", "2 boxes"."""
from __future__ import annotations

def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``n`` and the noun, singular for exactly one: plural(1, "box") -> '1 box', plural(0, "box") -> '0 boxes'."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {nouns or _regular_plural(noun)}"


def _regular_plural(noun: str) -> str:
    """box -> boxes, class -> classes, entry -> entries, sample -> samples."""
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover
