"""Calls into mtlfast._C: torch tensors go in as DLPack capsules, which the native code reads (and
checks: dtype, shape, strides, device, index values) without PyTorch headers (DESIGN.md). The
masked_linear launchers of the cuda backend live here; they allocate the outputs."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

_to_dlpack = torch._C._to_dlpack


def _C():
    from mtlfast import _C
    return _C


def capsule(t: Optional[torch.Tensor]):
    """t as a DLPack capsule for mtlfast._C (None stays None). About 0.3 µs: no copy, the capsule
    holds a reference to t's storage, and tensors that require grad are fine. Keep it in a name or
    an argument list until the call returns, like the tensor itself."""
    return None if t is None else _to_dlpack(t)


def threads() -> int:
    """The CPU kernels' thread count: torch's, within what mtlfast._C accepts."""
    return min(torch.get_num_threads(), _C().MAX_THREADS)


def masked_linear_forward(x: torch.Tensor, weight: torch.Tensor, mask_bits: torch.Tensor,
                          bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (M, K), weight (N, K), mask_bits (N, W) int32, bias (N,) or None -> (M, N)."""
    out = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
    _C().masked_linear_forward(capsule(x), capsule(weight), capsule(mask_bits), capsule(bias), capsule(out),
                               torch.cuda.current_stream(x.device))
    return out


def masked_linear_grad_input(grad_out: torch.Tensor, weight: torch.Tensor,
                             mask_bits: torch.Tensor) -> torch.Tensor:
    dx = torch.empty((grad_out.shape[0], weight.shape[1]), device=grad_out.device, dtype=grad_out.dtype)
    _C().masked_linear_grad_input(capsule(grad_out), capsule(weight), capsule(mask_bits), capsule(dx),
                                  torch.cuda.current_stream(grad_out.device))
    return dx


def masked_linear_grad_weight(grad_out: torch.Tensor, x: torch.Tensor, mask_bits: torch.Tensor,
                              with_bias: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    N, K = grad_out.shape[1], x.shape[1]
    dw = torch.empty((N, K), device=x.device, dtype=x.dtype)
    dbias = torch.empty((N,), device=x.device, dtype=x.dtype) if with_bias else None
    _C().masked_linear_grad_weight(capsule(grad_out), capsule(x), capsule(mask_bits), capsule(dw), capsule(dbias),
                                   torch.cuda.current_stream(x.device))
    return dw, dbias
