"""Seeded input construction shared by the workload modules.

Tensors are drawn on the CPU from a seeded generator and then moved, so a workload has the
same values (and the same random masks) on every device.
"""
from __future__ import annotations

import torch


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """Standard normal CPU float32 tensor times ``scale``."""
    return torch.randn(*shape, generator=g) * scale


def random_mask(g: torch.Generator, *shape: int, density: float) -> torch.Tensor:
    """Bool mask whose entries are True with probability ``density``."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    return torch.rand(*shape, generator=g) < density


def place(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None,
          requires_grad: bool = False) -> torch.Tensor:
    """Move ``t`` to ``device`` (and ``dtype`` for float tensors), optionally as a grad leaf."""
    t = t.to(device=device, dtype=dtype if t.is_floating_point() and dtype is not None else t.dtype)
    return t.requires_grad_(requires_grad) if t.is_floating_point() else t
