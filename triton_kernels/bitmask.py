"""Bit-packing a bool mask in one launch (the layout of mtlfast.bitmask: bit j of int32 word w in
row r holds mask[r, 32*w + j], padding bits 0). Masks are packed on every call, never cached: a
cache keyed by the tensor misses writes made through ``.data`` or another view (they do not bump
the tensor's version counter), and a stale mask is a silently wrong number. One launch reads the
bool mask once (1 byte per weight) and writes 1 bit per weight."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_R = 16
_BLOCK_W = 8


@triton.jit
def _pack_kernel(mask_ptr, stride_r, stride_c, out_ptr, R, C, W, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_w = tl.program_id(1)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    words = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    bits = tl.arange(0, 32)
    cols = (words[:, None] * 32 + bits[None, :]).to(tl.int64)                     # (BLOCK_W, 32)
    inside = (rows[:, None, None] < R) & (cols[None, :, :] < C)
    keep = tl.load(mask_ptr + rows[:, None, None] * stride_r + cols[None, :, :] * stride_c, mask=inside, other=0)
    # distinct powers of two: the sum is their bitwise or, and never overflows int32 (bit 31 is its sign)
    word = tl.sum((keep != 0).to(tl.int32) << bits[None, None, :], axis=2)           # (BLOCK_R, BLOCK_W)
    tl.store(out_ptr + rows[:, None] * W + words[None, :], word, mask=(rows[:, None] < R) & (words[None, :] < W))


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool (..., C), any strides -> int32 (..., ceil(C/32)), contiguous."""
    *lead, C = mask.shape
    W = (C + 31) // 32
    flat = mask.reshape(-1, C) if mask.dim() != 2 else mask     # a view wherever the strides allow
    R = flat.shape[0]
    out = torch.empty((R, W), dtype=torch.int32, device=mask.device)
    if R and W:
        grid = (triton.cdiv(R, _BLOCK_R), triton.cdiv(W, _BLOCK_W))
        _pack_kernel[grid](flat.view(torch.uint8), flat.stride(0), flat.stride(1), out, R, C, W,
                           BLOCK_R=_BLOCK_R, BLOCK_W=_BLOCK_W)
    return out.view(*lead, W)
