"""The markdown results table: one section per device and dtype, one row per provider."""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from bench import fmt, registry
from bench.providers import DEFAULT_BACKENDS

Record = Mapping[str, Any]
CLOCK_NAMES = {"wall": "wall time per call", "cuda_event": "CUDA-event kernel time per call"}


def _collapse(records: Sequence[Record]) -> list[Record]:
    """Merge the providers of a workload and mode that were all skipped for one reason into a
    single ``all`` row (e.g. a GPU-only workload on a CPU)."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault((r["op"], r["workload"], r["mode"]), []).append(r)
    out: list[Record] = []
    for group in groups.values():
        reasons = {(r["status"], r["reason"]) for r in group}
        if len(group) > 1 and len(reasons) == 1 and group[0]["status"] == "skipped":
            out.append({**group[0], "provider": "all"})
        else:
            out.extend(group)
    return out


def _row(r: Record, wall_column: bool, peak_columns: bool, machine_columns: bool) -> list[str]:
    head = [r["op"], r["workload"], r["mode"], r["provider"]]
    if r["status"] != "ok":
        return head + [f"{r['status']}: {r['reason']}"]  # the reason instead of a time
    q = r["quantiles_s"]
    row = head + [fmt.seconds(r["median_s"]), f"{fmt.seconds(q['p10'])} – {fmt.seconds(q['p90'])}",
                  fmt.DASH if r.get("launches") is None else f"{r['launches']:g}"]
    if wall_column:
        row.append(fmt.seconds(r["times"]["wall"]["median_s"]))
    row += [fmt.times(r["speedup_vs_eager"]), fmt.percent(r["frac_dense"]),
            fmt.number(r["tflops"]), fmt.number(r["gbps"])]
    if peak_columns:
        row += [fmt.percent(r["frac_peak_flops"]), fmt.percent(r["frac_peak_bw"])]
    if machine_columns:
        row += [fmt.percent(r.get("frac_machine_flops")), fmt.percent(r.get("frac_machine_bw"))]
    return row


def _heading(records: Sequence[Record]) -> str:
    r = records[0]
    clocks = sorted({x["clock"] for x in records if x["clock"]})
    clock = ", ".join(CLOCK_NAMES.get(c, c) for c in clocks) or "nothing ran"
    peak = next((x["peak"]["name"] for x in records if x.get("peak")), None)
    machine = next((x["machine"] for x in records if x.get("machine")), None)
    limits = (f" · this machine, measured in the run: GEMM {fmt.number(machine['gemm_flops_per_s'] / 1e12)} "
              f"TFLOP/s, copy {fmt.number(machine['copy_bytes_per_s'] / 1e9)} GB/s ({machine['how']})"
              if machine else "")
    return (f"### {r['device_name']} ({r['device']}), {r['dtype']}: {clock}\n\n"
            f"torch {r['torch']} · triton {r['triton'] or fmt.DASH} · CUDA {r['cuda'] or fmt.DASH} · "
            f"mtlfast {r['mtlfast'] or fmt.DASH} · git {r['git']} · {r['threads']} threads"
            f"{f' · peaks of {peak}' if peak else ''}{limits}")


def _notes(records: Sequence[Record]) -> list[str]:
    """One line per op and note whose timed providers carry a ``note`` (a random op, not compared
    with eager): the note up to its first ``; ``, and where the rest (per provider) is."""
    more: dict[tuple[str, str], bool] = {}
    for r in records:
        if r["status"] == "ok" and r.get("note"):
            head, _, rest = r["note"].partition("; ")
            more[(r["op"], head)] = more.get((r["op"], head), False) or bool(rest)
    where = "; each provider's sample is checked by a statistic instead (see the records' note)"
    return [f"{op}: {head}{where if rest else ''}." for (op, head), rest in more.items()]


def section(records: Sequence[Record]) -> str:
    """Heading and table of records measured on one device in one dtype."""
    wall_column = any(r["clock"] not in (None, "wall") for r in records)
    peak_columns = any(r["frac_peak_bw"] is not None for r in records)
    machine_columns = any(r.get("frac_machine_bw") is not None for r in records)
    kinds = {r["launch_kind"] for r in records if r.get("launch_kind")}
    headers = ["op", "workload", "mode", "provider", "median", "p10 – p90",
               "ops / call" if kinds == {"operator calls"} else "launches / call"]
    headers += ["wall median"] * wall_column
    headers += ["vs eager", "of dense", "TFLOP/s", "GB/s"]
    headers += ["% peak FLOP/s", "% peak BW"] * peak_columns
    headers += ["% GEMM rate", "% copy BW"] * machine_columns
    rows = [_row(r, wall_column, peak_columns, machine_columns) for r in _collapse(records)]
    rows = [row + [""] * (len(headers) - len(row)) for row in rows]
    notes = "".join(f"\n\n{line}" for line in _notes(records))
    return _heading(records) + "\n\n" + fmt.md_table(headers, rows) + notes


# Providers that time a different computation: a yardstick, not a competitor.
NOT_COMPETING = {"dense": "the unmasked matmul", "eager-hard-sharing": "a different network"}


def _is_mtlfast(provider: str) -> bool:
    # a backend, the custom-op path, or a backend in one of its modes (OpBench.backend_modes)
    return (provider in DEFAULT_BACKENDS or provider.startswith("mtlfast")
            or provider in _backend_modes())


@functools.lru_cache(maxsize=None)
def _backend_modes() -> frozenset:
    registry.load()         # a report may be made from records alone
    return frozenset(name for spec in registry.ops() for name in spec.backend_modes)


def _spread(r: Record) -> str:
    q = r["quantiles_s"]
    return f"{fmt.seconds(r['median_s'])} ({fmt.seconds(q['p10'])} – {fmt.seconds(q['p90'])})"


def best_rows(records: Sequence[Record]) -> list[list[str]]:
    """Per op, workload, mode and dtype: mtlfast's fastest provider against the fastest other one
    (eager, compile, the op's eager variants), with medians and p10 – p90, and their ratio."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        if r["status"] == "ok":
            groups.setdefault((r["op"], r["workload"], r["mode"], r["device_name"], r["dtype"]), []).append(r)
    rows = []
    for (op, workload, mode, _, _), group in groups.items():
        ours = [r for r in group if _is_mtlfast(r["provider"])]
        others = [r for r in group if not _is_mtlfast(r["provider"]) and r["provider"] not in NOT_COMPETING]
        if not ours or not others:
            continue
        mine = min(ours, key=lambda r: r["median_s"])
        best = min(others, key=lambda r: r["median_s"])
        rows.append([op, workload, mode, f"{mine['provider']} {_spread(mine)}", f"{best['provider']} {_spread(best)}",
                     fmt.times(best["median_s"] / mine["median_s"])])
    return rows


def best_table(records: Sequence[Record]) -> str:
    """The summary: every row's best provider and mtlfast's ratio to it."""
    rows = best_rows(records)
    if not rows:
        return ""
    headers = ["op", "workload", "mode", "mtlfast (fastest backend): median (p10 – p90)",
               "fastest other provider: median (p10 – p90)", "mtlfast speedup"]
    return ("### mtlfast against the fastest other provider\n\n" + fmt.md_table(headers, rows)
            + "\n\nOther = eager, compile and the op's eager variants ("
            + "; ".join(f"{p}: {why}, not counted" for p, why in NOT_COMPETING.items()) + ").")


def markdown(records: Sequence[Record]) -> str:
    """The full results table (sections in the order their device and dtype first appear)."""
    sections: dict[tuple, list[Record]] = {}
    for r in records:
        sections.setdefault((r["device_name"], r["dtype"]), []).append(r)
    if not sections:
        return "(no results)"
    legend = ("vs eager = eager median / median; of dense = dense median / median "
              "(share of the unmasked matmul's throughput); TFLOP/s and GB/s from the median; "
              "% GEMM rate and % copy BW (CPU) = TFLOP/s and GB/s over this machine's own large-GEMM "
              "rate and copy bandwidth measured in the same run (bench/machine.py); "
              "launches / call = kernel launches of one call on a GPU, ops / call = PyTorch operator "
              "calls of one call on a CPU (mtlfast.profile.count_launches).")
    return "\n\n".join([*(section(s) for s in sections.values()), *filter(None, [best_table(records)]), legend])
