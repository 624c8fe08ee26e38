"""Peak memory bandwidth and dense matmul throughput of known GPUs (vendor datasheets).

Keyed by a substring of ``torch.cuda.get_device_name()``; the first match wins, so the more
specific names come first.  CPUs have no entry: their fractions of peak are omitted.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Peak:
    """Datasheet peaks: HBM bytes/s and dense (non-sparse) FLOP/s per dtype name."""

    name: str
    bytes_per_s: float
    flops_per_s: Mapping[str, float]

    def flops(self, dtype: str) -> float | None:
        """Peak FLOP/s for ``dtype`` ("bfloat16", "float16", "float32"), None if unknown."""
        return self.flops_per_s.get(dtype)


def _tc(half: float, fp32: float) -> dict[str, float]:
    """Tensor-core bf16/fp16 and plain fp32 (no TF32) peaks, in TFLOP/s."""
    return {"bfloat16": half * 1e12, "float16": half * 1e12, "float32": fp32 * 1e12}


PEAKS: tuple[tuple[str, Peak], ...] = (
    ("H100 PCIe", Peak("H100 PCIe", 2.0e12, _tc(756, 51))),
    ("H100 NVL", Peak("H100 NVL", 3.9e12, _tc(835, 60))),
    ("H100", Peak("H100 SXM", 3.35e12, _tc(989, 67))),  # "NVIDIA H100 80GB HBM3"
    ("H200", Peak("H200", 4.8e12, _tc(989, 67))),
    ("A100-SXM4-80GB", Peak("A100 SXM 80GB", 2.039e12, _tc(312, 19.5))),
    ("A100 80GB PCIe", Peak("A100 PCIe 80GB", 1.935e12, _tc(312, 19.5))),
    ("A100", Peak("A100 40GB", 1.555e12, _tc(312, 19.5))),
)


def lookup(device_name: str) -> Peak | None:
    """The peak entry whose key is a substring of ``device_name``, or None (CPUs, unknown GPUs)."""
    return next((peak for key, peak in PEAKS if key in device_name), None)
