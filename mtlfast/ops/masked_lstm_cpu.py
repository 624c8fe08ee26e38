"""CPU kernels of the grouped masked LSTM. The large matmuls (the input projection of every step,
dx and the weight gradients over all steps) are one batched BLAS call each over every group (task
x direction); the recurrence, where each step's matmul has only B rows, is one native call per
layer (csrc/cpu/masked_lstm.cpp) that fuses the recurrent matmul with the cell on weights
packed once per call, all steps and groups, on torch's thread count. Masks are applied by one
native pass that reads the shared weight and the bool masks (no float copy of the masks). The
Triton kernels implement the same interface (``MaskedLSTMKernels`` in masked_lstm.py) on GPUs.

A "weights" handle is what ``prepare`` returns: per group, the masked weight (G, N, K), and the
masks and indices to mask that group's weight gradient with. Shapes: G groups, T steps (every
array in time order; reverse groups run backwards within each row's length), B batch rows,
H hidden, gates in torch.nn.LSTM order (i, f, g, o).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from mtlfast._native import capsule as _cap, lib, threads as _threads
from mtlfast.ops.common import accumulation_dtype, is_identity_index


class Weights(NamedTuple):
    masked: torch.Tensor                # (G, N, K) contiguous, each group's weight with its mask applied
    masks: Optional[torch.Tensor]       # (P, N, K) bool contiguous, or None when no group is masked
    mask_index: torch.Tensor            # (G,) int64 into masks, -1 for an unmasked group
    weight_index: torch.Tensor          # (G,) int64: each group's weight set (its biases' row)


def _mask_select(src: torch.Tensor, index: Optional[torch.Tensor], masks: Optional[torch.Tensor],
                 mask_index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[g] = src[index[g]] (src[g] without index) where masks[mask_index[g]], else 0."""
    lib().mask_select(_cap(src), _cap(index), _cap(masks), _cap(mask_index), _cap(out), _threads())
    return out


def prepare(weight: torch.Tensor, weight_index: torch.Tensor, masks: Optional[torch.Tensor],
            mask_index: torch.Tensor) -> Weights:
    """weight (S, N, K), masks (P, N, K) bool or None, indices (G,) -> per-group masked weights,
    in the accumulation dtype: fp32 (fp64 for fp64), so every matmul accumulates and rounds in
    fp32 like the GPU kernels (and on CPUs fp32 GEMMs are the fast ones anyway)."""
    w = weight.to(accumulation_dtype(weight.dtype)).contiguous()
    masks = masks.contiguous() if masks is not None else None
    weight_index, mask_index = weight_index.contiguous(), mask_index.contiguous()
    if masks is None and is_identity_index(weight_index, w.shape[0]):  # one unmasked set per group: w itself
        return Weights(w, None, mask_index, weight_index)
    out = w.new_empty((weight_index.shape[0], *w.shape[1:]))
    return Weights(_mask_select(w, weight_index, masks, mask_index, out), masks, mask_index, weight_index)


def project(x: torch.Tensor, weights: Weights, b_ih: Optional[torch.Tensor],
            b_hh: Optional[torch.Tensor]) -> torch.Tensor:
    """x (G, R, K) -> (G, R, N) fp32: x @ W_mᵀ (+ b_ih + b_hh (S, N), each group its set's row)."""
    w = weights.masked
    out = torch.bmm(x.to(w.dtype), w.transpose(1, 2))
    biases = [b.to(w.dtype) for b in (b_ih, b_hh) if b is not None]
    if not biases:
        return out
    # not baddbmm: with a broadcast bias it first copies the bias into every row, then runs a
    # beta = 1 GEMM, 1.0-1.5x the GEMM alone at the sluice sizes (measured); one in-place add is less
    return out.add_(sum(biases).index_select(0, weights.weight_index).unsqueeze(1))


def grad_input(dy: torch.Tensor, weights: Weights) -> torch.Tensor:
    """dy (G, R, N) -> (G, R, K) = dy @ W_m, in the accumulation dtype."""
    return torch.bmm(dy.to(weights.masked.dtype), weights.masked)


def grad_weight(dy: torch.Tensor, x: torch.Tensor, weights: Weights, with_bias: bool = False):
    """-> ((G, N, K) = M ⊙ (dyᵀ @ x), exactly 0 outside each group's mask; (G, N) = Σ_r dy if
    with_bias, else None), in the accumulation dtype."""
    acc = weights.masked.dtype
    dw = torch.bmm(dy.transpose(1, 2).to(acc), x.to(acc))
    if weights.masks is not None:
        dw = _mask_select(dw, None, weights.masks, weights.mask_index, dw)
    return dw, (dy.to(acc).sum(1) if with_bias else None)


def forward_recurrence(xproj: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, weights: Weights,
                       lengths: torch.Tensor, reverse: torch.Tensor, save: bool = True,
                       out_dtype: Optional[torch.dtype] = None):
    """xproj (G, T, B, 4H) in the accumulation dtype, time order; reverse (G,) bool: the group runs
    backwards within each row's length -> hs (G, T, B, H) (0 at padded steps), h_n, c_n (in
    out_dtype; default the accumulation dtype), gates (G, T, B, 4H) activated (0 at padded
    steps), cells (G, T, B, H) (carried when padded), h_prev (G, T, B, H): the h that entered each
    step; all in time order (the last three None unless ``save``: what backward needs). One native
    call for every step and group."""
    G, T, B, H4 = xproj.shape
    H = H4 // 4
    acc = xproj.dtype
    xproj, h0, c0 = xproj.contiguous(), h0.to(acc).contiguous(), c0.to(acc).contiguous()
    lengths, reverse = lengths.contiguous(), reverse.contiguous()
    hs = xproj.new_empty((G, T, B, H))
    cells, h_prev, gates = ((xproj.new_empty((G, T, B, H)), xproj.new_empty((G, T, B, H)), torch.empty_like(xproj))
                            if save else (None, None, None))
    h_n, c_n = torch.empty_like(h0), torch.empty_like(c0)
    lib().lstm_forward(_cap(xproj), _cap(weights.masked), _cap(h0), _cap(c0), _cap(lengths), _cap(reverse),
                           _cap(hs), _cap(gates), _cap(cells), _cap(h_prev), _cap(h_n), _cap(c_n), _threads())
    out_dtype = out_dtype or acc
    return hs.to(out_dtype), h_n.to(out_dtype), c_n.to(out_dtype), gates, cells, h_prev


def backward_recurrence(dhs: torch.Tensor, dh_n: torch.Tensor, dc_n: torch.Tensor, gates: torch.Tensor,
                        cells: torch.Tensor, c0: torch.Tensor, weights: Weights, lengths: torch.Tensor,
                        reverse: torch.Tensor, out_dtype: Optional[torch.dtype] = None):
    """dhs (G, T, B, H): the gradient of hs; gates, cells from forward_recurrence -> dgates
    (G, T, B, 4H) w.r.t. the pre-activations (0 at padded steps), dh0, dc0 (in out_dtype; default
    the accumulation dtype); time order. One native call for every step and group."""
    acc = gates.dtype
    dhs, dh_n, dc_n = dhs.to(acc).contiguous(), dh_n.to(acc).contiguous(), dc_n.to(acc).contiguous()
    gates, cells, c0 = gates.contiguous(), cells.contiguous(), c0.to(acc).contiguous()
    lengths, reverse = lengths.contiguous(), reverse.contiguous()
    dgates = torch.empty_like(gates)
    dh0, dc0 = torch.empty_like(dh_n), torch.empty_like(dc_n)
    lib().lstm_backward(_cap(dhs), _cap(dh_n), _cap(dc_n), _cap(gates), _cap(cells), _cap(c0),
                            _cap(weights.masked), _cap(lengths), _cap(reverse), _cap(dgates), _cap(dh0), _cap(dc0),
                            _threads())
    out_dtype = out_dtype or acc
    return dgates, dh0.to(out_dtype), dc0.to(out_dtype)


def sum_into_sets(grads: torch.Tensor, weight_index: torch.Tensor, num_sets: int,
                  out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(G, ...) -> (S, ...) in out_dtype (default grads'): each weight set's groups summed. A CPU's
    index_add_ adds the groups one after the other in index order (deterministic); a select over
    S x G copies cost 5.8 ms of conll03's 30 ms fwd+bwd."""
    if num_sets == 1:       # every group uses the one set (sparse sharing)
        out = grads.sum(0, keepdim=True)
    else:
        out = grads.new_zeros((num_sets, *grads.shape[1:])).index_add_(0, weight_index, grads)
    return out.to(out_dtype or grads.dtype)
