"""The PNG plot: speedup over eager per workload, one panel per op and mode."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

Record = Mapping[str, Any]


def _panels(records: Sequence[Record]) -> dict[tuple[str, str], list[Record]]:
    panels: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        if r["status"] == "ok" and r["speedup_vs_eager"]:
            panels.setdefault((r["op"], r["mode"]), []).append(r)
    return panels


def _draw(ax: Any, title: str, records: Sequence[Record]) -> None:
    workloads = list(dict.fromkeys(r["workload"] for r in records))
    providers = list(dict.fromkeys(r["provider"] for r in records))
    width = 0.8 / len(providers)
    for i, provider in enumerate(providers):
        speedup = {r["workload"]: r["speedup_vs_eager"] for r in records if r["provider"] == provider}
        xs = [j + (i - (len(providers) - 1) / 2) * width for j, w in enumerate(workloads) if w in speedup]
        ax.bar(xs, [speedup[w] for w in workloads if w in speedup], width, label=provider)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(workloads)), workloads, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("speedup over eager")
    ax.set_title(title)
    ax.legend(fontsize=7, ncols=min(4, len(providers)))


def plot(records: Sequence[Record], path: Path | str) -> None:
    """Save the speedup plot of ``records`` as a PNG at ``path``."""
    panels = _panels(records)
    fig, axes = plt.subplots(max(1, len(panels)), 1, figsize=(9, 3.6 * max(1, len(panels))),
                             squeeze=False)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no results to plot", ha="center", va="center")
        axes[0][0].set_axis_off()
    for ax, ((op, mode), rs) in zip(axes[:, 0], panels.items()):
        device = rs[0]["device_name"]
        _draw(ax, f"{op} {mode} · {device} · {rs[0]['dtype']}", rs)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
