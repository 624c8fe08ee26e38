"""The result schema: one JSON object per (op, workload, mode, provider), one per line.

Times are seconds.  ``median_s``/``quantiles_s`` are those of the primary ``clock``
("cuda_event" on CUDA, "wall" on CPU); ``times`` holds the statistics of every clock measured.
FLOPs are the dense-equivalent count of the op; bytes are the lower bound an ideal fused
kernel moves (every input, output, incoming gradient and produced gradient once). ``launches``
counts what one call starts (``mtlfast.profile.count_launches``): kernels on a GPU, PyTorch
operator calls on a CPU (``launch_kind`` says which).
"""
from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bench.machine import MachineLimits
from bench.peaks import Peak

SCHEMA = "mtlfast-bench/1"
QUANTILES: dict[str, float] = {"p10": 0.10, "p25": 0.25, "p50": 0.50, "p75": 0.75, "p90": 0.90}
STATUSES = ("ok", "skipped", "error")

FIELDS: tuple[str, ...] = (
    "schema", "op", "workload", "mode", "provider", "status", "reason", "params",
    "dtype", "device", "device_name", "torch", "triton", "cuda", "mtlfast", "mtlfast_build",
    "git", "threads", "python", "timestamp",
    "clock", "median_s", "quantiles_s", "rounds", "times",
    "flops", "bytes", "tflops", "gbps", "peak", "frac_peak_flops", "frac_peak_bw",
    "machine", "frac_machine_flops", "frac_machine_bw",
    "speedup_vs_eager", "frac_dense", "rel_err", "note", "launches", "launch_kind",
)


def summarize(samples: Iterable[float]) -> dict[str, Any]:
    """Median, mean, min, max, quantiles (linear interpolation) and count of ``samples``."""
    data = np.asarray(list(samples), dtype=np.float64)
    if data.size == 0:
        raise ValueError("no samples")
    qs = np.quantile(data, list(QUANTILES.values()))
    return {"median_s": float(np.median(data)), "mean_s": float(data.mean()),
            "min_s": float(data.min()), "max_s": float(data.max()),
            "quantiles_s": {k: float(v) for k, v in zip(QUANTILES, qs)}, "rounds": int(data.size)}


def throughput(flops: float, nbytes: float, seconds: float) -> tuple[float, float]:
    """(TFLOP/s, GB/s) achieved when ``flops`` and ``nbytes`` take ``seconds``."""
    return flops / seconds / 1e12, nbytes / seconds / 1e9


def fractions(tflops: float, gbps: float, dtype: str, peak: Peak | None) -> tuple[float | None, float | None]:
    """(fraction of peak FLOP/s, fraction of peak bandwidth); None where no peak is known."""
    if peak is None:
        return None, None
    peak_flops = peak.flops(dtype)
    return (tflops * 1e12 / peak_flops if peak_flops else None), gbps * 1e9 / peak.bytes_per_s


def base(*, op: str, workload: str, mode: str, provider: str, params: Mapping[str, Any],
         dtype: str, env: Mapping[str, Any]) -> dict[str, Any]:
    """A record with identity and environment filled and every measured field None."""
    record: dict[str, Any] = dict.fromkeys(FIELDS)
    record.update(env)
    record.update(schema=SCHEMA, op=op, workload=workload, mode=mode, provider=provider,
                  params=dict(params), dtype=dtype,
                  timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    return record


def not_run(record: dict[str, Any], status: str, reason: str) -> dict[str, Any]:
    """``record`` marked ``skipped`` or ``error`` with ``reason``."""
    if status not in ("skipped", "error"):
        raise ValueError(f"status must be 'skipped' or 'error', got {status!r}")
    return {**record, "status": status, "reason": reason}


def measured(record: dict[str, Any], *, samples: Mapping[str, list[float]], clock: str,
             flops: float, nbytes: float, peak: Peak | None, rel_err: float | None,
             note: str | None = None, launches: float | None = None,
             launch_kind: str | None = None, machine: MachineLimits | None = None) -> dict[str, Any]:
    """``record`` completed from timing samples per clock and the op's cost (``note``: why
    ``rel_err`` is null for a provider of a random op, and what was checked instead;
    ``launches``: per call, of ``launch_kind``: "kernel launches" on a GPU, "operator calls" on
    a CPU; None when mtlfast.profile could not count them; ``machine``: the CPU's limits measured
    in the same run, bench/machine.py)."""
    times = {name: summarize(s) for name, s in samples.items()}
    primary = times[clock]
    tflops, gbps = throughput(flops, nbytes, primary["median_s"])
    frac_flops, frac_bw = fractions(tflops, gbps, record["dtype"], peak)
    machine_fields = ({"machine": machine.as_record(),
                       "frac_machine_flops": tflops * 1e12 / machine.gemm_flops_per_s,
                       "frac_machine_bw": gbps * 1e9 / machine.copy_bytes_per_s} if machine else {})
    return {**record, "status": "ok", "clock": clock, "median_s": primary["median_s"],
            "quantiles_s": primary["quantiles_s"], "rounds": primary["rounds"], "times": times,
            "flops": flops, "bytes": nbytes, "tflops": tflops, "gbps": gbps,
            "peak": None if peak is None else {"name": peak.name, "bytes_per_s": peak.bytes_per_s,
                                               "flops_per_s": peak.flops(record["dtype"])},
            "frac_peak_flops": frac_flops, "frac_peak_bw": frac_bw, "rel_err": rel_err, "note": note,
            "launches": launches, "launch_kind": launch_kind, **machine_fields}


def group_key(record: Mapping[str, Any]) -> tuple:
    """Records that are timed against each other: same op, workload, mode, device and dtype."""
    return (record["op"], record["workload"], record["mode"], record["device_name"], record["dtype"])


def finalize(records: list[dict[str, Any]], eager_names: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Fill ``speedup_vs_eager`` (eager median / median) and ``frac_dense`` (dense median / median).

    ``eager_names`` maps an op to the provider name of its eager (default ``"eager"``)."""
    eager_names = eager_names or {}
    medians = {(group_key(r), r["provider"]): r["median_s"] for r in records if r["status"] == "ok"}
    out = []
    for r in records:
        r = dict(r)
        if r["status"] == "ok":
            eager, dense = (medians.get((group_key(r), p))
                            for p in (eager_names.get(r["op"], "eager"), "dense"))
            r["speedup_vs_eager"] = eager / r["median_s"] if eager else None
            r["frac_dense"] = dense / r["median_s"] if dense else None
        out.append(r)
    return out


def write_jsonl(path: Path | str, records: Iterable[Mapping[str, Any]]) -> None:
    """Write one JSON object per line (replacing ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=False) + "\n" for r in records))


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """Records of a JSON-lines file, filling fields an older writer left out with None."""
    lines = Path(path).read_text().splitlines()
    return [{**dict.fromkeys(FIELDS), **json.loads(line)} for line in lines if line.strip()]
