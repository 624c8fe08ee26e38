"""The benchmark suite: one pytest-benchmark test per case of every registered op."""
from __future__ import annotations

from typing import Any

import pytest

from bench.cases import Case
from bench.runner import Runner


def test_case(case: Case, benchmark: Any, bench_runner: Runner) -> None:
    """Time ``case``; a provider that cannot run is a skip with its reason."""
    record = bench_runner.run(case, benchmark)
    if record["status"] == "skipped":
        pytest.skip(record["reason"])
    if record["status"] == "error":
        pytest.fail(record["reason"], pytrace=False)
