"""What a result was measured on: device name, library versions, git revision."""
from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_revision(cwd: Path | str = REPO_ROOT) -> str:
    """``git rev-parse --short HEAD``, with ``-dirty`` if tracked files changed; "unknown" without git."""
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


def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` on CUDA, the CPU model otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _mtlfast() -> tuple[str | None, Any]:
    """mtlfast's version and ``_C.build_info()``; None for whatever cannot be imported."""
    try:
        import mtlfast
    except Exception:  # the library may be absent or broken; the baselines still run
        return None, None
    try:
        from mtlfast import _C

        build = _C.build_info()
    except Exception:
        build = None
    return getattr(mtlfast, "__version__", None), build


@functools.lru_cache(maxsize=None)
def environment(device_type: str) -> dict[str, Any]:
    """The environment fields of every result record measured on ``device_type``."""
    device = torch.device(device_type)
    version, build = _mtlfast()
    return {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "mtlfast": version,
        "mtlfast_build": build,
        "git": git_revision(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
