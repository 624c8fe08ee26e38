"""masked_linear on the Triton kernels: the one-group case of the grouped masked GEMMs of
mtlfast/triton_kernels/masked_gemm.py (which read the mask bit-packed and never materialise W ⊙ M).
Implements the family's kernel interface (mtlfast/ops/masked_linear.py: ``MaskedLinearKernels``)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from mtlfast.bitmask import pack
from mtlfast.triton_kernels.masked_gemm import (grouped_masked_matmul, grouped_masked_matmul_grad_input,
                                                grouped_masked_matmul_grad_weight)

_zero_index: dict = {}


def _index0(device: torch.device) -> torch.Tensor:
    """A (1,) int64 zero on `device`, made once: weight set 0 and mask 0 of the single group."""
    index = _zero_index.get(device)
    if index is None:
        index = _zero_index[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return index


def prepare(weight: torch.Tensor, mask: torch.Tensor, rows: int) -> torch.Tensor:
    """The mask bit-packed, (N, ceil(K/32)) int32: what the kernels read."""
    return pack(mask)


def forward(x: torch.Tensor, weight: torch.Tensor, mask_bits: torch.Tensor,
            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (M, K), weight (N, K), mask_bits (N, ceil(K/32)) int32, bias (N,) or None -> (M, N)."""
    i0 = _index0(x.device)
    return grouped_masked_matmul(x.unsqueeze(0), weight.unsqueeze(0), i0, mask_bits.unsqueeze(0), i0,
                                 biases=(bias.unsqueeze(0),) if bias is not None else ())[0]


def grad_input(grad_out: torch.Tensor, weight: torch.Tensor, mask_bits: torch.Tensor) -> torch.Tensor:
    """grad_out (M, N), weight (N, K) -> dx (M, K) = grad_out @ (weight ⊙ mask)."""
    i0 = _index0(grad_out.device)
    return grouped_masked_matmul_grad_input(grad_out.unsqueeze(0), weight.unsqueeze(0), i0,
                                            mask_bits.unsqueeze(0), i0)[0]


def grad_weight(grad_out: torch.Tensor, x: torch.Tensor, mask_bits: torch.Tensor,
                with_bias: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """grad_out (M, N), x (M, K) -> (dW (N, K) zero outside the mask, dbias (N,) or None)."""
    out = grouped_masked_matmul_grad_weight(grad_out.unsqueeze(0), x.unsqueeze(0), mask_bits.unsqueeze(0),
                                            _index0(x.device), with_bias=with_bias, out_dtype=x.dtype)
    dw, dbias = out if with_bias else (out, None)
    return dw[0], dbias[0] if dbias is not None else None
