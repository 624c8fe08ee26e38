"""`make gpu-check` (bench/gpu_check.py), the one command of a GPU session, cannot rot: its dry run
(no GPU: every stage on the CPU at tiny sizes, compute-sanitizer skipped) runs here in a subprocess
and writes what the GPU run writes; a failing stage fails the command; the GPU run's command lines
name tests, workloads, providers and profiles that exist, and its stage limits fit 6 minutes."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import cases, gpu_check as G, registry  # noqa: E402

DRY_LIMIT_S = 180
SUMMARY_LINE = re.compile(r"^(?P<stage>\w+)\s+(?P<status>ok|failed|skipped|FAILED)\s+(?P<wall>[\d.]+) s\s+"
                          r"(?P<limit>\d+) s\s+(?P<key>.*)$", re.M)


def gpu_context(tmp_path, **kw):
    base = dict(python="python3", out=tmp_path / "out", scratch=tmp_path / "scratch", dry=False,
                gpu_name="NVIDIA H200", arch="90", workers=8, test_timeout=90,
                sanitizer="/usr/local/cuda/bin/compute-sanitizer", cpus=16)
    base.update(kw)
    return G.Context(**base)


def run_gpu_check(args, out, timeout, via_make=True):
    """`make gpu-check` (without make, or ``via_make=False``: the module) with this interpreter:
    (exit status, stdout and stderr, seconds)."""
    if via_make and shutil.which("make"):
        cmd = ["make", "--no-print-directory", "gpu-check", f"PYTHON={sys.executable}", f"OUT={out}",
               f"ARGS={' '.join(args)}"]
    else:
        cmd = [sys.executable, "-m", "bench.gpu_check", "--out", str(out), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET", "MTLFAST_BACKEND")}
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


def summary_rows(text):
    tail = text.rsplit("=" * 100, 1)[-1]
    return {m["stage"]: m for m in SUMMARY_LINE.finditer(tail)}


# ---------------------------------------------------------------------------------------------
# The dry run, end to end


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    code, text, seconds = run_gpu_check(["--dry"], out, timeout=DRY_LIMIT_S + 120)
    return out, code, text, seconds


def test_dry_run_passes_every_stage_in_three_minutes(dry_run):
    out, code, text, seconds = dry_run
    assert code == 0, text[-6000:]
    rows = summary_rows(text)
    assert set(rows) == set(G.STAGES) | {"total"}, text[-3000:]
    for stage in G.STAGES:
        expected = "skipped" if stage == "sanitizer" else "ok"   # no GPU: compute-sanitizer skipped
        assert rows[stage]["status"] == expected, rows[stage].group(0)
    assert "compute-sanitizer skipped: no GPU" in rows["sanitizer"]["key"]
    assert re.search(r"smoke cases run without it: [1-9]\d* ok, 0 failed", rows["sanitizer"]["key"])
    assert re.search(r"[1-9]\d* passed, 0 failed, 0 errors", rows["tests"]["key"])
    assert re.search(r"archs \[", rows["build"]["key"])
    assert re.search(r"[1-9]\d* timed, \d+ skipped, 0 errors", rows["bench"]["key"])
    assert rows["profile"]["key"].count("->") >= 3
    assert float(rows["total"]["wall"]) <= DRY_LIMIT_S
    assert int(rows["total"]["limit"]) == sum(G.DRY_BUDGET.values()) <= DRY_LIMIT_S
    assert "DRY RUN" in text


def test_dry_run_writes_the_files_of_a_gpu_run(dry_run):
    out, code, text, _ = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert all(p.is_file() for p in out.iterdir())
    assert len(files) <= G.MAX_FILES
    bench = [f for f in files if f.endswith(".jsonl")]
    assert len(bench) == 1 and bench[0].startswith("dry-cpu-"), files
    name = bench[0][:-len(".jsonl")]
    expected = {"build.log", "tests.log", "junit.xml", "sanitizer.log", "gpu-check.txt",
                f"{name}.jsonl", f"{name}.md", f"{name}.png"}
    assert set(files) == expected
    assert f"files ({len(files)}): " + ", ".join(files) in text
    # the records carry the device, versions and revision; the name is made of them
    records = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
    assert records and all(r["device"] == "cpu" and r["git"] and r["torch"] for r in records)
    assert name.endswith(records[0]["git"])
    skipped = {(r["op"], r["provider"]): r["reason"] for r in records if r["status"] == "skipped"}
    assert "minutes per case" in skipped[("masked_lstm", "compile")]   # --skip reaches the table
    assert "| provider |" in (out / f"{name}.md").read_text()
    assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    junit = ET.parse(out / "junit.xml").getroot()
    assert int(junit.get("tests") or junit.find("testsuite").get("tests")) > 0
    body = (out / "gpu-check.txt").read_text()
    assert "## python -m mtlfast.info" in body and "backends:" in body
    assert "## python -m bench.profile" in body and body.count("PROFILE ") >= 3
    assert "stage      status" in body          # the summary is kept with the outputs
    assert "BUILD_INFO" in (out / "build.log").read_text()
    assert "SMOKE SUMMARY" in (out / "sanitizer.log").read_text()
    assert " passed" in (out / "tests.log").read_text()


# ---------------------------------------------------------------------------------------------
# Failures are reported as failures


def test_stage_over_its_limit_fails_the_command(tmp_path):
    code, text, _ = run_gpu_check(["--dry", "--stages", "info", "--timeout", "info=0.5"], tmp_path, timeout=120,
                                  via_make=False)
    assert code == 1, text
    rows = summary_rows(text)
    assert rows["info"]["status"] == "failed" and "timed out" in rows["info"]["key"], text
    assert rows["total"]["status"] == "FAILED" and rows["total"]["key"] == "failed: info"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-check.txt"]   # only what its stages write


def test_failing_command_in_a_stage_fails_it(tmp_path):
    """A stage whose command fails (here: the benchmark given a workload that does not exist)."""
    original = G.DRY_BENCH_WORKLOADS
    try:
        G.DRY_BENCH_WORKLOADS = ("no-such-workload",)
        ctx = G.Context(python=sys.executable, out=tmp_path, scratch=tmp_path / "scratch", dry=True)
        (tmp_path / "scratch").mkdir()
        status, key = G.stage_bench(ctx, time.monotonic() + 120)
    finally:
        G.DRY_BENCH_WORKLOADS = original
    assert status == "failed" and "no records" in key
    assert "unknown workload 'no-such-workload'" in (tmp_path / "gpu-check.txt").read_text()


@pytest.mark.parametrize("args, message", [
    (["--stages", "tests,nonsense"], "unknown stage"),
    (["--timeout", "bench"], "STAGE=SECONDS"),
    (["--timeout", "nonsense=3"], "STAGE=SECONDS"),
    (["--no-such-option"], "unrecognized arguments"),
])
def test_bad_command_line_exits_2(args, message):
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_run_command_interrupts_then_kills_at_the_deadline(tmp_path):
    log = tmp_path / "log"
    code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"
    start = time.monotonic()
    ran = G.run_command([sys.executable, "-c", code], log, start + 3)
    assert ran.timed_out and ran.rc != 0 and time.monotonic() - start < 10
    assert "stopped at its limit" in log.read_text()


# ---------------------------------------------------------------------------------------------
# The GPU run's plan, checked without a GPU


def test_stage_limits_fit_six_minutes():
    assert tuple(G.BUDGET) == G.STAGES == tuple(G.DRY_BUDGET)
    assert sum(G.BUDGET.values()) <= 350           # 6 minutes less the probe and the summary
    assert sum(G.DRY_BUDGET.values()) <= DRY_LIMIT_S


def test_gpu_build_installs_for_the_present_architecture_only(tmp_path):
    assert G.arch_of("9.0") == "90" and G.arch_of("8.6") == "86" and G.arch_of("10.0") == "100"
    (cmd, env), = G.build_steps(gpu_context(tmp_path))
    assert cmd[1:] == ["-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "--no-index",
                       "--no-cache-dir", "-e", "."]
    assert env["CMAKE_CUDA_ARCHITECTURES"] == "90"
    # setup.py hands the variable to CMake, which takes it over its 80;90 default
    assert "os.environ['CMAKE_CUDA_ARCHITECTURES']" in (ROOT / "setup.py").read_text()


def test_gpu_test_tier_command(tmp_path):
    ctx = gpu_context(tmp_path)
    cmd, env = G.pytest_command(ctx)
    assert cmd[1:4] == ["-m", "pytest", "-p"] and "tests" in cmd
    assert cmd[cmd.index("-n") + 1] == "8" and "--timeout=90" in cmd
    assert f"--junitxml={ctx.out / 'junit.xml'}" in cmd and "--continue-on-collection-errors" in cmd
    for path in G.CPU_SIDE_TESTS:
        assert f"--ignore={path}" in cmd
        assert (ROOT / path).is_file(), f"{path} is gone: the GPU tier's --ignore list is stale"
    assert env["MTLFAST_AUTOTUNE"] == "0" and env["OMP_NUM_THREADS"] == "2"
    for path in G.DRY_TESTS:
        assert (ROOT / path).is_file()


def test_gpu_sanitizer_commands(tmp_path):
    steps = G.sanitizer_steps(gpu_context(tmp_path))
    assert [tool for tool, _, _ in steps] == ["memcheck", "racecheck"]
    for tool, cmd, env in steps:
        at = cmd.index("--tool")
        assert cmd[0].endswith("compute-sanitizer") and cmd[at:at + 2] == ["--tool", tool]
        assert "--error-exitcode" in cmd and cmd[-3:-1] == ["bench.gpu_check", "--smoke"]
        assert env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1" and env["MTLFAST_AUTOTUNE"] == "0"
    assert steps[0][1][-1] == "all" and steps[1][1][-1] == "shared"
    # without compute-sanitizer (or a GPU) the cases run plain and the stage says why it skipped
    (tool, cmd, _), = G.sanitizer_steps(gpu_context(tmp_path, sanitizer=None))
    assert tool == "plain" and cmd[-2:] == ["--smoke", "all"]


def test_gpu_bench_names_workloads_providers_and_skips_that_exist(tmp_path):
    cmd = G.bench_command(gpu_context(tmp_path))
    assert cmd[1:4] == ["-m", "bench", "--quick"] and "--device=cpu" not in cmd
    settings = cases.Settings.make(device="cpu", workloads=G.BENCH_WORKLOADS, providers=G.BENCH_PROVIDERS,
                                   skips=G.BENCH_SKIPS)
    chosen = cases.select(settings)   # raises on any name that does not exist
    assert [w.key for w in registry.find(G.BENCH_WORKLOADS)] == list(G.BENCH_WORKLOADS)
    by_case = {(c.workload.key, c.provider): c for c in chosen}
    assert by_case[("masked_lstm/conll03", "compile")].workload.unsupported_reason("cpu", "compile")
    assert by_case[("gumbel_matrix/omniglot", "compile")].workload.unsupported_reason("cuda", "compile") is None
    for op in ("masked_lstm", "sluice_lstm"):   # the GPU run's skips apply on the GPU
        gpu = cases._apply_skips(registry.find([w for w in G.BENCH_WORKLOADS if w.startswith(op)]),
                                 cases.Settings(device="cuda", dtype="bfloat16", skips=G.BENCH_SKIPS))
        assert all(w.unsupported_reason("cuda", "compile") for w in gpu)
    for workload, baseline in G.PROFILES + G.DRY_PROFILES:
        (w,) = registry.find([workload])
        spec = registry.op(w.op)
        assert baseline is None or baseline in spec.variants


def test_bench_skip_option():
    settings = cases.Settings.make(device="cpu", workloads=("tiny", "alpha-mix-tiny"),
                                   skips=("masked_linear/compile=too slow", "alpha-mix-tiny/reference"))
    chosen = {(c.workload.name, c.provider): c.workload for c in cases.select(settings)}
    assert chosen[("tiny", "compile")].unsupported_reason("cpu", "compile") == "too slow"
    assert chosen[("tiny", "reference")].unsupported_reason("cpu", "reference") is None
    reason = chosen[("alpha-mix-tiny", "reference")].unsupported_reason("cpu", "reference")
    assert "--skip alpha-mix-tiny/reference" in reason
    for bad in ("masked_linear", "nothing/compile", "masked_linear/nothing"):
        with pytest.raises(ValueError):
            cases.select(cases.Settings.make(device="cpu", workloads=("tiny",), skips=(bad,)))


def test_result_names_follow_bench_results():
    h200 = {"device": "cuda", "device_name": "NVIDIA H200", "git": "1a2b3c4"}
    assert G.result_name(h200, False) == "cuda-h200-1a2b3c4"
    assert G.result_name({"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "git": "1a2b3c4-dirty"},
                         False) == "cuda-h100-80gb-hbm3-1a2b3c4-dirty"
    assert G.result_name({"device": "cpu", "device_name": "AMD EPYC 7B13", "threads": 2, "git": "1a2b3c4"},
                         True) == "dry-cpu-epyc-7b13-2threads-1a2b3c4"


FAKE_SANITIZER = r"""#!/bin/sh
# stands in for compute-sanitizer: skips its options, runs the program, prints the tool's summary
tool=memcheck
while [ $# -gt 0 ]; do
  case "$1" in
    --tool) tool=$2; shift 2 ;;
    --*) shift 2 ;;
    *) break ;;
  esac
done
"$@"; rc=$?
if [ "$tool" = racecheck ]; then echo "========= RACECHECK SUMMARY: HAZARDS hazards displayed (0 errors, 0 warnings)"
else echo "========= ERROR SUMMARY: ERRORS errors"; fi
[ "ERRORS" != 0 ] && exit 86
exit $rc
"""


@pytest.mark.parametrize("errors", [0, 2])
def test_sanitizer_stage_reads_the_tools_summaries(tmp_path, errors):
    """The GPU branch of the sanitizer stage, with a stand-in for compute-sanitizer (the smoke cases
    then run on this machine's backends)."""
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(FAKE_SANITIZER.replace("ERRORS", str(errors)).replace("HAZARDS", "0"))
    fake.chmod(0o755)
    (tmp_path / "out").mkdir()
    (tmp_path / "scratch").mkdir()
    ctx = gpu_context(tmp_path, python=sys.executable, sanitizer=str(fake))
    status, key = G.stage_sanitizer(ctx, time.monotonic() + 120)
    log = (tmp_path / "out" / "sanitizer.log").read_text()
    assert "## memcheck" in log and "## racecheck" in log and log.count("SMOKE SUMMARY") == 2
    assert re.search(rf"memcheck {errors} errors \(\d+ ok, 0 failed", key), key
    if errors:
        assert status == "failed" and "sanitizer found errors" in key
    else:
        assert status == "ok" and "racecheck 0 hazards" in key


def test_info_stage_on_a_gpu_needs_the_triton_and_cuda_backends(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "scratch").mkdir()
    ctx = gpu_context(tmp_path, python=sys.executable)   # this machine has no GPU: both are unavailable
    status, key = G.stage_info(ctx, time.monotonic() + 60)
    assert status == "failed" and "unavailable on the GPU: triton (" in key and "cuda (" in key, key
    assert "## python -m mtlfast.info" in (tmp_path / "out" / "gpu-check.txt").read_text()
