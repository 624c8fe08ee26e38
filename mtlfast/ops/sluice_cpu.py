"""CPU kernels of the sluice mixing ops (csrc/cpu/mixing.cpp): one pass over the inputs per call,
the mixing-weight gradients reduced per thread in double. Same interface as the Triton launchers
of mtlfast/triton_kernels/sluice.py. float32 and float64; the mixing weights are used in the
input's dtype, their gradients come back in float32 (float64 for float64 inputs)."""
from __future__ import annotations

from typing import Tuple

import torch

from mtlfast._native import _C, _DTYPE_CODES


def _weights(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return w.detach().to(like.dtype).contiguous()


def _grad_dtype(like: torch.Tensor) -> torch.dtype:
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def alpha_mix_forward(h: torch.Tensor, alpha: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    """h (M, N, D) contiguous, alpha (MS, MS) -> (M, N, D)."""
    M, N, D = h.shape
    out = torch.empty_like(h)
    alpha = _weights(alpha, h)      # a name holds it: a temporary's memory is freed before the call
    _C().alpha_mix_forward(_DTYPE_CODES[h.dtype], M, num_subspaces, N, D // num_subspaces, h.data_ptr(),
                           alpha.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out


def alpha_mix_backward(dout: torch.Tensor, h: torch.Tensor, alpha: torch.Tensor,
                       num_subspaces: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> dh (M, N, D), dalpha (MS, MS)."""
    M, N, D = h.shape
    dh = torch.empty_like(h)
    dalpha = h.new_empty(alpha.shape)
    alpha = _weights(alpha, h)
    _C().alpha_mix_backward(_DTYPE_CODES[h.dtype], M, num_subspaces, N, D // num_subspaces, dout.data_ptr(),
                            h.data_ptr(), alpha.data_ptr(), dh.data_ptr(), dalpha.data_ptr(),
                            torch.get_num_threads())
    return dh, dalpha.to(_grad_dtype(h))


def layer_mix_forward(layers: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """layers (K, M, N, D) contiguous, beta (M, K) -> (M, N, D)."""
    K, M, N, D = layers.shape
    out = layers.new_empty((M, N, D))
    beta = _weights(beta, layers)
    _C().layer_mix_forward(_DTYPE_CODES[layers.dtype], K, M, N, D, layers.data_ptr(), beta.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out


def layer_mix_backward(dout: torch.Tensor, layers: torch.Tensor,
                       beta: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> dlayers (K, M, N, D), dbeta (M, K)."""
    K, M, N, D = layers.shape
    dlayers = torch.empty_like(layers)
    dbeta = layers.new_empty(beta.shape)
    beta = _weights(beta, layers)
    _C().layer_mix_backward(_DTYPE_CODES[layers.dtype], K, M, N, D, dout.data_ptr(), layers.data_ptr(),
                            beta.data_ptr(), dlayers.data_ptr(), dbeta.data_ptr(),
                            torch.get_num_threads())
    return dlayers, dbeta.to(_grad_dtype(layers))
