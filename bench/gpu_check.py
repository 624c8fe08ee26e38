"""``make gpu-check`` (``python3 -m bench.gpu_check``): a GPU session in one command.

On a machine with a CUDA GPU it runs, with the machine's own ``python3`` (no venv, no network),
six stages, each under its own time limit, and prints each one's wall time:

  build      ``pip install --no-build-isolation --no-deps --no-index -e .`` with
             ``CMAKE_CUDA_ARCHITECTURES`` set to the present GPU's architecture only (setup.py
             passes it to CMake); checks ``mtlfast._C.build_info()``. If the native build fails,
             mtlfast is installed without it (``MTLFAST_NATIVE=0``) so the Triton stages still run.
  info       ``python -m mtlfast.info``; the triton and cuda backends must be available.
  tests      the suite on CUDA: pytest-xdist workers, a per-test timeout (pytest-timeout),
             ``MTLFAST_AUTOTUNE=0`` (each Triton kernel runs its first config), junit XML; without
             the CPU-side checks (AOT compilation, the CUDA emulation, the native build, this check).
  sanitizer  ``compute-sanitizer --tool memcheck`` over a few small cases of every kernel family
             (``--smoke all``: forward and backward on every backend against the reference), then
             ``--tool racecheck`` over the families whose kernels share memory across threads
             (``--smoke shared``: the WMMA kernels of csrc/cuda/masked_linear.cu, the Triton dot
             kernels); PyTorch's caching allocator off, so every tensor is its own allocation.
  bench      ``python -m bench --quick`` on the GPU providers (the eager formulations, dense /
             cuDNN, triton and its LSTM modes triton-step / triton-sequence, cuda, compile) over
             the workloads the issues set targets for;
             ``compile`` of the LSTM networks is recorded as skipped with the reason.
  profile    ``python -m bench.profile``'s comparison for conll03 (against the per-step loop and
             cuDNN), sluice-step and omniglot: launches, kernel time, wall time.

Everything goes to ``--out DIR`` (default: ``$OUT``, else bench/out/gpu-check), at most 8 files:

  build.log  tests.log  junit.xml  sanitizer.log
  <name>.jsonl  <name>.md  <name>.png     the benchmark records, table and plot; <name> is the
                                          device and the git revision (``cuda-h200-1a2b3c4``), as
                                          bench/results/ names them
  gpu-check.txt                           the stages' one-line results, mtlfast.info, the
                                          benchmark's output, the profiles, and the summary

and the summary is printed last. Time: the stage limits below add up to 350 s, so the whole run
stays within 6 minutes on an H100 or H200 from a cold machine; time a stage leaves unused goes to
the stages after it. A stage at its limit is interrupted (SIGINT, so pytest still writes its junit
XML and the benchmark its records), then killed. ``--stages`` reruns a subset, ``--timeout
STAGE=SECONDS`` changes one limit.

Without a GPU (or with ``--dry``) the same command is a dry run: every stage runs on the CPU at
tiny sizes (the build compiles ``_C`` for sm_90 into build/gpu-check-dry without installing it;
a few test files; the smoke cases without compute-sanitizer, which is skipped with the reason;
the tiny benchmark workloads), under 3 minutes in all. tests/test_gpu_check.py runs it.

The exit status is 0 when no stage failed (a skipped stage is no failure), 1 otherwise, 2 for a
bad command line.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("build", "info", "tests", "sanitizer", "bench", "profile")

# Seconds per stage. GPU: an H100 / H200 machine with 16 cores, started cold (empty Triton and
# inductor caches, nothing installed); 350 s in all, 10 s under the 6 minutes for the probe and the
# summary. Dry: a 2-core CPU machine (the native build alone takes ~55 s there when its build folder
# is new); 180 s in all.
BUDGET = {"build": 50, "info": 20, "tests": 115, "sanitizer": 55, "bench": 85, "profile": 25}
DRY_BUDGET = {"build": 90, "info": 10, "tests": 20, "sanitizer": 10, "bench": 35, "profile": 15}

# The suite's CPU-side checks, left out on a GPU: they run (and only matter) without one.
CPU_SIDE_TESTS = ("tests/test_triton_compile.py",   # AOT compilation for sm_80 / sm_90
                  "tests/test_cuda_emulation.py",   # the .cu kernels under an emulated CUDA runtime
                  "tests/test_build.py",            # CMake builds in subprocesses (the build stage does it)
                  "tests/test_gpu_check.py")        # this command's own dry run
DRY_TESTS = ("tests/test_backends.py", "tests/test_info.py")
TEST_TIMEOUT_S = 90          # per test, on a GPU (the first test of a worker compiles its kernels)

# The benchmark: the workloads the issues set GPU targets for, most wanted first (a stage
# interrupted at its limit keeps the records it has).
BENCH_WORKLOADS = ("masked_linear/gemm-4096", "masked_lstm/conll03", "masked_lstm/large", "alpha_mix/alpha-mix-large",
                   "sluice_lstm/sluice-step", "gumbel_matrix/omniglot", "masked_lstm/ontonotes")
DRY_BENCH_WORKLOADS = ("masked_linear/tiny", "masked_lstm/lstm-tiny", "alpha_mix/alpha-mix-tiny",
                       "sluice_lstm/sluice-tiny", "gumbel_matrix/gumbel-matrix-tiny")
# The GPU providers; each op's eager formulation (the oracle) runs always. The dry run adds the
# cpu backend (so that its table has mtlfast times) and compiles one workload only.
# triton-step / triton-sequence: the masked LSTM's two recurrence modes side by side (triton alone
# is the automatic choice)
BENCH_PROVIDERS = ("dense", "eager-lstm", "eager-hard-sharing", "compile", "triton", "cuda", "triton-step",
                   "triton-sequence")
DRY_BENCH_PROVIDERS = BENCH_PROVIDERS + ("cpu",)
BENCH_SKIPS = (
    "masked_lstm/compile=torch.compile of the unrolled per-step loop (tasks x directions x steps cells) "
    "compiles for minutes per case, not seconds; left out of make gpu-check",
    "sluice_lstm/compile=torch.compile of the sluice network (3 bi-LSTM layers per task, mixing) compiles "
    "for about 30 s per case; left out of make gpu-check",
)
# (workload, baseline or None for the op's eager)
PROFILES = (("conll03", None), ("conll03", "eager-lstm"), ("sluice-step", None), ("omniglot", None))
DRY_PROFILES = (("lstm-tiny", "eager-lstm"), ("sluice-tiny", None), ("gumbel-matrix-tiny", None))
PROFILE_CALLS = (3, 10)          # (warm-up, timed) calls per side; dry: (1, 3)

FILES = {"build": "build.log", "tests": "tests.log", "junit": "junit.xml", "sanitizer": "sanitizer.log",
         "text": "gpu-check.txt"}
MAX_FILES = 8
SANITIZER_EXIT = 86          # compute-sanitizer's exit status when it found an error


# ---------------------------------------------------------------------------------------------
# The machine


@dataclass
class Context:
    """Where and how this run goes."""

    python: str
    out: Path
    scratch: Path
    dry: bool
    gpu_name: Optional[str] = None
    arch: str = "90"                       # CMAKE_CUDA_ARCHITECTURES (dry: the H200's)
    workers: int = 0                       # pytest-xdist workers; 0: serial
    test_timeout: Optional[int] = TEST_TIMEOUT_S   # pytest-timeout per test; None: plugin absent
    sanitizer: Optional[str] = None        # compute-sanitizer's path
    cpus: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The environment of the stages that run mtlfast (not the build, not pytest's workers):
        one thread in the dry run, where a loaded 2-core machine made OpenMP spin 100x slower."""
        return {"OMP_NUM_THREADS": "1"} if self.dry else {}

    @property
    def text(self) -> Path:
        return self.out / FILES["text"]


def probe_gpu(python: str) -> tuple[Optional[str], Optional[str]]:
    """(name, compute capability "9.0") of GPU 0, or (None, None): nvidia-smi, else torch."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            done = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30)
            first = done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else ""
            if "," in first:
                name, cap = (s.strip() for s in first.rsplit(",", 1))
                if re.fullmatch(r"\d+\.\d+", cap):
                    return name, cap
        except (OSError, subprocess.SubprocessError):
            pass
    code = ("import torch; print(torch.cuda.get_device_name(0) + ',' + '.'.join(map(str, "
            "torch.cuda.get_device_capability(0))) if torch.cuda.is_available() else '')")
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
        line = done.stdout.strip()
        if done.returncode == 0 and "," in line:
            name, cap = line.rsplit(",", 1)
            return name, cap
    except (OSError, subprocess.SubprocessError):
        pass
    return None, None


def arch_of(capability: str) -> str:
    """"9.0" -> "90" (CMAKE_CUDA_ARCHITECTURES)."""
    major, minor = capability.split(".")
    return f"{int(major)}{int(minor)}"


def has_module(python: str, name: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is None)"
    done = subprocess.run([python, "-c", code], capture_output=True, timeout=60)
    return done.returncode == 0


def find_sanitizer() -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        for sub in ("bin/compute-sanitizer", "compute-sanitizer/compute-sanitizer"):
            if base and Path(base, sub).is_file():
                return str(Path(base, sub))
    return None


# ---------------------------------------------------------------------------------------------
# Running one command under a deadline


@dataclass
class Ran:
    rc: Optional[int]
    wall: float
    timed_out: bool


def run_command(cmd: Sequence[str], log: Path, deadline: float, env: Optional[dict] = None,
                title: Optional[str] = None) -> Ran:
    """Run ``cmd`` (its own process group) in the repository root, appending its output to ``log``.
    At ``deadline`` minus a grace period it gets SIGINT (pytest then still writes its reports), at
    ``deadline`` SIGKILL; whatever it left running in its group is killed when it returns."""
    start = time.monotonic()
    limit = max(deadline - start, 1.0)
    grace = min(15.0, max(2.0, 0.15 * limit))
    # never the Triton interpreter by inheritance (a GPU run would time it; the tests' conftest sets it
    # for itself where there is no GPU)
    full_env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PYTHONUNBUFFERED": "1",
                **(env or {})}
    with open(log, "a", encoding="utf-8", errors="replace") as f:
        shown = " ".join(_quote(c) for c in cmd)
        extra = " ".join(f"{k}={_quote(v)}" for k, v in (env or {}).items())
        f.write(f"\n$ {extra + ' ' if extra else ''}{shown}\n" if title is None else f"\n## {title}\n$ {shown}\n")
        f.flush()
        try:
            proc = subprocess.Popen(list(cmd), cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            f.write(f"could not start: {exc}\n")
            return Ran(127, time.monotonic() - start, False)
        interrupted = timed_out = False
        while True:
            try:
                rc = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if not interrupted and now >= deadline - grace:
                interrupted = timed_out = True
                _signal_group(proc.pid, signal.SIGINT)
            if now >= deadline:
                _signal_group(proc.pid, signal.SIGKILL)
                rc = proc.wait()
                break
        _signal_group(proc.pid, signal.SIGKILL)   # stragglers of this command's own group
        wall = time.monotonic() - start
        if timed_out:
            f.write(f"\n[gpu-check] stopped at its limit ({limit:.0f} s): SIGINT, then SIGKILL after {grace:.0f} s\n")
        f.write(f"[gpu-check] exit status {rc}, {wall:.1f} s\n")
    return Ran(rc, wall, timed_out)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)   # the group this command was started in (start_new_session), nothing else
    except (ProcessLookupError, PermissionError):
        pass


def _quote(s: str) -> str:
    return s if re.fullmatch(r"[\w./:=,+@%-]+", s) else "'" + s.replace("'", "'\\''") + "'"


# ---------------------------------------------------------------------------------------------
# The stages: each returns (status, key numbers); status is "ok", "failed" or "skipped"


@dataclass
class Result:
    stage: str
    status: str = "not run"
    wall: float = 0.0
    limit: float = 0.0
    key: str = ""


def _append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def _section(ctx: Context, title: str, body_from: Path) -> None:
    body = body_from.read_text(encoding="utf-8", errors="replace") if body_from.exists() else "(no output)\n"
    _append(ctx.text, f"\n{'=' * 100}\n## {title}\n{body}")


def build_steps(ctx: Context) -> list[tuple[list[str], dict]]:
    """The build's commands: (cmd, env) for the install (GPU) or the out-of-place build (dry)."""
    env = {"CMAKE_CUDA_ARCHITECTURES": ctx.arch, "MAX_JOBS": str(ctx.cpus), "PIP_NO_INPUT": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if ctx.dry:
        return [([ctx.python, "setup.py", "build_ext", "--build-temp", str(ROOT / "build" / "gpu-check-dry"),
                  "--build-lib", str(ctx.scratch / "lib")], env)]
    return [([ctx.python, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "--no-index",
              "--no-cache-dir", "-e", "."], env)]


# Loads the module just built (it needs no torch) from the folder it was built into, or imports it.
_BUILD_INFO = r"""
import importlib.machinery, importlib.util, json, os, sys
found = [p for p in (os.path.join(sys.argv[1], "mtlfast", "_C" + s) for s in importlib.machinery.EXTENSION_SUFFIXES)
         if os.path.isfile(p)]
if found:
    spec = importlib.util.spec_from_file_location("_C", found[0])
    C = importlib.util.module_from_spec(spec); spec.loader.exec_module(C)
else:
    import mtlfast._C as C
print("BUILD_INFO " + json.dumps(dict(C.build_info())) + " from " + str(getattr(C, "__file__", "?")))
"""


@contextlib.contextmanager
def _dry_build_lock(ctx: Context, deadline: float) -> Iterator[None]:
    """The dry build's folder is shared by every dry run of this checkout (so that a second one
    builds incrementally): one at a time. Waits until ``deadline`` at most, then builds anyway."""
    if not ctx.dry:
        yield
        return
    path = ROOT / "build" / "gpu-check-dry.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.5)
        yield


def stage_build(ctx: Context, deadline: float) -> tuple[str, str]:
    log = ctx.out / FILES["build"]
    how = "dry: built, not installed" if ctx.dry else "pip install -e"
    log.write_text(f"gpu-check build: CMAKE_CUDA_ARCHITECTURES={ctx.arch} ({how})\n")
    (cmd, env), = build_steps(ctx)
    with _dry_build_lock(ctx, deadline):
        ran = run_command(cmd, log, deadline, env)
    if ran.rc != 0:
        key = "timed out" if ran.timed_out else f"native build failed (exit {ran.rc}); see build.log"
        if not ctx.dry:   # keep the Python package (reference + Triton) for the stages after this one
            fallback = run_command(cmd, log, max(deadline, time.monotonic() + 30), {**env, "MTLFAST_NATIVE": "0"})
            key += "; installed without _C (MTLFAST_NATIVE=0)" if fallback.rc == 0 else "; mtlfast not installed"
        return "failed", key
    check_log = ctx.scratch / "build-info.txt"
    check_log.unlink(missing_ok=True)
    target = str(ctx.scratch / "lib") if ctx.dry else str(ROOT)   # pip -e builds _C in place
    ran = run_command([ctx.python, "-c", _BUILD_INFO, target], check_log, max(deadline, time.monotonic() + 20))
    text = check_log.read_text(errors="replace")
    _append(log, text)
    found = re.search(r"^BUILD_INFO (\{.*\}) from ", text, re.M)
    if ran.rc != 0 or not found:
        return "failed", "built, but mtlfast._C does not import; see build.log"
    info = json.loads(found.group(1))
    key = (f"_C {info.get('version')}: cuda {info.get('cuda')}, archs {info.get('cuda_archs')}, "
           f"nvcc {info.get('cuda_version')}")
    has_nvcc = shutil.which("nvcc") is not None or bool(os.environ.get("CUDACXX"))
    if ctx.dry:
        return "ok", key + " (dry: built in build/gpu-check-dry, not installed)"
    if not info.get("cuda"):
        return "failed", key + ("; nvcc was found, yet no CUDA kernels" if has_nvcc else "; nvcc not found")
    if [str(a) for a in info.get("cuda_archs", [])] != [re.sub(r"\D", "", ctx.arch)]:
        return "failed", key + f"; expected only {ctx.arch}"
    return "ok", key


def stage_info(ctx: Context, deadline: float) -> tuple[str, str]:
    log = ctx.scratch / "info.txt"
    log.unlink(missing_ok=True)
    ran = run_command([ctx.python, "-m", "mtlfast.info"], log, deadline, ctx.env)
    _section(ctx, "python -m mtlfast.info", log)
    text = log.read_text(errors="replace")
    if ran.rc != 0:
        return "failed", "timed out" if ran.timed_out else f"exit {ran.rc}; see gpu-check.txt"
    devices = re.search(r"^devices: (.*?);", text, re.M)
    backends = dict(re.findall(r"^  (\w+)\s+(available|unavailable: .*)$", text, re.M))
    up = [b for b, s in backends.items() if s == "available"]
    key = f"{devices.group(1) if devices else '?'}; backends available: {', '.join(up) or 'none'}"
    if not ctx.dry:
        missing = [f"{b} ({backends.get(b, 'not listed')})" for b in ("triton", "cuda") if b not in up]
        if missing:
            return "failed", key + "; unavailable on the GPU: " + ", ".join(missing)
    return "ok", key


def pytest_command(ctx: Context) -> tuple[list[str], dict]:
    """The test tier's pytest command and environment."""
    cmd = [ctx.python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", "--tb=short", "--durations=15",
           "--continue-on-collection-errors", f"--junitxml={ctx.out / FILES['junit']}"]
    if ctx.dry:
        cmd += [*DRY_TESTS, "-m", "not slow"]
    else:
        cmd += ["tests", *(f"--ignore={t}" for t in CPU_SIDE_TESTS)]
    if ctx.workers:
        cmd += ["-n", str(ctx.workers)]
    if ctx.test_timeout:
        cmd += [f"--timeout={ctx.test_timeout}"]
    threads = max(1, ctx.cpus // max(1, ctx.workers))
    env = {"MTLFAST_AUTOTUNE": "0", "OMP_NUM_THREADS": str(threads)}
    return cmd, env


def junit_counts(path: Path) -> Optional[dict[str, float]]:
    """tests, failures, errors, skipped, time of a junit XML file (summed over its suites)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {k: 0.0 for k in ("tests", "failures", "errors", "skipped", "time")}
    for s in suites:
        for k in total:
            total[k] += float(s.get(k, 0) or 0)
    return total


def stage_tests(ctx: Context, deadline: float) -> tuple[str, str]:
    log = ctx.out / FILES["tests"]
    junit = ctx.out / FILES["junit"]
    junit.unlink(missing_ok=True)
    cmd, env = pytest_command(ctx)
    log.write_text(f"gpu-check tests: {'dry run, a few CPU test files' if ctx.dry else 'the suite on CUDA'}\n")
    ran = run_command(cmd, log, deadline, env)
    counts = junit_counts(junit)
    how = f"{ctx.workers} workers" if ctx.workers else "serial (pytest-xdist not installed)"
    how += (f", {ctx.test_timeout} s per test" if ctx.test_timeout
            else ", no per-test timeout (pytest-timeout not installed)")
    if counts is None:
        key = f"no junit XML ({'timed out' if ran.timed_out else f'exit {ran.rc}'}); see tests.log"
        return "failed", key + f"; {how}"
    t = {k: int(v) for k, v in counts.items() if k != "time"}
    passed = t["tests"] - t["failures"] - t["errors"] - t["skipped"]
    key = f"{passed} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped; {how}"
    if ran.timed_out:
        return "failed", "interrupted at its limit: " + key
    return ("ok" if ran.rc == 0 else "failed"), key


def sanitizer_steps(ctx: Context) -> list[tuple[str, list[str], dict]]:
    """(tool, cmd, env) of the sanitizer stage; plain runs of the smoke cases when it is skipped."""
    smoke = [ctx.python, "-m", "bench.gpu_check", "--smoke"]
    env = {**ctx.env, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "MTLFAST_AUTOTUNE": "0"}
    if ctx.dry or ctx.sanitizer is None:   # dry: the cpu backend (Triton's interpreter would take 30 s)
        return [("plain", smoke + ["all"], env)]
    # API errors off: Triton and cuda-python probe driver entry points that may not exist, on purpose
    common = [ctx.sanitizer, "--error-exitcode", str(SANITIZER_EXIT), "--print-limit", "30",
              "--report-api-errors", "no"]
    return [("memcheck", [*common, "--tool", "memcheck", *smoke, "all"], env),
            ("racecheck", [*common, "--tool", "racecheck", *smoke, "shared"], env)]


def stage_sanitizer(ctx: Context, deadline: float) -> tuple[str, str]:
    log = ctx.out / FILES["sanitizer"]
    log.write_text("gpu-check sanitizer\n")
    steps = sanitizer_steps(ctx)
    keys, failed = [], False
    start = time.monotonic()
    for i, (tool, cmd, env) in enumerate(steps):
        mark = log.stat().st_size
        # memcheck may take 65% of the stage when racecheck follows
        own = deadline if i == len(steps) - 1 else start + 0.65 * (deadline - start)
        ran = run_command(cmd, log, own, env, title=tool)
        with open(log, encoding="utf-8", errors="replace") as f:
            f.seek(mark)
            text = f.read()
        smoke = re.search(r"^SMOKE SUMMARY: (.*)$", text, re.M)
        what = smoke.group(1) if smoke else "no smoke summary"
        if tool == "memcheck":
            found = re.search(r"ERROR SUMMARY: (\d+) error", text)
            what = f"memcheck {found.group(1) + ' errors' if found else '?'} ({what})"
        elif tool == "racecheck":
            found = re.search(r"RACECHECK SUMMARY: (\d+) hazard", text)
            what = f"racecheck {found.group(1) + ' hazards' if found else '?'} ({what})"
        if ran.timed_out:
            what += " - timed out"
        elif ran.rc == SANITIZER_EXIT:
            what += " - sanitizer found errors"
        elif ran.rc != 0:
            what += f" - exit {ran.rc}"
        failed |= ran.rc != 0
        keys.append(what)
    if failed:
        return "failed", "; ".join(keys)
    if ctx.dry or ctx.sanitizer is None:
        reason = "no GPU (dry run)" if ctx.dry else "compute-sanitizer not found"
        return "skipped", f"compute-sanitizer skipped: {reason}; smoke cases run without it: {keys[0]}"
    return "ok", "; ".join(keys)


def bench_command(ctx: Context) -> list[str]:
    cmd = [ctx.python, "-m", "bench", "--quick", "--out", str(ctx.scratch / "bench")]
    cmd += [f"--workload={w}" for w in (DRY_BENCH_WORKLOADS if ctx.dry else BENCH_WORKLOADS)]
    cmd += [f"--provider={p}" for p in (DRY_BENCH_PROVIDERS if ctx.dry else BENCH_PROVIDERS)]
    cmd += [f"--skip={s}" for s in BENCH_SKIPS]
    if ctx.dry:
        cmd += ["--device=cpu"]
        cmd += [f"--skip={op}/compile=dry run: one compiled workload (gumbel-matrix-tiny) is enough"
                for op in ("masked_linear", "alpha_mix")]
    return cmd


def result_name(record: dict[str, Any], dry: bool) -> str:
    """bench/results/'s naming: device type, model and git revision (``cuda-h200-1a2b3c4``;
    a CPU adds its threads: ``cpu-epyc-2threads-1a2b3c4``)."""
    drop = {"nvidia", "amd", "intel", "cpu", "processor", "core", "@"}
    text = re.sub(r"\((r|tm)\)", " ", str(record.get("device_name", "")).lower())
    words = [re.sub(r"[^a-z0-9]+", "", w) for w in re.split(r"[\s_]+", text)]
    words = [w for w in words if w and w not in drop and not w.endswith("ghz")]
    model = "-".join(words[:2 if record.get("device") == "cpu" else 3])
    parts = [str(record.get("device", "device")), model or "unknown"]
    if record.get("device") == "cpu":
        parts.append(f"{record.get('threads')}threads")
    parts.append(str(record.get("git") or "unknown"))
    name = "-".join(p for p in parts if p)
    return ("dry-" if dry else "") + re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def bench_key(records: list[dict[str, Any]]) -> str:
    """Record counts, and per workload the fastest mtlfast provider in fwd+bwd against eager."""
    count = {s: sum(r.get("status") == s for r in records) for s in ("ok", "skipped", "error")}
    best: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("status") == "ok" and r.get("mode") == "fwd+bwd" and r.get("provider") in ("triton", "cuda", "cpu") \
                and r.get("speedup_vs_eager"):
            if r["speedup_vs_eager"] > best.get(r["workload"], {}).get("speedup_vs_eager", 0.0):
                best[r["workload"]] = r
    key = f"{count['ok']} timed, {count['skipped']} skipped, {count['error']} errors"
    if best:
        key += "; fwd+bwd vs eager: " + ", ".join(
            f"{w} {r['provider']} {r['speedup_vs_eager']:.2f}x"
            + (f" ({r['frac_dense']:.0%} of dense)" if r.get("frac_dense") else "") for w, r in best.items())
    return key


def stage_bench(ctx: Context, deadline: float) -> tuple[str, str]:
    out = ctx.scratch / "bench"
    shutil.rmtree(out, ignore_errors=True)
    log = ctx.scratch / "bench.txt"
    log.unlink(missing_ok=True)
    ran = run_command(bench_command(ctx), log, deadline, ctx.env)
    _section(ctx, "python -m bench", log)
    results = out / "results.jsonl"
    if not results.exists():
        return "failed", f"no records ({'timed out' if ran.timed_out else f'exit {ran.rc}'}); see gpu-check.txt"
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    if not records:
        return "failed", "no records; see gpu-check.txt"
    name = result_name(records[0], ctx.dry)
    for src, suffix in ((results, ".jsonl"), (out / "report.md", ".md"), (out / "report.png", ".png")):
        if src.exists():
            shutil.move(str(src), ctx.out / f"{name}{suffix}")
    key = f"{name}.jsonl: " + bench_key(records)
    if ran.timed_out:
        return "failed", "interrupted at its limit: " + key
    if ran.rc != 0 or any(r.get("status") == "error" for r in records):
        return "failed", key
    return "ok", key


def profile_command(ctx: Context) -> list[str]:
    cmd = [ctx.python, "-m", "bench.gpu_check", "--run-profiles"]
    cmd += [f"{w}:{b}" if b else w for w, b in (DRY_PROFILES if ctx.dry else PROFILES)]
    if ctx.dry:
        cmd += ["--profile-device", "cpu", "--profile-calls", "1,3"]
    return cmd


def stage_profile(ctx: Context, deadline: float) -> tuple[str, str]:
    log = ctx.scratch / "profile.txt"
    log.unlink(missing_ok=True)
    ran = run_command(profile_command(ctx), log, deadline, ctx.env)
    _section(ctx, "python -m bench.profile", log)
    lines = re.findall(r"^PROFILE (.*)$", log.read_text(errors="replace"), re.M)
    key = "; ".join(lines) or "no profile"
    if ran.rc != 0:
        return "failed", ("timed out: " if ran.timed_out else f"exit {ran.rc}: ") + key
    return "ok", key


STAGE_FUNCTIONS: dict[str, Callable[[Context, float], tuple[str, str]]] = {
    "build": stage_build, "info": stage_info, "tests": stage_tests, "sanitizer": stage_sanitizer,
    "bench": stage_bench, "profile": stage_profile}


# ---------------------------------------------------------------------------------------------
# Helpers that run inside the stages' processes: the smoke cases and the profiles


def run_smoke(selection: str) -> int:
    """A few small cases per kernel family, forward and backward on every backend that runs them,
    against the reference backend on the same inputs. On a GPU: triton everywhere and cuda for
    masked_linear must run. Prints one line per case and ``SMOKE SUMMARY``; exit 1 on a failure."""
    import torch

    import mtlfast
    import mtlfast.functional as MF
    import mtlfast.nn as mnn

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtypes = (torch.float32, torch.bfloat16) if cuda else (torch.float32,)
    backends = ("triton", "cuda") if cuda else ("cpu", "triton")

    def rand(*shape, dtype):
        return torch.randn(*shape, device=device).to(dtype).requires_grad_()

    def lstm_case(dtype):
        m = mnn.SparseSharingLSTM(11, 13, num_layers=2, bidirectional=True, num_tasks=3).to(device, dtype)
        g = torch.Generator().manual_seed(1)
        for t in range(3):
            for name in m._flat_weights_names:
                if name.startswith("weight"):
                    m.set_mask(t, name, (torch.rand(getattr(m, name).shape, generator=g) < 0.5).to(device))
        x = rand(4, 4, 11, dtype=dtype)
        task = torch.tensor([0, 2, 1, 2], device=device)
        return (lambda: m(x, task=task)), [x, *m.parameters()]

    def sluice_case(dtype):
        m = mnn.SluiceLSTM(9, 12, num_tasks=2, num_layers=2, num_subspaces=2).to(device, dtype)
        x = rand(3, 5, 9, dtype=dtype)
        lengths = torch.tensor([5, 3, 1])
        return (lambda: m(x, lengths)), [x, *m.parameters()]   # its penalty: the orthogonality case

    def gumbel_matrix_case(dtype):
        gm = mnn.GumbelMatrix(5, [7, 7, 3]).to(device)
        gm.train()
        return gm.sample_all, list(gm.parameters())

    def op(fn, *shapes_and_args):
        def make(dtype):
            args = [a(dtype) if callable(a) else a for a in shapes_and_args]
            return (lambda: fn(*args)), [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        return make

    def mask(shape):   # an argument maker: called with the case's dtype
        return lambda dtype: torch.rand(*shape, device=device) < 0.5

    def t(*shape):
        return lambda dtype: rand(*shape, dtype=dtype)

    def zeros_ones(dtype):
        return torch.tensor([1., 0, 1, 1, 0, 0, 1], device=device, dtype=dtype).requires_grad_()

    # (name, family is "shared" (dot / WMMA kernels, racecheck), builder, random, backends that must run on a GPU)
    cases = [
        ("masked_linear 37x53->29", True, op(MF.masked_linear, t(37, 53), t(29, 53), mask((29, 53)), t(29)), False,
         ("triton", "cuda")),
        ("masked_linear 3x1x64->130", True, op(MF.masked_linear, t(3, 1, 64), t(130, 64), mask((130, 64)), None),
         False, ("triton", "cuda")),
        ("SparseSharingLSTM 2 layers bi, 3 tasks, per-sample", True, lstm_case, False, ("triton",)),
        ("alpha_mix M3 S2 12", True, op(lambda h, a: MF.alpha_mix(h, a, 2), t(3, 5, 7, 12), t(6, 6)), False,
         ("triton",)),
        ("orthogonality_penalty 24x17 S2", True, op(lambda w: MF.orthogonality_penalty(w, 2), t(24, 17)), False,
         ("triton",)),
        ("SluiceLSTM 2 layers, lengths", True, sluice_case, False, ("triton",)),
        ("layer_mix K3 M2", False, op(MF.layer_mix, t(3, 2, 5, 11), t(2, 3)), False, ("triton",)),
        ("gumbel_sigmoid 33x17", False, op(lambda x: MF.gumbel_sigmoid(x, 0.7, True), t(33, 17)), True, ("triton",)),
        ("gumbel_pairs 20x7", False, op(lambda x: MF.gumbel_pairs(x, 1.0, True), t(20, 7, 2)), True, ("triton",)),
        ("gumbel_softmax 13x9 hard", False, op(lambda x: MF.gumbel_softmax(x, 0.5, True), t(13, 9)), True,
         ("triton",)),
        ("allocation_combine 7x3x5x5", False, op(MF.allocation_combine, t(7, 3, 5, 5), zeros_ones), False,
         ("triton",)),
        ("GumbelMatrix.sample_all 5 tasks", False, gumbel_matrix_case, True, ("triton",)),
    ]
    if selection == "shared":
        cases = [c for c in cases if c[1]]

    def run(make, dtype, backend, seed=0):
        torch.manual_seed(seed)
        fn, wrt = make(dtype)
        torch.manual_seed(seed + 1)
        with mtlfast.use_backend(backend):
            flat = tensors(fn())
            loss = sum((o.float() * (1 + torch.arange(o.numel(), device=o.device).view(o.shape) % 3)).sum()
                       for o in flat if o.requires_grad)
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        if cuda:
            torch.cuda.synchronize()
        return [o.detach().float() for o in flat], [g.detach().float() for g in grads if g is not None]

    def tensors(value):
        if isinstance(value, torch.Tensor):
            return [value]
        return [t for v in value for t in tensors(v)] if isinstance(value, (tuple, list)) else []

    def rel(a, b):
        num = sum(float((x - y).norm()) ** 2 for x, y in zip(a, b)) ** 0.5
        den = sum(float(y.norm()) ** 2 for y in b) ** 0.5
        return num / max(den, 1e-30)

    ok = failed = unavailable = 0
    for name, _, make, random, required in cases:
        for dtype in dtypes:
            expected = None
            for backend in backends:
                label = f"{name} {backend} {str(dtype).replace('torch.', '')}"
                began = time.perf_counter()
                try:
                    outs, grads = run(make, dtype, backend)
                    if expected is None:
                        expected = run(make, dtype, "reference")
                    finite = all(bool(torch.isfinite(x).all()) for x in outs + grads)
                    if random:   # each backend draws the same Philox stream; hard samples must be 0/1
                        binary = all(bool(((x == 0) | (x == 1)).all()) for x in outs)
                        good, what = finite and binary, f"finite {finite}, 0/1 {binary}"
                    else:
                        err = rel(outs + grads, expected[0] + expected[1])
                        tol = 1e-3 if dtype == torch.float32 else 5e-2
                        good, what = finite and err <= tol, f"rel err {err:.2e} (tol {tol:g})"
                except mtlfast.BackendUnavailableError as exc:
                    must = cuda and backend in required and (dtype == torch.float32 or backend == "cuda")
                    print(f"SMOKE {'FAILED' if must else 'n/a'} {label}: {str(exc).splitlines()[0][:160]}", flush=True)
                    failed += must
                    unavailable += not must
                    continue
                except Exception as exc:  # noqa: BLE001  (a crash of one case is that case's failure)
                    print(f"SMOKE FAILED {label}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    failed += 1
                    continue
                print(f"SMOKE {'ok' if good else 'FAILED'} {label}: {what} ({time.perf_counter() - began:.1f} s)",
                      flush=True)
                ok += good
                failed += not good
    print(f"SMOKE SUMMARY: {ok} ok, {failed} failed, {unavailable} not available on {device.type}", flush=True)
    return 1 if failed or not ok else 0


def run_profiles(specs: Sequence[str], device: Optional[str], calls: tuple[int, int] = PROFILE_CALLS) -> int:
    """bench.profile's comparison for each ``WORKLOAD[:BASELINE]``; one ``PROFILE`` line each."""
    from bench.profile import main as profile_main

    failed = 0
    for spec in specs:
        workload, _, baseline = spec.partition(":")
        argv = [workload, "--warmup", str(calls[0]), "--iters", str(calls[1])]
        argv += ["--baseline", baseline] if baseline else []
        argv += ["--device", device] if device else []
        print(f"\n$ python -m bench.profile {' '.join(argv)}", flush=True)
        try:
            c = profile_main(argv)
        except BaseException as exc:  # noqa: BLE001  (SystemExit of a bad workload, a kernel error)
            if isinstance(exc, KeyboardInterrupt):
                raise
            print(f"PROFILE {spec}: FAILED {type(exc).__name__}: {exc}", flush=True)
            failed += 1
            continue
        a, b = c.a, c.b
        on_device = a.device_ms is not None and b.device_ms is not None
        clock = (f"kernel {a.device_ms:.3g} -> {b.device_ms:.3g} ms" if on_device
                 else f"wall {a.wall_ms:.3g} -> {b.wall_ms:.3g} ms")
        print(f"PROFILE {workload} {a.label} -> {b.label}: {a.launch_kind} {a.launches:g} -> {b.launches:g}, {clock}",
              flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# The command


def parse_stages(text: str) -> tuple[str, ...]:
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STAGES]
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {unknown or text!r}; valid: {','.join(STAGES)}")
    return tuple(s for s in STAGES if s in wanted)


def parse_timeout(text: str) -> tuple[str, float]:
    stage, _, seconds = text.partition("=")
    try:
        value = float(seconds)
    except ValueError:
        value = -1.0
    if stage not in STAGES or value <= 0:
        raise argparse.ArgumentTypeError(f"expected STAGE=SECONDS with STAGE one of {','.join(STAGES)}, got {text!r}")
    return stage, value


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT, else bench/out/gpu-check)")
    p.add_argument("--stages", type=parse_stages, default=STAGES, help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--timeout", type=parse_timeout, action="append", default=[], metavar="STAGE=SECONDS",
                   help="one stage's time limit (repeatable)")
    p.add_argument("--dry", action="store_true", help="the dry run (CPU, tiny sizes) even where a GPU is present")
    p.add_argument("--python", default=sys.executable, help="the interpreter of the stages (default: this one)")
    p.add_argument("--arch", default=None, help="CMAKE_CUDA_ARCHITECTURES (default: the GPU's, e.g. 90; dry: 90)")
    p.add_argument("--workers", type=int, default=None, help="pytest-xdist workers of the test tier (default: "
                   "min(8, cores / 2) on a GPU, 2 in the dry run; 0: serial)")
    p.add_argument("--test-timeout", type=int, default=TEST_TIMEOUT_S, help="seconds per test (pytest-timeout)")
    p.add_argument("--smoke", choices=("all", "shared"), help=argparse.SUPPRESS)
    p.add_argument("--run-profiles", nargs="+", metavar="WORKLOAD[:BASELINE]", help=argparse.SUPPRESS)
    p.add_argument("--profile-device", default=None, help=argparse.SUPPRESS)
    p.add_argument("--profile-calls", default=",".join(map(str, PROFILE_CALLS)), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_context(ns: argparse.Namespace) -> Context:
    out = ns.out or Path(os.environ.get("OUT") or ROOT / "bench" / "out" / "gpu-check")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(python=ns.python, out=out, scratch=Path(tempfile.mkdtemp(prefix="gpu-check-")), dry=ns.dry,
                  cpus=os.cpu_count() or 1)
    if not ns.dry:
        name, cap = probe_gpu(ns.python)
        if name is None:
            ctx.dry = True
            ctx.notes.append("no GPU found (nvidia-smi, torch): dry run")
        else:
            ctx.gpu_name, ctx.arch = name, arch_of(cap)
    else:
        ctx.notes.append("--dry: dry run")
    if ns.arch:
        ctx.arch = ns.arch
    xdist = has_module(ns.python, "xdist")
    workers = ns.workers if ns.workers is not None else (2 if ctx.dry else min(8, max(1, ctx.cpus // 2)))
    ctx.workers = workers if xdist else 0
    if workers and not xdist:
        ctx.notes.append("pytest-xdist not installed: tests run serially")
    ctx.test_timeout = ns.test_timeout if has_module(ns.python, "pytest_timeout") else None
    if ctx.test_timeout is None:
        ctx.notes.append("pytest-timeout not installed: no per-test timeout")
    ctx.sanitizer = None if ctx.dry else find_sanitizer()
    return ctx


def summary(ctx: Context, results: list[Result], total_wall: float, total_budget: float) -> str:
    head = (f"gpu-check: {ctx.gpu_name} (sm_{ctx.arch})" if not ctx.dry
            else "gpu-check: DRY RUN (no GPU: CPU, tiny sizes; nothing here is a GPU figure)")
    lines = ["", "=" * 100, head, f"out: {ctx.out}", *(f"note: {n}" for n in ctx.notes),
             f"{'stage':<10} {'status':<8} {'wall':>8} {'limit':>7}  key numbers"]
    for r in results:
        lines.append(f"{r.stage:<10} {r.status:<8} {r.wall:>6.1f} s {r.limit:>5.0f} s  {r.key}")
    failed = [r.stage for r in results if r.status == "failed"]
    files = sorted(p.name for p in ctx.out.iterdir() if p.is_file())
    lines.append(f"{'total':<10} {'FAILED' if failed else 'ok':<8} {total_wall:>6.1f} s {total_budget:>5.0f} s  "
                 f"{'failed: ' + ', '.join(failed) if failed else 'no stage failed'}")
    lines.append(f"files ({len(files)}): {', '.join(files)}")
    if len(files) > MAX_FILES:
        lines.append(f"warning: more than {MAX_FILES} files in {ctx.out} (earlier runs' files?)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = parse_args(argv)
    if ns.smoke:
        return run_smoke(ns.smoke)
    if ns.run_profiles:
        warmup, iters = (int(n) for n in ns.profile_calls.split(","))
        return run_profiles(ns.run_profiles, ns.profile_device, (warmup, iters))
    t0 = time.monotonic()
    ctx = make_context(ns)
    budgets = dict(DRY_BUDGET if ctx.dry else BUDGET)
    budgets.update(dict(ns.timeout))
    total_budget = sum(budgets[s] for s in ns.stages)
    ctx.text.write_text(f"gpu-check {'dry run' if ctx.dry else ctx.gpu_name}: stages {','.join(ns.stages)}\n")
    print(f"gpu-check: {'dry run (no GPU)' if ctx.dry else f'{ctx.gpu_name}, sm_{ctx.arch}'}; "
          f"stages {','.join(ns.stages)}; {total_budget:.0f} s budget; out {ctx.out}", flush=True)
    for note in ctx.notes:
        print(f"gpu-check: note: {note}", flush=True)
    results: list[Result] = []
    planned_end = time.monotonic()
    try:
        for stage in ns.stages:
            planned_end += budgets[stage]
            start = time.monotonic()
            limit = max(planned_end - start, 1.0)   # its own budget plus what earlier stages left
            r = Result(stage, limit=limit)
            results.append(r)
            print(f"gpu-check: {stage} ... (limit {limit:.0f} s)", flush=True)
            try:
                r.status, r.key = STAGE_FUNCTIONS[stage](ctx, start + limit)
            except Exception as exc:  # noqa: BLE001  (a broken stage is a failed stage, the next ones run)
                r.status, r.key = "failed", f"gpu-check error: {type(exc).__name__}: {exc}"
            r.wall = time.monotonic() - start
            line = f"gpu-check: {stage} {r.status} in {r.wall:.1f} s: {r.key}"
            print(line, flush=True)
            _append(ctx.text, line + "\n")
    except KeyboardInterrupt:
        if results:
            results[-1].status, results[-1].key = "failed", "interrupted (Ctrl-C)"
    finally:
        shutil.rmtree(ctx.scratch, ignore_errors=True)
    text = summary(ctx, results, time.monotonic() - t0, total_budget)
    _append(ctx.text, text + "\n")
    print(text, flush=True)
    return 1 if any(r.status == "failed" for r in results) or len(results) < len(ns.stages) else 0


if __name__ == "__main__":
    sys.exit(main())
