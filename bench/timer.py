"""The benchmark's timer: warm-up, round planning, wall time through pytest-benchmark, CUDA events.

A synchronised call is timed by ``mtlfast._timing`` (the one wall-clock timer, also used by
``mtlfast.profile``). Wall time is per call and includes a device synchronisation on CUDA (what a caller waits for).
On CUDA the kernel time is also measured with CUDA events recorded around each call, the calls
launched back to back with one synchronisation at the end (GPU timeline per call; inputs stay
cache-warm, as the weights of an LSTM do across time steps).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from mtlfast import _timing

WALL = "wall"
CUDA_EVENT = "cuda_event"


@dataclass(frozen=True)
class Plan:
    """How long to warm up and measure one case (seconds per clock) and the round limits."""

    warmup_s: float
    budget_s: float
    min_rounds: int
    max_rounds: int
    min_warmup_calls: int = 2  # the first call may compile, autotune or allocate


DEFAULT = Plan(warmup_s=0.2, budget_s=0.5, min_rounds=3, max_rounds=1000)
QUICK = Plan(warmup_s=0.01, budget_s=0.02, min_rounds=3, max_rounds=20)


class Timer:
    """Times zero-argument callables on one device."""

    def __init__(self, device: torch.device, plan: Plan) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        # first CUDA calls pay for handles, autotuning and lazy module loading
        self.plan = replace(plan, min_warmup_calls=max(plan.min_warmup_calls, 3)) if self.cuda else plan

    @property
    def primary_clock(self) -> str:
        """The clock speedups and throughputs use: kernel time on CUDA, wall time on CPU."""
        return CUDA_EVENT if self.cuda else WALL

    def sync(self) -> None:
        """Wait for queued device work."""
        _timing.sync(self.device)

    def timed_call(self, step: Callable[[], Any]) -> tuple[Any, float]:
        """One synchronised call: its result and its wall time in seconds."""
        return _timing.timed_call(step, self.device)

    def warm_up(self, step: Callable[[], Any], spent_s: float, last_s: float, calls: int = 1) -> float:
        """Call ``step`` until the plan's warm-up is spent; return the last call's seconds.

        ``spent_s``/``last_s``/``calls`` account for calls already made (the checked first call).
        """
        while spent_s < self.plan.warmup_s or calls < self.plan.min_warmup_calls:
            _, last_s = self.timed_call(step)
            spent_s, calls = spent_s + last_s, calls + 1
        return last_s

    def rounds(self, per_call_s: float, share: float = 1.0) -> int:
        """Rounds that fill ``share`` of the budget (and of the round limits) at ``per_call_s``."""
        wanted = math.ceil(share * self.plan.budget_s / max(per_call_s, 1e-9))
        return max(math.ceil(share * self.plan.min_rounds), min(math.ceil(share * self.plan.max_rounds), wanted))

    def wall(self, step: Callable[[], Any], benchmark: Any, rounds: int) -> list[float]:
        """Per-call wall seconds, measured by the pytest-benchmark fixture."""
        if getattr(benchmark, "disabled", False):
            raise RuntimeError("pytest-benchmark is disabled (--benchmark-disable): nothing is timed")

        def call() -> None:
            step()
            self.sync()

        self.sync()
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
        return list(benchmark.stats.stats.data)

    def cuda_events(self, step: Callable[[], Any], rounds: int) -> list[float]:
        """Per-call GPU seconds between CUDA events around back-to-back calls."""
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
        self.sync()
        for start, end in zip(starts, ends):
            start.record()
            step()
            end.record()
        self.sync()
        return [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)]

    def measure(self, step: Callable[[], Any], benchmark: Any, per_call_s: float,
                share: float = 1.0) -> dict[str, list[float]]:
        """Samples per clock: ``wall`` always, ``cuda_event`` on CUDA; ``share``: this slice's part
        of the budget."""
        rounds = self.rounds(per_call_s, share)
        samples = {WALL: self.wall(step, benchmark, rounds)}
        if self.cuda:
            samples[CUDA_EVENT] = self.cuda_events(step, rounds)
        return samples
