"""masked_linear on the CPU, two ways by the number of rows M (the product of x's leading sizes):

- **few rows** (M <= ``DIRECT_ROWS``, 16: one recurrent step, one decoded token): the loops of
  csrc/cpu/masked_linear.cpp read the weight and the bool mask where they use them, forward and
  both gradients; nothing is copied or packed. Each weight is used only M times, so these calls are
  bound by reading the weight once, which BLAS pays too, plus its packing.
- **more rows**: torch's BLAS GEMM (oneDNN / MKL, register-blocked, AVX-512 where the CPU has it)
  on ``where(mask, w, 0)`` written by one native pass (``mask_select``, the masked LSTM's), which
  reads the weight and the bool mask once; the forward's copy is what dx reads in backward (eager
  autograd keeps ``w * mask`` the same way), and dW is masked in place right after its GEMM. A
  GEMM of our own with the mask applied in its packing would save that one pass (about 5 % of
  these shapes' forward, measured on a 2-core Xeon) but would have to match oneDNN's AVX-512
  kernels to gain anything.

Implements the family's kernel interface (mtlfast/ops/masked_linear.py: ``MaskedLinearKernels``);
float32 and float64 (half precision runs the reference: CPU BLAS has no faster half GEMM).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from mtlfast._native import capsule as _cap, lib, threads as _threads


class Prepared(NamedTuple):
    mask: torch.Tensor                  # (N, K) bool, contiguous
    masked: Optional[torch.Tensor]      # (N, K) where(mask, w, 0) for BLAS; None on the direct path


# the adapter is imported when the cpu backend first runs, so these cost nothing at import mtlfast
_DIRECT_ROWS = lib().direct_rows()
_MASK0 = torch.zeros(1, dtype=torch.int64)    # mask_select's mask_index: the one mask


def _mask_into(src: torch.Tensor, mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = where(mask, src, 0), all (N, K) contiguous; out may be src."""
    lib().mask_select(_cap(src.unsqueeze(0)), None, _cap(mask.unsqueeze(0)), _cap(_MASK0), _cap(out.unsqueeze(0)),
                      _threads())
    return out


def prepare(weight: torch.Tensor, mask: torch.Tensor, rows: int) -> Prepared:
    """What the calls for ``rows`` rows read: the mask, and above DIRECT_ROWS (BLAS) the masked copy."""
    mask = mask.contiguous()
    if rows <= _DIRECT_ROWS:
        return Prepared(mask, None)
    w = weight.contiguous()
    return Prepared(mask, _mask_into(w, mask, torch.empty_like(w)))


def forward(x: torch.Tensor, weight: torch.Tensor, prepared: Prepared,
            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (M, K), weight (N, K), bias (N,) or None -> (M, N)."""
    if prepared.masked is not None:
        w = prepared.masked.t()
        return torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)
    x = x.contiguous()
    out = x.new_empty((x.shape[0], weight.shape[0]))
    lib().masked_linear_direct_forward(_cap(x), _cap(weight.contiguous()), _cap(prepared.mask), _cap(bias), _cap(out),
                                       _threads())
    return out


def grad_input(grad_out: torch.Tensor, weight: torch.Tensor, prepared: Prepared) -> torch.Tensor:
    """grad_out (M, N) -> dx (M, K) = grad_out @ (weight ⊙ mask)."""
    if prepared.masked is not None:
        return torch.mm(grad_out, prepared.masked)
    dx = grad_out.new_empty((grad_out.shape[0], weight.shape[1]))
    lib().masked_linear_direct_grad_input(_cap(grad_out.contiguous()), _cap(weight.contiguous()), _cap(prepared.mask),
                                          _cap(dx), _threads())
    return dx


def grad_weight(grad_out: torch.Tensor, x: torch.Tensor, prepared: Prepared,
                with_bias: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """grad_out (M, N), x (M, K) -> (dW (N, K), exactly 0 outside the mask; dbias (N,) or None)."""
    if prepared.masked is not None:
        dw = torch.mm(grad_out.t(), x)
        return _mask_into(dw, prepared.mask, dw), (grad_out.sum(0) if with_bias else None)
    N, K = grad_out.shape[1], x.shape[1]
    dw = x.new_empty((N, K))
    dbias = x.new_empty((N,)) if with_bias else None
    lib().masked_linear_direct_grad_weight(_cap(grad_out.contiguous()), _cap(x.contiguous()), _cap(prepared.mask),
                                           _cap(dw), _cap(dbias), _threads())
    return dw, dbias
