"""CPU kernels of the Gumbel ops (csrc/cpu/gumbel.cpp): the same interface as the Triton launchers
of mtlfast/triton_kernels/gumbel.py and the same Philox noise, bit for bit. Sigmoid samples (and
complementary pairs) are one native pass each way with the noise recomputed in backward; the
softmax draws its noise natively and does the rest with torch ops (rows of a handful of
components: the noise is the expensive part). float32 and float64."""
from __future__ import annotations

import torch

from mtlfast._native import capsule as _cap, lib, threads as _threads
from mtlfast.ops.common import accumulation_dtype


def _sigmoid_forward(logits: torch.Tensor, tau: torch.Tensor, seed: int, hard: bool, pairs: bool) -> torch.Tensor:
    """z of logits' shape, or of logits.shape[:-1] for pairs (the native code tells them apart by
    z's shape). tau at full precision: a float64 tau stays float64 up to the kernel."""
    x = logits.contiguous()
    z = x.new_empty(x.shape[:-1] if pairs else x.shape)
    lib().gumbel_sigmoid_forward(_cap(x), float(tau), seed, hard, _cap(z), _threads())
    return z


def _sigmoid_backward(grad: torch.Tensor, logits: torch.Tensor, tau: torch.Tensor, seed: int,
                      pairs: bool) -> torch.Tensor:
    x = logits.contiguous()
    grad = grad.to(x.dtype).contiguous()
    dx = torch.empty_like(x)
    lib().gumbel_sigmoid_backward(_cap(grad), _cap(x), float(tau), seed, _cap(dx), _threads())
    return dx


def gumbel_sigmoid_forward(logits, tau, seed, hard):
    return _sigmoid_forward(logits, tau, seed, hard, pairs=False)


def gumbel_sigmoid_backward(grad, logits, tau, seed):
    return _sigmoid_backward(grad, logits, tau, seed, pairs=False)


def gumbel_pairs_forward(logits, tau, seed, hard):
    return _sigmoid_forward(logits, tau, seed, hard, pairs=True)


def gumbel_pairs_backward(grad, logits, tau, seed):
    return _sigmoid_backward(grad, logits, tau, seed, pairs=True)


def uniform(seed: int, n: int) -> torch.Tensor:
    """u (n,) float32 of the Philox stream (seed, 0 .. n-1)."""
    u = torch.empty(n, dtype=torch.float32)
    lib().philox_uniform(seed, 0, _cap(u), _threads())
    return u


def _soft(logits: torch.Tensor, tau: torch.Tensor, seed: int) -> torch.Tensor:
    """softmax((x + g) / tau) over the last dim of (R, C), in the accumulation dtype."""
    acc = accumulation_dtype(logits.dtype)
    g = -torch.log(-torch.log(uniform(seed, logits.numel()))).view(logits.shape)
    v = logits.to(acc) + g.to(acc)
    # the max is subtracted before dividing: (v - max) / tau cannot overflow for any tau > 0
    return torch.softmax((v - v.amax(-1, keepdim=True)) / tau.to(acc), dim=-1)


def gumbel_softmax_forward(logits: torch.Tensor, tau: torch.Tensor, seed: int, hard: bool) -> torch.Tensor:
    soft = _soft(logits, tau, seed)
    if hard:
        soft = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
    return soft.to(logits.dtype)


def gumbel_softmax_backward(grad: torch.Tensor, logits: torch.Tensor, tau: torch.Tensor, seed: int) -> torch.Tensor:
    soft = _soft(logits, tau, seed)
    grad = grad.to(soft.dtype)
    return (soft * (grad - (grad * soft).sum(-1, keepdim=True)) / tau.to(soft.dtype)).to(logits.dtype)
