"""Triton kernels for y = x @ (W ⊙ M)^T + b and its gradients, reading M bit-packed.

The mask is applied to each weight tile in registers after it is loaded, so ``W ⊙ M`` never
exists in memory: a call reads W once and 1 bit per weight of mask. Launch helpers allocate the
outputs; autograd and dispatch live in mtlfast/ops/masked_linear.py.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_INT32_MAX = 2**31 - 1


def _configs(block_a: int, block_b: int, block_r: int):
    """Autotune candidates over (rows, cols, reduction) tiles, in that kwargs order (fits_shared_memory
    reads them so). The interpreter gets one config:
    it would otherwise time every candidate, and its speed says nothing about a GPU."""
    if _INTERPRET:
        return [triton.Config({block_a: 32, block_b: 32, block_r: 32}, num_warps=4)]
    shapes = [(128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 64, 64, 4, 4),
              (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 4, 4), (64, 32, 32, 5, 2)]
    return [triton.Config({block_a: a, block_b: b, block_r: r}, num_stages=s, num_warps=w)
            for a, b, r, s, w in shapes]


# Shared memory the smaller of the targets (A100) offers a block; fp32 tiles with many stages
# exceed it (fp32 stays IEEE, on FMA units, so big fp32 tiles buy nothing anyway).
_SHARED_BUDGET = 160 * 1024


def fits_shared_memory(config, element_bytes: int) -> bool:
    """Conservative estimate: every stage holds both operand tiles."""
    a, b, r = config.kwargs.values()
    return config.num_stages * (a * r + r * b) * element_bytes <= _SHARED_BUDGET


def _prune(configs, named_args, **kwargs):
    element_bytes = next(v.element_size() for k, v in named_args.items() if k.endswith("_ptr") and k != "bits_ptr")
    kept = [c for c in configs if fits_shared_memory(c, element_bytes)]
    return kept or configs[-1:]


@triton.jit
def _keep_bits_kn(bits_ptr, stride_bits, k0, offs_n, N, K, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep-flags (BLOCK_K, BLOCK_N) of weights (offs_n, k0 + [0, BLOCK_K)) of an (N, K) mask, from
    BLOCK_K/32 words per row; k0 is a multiple of 32 so word and tile boundaries agree. Words past
    the row's ceil(K/32) are not read (a tail tile would otherwise run off the last row)."""
    WORDS: tl.constexpr = BLOCK_K // 32
    offs_w = k0 // 32 + tl.arange(0, WORDS)
    words = tl.load(bits_ptr + offs_n[None, :] * stride_bits + offs_w[:, None],
                    mask=(offs_n[None, :] < N) & (offs_w[:, None] * 32 < K), other=0)   # (WORDS, BLOCK_N)
    shifts = tl.arange(0, 32)
    keep = (words[:, None, :] >> shifts[None, :, None]) & 1                # (WORDS, 32, BLOCK_N)
    return tl.reshape(keep, (BLOCK_K, BLOCK_N)) != 0


@triton.jit
def _keep_bits_nk(bits_ptr, stride_bits, k0, offs_n, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """As _keep_bits_kn, laid out (BLOCK_N, BLOCK_K)."""
    WORDS: tl.constexpr = BLOCK_K // 32
    offs_w = k0 // 32 + tl.arange(0, WORDS)
    words = tl.load(bits_ptr + offs_n[:, None] * stride_bits + offs_w[None, :],
                    mask=(offs_n[:, None] < N) & (offs_w[None, :] * 32 < K), other=0)   # (BLOCK_N, WORDS)
    shifts = tl.arange(0, 32)
    keep = (words[:, :, None] >> shifts[None, None, :]) & 1                # (BLOCK_N, WORDS, 32)
    return tl.reshape(keep, (BLOCK_N, BLOCK_K)) != 0


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST is set only under the interpreter for bfloat16, whose tl.dot multiplies
    the raw bf16 bit patterns (triton#11584); bf16 products are exact in fp32, so the upcast
    computes what the GPU's bf16 MMA with fp32 accumulation computes."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row-grouped tile order: neighbouring programs share operand tiles in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    return pid_m, pid_n


@triton.autotune(configs=_configs("BLOCK_M", "BLOCK_N", "BLOCK_K"), key=["M", "N", "K", "PRECISION"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _forward_kernel(x_ptr, stride_xm, stride_xk, w_ptr, stride_wn, stride_wk, bits_ptr, stride_bits,
                    bias_ptr, out_ptr, stride_om, stride_on, M, N, K,
                    HAS_BIAS: tl.constexpr, INT64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr = 8):
    """out (M, N) = x (M, K) @ (W ⊙ M)^T (K, N) + bias."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if INT64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0.0)   # (BLOCK_K, BLOCK_N)
        keep = _keep_bits_kn(bits_ptr, stride_bits, k0, offs_n, N, K, BLOCK_K, BLOCK_N)
        w = tl.where(keep, w, tl.zeros_like(w))
        acc = _dot(x, w, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.autotune(configs=_configs("BLOCK_M", "BLOCK_K", "BLOCK_N"), key=["M", "N", "K", "PRECISION"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _grad_input_kernel(dy_ptr, stride_dm, stride_dn, w_ptr, stride_wn, stride_wk, bits_ptr, stride_bits,
                       dx_ptr, stride_xm, stride_xk, M, N, K,
                       INT64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                       GROUP_M: tl.constexpr = 8):
    """dx (M, K) = dy (M, N) @ (W ⊙ M) (N, K); the reduction runs over N."""
    pid_m, pid_k = _grouped_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if INT64:
        offs_m = offs_m.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if INT64:
            offs_n = offs_n.to(tl.int64)
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn,
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)   # (BLOCK_N, BLOCK_K)
        keep = _keep_bits_nk(bits_ptr, stride_bits, k0, offs_n, N, K, BLOCK_N, BLOCK_K)
        w = tl.where(keep, w, tl.zeros_like(w))
        acc = _dot(dy, w, acc, PRECISION, UPCAST)
    tl.store(dx_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
             acc.to(dx_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.autotune(configs=_configs("BLOCK_N", "BLOCK_K", "BLOCK_M"), key=["M", "N", "K", "PRECISION"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _grad_weight_kernel(dy_ptr, stride_dm, stride_dn, x_ptr, stride_xm, stride_xk, bits_ptr, stride_bits,
                        dw_ptr, stride_wn, stride_wk, dbias_ptr, M, N, K,
                        HAS_BIAS: tl.constexpr, INT64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                        GROUP_M: tl.constexpr = 8):
    """dW (N, K) = M ⊙ (dy^T (N, M) @ x (M, K)); the programs of the first K tile also reduce
    dbias (N,) = Σ_m dy from the dy tiles they load anyway."""
    pid_n, pid_k = _grouped_tile(N, K, BLOCK_N, BLOCK_K, GROUP_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if INT64:
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        if INT64:
            offs_m = offs_m.to(tl.int64)
        dy_t = tl.load(dy_ptr + offs_n[:, None] * stride_dn + offs_m[None, :] * stride_dm,
                       mask=(offs_n[:, None] < N) & (offs_m[None, :] < M), other=0.0)   # (BLOCK_N, BLOCK_M)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        acc = _dot(dy_t, x, acc, PRECISION, UPCAST)
        if HAS_BIAS:
            bias_acc += tl.sum(dy_t.to(tl.float32), axis=1)
    keep = _keep_bits_nk(bits_ptr, stride_bits, k0, offs_n, N, K, BLOCK_N, BLOCK_K)
    acc = tl.where(keep, acc, 0.0)
    tl.store(dw_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
             acc.to(dw_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(dbias_ptr + offs_n, bias_acc.to(dbias_ptr.dtype.element_ty), mask=offs_n < N)


# ---------------------------------------------------------------------------------------------
# Launch helpers

def _precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own switch, so results match F.linear on the same machine.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return _INTERPRET and dtype == torch.bfloat16


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """True when an element offset of any tensor can pass int32 (offsets are computed in int32
    otherwise, which is faster but would wrap)."""
    for t in tensors:
        span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 0)
        if span + max(t.shape, default=0) > _INT32_MAX:
            return True
    return False


def _grid(rows_key: str, cols_key: str, rows: int, cols: int):
    return lambda meta: (triton.cdiv(rows, meta[rows_key]) * triton.cdiv(cols, meta[cols_key]),)


def masked_linear_forward(x: torch.Tensor, weight: torch.Tensor, mask_bits: torch.Tensor,
                          bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (M, K), weight (N, K), mask_bits (N, ceil(K/32)) int32, bias (N,) or None -> (M, N)."""
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_(bias.expand(M, N)) if bias is not None else out.zero_()
    _forward_kernel[_grid("BLOCK_M", "BLOCK_N", M, N)](
        x, x.stride(0), x.stride(1), weight, weight.stride(0), weight.stride(1),
        mask_bits, mask_bits.stride(0), bias if bias is not None else x,
        out, out.stride(0), out.stride(1), M, N, K,
        HAS_BIAS=bias is not None, INT64=_needs_int64(x, weight, out), PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype))
    return out


def masked_linear_grad_input(grad_out: torch.Tensor, weight: torch.Tensor,
                             mask_bits: torch.Tensor) -> torch.Tensor:
    """grad_out (M, N), weight (N, K) -> dx (M, K) = grad_out @ (weight ⊙ mask)."""
    M, N = grad_out.shape
    K = weight.shape[1]
    dx = torch.empty((M, K), device=grad_out.device, dtype=grad_out.dtype)
    if M == 0 or K == 0:
        return dx
    if N == 0:
        return dx.zero_()
    _grad_input_kernel[_grid("BLOCK_M", "BLOCK_K", M, K)](
        grad_out, grad_out.stride(0), grad_out.stride(1), weight, weight.stride(0), weight.stride(1),
        mask_bits, mask_bits.stride(0), dx, dx.stride(0), dx.stride(1), M, N, K,
        INT64=_needs_int64(grad_out, weight, dx), PRECISION=_precision(grad_out.dtype), UPCAST=_upcast(grad_out.dtype))
    return dx


def masked_linear_grad_weight(grad_out: torch.Tensor, x: torch.Tensor, mask_bits: torch.Tensor,
                              with_bias: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """grad_out (M, N), x (M, K) -> (dW (N, K) zero outside the mask, dbias (N,) or None)."""
    M, N = grad_out.shape
    K = x.shape[1]
    dw = torch.empty((N, K), device=x.device, dtype=x.dtype)
    dbias = torch.empty((N,), device=x.device, dtype=x.dtype) if with_bias else None
    if N == 0:
        return dw, dbias
    if M == 0 or K == 0:
        # No reduction to run; dbias still has N entries to write when K == 0.
        dw.zero_()
        if dbias is not None:
            dbias.copy_(grad_out.sum(0)) if M > 0 else dbias.zero_()
        return dw, dbias
    _grad_weight_kernel[_grid("BLOCK_N", "BLOCK_K", N, K)](
        grad_out, grad_out.stride(0), grad_out.stride(1), x, x.stride(0), x.stride(1),
        mask_bits, mask_bits.stride(0), dw, dw.stride(0), dw.stride(1),
        dbias if dbias is not None else dw, M, N, K,
        HAS_BIAS=with_bias, INT64=_needs_int64(grad_out, x, dw), PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype))
    return dw, dbias
