"""Masked (grouped) GEMMs reading bit-packed masks: the kernels behind masked_linear (one group)
and the grouped masked LSTM's projections and weight gradients (many groups).

G groups run in one launch; group g uses weight set ``weight_index[g]`` and mask ``mask_index[g]``
(-1: unmasked). The mask is applied to each weight tile in registers after it is loaded, so
``W ⊙ M`` never exists in memory: a call reads W once and 1 bit per weight of mask. Masks are
int32 words (mtlfast.bitmask): bit j of word w in row n keeps column 32w + j. Launch helpers
allocate the outputs; autograd and dispatch live in mtlfast/ops.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from mtlfast.backends import autotune_enabled, triton_interpreter_enabled

_INTERPRET = triton_interpreter_enabled()
_INT32_MAX = 2**31 - 1


_AUTOTUNE = autotune_enabled()      # mtlfast.backends: read once at import, like TRITON_INTERPRET

# A kernel's candidates: (the one config the interpreter runs, the GPU's list). The first of the
# GPU's list is the default: what MTLFAST_AUTOTUNE=0 runs wherever the prune keeps it, so it should
# be a good config for the main target (H100, bf16) that compiles for every dtype and shape.
Candidates = Tuple["triton.Config", Sequence["triton.Config"]]


def autotune_configs(interpreted: "triton.Config", compiled: Sequence["triton.Config"]) -> list:
    """The configs a kernel's autotuner holds: ``compiled`` on a GPU; under the interpreter only
    ``interpreted``: it would otherwise time every candidate, and its speed says nothing about a GPU.
    (MTLFAST_AUTOTUNE=0 keeps the whole list, so the prune still sees every candidate; `autotune`
    then takes the first it keeps instead of timing them.)"""
    return [interpreted] if _INTERPRET else list(compiled)


def _no_benchmark(kernel_call, quantiles=None, **kwargs):
    """MTLFAST_AUTOTUNE=0's stand-in for the autotuner's timing: runs nothing, times every candidate
    equal, so the autotuner keeps the first (the only one the prune passes on)."""
    return [0.0, 0.0, 0.0]


def _first_kept(prune: Optional[Callable]) -> Callable:
    def first(configs, named_args, **kwargs):
        kept = prune(configs, named_args, **kwargs) if prune is not None else configs
        # one candidate: nothing to time, and a disk cache of autotune results (TRITON_CACHE_AUTOTUNING)
        # keys it apart from the timed choice among all of them
        return list(kept)[:1]
    return first


def autotune(candidates: Candidates, key: Sequence[str], prune: Optional[Callable] = None):
    """@triton.autotune for every kernel of mtlfast.triton_kernels: the configs of
    autotune_configs(*candidates), re-tuned for each new value of the `key` arguments (sizes that
    vary from call to call enter as size_bucket values, so a run with variable lengths or batches
    times candidates once per bucket, not once per size), `prune` as the early config prune, and
    MTLFAST_AUTOTUNE=0 (autotune_enabled). The returned Autotuner also keeps every GPU candidate
    in `.candidates` and the prune in `.candidate_prune` (tests run each candidate through the
    interpreter, the AOT test compiles them)."""
    interpreted, compiled = candidates
    prune_by = {"early_config_prune": prune if _AUTOTUNE else _first_kept(prune)}
    if _AUTOTUNE and prune is None:
        prune_by = None
    decorator = triton.autotune(configs=autotune_configs(interpreted, compiled), key=list(key),
                                prune_configs_by=prune_by, do_bench=None if _AUTOTUNE else _no_benchmark)

    def decorate(fn):
        tuner = decorator(fn)
        tuner.candidates = list(compiled)
        tuner.candidate_prune = prune
        return tuner
    return decorate


def size_bucket(n: int) -> int:
    """The autotune key of a size that varies between calls (rows = length x batch, batch, element
    count): the next power of two, so sizes from (2^(k-1), 2^k] share one tuning. Passed to the
    kernels as an extra argument used only as a key (do_not_specialize: it compiles nothing)."""
    return triton.next_power_of_2(max(int(n), 1))


# Under the interpreter a few programs per persistent launch, so tests walk several tiles per program.
_INTERPRET_PROGRAMS = 3
_sm_count: dict = {}


def persistent_programs(device: torch.device, work: int, per_sm: int, share: int = 1) -> int:
    """Programs of a persistent launch, per each of ``share`` independent rows of its grid: at most
    ``work`` (the tiles of the smallest config, so none idles without need) and together at most
    ``per_sm`` per SM of ``device``."""
    if _INTERPRET or device.type != "cuda":
        cap = _INTERPRET_PROGRAMS
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _sm_count:
            _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
        cap = _sm_count[index] * per_sm // share
    return max(1, min(work, cap))


def _configs(block_a: str, block_b: str, block_r: str) -> Candidates:
    """Autotune candidates over (rows, cols, reduction) tiles, in that kwargs order (fits_shared_memory
    reads them so)."""
    shapes = [(128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 64, 64, 4, 4),
              (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 4, 4), (64, 32, 32, 5, 2)]
    return (triton.Config({block_a: 32, block_b: 32, block_r: 32}, num_warps=4),
            [triton.Config({block_a: a, block_b: b, block_r: r}, num_stages=s, num_warps=w)
             for a, b, r, s, w in shapes])


# Shared memory the smaller of the targets (A100) offers a block; fp32 tiles with many stages
# exceed it (fp32 stays IEEE, on FMA units, so big fp32 tiles buy nothing anyway).
_SHARED_BUDGET = 160 * 1024


def fits_shared_memory(config, element_bytes: int, b_bytes: Optional[int] = None) -> bool:
    """Conservative estimate: every stage holds both operand tiles as loaded (the (rows, reduction)
    tile in ``element_bytes`` per element, the (reduction, cols) one in ``b_bytes``, default the
    same): an fp32 operand rounded to bf16 in registers is staged in fp32."""
    a, b, r = config.kwargs.values()
    b_bytes = element_bytes if b_bytes is None else b_bytes
    return config.num_stages * (a * r * element_bytes + r * b * b_bytes) <= _SHARED_BUDGET


def _prune(configs, named_args, **kwargs):
    # the grouped kernels' first two tensor pointers (bits aside) are the dot's two operands, in order
    a_bytes, b_bytes = [v.element_size() for k, v in named_args.items() if k.endswith("_ptr") and k != "bits_ptr"][:2]
    kept = [c for c in configs if fits_shared_memory(c, a_bytes, b_bytes)]
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


@triton.jit
def _group_mask(bits_ptr, stride_bp, mi_ptr, g, N):
    """(bits of group g's mask, row limit, unmasked). An unmasked group (mask_index -1) gets a row
    limit of 0, so the _keep_bits_* loads are predicated off and read nothing; `unmasked` then
    keeps every weight."""
    mi = tl.load(mi_ptr + g)
    unmasked = mi < 0
    return bits_ptr + tl.maximum(mi, 0) * stride_bp, tl.where(unmasked, 0, N), unmasked


# ---------------------------------------------------------------------------------------------
# Grouped masked GEMMs (input projections and their gradients). Grid: (tiles of one group, G).

# Key: the rows (length x batch) by size_bucket; N, K and the dtypes are the model's.
@autotune(_configs("BLOCK_M", "BLOCK_N", "BLOCK_K"), key=["M_BUCKET", "N", "K", "PRECISION"], prune=_prune)
@triton.jit(do_not_specialize=["M_BUCKET"])
def _grouped_forward_kernel(x_ptr, stride_xg, stride_xm, stride_xk,
                            w_ptr, stride_ws, stride_wn, stride_wk, wi_ptr,
                            bits_ptr, stride_bp, stride_bn, mi_ptr,
                            bias_ptr, stride_bs, stride_bb, bias2_ptr, stride_b2s, stride_b2b,
                            out_ptr, stride_og, stride_om, stride_on, M, N, K, M_BUCKET,
                            BIASES: tl.constexpr, INT64: tl.constexpr, PRECISION: tl.constexpr,
                            UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr = 8, HAS_MASK: tl.constexpr = True):
    """out[g] (M, N) = x[g] (M, K) @ (W[wi[g]] ⊙ M[mi[g]])^T + Σ of the BIASES (0, 1 or 2) biases'
    rows wi[g], added in fp32 (an LSTM's b_ih + b_hh, never summed in low precision first)."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    g = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if INT64:
        g = g.to(tl.int64)
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    x_g = x_ptr + g * stride_xg
    w_set = tl.load(wi_ptr + g)
    w_g = w_ptr + w_set * stride_ws
    if HAS_MASK:
        bits_g, mask_rows, unmasked = _group_mask(bits_ptr, stride_bp, mi_ptr, g, N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_g + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = tl.load(w_g + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0.0)   # (BLOCK_K, BLOCK_N)
        w = w.to(x.dtype)
        if HAS_MASK:
            keep = _keep_bits_kn(bits_g, stride_bn, k0, offs_n, mask_rows, K, BLOCK_K, BLOCK_N)
            w = tl.where(keep | unmasked, w, tl.zeros_like(w))
        acc = _dot(x, w, acc, PRECISION, UPCAST)
    if BIASES >= 1:
        bias = tl.load(bias_ptr + w_set * stride_bs + offs_n * stride_bb, mask=offs_n < N, other=0.0).to(tl.float32)
        if BIASES == 2:
            bias += tl.load(bias2_ptr + w_set * stride_b2s + offs_n * stride_b2b, mask=offs_n < N,
                            other=0.0).to(tl.float32)
        acc += bias[None, :]
    tl.store(out_ptr + g * stride_og + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@autotune(_configs("BLOCK_M", "BLOCK_K", "BLOCK_N"), key=["M_BUCKET", "N", "K", "PRECISION"], prune=_prune)
@triton.jit(do_not_specialize=["M_BUCKET"])
def _grouped_grad_input_kernel(dy_ptr, stride_dg, stride_dm, stride_dn,
                               w_ptr, stride_ws, stride_wn, stride_wk, wi_ptr,
                               bits_ptr, stride_bp, stride_bn, mi_ptr,
                               dx_ptr, stride_xg, stride_xm, stride_xk, M, N, K, M_BUCKET,
                               INT64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                               GROUP_M: tl.constexpr = 8, HAS_MASK: tl.constexpr = True):
    """dx[g] (M, K) = dy[g] (M, N) @ (W[wi[g]] ⊙ M[mi[g]]) (N, K) in W's dtype with fp32
    accumulation; the reduction runs over N."""
    pid_m, pid_k = _grouped_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    g = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if INT64:
        g = g.to(tl.int64)
        offs_m = offs_m.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    dy_g = dy_ptr + g * stride_dg
    w_g = w_ptr + tl.load(wi_ptr + g) * stride_ws
    if HAS_MASK:
        bits_g, mask_rows, unmasked = _group_mask(bits_ptr, stride_bp, mi_ptr, g, N)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if INT64:
            offs_n = offs_n.to(tl.int64)
        # dy (an LSTM's fp32 dgates) rounded to the weight's dtype in registers, as cuDNN does
        dy = tl.load(dy_g + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn,
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0).to(w_ptr.dtype.element_ty)
        w = tl.load(w_g + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)   # (BLOCK_N, BLOCK_K)
        if HAS_MASK:
            keep = _keep_bits_nk(bits_g, stride_bn, k0, offs_n, mask_rows, K, BLOCK_N, BLOCK_K)
            w = tl.where(keep | unmasked, w, tl.zeros_like(w))
        acc = _dot(dy, w, acc, PRECISION, UPCAST)
    tl.store(dx_ptr + g * stride_xg + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
             acc.to(dx_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@autotune(_configs("BLOCK_N", "BLOCK_K", "BLOCK_M"), key=["M_BUCKET", "N", "K", "PRECISION"], prune=_prune)
@triton.jit(do_not_specialize=["M_BUCKET"])
def _grouped_grad_weight_kernel(dy_ptr, stride_dg, stride_dm, stride_dn,
                                x_ptr, stride_xg, stride_xm, stride_xk,
                                bits_ptr, stride_bp, stride_bn, mi_ptr,
                                dw_ptr, stride_wg, stride_wn, stride_wk, dbias_ptr, stride_dbg, M, N, K, M_BUCKET,
                                HAS_BIAS: tl.constexpr, INT64: tl.constexpr, PRECISION: tl.constexpr,
                                UPCAST: tl.constexpr, DOT_DTYPE: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                                GROUP_M: tl.constexpr = 8, HAS_MASK: tl.constexpr = True):
    """dW[g] (N, K) = M[mi[g]] ⊙ (dy[g]^T (N, M) @ x[g] (M, K)), exactly 0 off the mask, both
    operands rounded to DOT_DTYPE in registers (an LSTM's fp32 dgates and h to its weights' dtype)
    with fp32 accumulation; the programs of the first K tile also reduce dbias[g] (N,) = Σ_m dy[g]
    in fp32 from the dy tiles they load anyway."""
    pid_n, pid_k = _grouped_tile(N, K, BLOCK_N, BLOCK_K, GROUP_M)
    g = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if INT64:
        g = g.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    dy_g = dy_ptr + g * stride_dg
    x_g = x_ptr + g * stride_xg
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        if INT64:
            offs_m = offs_m.to(tl.int64)
        dy_t = tl.load(dy_g + offs_n[:, None] * stride_dn + offs_m[None, :] * stride_dm,
                       mask=(offs_n[:, None] < N) & (offs_m[None, :] < M), other=0.0)   # (BLOCK_N, BLOCK_M)
        x = tl.load(x_g + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        acc = _dot(dy_t.to(DOT_DTYPE), x.to(DOT_DTYPE), acc, PRECISION, UPCAST)
        if HAS_BIAS:
            bias_acc += tl.sum(dy_t.to(tl.float32), axis=1)
    if HAS_MASK:
        # The mask is applied once to the finished tile, not per M step: 1 bit per weight in all.
        bits_g, mask_rows, unmasked = _group_mask(bits_ptr, stride_bp, mi_ptr, g, N)
        keep = _keep_bits_nk(bits_g, stride_bn, k0, offs_n, mask_rows, K, BLOCK_N, BLOCK_K)
        acc = tl.where(keep | unmasked, acc, 0.0)
    tl.store(dw_ptr + g * stride_wg + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
             acc.to(dw_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(dbias_ptr + g * stride_dbg + offs_n, bias_acc.to(dbias_ptr.dtype.element_ty), mask=offs_n < N)


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


def _grid2(rows_key: str, cols_key: str, rows: int, cols: int, groups: int):
    return lambda meta: (triton.cdiv(rows, meta[rows_key]) * triton.cdiv(cols, meta[cols_key]), groups)


def _mask_args(bits: Optional[torch.Tensor], dummy: torch.Tensor):
    """(bits pointer, stride over masks, stride over rows); an int tensor stands in for absent bits."""
    if bits is None:
        return dummy, 0, 0
    return bits, bits.stride(0), bits.stride(1)


def _int64(*tensors: Optional[torch.Tensor]) -> bool:
    return _needs_int64(*(t for t in tensors if t is not None))


def grouped_masked_matmul(x: torch.Tensor, weight: torch.Tensor, weight_index: torch.Tensor,
                          bits: Optional[torch.Tensor], mask_index: torch.Tensor, *,
                          biases: Tuple[torch.Tensor, ...] = (), out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """x (G, R, K) (any strides, group stride 0 allowed), weight (S, N, K), bits (P, N, ceil(K/32))
    or None, biases: 0, 1 or 2 tensors (S, N) -> (G, R, N) = x[g] @ (weight[wi[g]] ⊙ M[mi[g]])ᵀ + Σ
    biases[wi[g]] (added in fp32), in out_dtype (default x's)."""
    G, R, K = x.shape
    N = weight.shape[1]
    if not isinstance(biases, (tuple, list)) or len(biases) > 2:
        raise ValueError(f"grouped_masked_matmul: biases must be a tuple of at most two (S, N) tensors, "
                         f"got {type(biases).__name__} of length {len(biases)}")
    out = torch.empty((G, R, N), device=x.device, dtype=out_dtype or x.dtype)
    if out.numel() == 0:
        return out
    if K == 0:
        if not biases:
            return out.zero_()
        total = sum(b.float().index_select(0, weight_index) for b in biases)
        return out.copy_(total.unsqueeze(1).expand(G, R, N))
    bits_arg, stride_bp, stride_bn = _mask_args(bits, weight_index)
    b1 = biases[0] if biases else out
    b2 = biases[1] if len(biases) == 2 else b1
    b1_strides = b1.stride()[:2] if biases else (0, 0)
    b2_strides = b2.stride()[:2] if len(biases) == 2 else (0, 0)
    _grouped_forward_kernel[_grid2("BLOCK_M", "BLOCK_N", R, N, G)](
        x, x.stride(0), x.stride(1), x.stride(2),
        weight, weight.stride(0), weight.stride(1), weight.stride(2), weight_index,
        bits_arg, stride_bp, stride_bn, mask_index,
        b1, *b1_strides, b2, *b2_strides,
        out, out.stride(0), out.stride(1), out.stride(2), R, N, K, size_bucket(R),
        BIASES=len(biases), INT64=_int64(x, weight, bits, *biases, out), PRECISION=_precision(x.dtype),
        UPCAST=_upcast(x.dtype), HAS_MASK=bits is not None)
    return out


def grouped_masked_matmul_grad_input(dy: torch.Tensor, weight: torch.Tensor, weight_index: torch.Tensor,
                                     bits: Optional[torch.Tensor], mask_index: torch.Tensor) -> torch.Tensor:
    """dy (G, R, N) (any float dtype: rounded to the weight's in registers) -> dx (G, R, K) =
    dy[g] @ (weight[wi[g]] ⊙ M[mi[g]]), in the weight's dtype."""
    G, R, N = dy.shape
    K = weight.shape[2]
    dx = torch.empty((G, R, K), device=dy.device, dtype=weight.dtype)
    if dx.numel() == 0:
        return dx
    if N == 0:
        return dx.zero_()
    bits_arg, stride_bp, stride_bn = _mask_args(bits, weight_index)
    _grouped_grad_input_kernel[_grid2("BLOCK_M", "BLOCK_K", R, K, G)](
        dy, dy.stride(0), dy.stride(1), dy.stride(2),
        weight, weight.stride(0), weight.stride(1), weight.stride(2), weight_index,
        bits_arg, stride_bp, stride_bn, mask_index,
        dx, dx.stride(0), dx.stride(1), dx.stride(2), R, N, K, size_bucket(R),
        INT64=_int64(dy, weight, bits, dx), PRECISION=_precision(weight.dtype), UPCAST=_upcast(weight.dtype),
        HAS_MASK=bits is not None)
    return dx


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def grouped_masked_matmul_grad_weight(dy: torch.Tensor, x: torch.Tensor, bits: Optional[torch.Tensor],
                                      mask_index: torch.Tensor, *, with_bias: bool = False,
                                      out_dtype: torch.dtype = torch.float32,
                                      dot_dtype: Optional[torch.dtype] = None):
    """dy (G, R, N), x (G, R, K) (group stride 0 allowed) -> dW (G, N, K) = M[mi[g]] ⊙ (dy[g]ᵀ @ x[g]),
    exactly 0 outside the mask, in out_dtype, the product's operands rounded to dot_dtype (default
    dy's) with fp32 accumulation; with_bias: returns (dW, dbias (G, N) = Σ_r dy[g], summed in fp32)."""
    G, R, N = dy.shape
    K = x.shape[2]
    dot_dtype = dot_dtype or dy.dtype
    dw = torch.empty((G, N, K), device=dy.device, dtype=out_dtype)
    dbias = torch.empty((G, N), device=dy.device, dtype=out_dtype) if with_bias else None
    if N == 0 or G == 0:
        return (dw, dbias) if with_bias else dw
    if R == 0 or K == 0:
        # no reduction to run; dbias still has N entries per group when K == 0
        dw.zero_()
        if dbias is not None:
            dbias.copy_(dy.float().sum(1)) if R > 0 else dbias.zero_()
        return (dw, dbias) if with_bias else dw
    bits_arg, stride_bp, stride_bn = _mask_args(bits, mask_index)
    _grouped_grad_weight_kernel[_grid2("BLOCK_N", "BLOCK_K", N, K, G)](
        dy, dy.stride(0), dy.stride(1), dy.stride(2), x, x.stride(0), x.stride(1), x.stride(2),
        bits_arg, stride_bp, stride_bn, mask_index,
        dw, dw.stride(0), dw.stride(1), dw.stride(2), dbias if dbias is not None else dw,
        dbias.stride(0) if dbias is not None else 0, R, N, K, size_bucket(R),
        HAS_BIAS=with_bias, INT64=_int64(dy, x, bits, dw), PRECISION=_precision(dot_dtype),
        UPCAST=_upcast(dot_dtype), DOT_DTYPE=_TL_DTYPES[dot_dtype], HAS_MASK=bits is not None)
    return (dw, dbias) if with_bias else dw
