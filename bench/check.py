"""Sanity check of a provider's results against eager before it is timed (for a random op: a
statistic of its sample instead)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mtlfast.ops.definition import DEFAULT_TOLERANCES

# Norm-wise relative error allowed per dtype, from the ops' one tolerance table: its rtol, times 10
# in fp32/fp64 (a workload is many ops and steps, and eager, oneDNN and torch.compile order their
# sums differently); as it is in fp16/bf16, where rounding to the output dtype dominates and the
# expected results come from a float32 oracle (bench/runner.py). Measured on the tiny CPU
# workloads in bf16: at most 1.3e-2 against 2e-2.
TOLERANCE: dict[torch.dtype, float] = {
    dtype: rtol * (10 if dtype in (torch.float32, torch.float64) else 1)
    for dtype, (_, rtol) in DEFAULT_TOLERANCES.items()}


def relative_error(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """Largest ``‖got - expected‖ / ‖expected‖`` over matching tensors (float64)."""
    if len(got) != len(expected):
        raise ValueError(f"expected {len(expected)} tensors, got {len(got)}")
    worst = 0.0
    for a, b in zip(got, expected):
        if a.shape != b.shape:
            raise ValueError(f"shape {tuple(a.shape)} differs from eager's {tuple(b.shape)}")
        a, b = a.detach().double(), b.detach().double()
        worst = max(worst, float((a - b).norm() / b.norm().clamp_min(1e-30)))
    return worst


class WrongResult(AssertionError):
    """A provider's result differs from eager's by more than the dtype's tolerance."""


def verify(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], dtype: torch.dtype) -> float:
    """The relative error of ``got``; raises :class:`WrongResult` beyond the dtype's tolerance."""
    err = relative_error(got, expected)
    tol = TOLERANCE.get(dtype, 1e-2)
    if not err <= tol:
        raise WrongResult(f"relative error {err:.2e} > {tol:.0e} against eager")
    return err


RANDOM_NOTE = "random op: not compared with eager sample by sample (each provider draws its own random stream)"


def sample_note(sample_check: Callable[[tuple, tuple[torch.Tensor, ...]], str] | None, args: tuple,
                outputs: tuple[torch.Tensor, ...]) -> str:
    """The note of a random op's provider: why it is not compared with eager, and what
    ``sample_check`` (``OpBench.sample_check``, when the op has one) checked instead; raises
    :class:`WrongResult` when that check fails."""
    return RANDOM_NOTE if sample_check is None else f"{RANDOM_NOTE}; {sample_check(args, outputs)}"
