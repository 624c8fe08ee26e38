"""pytest plumbing of the benchmark suite: options, case parametrization, the JSON-lines sink.

``python -m bench`` passes these options; ``pytest bench/`` works too (then only
pytest-benchmark's own output is written unless ``--bench-jsonl`` is given).
"""
from __future__ import annotations

from typing import Any

import pytest

from bench import cases, records, registry
from bench.runner import Runner

RUNNER = pytest.StashKey[Runner]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mtlfast-bench")
    group.addoption("--bench-workload", action="append", default=[], help="workload name or op/name (repeatable)")
    group.addoption("--bench-provider", action="append", default=[], help="provider (repeatable); eager and dense always run")
    group.addoption("--bench-mode", action="append", default=[], help="fwd or fwd+bwd (repeatable)")
    group.addoption("--bench-skip", action="append", default=[],
                    help="WHAT/PROVIDER[=REASON]: PROVIDER skipped with REASON on the workloads WHAT names (repeatable)")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if available)")
    group.addoption("--bench-dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on cuda, fp32 on cpu)")
    group.addoption("--bench-quick", action="store_true", help="few short rounds (tests)")
    group.addoption("--bench-slices", type=int, default=None,
                    help="measure each case in N slices, a row's providers taking turns (default: 4 on cpu, 1 on cuda)")
    group.addoption("--bench-jsonl", default=None, help="write the result records here")


def settings_from(config: pytest.Config) -> cases.Settings:
    """The run settings given on the pytest command line."""
    opt = config.getoption
    return cases.Settings.make(device=opt("--bench-device"), dtype=opt("--bench-dtype"),
                               quick=opt("--bench-quick"), workloads=tuple(opt("--bench-workload")),
                               providers=tuple(opt("--bench-provider")), modes=tuple(opt("--bench-mode")),
                               skips=tuple(opt("--bench-skip")), slices=opt("--bench-slices"))


def pytest_configure(config: pytest.Config) -> None:
    settings = settings_from(config)
    try:
        cases.select(settings)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from exc
    config.stash[RUNNER] = Runner(settings)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        selected = cases.select(metafunc.config.stash[RUNNER].settings)
        metafunc.parametrize("case", selected, ids=[c.id for c in selected])


@pytest.fixture
def bench_runner(request: pytest.FixtureRequest) -> Runner:
    """The session's runner (settings, timer, collected records)."""
    return request.config.stash[RUNNER]


def pytest_sessionfinish(session: pytest.Session, exitstatus: Any) -> None:
    path = session.config.getoption("--bench-jsonl")
    if path:
        eager_names = {spec.op: spec.eager_name for spec in registry.ops()}
        records.write_jsonl(path, records.finalize(session.config.stash[RUNNER].records, eager_names))
