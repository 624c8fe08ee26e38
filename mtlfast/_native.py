"""Calls into mtlfast._C: torch tensors in, raw pointers, element strides and the current CUDA
stream out (the native code has no PyTorch headers, see DESIGN.md). Allocates the outputs."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# Mirrors csrc/cuda/dtype.h.
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
CUDA_DTYPES = tuple(_DTYPE_CODES)


def _C():
    from mtlfast import _C
    return _C


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def masked_linear_forward(x: torch.Tensor, weight: torch.Tensor, mask_bits: torch.Tensor,
                          bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (M, K), weight (N, K), mask_bits (N, W) int32, bias (N,) or None -> (M, N)."""
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    with torch.cuda.device(x.device):
        _C().masked_linear_forward(
            _DTYPE_CODES[x.dtype], M, N, K, _ptr(x), *x.stride(), _ptr(weight), *weight.stride(),
            _ptr(mask_bits), mask_bits.stride(0), _ptr(bias), _ptr(out), *out.stride(), _stream(x.device))
    return out


def masked_linear_grad_input(grad_out: torch.Tensor, weight: torch.Tensor,
                             mask_bits: torch.Tensor) -> torch.Tensor:
    M, N = grad_out.shape
    K = weight.shape[1]
    dx = torch.empty((M, K), device=grad_out.device, dtype=grad_out.dtype)
    with torch.cuda.device(grad_out.device):
        _C().masked_linear_grad_input(
            _DTYPE_CODES[grad_out.dtype], M, N, K, _ptr(grad_out), *grad_out.stride(),
            _ptr(weight), *weight.stride(), _ptr(mask_bits), mask_bits.stride(0),
            _ptr(dx), *dx.stride(), _stream(grad_out.device))
    return dx


def masked_linear_grad_weight(grad_out: torch.Tensor, x: torch.Tensor, mask_bits: torch.Tensor,
                              with_bias: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    M, N = grad_out.shape
    K = x.shape[1]
    dw = torch.empty((N, K), device=x.device, dtype=x.dtype)
    dbias = torch.empty((N,), device=x.device, dtype=x.dtype) if with_bias else None
    with torch.cuda.device(x.device):
        _C().masked_linear_grad_weight(
            _DTYPE_CODES[x.dtype], M, N, K, _ptr(grad_out), *grad_out.stride(), _ptr(x), *x.stride(),
            _ptr(mask_bits), mask_bits.stride(0), _ptr(dw), *dw.stride(), _ptr(dbias),
            _stream(x.device))
    return dw, dbias
