"""``python -m mtlfast.info``: what this install can do, and why a backend cannot."""
from __future__ import annotations

import platform
from typing import Any

import torch

import mtlfast
from mtlfast import backends


def collect() -> dict[str, Any]:
    """Versions, devices, the native build and each backend's status, as a dict."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"not importable ({type(exc).__name__})"
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
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_devices": devices,
        "cpu": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "native_build": build,
        "triton_interpreter": backends.triton_interpreter_enabled(),
        "forced_backend": backends.forced_backend(),
        "backends": backends.available_backends(),
    }


def render(info: dict[str, Any]) -> str:
    lines = [f"mtlfast {info['mtlfast']}  (python {info['python']})",
             f"torch {info['torch']}  CUDA runtime {info['torch_cuda'] or 'none (CPU build)'}",
             f"triton {info['triton']}  interpreter {'ON (TRITON_INTERPRET=1)' if info['triton_interpreter'] else 'off'}",
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
