"""CPU kernels of the sluice mixing ops (csrc/cpu/sluice.cpp): one pass over the inputs per call,
the mixing-weight gradients reduced per thread in double. Same interface as the Triton launchers
of mtlfast/triton_kernels/sluice.py. The kernels are float32 and float64; float16 and bfloat16
inputs (what torch.autocast hands them) are computed in float32 and returned in their dtype. The
mixing weights are used in the compute dtype, their gradients come back in float32 (float64 for
float64 inputs)."""
from __future__ import annotations

from typing import Tuple

import torch

from mtlfast._native import capsule as _cap, lib, threads as _threads
from mtlfast.ops.common import accumulation_dtype


def _weights(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return w.detach().to(like.dtype).contiguous()


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in a dtype the kernels take: float16 / bfloat16 widened to float32 (exactly)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def alpha_mix_forward(h: torch.Tensor, alpha: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    """h (M, N, D) contiguous, alpha (MS, MS) -> (M, N, D). The native code reads S from alpha's
    shape (num_subspaces is what the other backends take)."""
    wide = _wide(h)
    out = torch.empty_like(wide)
    lib().alpha_mix_forward(_cap(wide), _cap(_weights(alpha, wide)), _cap(out), _threads())
    return out.to(h.dtype)


def alpha_mix_backward(dout: torch.Tensor, h: torch.Tensor, alpha: torch.Tensor,
                       num_subspaces: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> dh (M, N, D), dalpha (MS, MS)."""
    wide = _wide(h)
    dh = torch.empty_like(wide)
    dalpha = wide.new_empty(alpha.shape)
    lib().alpha_mix_backward(_cap(dout.to(wide.dtype)), _cap(wide), _cap(_weights(alpha, wide)), _cap(dh), _cap(dalpha),
                            _threads())
    return dh.to(h.dtype), dalpha.to(accumulation_dtype(h.dtype))


def layer_mix_forward(layers: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """layers (K, M, N, D) contiguous, beta (M, K) -> (M, N, D)."""
    wide = _wide(layers)
    out = wide.new_empty(layers.shape[1:])
    lib().layer_mix_forward(_cap(wide), _cap(_weights(beta, wide)), _cap(out), _threads())
    return out.to(layers.dtype)


def layer_mix_backward(dout: torch.Tensor, layers: torch.Tensor,
                       beta: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> dlayers (K, M, N, D), dbeta (M, K)."""
    wide = _wide(layers)
    dlayers = torch.empty_like(wide)
    dbeta = wide.new_empty(beta.shape)
    lib().layer_mix_backward(_cap(dout.to(wide.dtype)), _cap(wide), _cap(_weights(beta, wide)), _cap(dlayers),
                            _cap(dbeta), _threads())
    return dlayers.to(layers.dtype), dbeta.to(accumulation_dtype(layers.dtype))
