"""Two result files side by side: the time ratio per op, workload, mode and provider."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench import fmt

Record = Mapping[str, Any]
KEY = ("op", "workload", "mode", "provider")


@dataclass(frozen=True)
class Pair:
    """The records of one key in file A and file B (None where a file lacks it)."""

    key: tuple[str, ...]
    a: Record | None
    b: Record | None

    @property
    def ratio(self) -> float | None:
        """B median / A median (below 1: B is faster), None unless both ran."""
        if self.a is None or self.b is None or "ok" != self.a["status"] or "ok" != self.b["status"]:
            return None
        return self.b["median_s"] / self.a["median_s"]


def pairs(a: Sequence[Record], b: Sequence[Record]) -> list[Pair]:
    """Records matched by (op, workload, mode, provider), in A's order then B's extra keys."""
    index_a = {tuple(r[k] for k in KEY): r for r in a}
    index_b = {tuple(r[k] for k in KEY): r for r in b}
    keys = list(dict.fromkeys([*index_a, *index_b]))
    return [Pair(k, index_a.get(k), index_b.get(k)) for k in keys]


def _time(r: Record | None) -> str:
    if r is None:
        return "absent"
    return fmt.seconds(r["median_s"]) if r["status"] == "ok" else f"{r['status']}: {r['reason']}"


def _source(label: str, name: str, records: Sequence[Record]) -> str:
    if not records:
        return f"{label} = {name}: (empty)"
    r = records[0]
    return f"{label} = {name}: {r['device_name']}, {r['dtype']}, torch {r['torch']}, git {r['git']}"


def markdown(a: Sequence[Record], b: Sequence[Record], names: tuple[str, str] = ("A", "B")) -> str:
    """The comparison table of ``a`` and ``b`` (``names``: where each came from)."""
    rows = [[*p.key, _time(p.a), _time(p.b), fmt.times(p.ratio)] for p in pairs(a, b)]
    table = fmt.md_table([*KEY, "A median", "B median", "B / A"], rows)
    return "\n\n".join([_source("A", names[0], a), _source("B", names[1], b), table,
                        "B / A is the ratio of median times: below 1, B is faster."])
