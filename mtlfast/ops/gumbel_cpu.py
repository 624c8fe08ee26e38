"""CPU kernels of the Gumbel ops (csrc/cpu/gumbel.cpp, csrc/cpu/combine.cpp): the same interface as
the Triton launchers of mtlfast/triton_kernels/gumbel.py and the same Philox noise, bit for bit.
Every op is one native pass each way (sigmoid samples, complementary pairs and softmax rows, the
noise recomputed in backward; the allocation-weighted combine). float32 and float64.

The sampling kernels also check that every logit is finite while they read them (the op's value
validation, see mtlfast/ops/gumbel.py): a forward that finds inf or NaN raises the op's own error.
"""
from __future__ import annotations

from typing import Tuple

import torch

from mtlfast._native import capsule as _cap, lib, threads as _threads
from mtlfast.ops.gumbel import nonfinite_logits_error


def _sigmoid_forward(logits: torch.Tensor, tau: torch.Tensor, seed: int, hard: bool, pairs: bool) -> torch.Tensor:
    """z of logits' shape, or of logits.shape[:-1] for pairs (the native code tells them apart by
    z's shape). tau at full precision: a float64 tau stays float64 up to the kernel."""
    x = logits.contiguous()
    z = x.new_empty(x.shape[:-1] if pairs else x.shape)
    if not lib().gumbel_sigmoid_forward(_cap(x), float(tau), seed, hard, _cap(z), _threads()):
        raise nonfinite_logits_error("gumbel_pairs" if pairs else "gumbel_sigmoid")
    return z


def _sigmoid_backward(grad: torch.Tensor, logits: torch.Tensor, tau: torch.Tensor, seed: int) -> torch.Tensor:
    x = logits.contiguous()
    grad = grad.to(x.dtype).contiguous()
    dx = torch.empty_like(x)
    lib().gumbel_sigmoid_backward(_cap(grad), _cap(x), float(tau), seed, _cap(dx), _threads())
    return dx


def gumbel_sigmoid_forward(logits, tau, seed, hard):
    return _sigmoid_forward(logits, tau, seed, hard, pairs=False)


def gumbel_pairs_forward(logits, tau, seed, hard):
    return _sigmoid_forward(logits, tau, seed, hard, pairs=True)


# the pairing is read from the shapes of grad and logits
gumbel_sigmoid_backward = gumbel_pairs_backward = _sigmoid_backward


def gumbel_softmax_forward(logits: torch.Tensor, tau: torch.Tensor, seed: int, hard: bool) -> torch.Tensor:
    """logits (R, C) -> one sample per row, (R, C): softmax((logits + g) / tau), or its one-hot."""
    x = logits.contiguous()
    y = torch.empty_like(x)
    if not lib().gumbel_softmax_forward(_cap(x), float(tau), seed, hard, _cap(y), _threads()):
        raise nonfinite_logits_error("gumbel_softmax")
    return y


def gumbel_softmax_backward(grad: torch.Tensor, logits: torch.Tensor, tau: torch.Tensor, seed: int) -> torch.Tensor:
    x = logits.contiguous()
    grad = grad.to(x.dtype).contiguous()
    dx = torch.empty_like(x)
    lib().gumbel_softmax_backward(_cap(grad), _cap(x), float(tau), seed, _cap(dx), _threads())
    return dx


def allocation_combine_forward(outputs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """outputs (C, N), z (C,) -> (N,) in outputs' dtype (z taken in it too: the kernel reads one)."""
    outputs = outputs.contiguous()
    z = z.to(outputs.dtype).contiguous()
    out = outputs.new_empty(outputs.shape[1:])
    lib().allocation_combine_forward(_cap(outputs), _cap(z), _cap(out), _threads())
    return out


def allocation_combine_backward(grad: torch.Tensor, outputs: torch.Tensor,
                                z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d outputs (C, N), d z (C,)) from grad (N,), one pass over outputs."""
    outputs = outputs.contiguous()
    zc = z.to(outputs.dtype).contiguous()
    grad = grad.to(outputs.dtype).contiguous()
    doutputs, dz = torch.empty_like(outputs), torch.empty_like(zc)
    lib().allocation_combine_backward(_cap(grad), _cap(outputs), _cap(zc), _cap(doutputs), _cap(dz), _threads())
    return doutputs, dz
