"""What this CPU can do, measured in the benchmark's own run: the CPU counterparts of a GPU's
datasheet peaks (bench/peaks.py), which CPUs lack (clocks, cores and vector units vary too much
between machines and under virtualisation for a table).

- **GEMM rate**: the best of a few ``torch.mm`` calls of two 2048 x 2048 matrices in the run's
  dtype at the run's thread count (oneDNN / MKL: as close to the FMA peak as this machine gets).
- **Copy bandwidth**: the best of a few ``copy_`` calls between two 256 MiB buffers, counted as
  bytes read plus bytes written (far past every cache: main-memory bandwidth).

Every CPU record then carries ``frac_machine_flops`` / ``frac_machine_bw`` = its TFLOP/s and GB/s
over these (records.py), shown in the report; the quick mode (the harness tests) uses small sizes.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

GEMM_SIZE = 2048
COPY_BYTES = 256 << 20
REPEATS = 5


@dataclass(frozen=True)
class MachineLimits:
    """Measured limits: FLOP/s of a large GEMM, bytes/s of a large copy, and how they were taken."""

    gemm_flops_per_s: float
    copy_bytes_per_s: float
    how: str

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm: allocation, oneDNN's first-call setup
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(dtype: torch.dtype, quick: bool = False) -> MachineLimits:
    """The limits of this CPU at torch's current thread count, for matmuls in ``dtype``."""
    n = 256 if quick else GEMM_SIZE
    copy_bytes = (4 << 20) if quick else COPY_BYTES
    repeats = 2 if quick else REPEATS
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    gemm_s = _best_seconds(lambda: torch.mm(a, b), repeats)
    src = torch.ones(copy_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_s = _best_seconds(lambda: dst.copy_(src), repeats)
    threads = torch.get_num_threads()
    how = (f"best of {repeats}: torch.mm {n}x{n} {str(dtype).replace('torch.', '')}, "
           f"copy_ of {copy_bytes >> 20} MiB (read + write), {threads} threads")
    return MachineLimits(2.0 * n ** 3 / gemm_s, 2.0 * copy_bytes / copy_s, how)
