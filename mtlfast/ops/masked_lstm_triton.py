"""The grouped masked LSTM's kernel interface (see masked_lstm_cpu.py) on the Triton kernels of
mtlfast/triton_kernels/masked_lstm.py: masks stay bit-packed and the masked weights are never
materialised; each step is one launch for every group."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from mtlfast.bitmask import pack
from mtlfast.triton_kernels import masked_lstm as K



class Weights(NamedTuple):
    weight: torch.Tensor                 # (S, N, K)
    weight_index: torch.Tensor           # (G,)
    bits: Optional[torch.Tensor]         # (P, N, ceil(K/32)) int32 or None
    mask_index: torch.Tensor             # (G,), -1 = unmasked


def prepare(weight, weight_index, masks, mask_index) -> Weights:
    """masks (P, N, K) bool or None, packed here on every call (one launch; nothing cached)."""
    return Weights(weight, weight_index, pack(masks) if masks is not None else None, mask_index)


def project(x: torch.Tensor, w: Weights, b_ih: Optional[torch.Tensor], b_hh: Optional[torch.Tensor]) -> torch.Tensor:
    # both biases read by the GEMM itself, by weight set, and added in fp32: no summed or gathered copy
    biases = tuple(b for b in (b_ih, b_hh) if b is not None)
    return K.grouped_masked_matmul(x, w.weight, w.weight_index, w.bits, w.mask_index, biases=biases,
                                   out_dtype=torch.float32)


def grad_input(dy: torch.Tensor, w: Weights) -> torch.Tensor:
    # dgates are fp32; the GEMM rounds them to the weights' dtype in registers and accumulates in
    # fp32, as cuDNN does, and writes dx in the weights' (the model's) dtype
    return K.grouped_masked_matmul_grad_input(dy, w.weight, w.weight_index, w.bits, w.mask_index)


def grad_weight(dy: torch.Tensor, x: torch.Tensor, w: Weights, with_bias: bool = False):
    # operands rounded to the weights' dtype in registers (dgates and h are fp32), fp32 sums
    dw = K.grouped_masked_matmul_grad_weight(dy, x, w.bits, w.mask_index, with_bias=with_bias,
                                             dot_dtype=w.weight.dtype)
    return dw if with_bias else (dw, None)


def forward_recurrence(xproj, h0, c0, w: Weights, lengths, reverse, save: bool = True,
                       out_dtype: Optional[torch.dtype] = None):
    # the step kernels always store what backward needs (``save`` is a CPU saving)
    return K.forward_recurrence(xproj, h0, c0, w.weight, w.weight_index, w.bits, w.mask_index, lengths,
                                reverse.contiguous(), out_dtype=out_dtype or torch.float32)


def backward_recurrence(dhs, dh_n, dc_n, gates, cells, c0, w: Weights, lengths, reverse,
                        out_dtype: Optional[torch.dtype] = None):
    return K.backward_recurrence(dhs, dh_n, dc_n, gates, cells, c0, w.weight, w.weight_index, w.bits,
                                 w.mask_index, lengths, reverse.contiguous(), out_dtype=out_dtype or torch.float32)


def sum_into_sets(grads: torch.Tensor, weight_index: torch.Tensor, num_sets: int,
                  out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(G, ...) -> (S, ...): each weight set's groups summed in fp32, written in out_dtype, one launch."""
    return K.sum_into_sets(grads, weight_index, num_sets, out_dtype)
