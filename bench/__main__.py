"""``python -m bench``: run the benchmark suites through pytest-benchmark and report.

Runs the default workloads of every registered op on CUDA if present (bf16), else the CPU
(fp32), writes ``results.jsonl`` (one record per line), ``report.md``, ``report.png`` and
pytest-benchmark's raw ``pytest-benchmark.json`` to the output folder, and prints the table.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from bench import cases, providers, records, registry, report

HERE = Path(__file__).resolve().parent
SUITE = HERE / "test_suite.py"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", action="append", default=[], metavar="NAME",
                        help="workload name or op/name (repeatable; default: every default workload)")
    parser.add_argument("--provider", action="append", default=[], metavar="NAME",
                        help="provider (repeatable; eager and dense always run as baselines)")
    parser.add_argument("--mode", action="append", default=[], choices=registry.MODES,
                        help="fwd or fwd+bwd (repeatable; default: both)")
    parser.add_argument("--skip", action="append", default=[], metavar="WHAT/PROVIDER[=REASON]",
                        help="record PROVIDER as skipped (with REASON) on the workloads WHAT names: an op, a "
                             "workload or op/name (repeatable; e.g. masked_lstm/compile=minutes of compilation)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--dtype", choices=cases.DTYPES, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="output folder (default: bench/out)")
    parser.add_argument("--quick", action="store_true", help="few short rounds (for tests)")
    parser.add_argument("--slices", type=int, default=None, metavar="N",
                        help="measure each case in N slices of its time, the providers of a workload and mode "
                             "taking turns (default: 4 on cpu, 1 on cuda and with --quick)")
    parser.add_argument("--list", action="store_true", help="list workloads and providers, then exit")
    return parser.parse_args(argv)


def pytest_args(ns: argparse.Namespace) -> list[str]:
    """The pytest command line that runs the suite with these options."""
    args = [str(SUITE), "-q", "-p", "no:cacheprovider", "-rfE", "--disable-warnings", "--benchmark-quiet",
            f"--benchmark-json={ns.out / 'pytest-benchmark.json'}",
            f"--bench-jsonl={ns.out / 'results.jsonl'}"]
    args += [f"--bench-workload={w}" for w in ns.workload]
    args += [f"--bench-provider={p}" for p in ns.provider]
    args += [f"--bench-mode={m}" for m in ns.mode]
    args += [f"--bench-skip={s}" for s in ns.skip]
    args += [f"--bench-{k}={v}" for k, v in (("device", ns.device), ("dtype", ns.dtype), ("slices", ns.slices))
             if v is not None]
    return args + ["--bench-quick"] * ns.quick


def list_choices() -> str:
    """Workloads (with sizes and source) and providers, one per line."""
    lines = ["workloads:"]
    for w in registry.workloads():
        flags = "" if w.default else " (not default)"
        lines.append(f"  {w.key}{flags}: {dict(w.params)} - {w.source}")
    return "\n".join([*lines, "providers: " + ", ".join(providers.names())])


def main(argv: Sequence[str] | None = None) -> int:
    """Run, write the results and the report, print the table; pytest's exit code."""
    ns = parse_args(argv)
    if ns.list:
        print(list_choices())
        return 0
    try:
        cases.select(cases.Settings.make(device=ns.device, dtype=ns.dtype, workloads=tuple(ns.workload),
                                         providers=tuple(ns.provider), modes=tuple(ns.mode),
                                         skips=tuple(ns.skip), slices=ns.slices, quick=ns.quick))
    except ValueError as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 2
    ns.out.mkdir(parents=True, exist_ok=True)
    results = ns.out / "results.jsonl"
    results.unlink(missing_ok=True)
    start = time.perf_counter()
    code = pytest.main(pytest_args(ns))
    if not results.exists():
        print(f"python -m bench: pytest wrote no results (exit code {int(code)})", file=sys.stderr)
        return int(code) or 1
    print(report.write(records.read_jsonl(results), ns.out / "report.md", ns.out / "report.png"))
    print(f"\n{results}, {ns.out / 'report.md'}, {ns.out / 'report.png'} written; "
          f"{time.perf_counter() - start:.0f} s")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
