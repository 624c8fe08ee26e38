"""The one wall-clock timer: a call bracketed by device synchronisations, so its time is what a
caller waits for (queued CUDA work included). ``mtlfast.profile`` times with it, and the
benchmark harness (``bench/timer.py``) builds its warm-up and rounds on it."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(step: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """One synchronised call of ``step``: its result and its wall time in seconds."""
    sync(device)
    start = time.perf_counter()
    result = step()
    sync(device)
    return result, time.perf_counter() - start


def wall_times(step: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> list[float]:
    """``warmup`` untimed calls, then the wall seconds of each of ``iters`` synchronised calls."""
    for _ in range(warmup):
        step()
    return [timed_call(step, device)[1] for _ in range(iters)]
