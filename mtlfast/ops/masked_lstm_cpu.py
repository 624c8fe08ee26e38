"""CPU kernels of the grouped masked LSTM: every group (task × direction) of a layer in one
batched matmul per projection and per time step (PyTorch's BLAS), with masked weights materialised
once per call instead of once per task and step, and the pointwise cell of each step in one native
call (csrc/cpu/lstm_cell.cpp) instead of a dozen small ops. The Triton kernels implement the same
interface on GPUs.

A "weights" handle is what ``prepare`` returns: per group, the masked weight (G, N, K) and the
mask (G, N, K) bool or None. Shapes: G groups, T steps (step-major: reverse groups were reversed
by the caller), B batch rows, H hidden, gates in torch.nn.LSTM order (i, f, g, o).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch



def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class Weights(NamedTuple):
    masked: torch.Tensor            # (G, N, K), the weight of each group with its mask applied
    mask: Optional[torch.Tensor]    # (G, N, K) bool, or None when no group is masked


def prepare(weight: torch.Tensor, weight_index: torch.Tensor, masks: Optional[torch.Tensor],
            mask_index: torch.Tensor) -> Weights:
    """weight (S, N, K), masks (P, N, K) bool or None, indices (G,) -> per-group masked weights,
    in the accumulation dtype: fp32 (fp64 for fp64), so every matmul accumulates and rounds in
    fp32 like the GPU kernels (and on CPUs fp32 GEMMs are the fast ones anyway)."""
    w = weight.index_select(0, weight_index).to(accumulation_dtype(weight.dtype))
    if masks is None:
        return Weights(w, None)
    keep = masks.index_select(0, mask_index.clamp(min=0))
    unmasked = mask_index < 0
    if bool(unmasked.any()):
        keep = keep | unmasked.view(-1, 1, 1)
    return Weights(w * keep, keep)


def project(x: torch.Tensor, weights: Weights, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (G, R, K) -> (G, R, N) fp32: x @ W_mᵀ (+ bias (G, N))."""
    w = weights.masked
    if bias is None:
        return torch.bmm(x.to(w.dtype), w.transpose(1, 2))
    return torch.baddbmm(bias.to(w.dtype).unsqueeze(1), x.to(w.dtype), w.transpose(1, 2))


def grad_input(dy: torch.Tensor, weights: Weights) -> torch.Tensor:
    """dy (G, R, N) -> (G, R, K) = dy @ W_m."""
    return torch.bmm(dy.to(weights.masked.dtype), weights.masked)


def grad_weight(dy: torch.Tensor, x: torch.Tensor, weights: Weights) -> torch.Tensor:
    """(G, N, K) fp32 = M ⊙ (dyᵀ @ x), exactly 0 outside each group's mask."""
    acc = weights.masked.dtype
    dw = torch.bmm(dy.transpose(1, 2).to(acc), x.to(acc))
    return dw if weights.mask is None else dw * weights.mask


_DTYPE_CODES = {torch.float32: 0, torch.float64: 3}   # csrc/cuda/dtype.h numbering


def _native():
    from mtlfast import _C
    return _C


def forward_recurrence(xproj: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, weights: Weights,
                       lengths: torch.Tensor):
    """xproj (G, T, B, 4H) in the accumulation dtype -> hs (G, T, B, H) (0 at inactive steps), h_n,
    c_n, gates (G, T, B, 4H) activated (0 at inactive steps), cells (G, T, B, H) (carried when
    inactive). Per step: one batched matmul for every group, one native call for the cell.
    The saved tensors live step-major, (T, G, B, ...), and are returned as (G, T, ...) views: every
    per-step operand is then contiguous, which BLAS's batched matmul needs to run at full speed."""
    G, T, B, H4 = xproj.shape
    H = H4 // 4
    C, code = _native(), _DTYPE_CODES[xproj.dtype]
    w_t = weights.masked.transpose(1, 2).contiguous()   # (G, H, 4H)
    lengths = lengths.contiguous()
    xs = xproj.transpose(0, 1).contiguous()               # (T, G, B, 4H)
    hs = xproj.new_empty((T, G, B, H))
    gates = xproj.new_empty((T, G, B, H4))
    cells = xproj.new_empty((T, G, B, H))
    h, c = h0.contiguous().clone(), c0.contiguous().clone()
    pre = xproj.new_empty((G, B, H4))
    for s in range(T):
        torch.baddbmm(xs[s], h, w_t, out=pre)
        C.lstm_cell_forward(code, G, B, H, s, pre.data_ptr(), lengths.data_ptr(), h.data_ptr(), c.data_ptr(),
                            hs[s].data_ptr(), hs.stride(1), gates[s].data_ptr(), gates.stride(1),
                            cells[s].data_ptr(), cells.stride(1))
    return hs.transpose(0, 1), h, c, gates.transpose(0, 1), cells.transpose(0, 1)


def _step_major(t: torch.Tensor) -> torch.Tensor:
    """(G, T, ...) -> (T, G, ...) contiguous; free for the views forward_recurrence returns."""
    return t.transpose(0, 1).contiguous()


def backward_recurrence(dhs: torch.Tensor, dh_n: torch.Tensor, dc_n: torch.Tensor, gates: torch.Tensor,
                        cells: torch.Tensor, c0: torch.Tensor, weights: Weights, lengths: torch.Tensor):
    """-> dgates (G, T, B, 4H) w.r.t. the pre-activations (0 at inactive steps), dh0, dc0. dgates
    stays (G, T, ...): the weight-gradient GEMMs read it whole, and the per-step matmul reads a
    group-strided slice as fast as a contiguous one (measured)."""
    G, T, B, H4 = gates.shape
    H = H4 // 4
    C, code = _native(), _DTYPE_CODES[gates.dtype]
    w = weights.masked.contiguous()
    lengths = lengths.contiguous()
    dhs, gates, cells, c0 = _step_major(dhs), _step_major(gates), _step_major(cells), c0.contiguous()
    dgates = gates.new_empty((G, T, B, H4))
    dh, dc = dh_n.contiguous().clone(), dc_n.contiguous().clone()
    dh_next = torch.empty_like(dh)
    all_active_below = int(lengths.min()) if lengths.numel() else 0
    for s in range(T - 1, -1, -1):
        c_prev, c_prev_sg = (cells[s - 1], cells.stride(1)) if s > 0 else (c0, c0.stride(0))
        C.lstm_cell_backward(code, G, B, H, s, lengths.data_ptr(), gates[s].data_ptr(), gates.stride(1),
                             cells[s].data_ptr(), cells.stride(1), c_prev.data_ptr(), c_prev_sg,
                             dhs[s].data_ptr(), dhs.stride(1), dh.data_ptr(), dc.data_ptr(),
                             dgates[:, s].data_ptr(), dgates.stride(0))
        torch.bmm(dgates[:, s], w, out=dh_next)
        if s < all_active_below:
            dh, dh_next = dh_next, dh
        else:   # rows past their length carry dh through unchanged
            torch.where((lengths > s).unsqueeze(-1), dh_next, dh, out=dh)
    return dgates, dh, dc
