"""Formatting of numbers and markdown tables for the reports."""
from __future__ import annotations

from collections.abc import Sequence

DASH = "–"


def seconds(value: float | None) -> str:
    """A duration with a unit that keeps three significant digits (ns, µs, ms, s)."""
    if value is None:
        return DASH
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e-9:.3g} ns"


def times(value: float | None) -> str:
    """A ratio written as ``1.23×``."""
    return DASH if value is None else f"{value:.2f}×"


def percent(value: float | None) -> str:
    """A fraction written as a percentage."""
    return DASH if value is None else f"{100 * value:.1f}%"


def number(value: float | None) -> str:
    """Three significant digits."""
    return DASH if value is None else f"{value:.3g}"


def cell(text: object) -> str:
    """Markdown-safe cell text (no pipes, no newlines)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
