"""``python -m mtlfast.info``: the one description of the environment.

``collect()`` is what this install can do (versions, devices, the native build, each backend and
why one is unavailable), printed by ``python -m mtlfast.info``. ``environment(device_type)`` is the
fixed set of fields every benchmark record and example result carries, so a figure says what it
was measured on: device, device name (GPU or CPU model), versions, the native build, the git
revision, torch's thread count.
"""
from __future__ import annotations

import functools
import importlib.metadata
import platform
import os
import subprocess
from pathlib import Path
from typing import Any, Optional

import torch

import mtlfast
from mtlfast import backends

_CHECKOUT = Path(__file__).resolve().parent.parent   # the folder holding mtlfast/ (a checkout, or site-packages)


def git_revision(cwd: Optional[Path | str] = None) -> str:
    """``git rev-parse --short HEAD`` of ``cwd``, with ``-dirty`` if tracked files changed;
    "unknown" outside a git work tree or without git. Default ``cwd``: the checkout mtlfast is
    imported from ("unknown" for an installed copy). ``MTLFAST_GIT_REVISION``, when set, is taken
    as it is (a copy of the tree without its .git, e.g. on a lent GPU machine)."""
    if os.environ.get("MTLFAST_GIT_REVISION"):
        return os.environ["MTLFAST_GIT_REVISION"]
    if cwd is None:
        if not (_CHECKOUT / ".git").exists():
            return "unknown"
        cwd = _CHECKOUT

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str) -> str:
    """``torch.cuda.get_device_name`` on CUDA, the CPU model otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def _version(dist: str) -> Optional[str]:
    """The installed version of distribution ``dist``; None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _build_info() -> Optional[dict[str, Any]]:
    """``mtlfast._C.build_info()``; None when the native module is not built."""
    try:
        from mtlfast import _C

        return dict(_C.build_info())
    except Exception:
        return None


@functools.lru_cache(maxsize=None)
def environment(device_type: str) -> dict[str, Any]:
    """The environment fields of a result measured on ``device_type`` ("cpu" or "cuda")."""
    device = torch.device(device_type)
    return {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "mtlfast": mtlfast.__version__,
        "mtlfast_build": _build_info(),
        "git": git_revision(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def collect() -> dict[str, Any]:
    """Versions, devices, the native build and each backend's status, as a dict."""
    build: dict[str, Any]
    try:
        from mtlfast import _C

        build = dict(_C.build_info())
        build["cuda_device_count"] = _C.cuda_device_count()
    except Exception as exc:
        build = {"error": f"mtlfast._C not built ({type(exc).__name__}: {exc})"}
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {
        "mtlfast": mtlfast.__version__,
        "git": git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "cuda_devices": devices,
        "cpu": f"{_cpu_name()} ({platform.machine()}), {torch.get_num_threads()} torch threads",
        "native_build": build,
        "triton_interpreter": backends.triton_interpreter_enabled(),
        "triton_autotune": backends.autotune_enabled(),
        "forced_backend": backends.forced_backend(),
        "backends": backends.available_backends(),
    }


def render(info: dict[str, Any]) -> str:
    lines = [f"mtlfast {info['mtlfast']}  (git {info['git']}, python {info['python']})",
             f"torch {info['torch']}  CUDA runtime {info['torch_cuda'] or 'none (CPU build)'}",
             f"triton {info['triton'] or 'not installed'}  "
             f"interpreter {'ON (TRITON_INTERPRET=1)' if info['triton_interpreter'] else 'off'}  "
             f"autotuning {'on' if info['triton_autotune'] else 'OFF (MTLFAST_AUTOTUNE=0)'}",
             f"devices: {', '.join(info['cuda_devices']) or 'no CUDA device'}; CPU {info['cpu']}",
             f"mtlfast._C: {info['native_build']}",
             f"forced backend: {info['forced_backend'] or 'none (automatic)'}",
             "backends:"]
    for name, reason in info["backends"].items():
        lines.append(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


def main() -> None:
    print(render(collect()))


if __name__ == "__main__":
    main()
