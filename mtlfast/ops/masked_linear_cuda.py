"""masked_linear on the CUDA C++ kernels of csrc/cuda/masked_linear.cu (through mtlfast._C; the mask
read bit-packed). Implements the family's kernel interface (mtlfast/ops/masked_linear.py:
``MaskedLinearKernels``); allocates the outputs and passes torch's current stream."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from mtlfast._native import capsule, lib
from mtlfast.bitmask import pack


def prepare(weight: torch.Tensor, mask: torch.Tensor, rows: int) -> torch.Tensor:
    """The mask bit-packed, (N, ceil(K/32)) int32: what the kernels read."""
    return pack(mask)


def forward(x: torch.Tensor, weight: torch.Tensor, mask_bits: torch.Tensor,
            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (M, K), weight (N, K), mask_bits (N, W) int32, bias (N,) or None -> (M, N)."""
    out = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
    lib().masked_linear_forward(capsule(x), capsule(weight), capsule(mask_bits), capsule(bias), capsule(out),
                                torch.cuda.current_stream(x.device))
    return out


def grad_input(grad_out: torch.Tensor, weight: torch.Tensor, mask_bits: torch.Tensor) -> torch.Tensor:
    dx = torch.empty((grad_out.shape[0], weight.shape[1]), device=grad_out.device, dtype=grad_out.dtype)
    lib().masked_linear_grad_input(capsule(grad_out), capsule(weight), capsule(mask_bits), capsule(dx),
                                   torch.cuda.current_stream(grad_out.device))
    return dx


def grad_weight(grad_out: torch.Tensor, x: torch.Tensor, mask_bits: torch.Tensor,
                with_bias: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    N, K = grad_out.shape[1], x.shape[1]
    dw = torch.empty((N, K), device=x.device, dtype=x.dtype)
    dbias = torch.empty((N,), device=x.device, dtype=x.dtype) if with_bias else None
    lib().masked_linear_grad_weight(capsule(grad_out), capsule(x), capsule(mask_bits), capsule(dw), capsule(dbias),
                                    torch.cuda.current_stream(x.device))
    return dw, dbias
