"""Triton kernels for Gumbel-Matrix: straight-through Gumbel-sigmoid (elementwise and on
complementary logit pairs), Gumbel-softmax over rows, and the allocation-weighted combine of
component outputs.

Noise. Element (or pair, or row*C + column) i of a sample keyed by seed draws x = Philox4x32-10 at
counter (i_lo, i_hi, 0, 0) and key (seed_lo, seed_hi), word 0 (what tl.randint(seed, i) returns),
u = ((x >> 9) + 0.5) * 2**-23 in (0, 1), logistic L = log u - log(1 - u), Gumbel g = -log(-log u),
in fp32 (mtlfast/ops/philox.py has the same recipe in PyTorch, and says why 23 bits). Nothing is
stored: a backward kernel recomputes the noise from (seed, i), so a sample costs no memory and a
fused forward + backward reads the logits twice and writes nothing else.

The seed travels as two int32 arguments, its low and high words reinterpreted as signed, marked
do_not_specialize: a Python int argument is typed i32 or i64 by its value, so a single 64-bit seed
argument would compile a second kernel the first time a seed crossed 2**31, and specialisation
would compile another for seed 1. tau is a 0-d fp32 tensor read by the kernel: a schedule that
anneals tau compiles nothing and never syncs the host.

Philox is the cost: ten rounds of two 32x32 high multiplies, two low ones and four xors per
element, more integer work than the bytes moved at H100 bandwidth, so the elementwise kernels take
large blocks (several elements per thread) to keep the memory system busy while the ALUs work.

Hard samples are exactly 0.0 / 1.0: x + L > 0 (Gumbel-sigmoid), the one-hot of argmax(x + g),
lowest index on ties (Gumbel-softmax); neither depends on tau. The backward kernels compute the
gradient of the soft sample (straight-through).

Combine. outputs (C, N) contiguous, z (C,) fp32: out = Σ_c z_c · outputs_c / max(1, Σ_c z_c).
A (C_P, BLOCK) tile per program, like the layer mixing in sluice.py. The backward is persistent
and one pass: doutputs is written tile by tile and A_c = Σ_n grad_n · outputs_cn is summed
elementwise in registers; dz_c = A_c / m - [S >= 1] · (Σ_c' z_c' A_c') / m² is linear in A, so each
program stores its share of dz and a torch .sum over the per-program partials finishes it
(deterministic, no atomics).

Launch helpers allocate the outputs; autograd and validation live in mtlfast/ops.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
import triton
import triton.language as tl
from triton.language.random import philox_impl

from mtlfast.triton_kernels.masked_gemm import Candidates, _int64, autotune, persistent_programs, size_bucket

MAX_SOFTMAX_COLUMNS = 16384
_MASK32 = 0xFFFFFFFF


@triton.constexpr_function
def _pow2(n):
    return triton.next_power_of_2(n)


@triton.constexpr_function
def _rows_per_block(tile, block_c):
    """Rows a Gumbel-softmax program takes: enough for `tile` elements, at least one."""
    return max(1, tile // block_c)


# ---------------------------------------------------------------------------------------------
# Autotune candidates. Elementwise kernels: (BLOCK, num_warps), 8 or 16 elements per thread (the
# loads of a thread are 16- or 32-byte vectors, and each thread has several Philox streams in
# flight to hide their latency). AOT sm_90 bf16 (the gumbel-large launch in tests/triton_aot.py):
# 16 per thread take 79-140 registers, 8 take 32-72; 32 per thread took 165-206 (few warps
# resident), so none is offered.
_ELEMENTWISE_SHAPES = [(2048, 4), (4096, 8), (1024, 4), (2048, 8), (1024, 2), (8192, 16)]
# Softmax: (elements per program, num_warps); rows per program = elements / BLOCK_C (at least 1).
# (16384, 16) is not offered: _prune_softmax never keeps it (past 16 per thread for every BLOCK_C
# under 16384, and at 16384 (8192, 16) runs the same one row per program and comes first).
_SOFTMAX_SHAPES = [(2048, 4), (4096, 8), (1024, 4), (2048, 8), (8192, 16), (4096, 16)]
# Combine: (BLOCK, num_warps) over N; each thread holds C_P components of its pixels. The
# backward's fp32 accumulator doubles what a thread holds (AOT sm_90 bf16, C_P = 8: 32 elements per
# thread take 80 registers as tests/triton_aot.py compiles the combine launch; 64 took 168-212),
# so it gets smaller tiles per warp.
_COMBINE_SHAPES = {"forward": [(1024, 4), (512, 4), (2048, 8), (512, 2), (1024, 8), (256, 1)],
                   "backward": [(512, 4), (1024, 8), (256, 2), (256, 4), (512, 8), (128, 1)]}
# fp32 elements of a (rows x columns) tile a thread may hold: softmax keeps x, the noise and the
# exponentials of its share of a row block (16 warps leave a thread at most 128 registers);
# combine backward an fp32 accumulator beside the tile.
_SOFTMAX_ELEMENTS_PER_THREAD = 16
_COMBINE_ELEMENTS_PER_THREAD = {"forward": 64, "backward": 32}


def _elementwise_configs() -> Candidates:
    return (triton.Config({"BLOCK": 64}, num_warps=4),
            [triton.Config({"BLOCK": b}, num_warps=w, num_stages=1) for b, w in _ELEMENTWISE_SHAPES])


def _softmax_configs() -> Candidates:
    return (triton.Config({"TILE": 64}, num_warps=4),
            [triton.Config({"TILE": t}, num_warps=w, num_stages=1) for t, w in _SOFTMAX_SHAPES])


def _combine_configs(direction: str) -> Candidates:
    return (triton.Config({"BLOCK": 32}, num_warps=4),
            [triton.Config({"BLOCK": b}, num_warps=w, num_stages=1) for b, w in _COMBINE_SHAPES[direction]])


# No kernel here stages operands in shared memory (the softmax row reductions pass a few KiB
# through it at most): the prunes bound registers only.

def _prune_softmax(configs, named_args, **kwargs):
    """Candidates whose row block stays within _SOFTMAX_ELEMENTS_PER_THREAD per thread for this
    BLOCK_C (the most warps if none does: a 16384-column row needs 16)."""
    block_c = kwargs["BLOCK_C"]

    def per_thread(c):
        return max(c.kwargs["TILE"], block_c) / (32 * c.num_warps)
    kept = [c for c in configs if per_thread(c) <= _SOFTMAX_ELEMENTS_PER_THREAD]
    return kept or [min(configs, key=per_thread)]


def _prune_combine(direction: str):
    def prune(configs, named_args, **kwargs):
        rows = triton.next_power_of_2(kwargs["COMPONENTS"])

        def per_thread(c):
            return rows * c.kwargs["BLOCK"] / (32 * c.num_warps)
        kept = [c for c in configs if per_thread(c) <= _COMBINE_ELEMENTS_PER_THREAD[direction]]
        return kept or [min(configs, key=per_thread)]
    return prune


# ---------------------------------------------------------------------------------------------
# Noise

@triton.jit
def _uniform(seed_lo, seed_hi, offs, INT64: tl.constexpr):
    """fp32 u in (0, 1) at element offsets `offs` (int32, or int64 when INT64) of stream
    (seed_hi << 32 | seed_lo): Philox word 0 at counter (offs_lo, offs_hi, 0, 0), top 23 bits,
    centred: exact in fp32, never 0 or 1."""
    c0 = offs.to(tl.uint32)
    zero = c0 * 0
    if INT64:
        c1 = (offs >> 32).to(tl.uint32)
    else:
        c1 = zero
    # the int32 words carry the key's bits; the casts to uint32 keep them
    x, _, _, _ = philox_impl(c0, c1, zero, zero, seed_lo.to(tl.uint32), seed_hi.to(tl.uint32))
    return ((x >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07     # 2**-23


@triton.jit
def _logistic(seed_lo, seed_hi, offs, INT64: tl.constexpr):
    u = _uniform(seed_lo, seed_hi, offs, INT64)
    return tl.log(u) - tl.log(1.0 - u)     # 1 - u is exact: u is a multiple of 2**-24


@triton.jit
def _gumbel(seed_lo, seed_hi, offs, INT64: tl.constexpr):
    u = _uniform(seed_lo, seed_hi, offs, INT64)
    return -tl.log(-tl.log(u))


@triton.jit
def _sigmoid_slope(v, tau):
    """d sigmoid(v / tau) / dv = s (1 - s) / tau as e / (1 + e)² / tau, e = exp(-|v| / tau): no
    1 - s that rounds to 0 while the slope is still representable, no overflow at any v."""
    e = tl.exp(-tl.abs(v) / tau)
    return e / ((1.0 + e) * (1.0 + e)) / tau


@triton.jit
def _offsets(pid, n, INT64: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if INT64:
        offs = offs.to(tl.int64) + tl.cast(pid, tl.int64) * BLOCK
    else:
        offs = offs + pid * BLOCK
    return offs, offs < n


# ---------------------------------------------------------------------------------------------
# Gumbel-sigmoid, elementwise (noise index = flat index)

@triton.jit
def _noisy(logits_ptr, offs, mask, seed_lo, seed_hi, PAIRS: tl.constexpr, INT64: tl.constexpr):
    """v = x + L in fp32 for elements ``offs``: x the logit, or for complementary pairs the
    difference x[:, 0] - x[:, 1] (a (BLOCK, 2) tile is one contiguous run of 2*BLOCK logits,
    split in registers); L the logistic noise of the element (of the pair)."""
    if PAIRS:
        pair = offs[:, None] * 2 + tl.arange(0, 2)[None, :]
        x0, x1 = tl.split(tl.load(logits_ptr + pair, mask=mask[:, None], other=0.0).to(tl.float32))
        x = x0 - x1
    else:
        x = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x + _logistic(seed_lo, seed_hi, offs, INT64)


@triton.jit
def _sample_forward(logits_ptr, tau_ptr, y_ptr, n, seed_lo, seed_hi, HARD: tl.constexpr, PAIRS: tl.constexpr,
                    INT64: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _offsets(tl.program_id(0), n, INT64, BLOCK)
    v = _noisy(logits_ptr, offs, mask, seed_lo, seed_hi, PAIRS, INT64)
    if HARD:
        y = tl.where(v > 0.0, 1.0, 0.0)
    else:
        y = tl.sigmoid(v / tl.load(tau_ptr))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sample_backward(grad_ptr, logits_ptr, tau_ptr, dlogits_ptr, n, seed_lo, seed_hi, PAIRS: tl.constexpr,
                     INT64: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _offsets(tl.program_id(0), n, INT64, BLOCK)
    v = _noisy(logits_ptr, offs, mask, seed_lo, seed_hi, PAIRS, INT64)
    d = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32) * _sigmoid_slope(v, tl.load(tau_ptr))
    if PAIRS:
        pair = offs[:, None] * 2 + tl.arange(0, 2)[None, :]
        tl.store(dlogits_ptr + pair, tl.join(d, -d).to(dlogits_ptr.dtype.element_ty), mask=mask[:, None])
    else:
        tl.store(dlogits_ptr + offs, d.to(dlogits_ptr.dtype.element_ty), mask=mask)


# Keys: the element count by size_bucket (n_bucket); the softmax's padded row width BLOCK_C (C's
# bucket), not the rows; the combine's component count.
@autotune(_elementwise_configs(), key=["n_bucket", "HARD"])
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "n_bucket"])
def _sigmoid_forward_kernel(logits_ptr, tau_ptr, y_ptr, n, n_bucket, seed_lo, seed_hi, HARD: tl.constexpr,
                            INT64: tl.constexpr, BLOCK: tl.constexpr):
    """y (n,) = [x + L > 0] if HARD else sigmoid((x + L) / tau). Grid: (cdiv(n, BLOCK),)."""
    _sample_forward(logits_ptr, tau_ptr, y_ptr, n, seed_lo, seed_hi, HARD, False, INT64, BLOCK)


@autotune(_elementwise_configs(), key=["n_bucket"])
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "n_bucket"])
def _sigmoid_backward_kernel(grad_ptr, logits_ptr, tau_ptr, dlogits_ptr, n, n_bucket, seed_lo, seed_hi,
                             INT64: tl.constexpr, BLOCK: tl.constexpr):
    """dlogits (n,) = grad · s (1 - s) / tau, s = sigmoid((x + L) / tau), L recomputed."""
    _sample_backward(grad_ptr, logits_ptr, tau_ptr, dlogits_ptr, n, seed_lo, seed_hi, False, INT64, BLOCK)


# Gumbel-sigmoid on complementary pairs: logits (n, 2), x = x[:, 0] - x[:, 1], noise index = pair.

@autotune(_elementwise_configs(), key=["n_bucket", "HARD"])
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "n_bucket"])
def _pairs_forward_kernel(logits_ptr, tau_ptr, z_ptr, n, n_bucket, seed_lo, seed_hi, HARD: tl.constexpr,
                          INT64: tl.constexpr, BLOCK: tl.constexpr):
    """z (n,) = Gumbel-sigmoid of x[:, 0] - x[:, 1] (z = 1: component 0 wins). Grid: (cdiv(n, BLOCK),)."""
    _sample_forward(logits_ptr, tau_ptr, z_ptr, n, seed_lo, seed_hi, HARD, True, INT64, BLOCK)


@autotune(_elementwise_configs(), key=["n_bucket"])
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "n_bucket"])
def _pairs_backward_kernel(grad_ptr, logits_ptr, tau_ptr, dlogits_ptr, n, n_bucket, seed_lo, seed_hi,
                           INT64: tl.constexpr, BLOCK: tl.constexpr):
    """dlogits (n, 2) = (+d, -d), d = grad · s (1 - s) / tau of the pair's soft sample."""
    _sample_backward(grad_ptr, logits_ptr, tau_ptr, dlogits_ptr, n, seed_lo, seed_hi, True, INT64, BLOCK)


# ---------------------------------------------------------------------------------------------
# Gumbel-softmax over the C columns of (R, C) logits, noise index r*C + c. A program takes
# BLOCK_R = max(1, TILE / BLOCK_C) whole rows: the row reductions stay inside the program.

@triton.jit
def _softmax_tile(logits_ptr, R, C, seed_lo, seed_hi, INT64: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """(offsets, mask, x + g with -inf in the pad columns), (BLOCK_R, BLOCK_C) fp32, of row block
    program_id(0). Pad rows keep finite values, so their (unstored) softmax stays NaN-free."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    if INT64:
        rows = rows.to(tl.int64)
    offs = rows[:, None] * C + cols[None, :]
    in_row = (cols < C)[None, :]
    mask = (rows < R)[:, None] & in_row
    x = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.where(in_row, x + _gumbel(seed_lo, seed_hi, offs, INT64), float("-inf"))
    return offs, mask, v


@triton.jit
def _softmax(v, tau):
    # the row max subtracted before dividing by tau: (v - max) / tau lies in [-inf, 0] for any tau > 0,
    # where v / tau would overflow to inf for a tiny tau and make the row NaN (inf - inf)
    e = tl.exp((v - tl.max(v, axis=1)[:, None]) / tau)
    return e / tl.sum(e, axis=1)[:, None]


@autotune(_softmax_configs(), key=["BLOCK_C", "HARD"], prune=_prune_softmax)
@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _softmax_forward_kernel(logits_ptr, tau_ptr, y_ptr, R, C, seed_lo, seed_hi, HARD: tl.constexpr,
                            INT64: tl.constexpr, BLOCK_C: tl.constexpr, TILE: tl.constexpr):
    """y (R, C) = one-hot(argmax(x + g)) if HARD else softmax((x + g) / tau), per row.
    Grid: (cdiv(R, BLOCK_R),)."""
    BLOCK_R: tl.constexpr = _rows_per_block(TILE, BLOCK_C)
    offs, mask, v = _softmax_tile(logits_ptr, R, C, seed_lo, seed_hi, INT64, BLOCK_R, BLOCK_C)
    if HARD:
        win = tl.argmax(v, axis=1, tie_break_left=True)
        y = tl.where(tl.arange(0, BLOCK_C)[None, :] == win[:, None], 1.0, 0.0)
    else:
        y = _softmax(v, tl.load(tau_ptr))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@autotune(_softmax_configs(), key=["BLOCK_C"], prune=_prune_softmax)
@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _softmax_backward_kernel(grad_ptr, logits_ptr, tau_ptr, dlogits_ptr, R, C, seed_lo, seed_hi,
                             INT64: tl.constexpr, BLOCK_C: tl.constexpr, TILE: tl.constexpr):
    """dlogits (R, C) = y (grad - Σ_c grad · y) / tau, y the soft sample recomputed."""
    BLOCK_R: tl.constexpr = _rows_per_block(TILE, BLOCK_C)
    offs, mask, v = _softmax_tile(logits_ptr, R, C, seed_lo, seed_hi, INT64, BLOCK_R, BLOCK_C)
    tau = tl.load(tau_ptr)
    y = _softmax(v, tau)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = y * (g - tl.sum(g * y, axis=1)[:, None]) / tau
    tl.store(dlogits_ptr + offs, d.to(dlogits_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Allocation-weighted combine. outputs (COMPONENTS, N) contiguous, z (COMPONENTS,) fp32.

@triton.jit
def _combine_tile(tile, N, COMPONENTS: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    """(pixel offsets (BLOCK,), their mask, component offsets (C_P, BLOCK), their mask)."""
    C_P: tl.constexpr = _pow2(COMPONENTS)
    offs = tl.arange(0, BLOCK)
    c = tl.arange(0, C_P)
    if INT64:
        # tl.cast, not .to: a loop index is a plain int under the interpreter
        offs = offs.to(tl.int64) + tl.cast(tile, tl.int64) * BLOCK
        c = c.to(tl.int64)
    else:
        offs = offs + tile * BLOCK
    in_row = offs < N
    return offs, in_row, c[:, None] * N + offs[None, :], (c < COMPONENTS)[:, None] & in_row[None, :]


@triton.jit
def _allocation(z_ptr, COMPONENTS: tl.constexpr):
    """(z (C_P,) fp32, zero-padded; S = Σ z; m = max(1, S))."""
    c = tl.arange(0, _pow2(COMPONENTS))
    z = tl.load(z_ptr + c, mask=c < COMPONENTS, other=0.0)
    s = tl.sum(z, axis=0)
    return z, s, tl.maximum(s, 1.0)


@autotune(_combine_configs("forward"), key=["COMPONENTS"], prune=_prune_combine("forward"))
@triton.jit
def _combine_forward_kernel(outputs_ptr, z_ptr, out_ptr, N, COMPONENTS: tl.constexpr, INT64: tl.constexpr,
                            BLOCK: tl.constexpr):
    """out (N,) tile = Σ_c z_c · outputs_c / max(1, Σ z). Grid: (cdiv(N, BLOCK),)."""
    z, _, m = _allocation(z_ptr, COMPONENTS)
    offs, in_row, offs_c, mask_c = _combine_tile(tl.program_id(0), N, COMPONENTS, INT64, BLOCK)
    o = tl.load(outputs_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    out = tl.sum(z[:, None] * o, axis=0) / m           # the component axis is within each thread
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=in_row)


@autotune(_combine_configs("backward"), key=["COMPONENTS"], prune=_prune_combine("backward"))
@triton.jit
def _combine_backward_kernel(grad_ptr, outputs_ptr, z_ptr, doutputs_ptr, part_ptr, N, COMPONENTS: tl.constexpr,
                             INT64: tl.constexpr, BLOCK: tl.constexpr):
    """doutputs_c = grad · z_c / m on every tile this program visits, and its share of dz,
    A_c / m - [S >= 1] (Σ_c' z_c' A_c') / m² with A_c = Σ grad ⊙ outputs_c over those tiles, at
    part[pid] (COMPONENTS,). Grid: (P,) persistent; program pid visits tiles pid, pid + P, ..."""
    C_P: tl.constexpr = _pow2(COMPONENTS)
    pid = tl.program_id(0)
    z, s, m = _allocation(z_ptr, COMPONENTS)
    w = z / m
    acc = tl.zeros((C_P, BLOCK), dtype=tl.float32)
    for tile in range(pid, tl.cdiv(N, BLOCK), tl.num_programs(0)):
        offs, in_row, offs_c, mask_c = _combine_tile(tile, N, COMPONENTS, INT64, BLOCK)
        g = tl.load(grad_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
        tl.store(doutputs_ptr + offs_c, (w[:, None] * g[None, :]).to(doutputs_ptr.dtype.element_ty), mask=mask_c)
        o = tl.load(outputs_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        acc += o * g[None, :]
    a = tl.sum(acc, axis=1)
    # the clamp's gradient reaches S only where S >= 1 (torch's clamp passes it at the bound); a
    # where, not a product with 0, so a non-finite Σ z_c A_c stays out of dz below the bound
    through = tl.where(s >= 1.0, tl.sum(z * a, axis=0) / (m * m), 0.0)
    dz = a / m - through
    c = tl.arange(0, C_P)
    tl.store(part_ptr + pid * COMPONENTS + c, dz, mask=c < COMPONENTS)


# ---------------------------------------------------------------------------------------------
# Launch helpers

# Persistent programs per SM for the combine backward: 4-warp programs holding an fp32
# accumulator beside the tile (~100 registers per thread), a handful resident per SM; a few
# waves of them keep the last one short.
_PROGRAMS_PER_SM = 16


def _num_programs(device: torch.device, work: int) -> int:
    """Programs of a persistent launch: at most `work` (the tiles of the smallest config, so none
    idles without need) and at most _PROGRAMS_PER_SM per SM."""
    return persistent_programs(device, work, _PROGRAMS_PER_SM)


def _seed_words(seed: int) -> Tuple[int, int]:
    """The seed's low and high 32-bit words as signed int32 values (always typed i32 at launch)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected an int in [0, 2**64), got {seed!r}")

    def signed(word):
        return word - 2**32 if word >= 2**31 else word
    return signed(seed & _MASK32), signed(seed >> 32)


def _tau(tau: Union[torch.Tensor, float], device: torch.device) -> torch.Tensor:
    """tau as a 0-d fp32 tensor on `device` (a tensor there already costs nothing; a float costs a
    host-to-device copy per call)."""
    if not isinstance(tau, torch.Tensor):
        return torch.tensor(float(tau), device=device, dtype=torch.float32)
    return tau.to(device=device, dtype=torch.float32).reshape(())


def gumbel_sigmoid_forward(logits: torch.Tensor, tau: Union[torch.Tensor, float], seed: int,
                           hard: bool) -> torch.Tensor:
    """logits (any shape), tau 0-d fp32 tensor, seed int in [0, 2**64) -> y (logits' shape and
    dtype): hard: exactly 0/1, [x + L > 0]; soft: sigmoid((x + L) / tau), L the logistic noise at
    the flat index."""
    logits = logits.contiguous()
    y = torch.empty_like(logits)
    n = logits.numel()
    if n == 0:
        return y
    lo, hi = _seed_words(seed)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
    _sigmoid_forward_kernel[grid](logits, _tau(tau, logits.device), y, n, size_bucket(n), lo, hi, HARD=bool(hard),
                                  INT64=_int64(logits))
    return y


def gumbel_sigmoid_backward(grad: torch.Tensor, logits: torch.Tensor, tau: Union[torch.Tensor, float],
                            seed: int) -> torch.Tensor:
    """grad, logits (same shape) -> dlogits (logits' shape and dtype) = grad · s (1 - s) / tau, s the
    soft sample of (logits, tau, seed) (straight-through for hard samples)."""
    logits = logits.contiguous()
    grad = grad.to(logits.dtype).contiguous()
    dlogits = torch.empty_like(logits)
    n = logits.numel()
    if n == 0:
        return dlogits
    lo, hi = _seed_words(seed)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
    _sigmoid_backward_kernel[grid](grad, logits, _tau(tau, logits.device), dlogits, n, size_bucket(n), lo, hi,
                                   INT64=_int64(logits))
    return dlogits


def gumbel_pairs_forward(logits: torch.Tensor, tau: Union[torch.Tensor, float], seed: int,
                         hard: bool) -> torch.Tensor:
    """logits (..., 2) complementary pairs -> z (...) in logits' dtype: Gumbel-sigmoid of
    x[..., 0] - x[..., 1] with the noise at the pair's flat index; z = 1: component 0 wins."""
    logits = logits.contiguous()
    z = torch.empty(logits.shape[:-1], device=logits.device, dtype=logits.dtype)
    n = z.numel()
    if n == 0:
        return z
    lo, hi = _seed_words(seed)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
    _pairs_forward_kernel[grid](logits, _tau(tau, logits.device), z, n, size_bucket(n), lo, hi, HARD=bool(hard),
                                INT64=_int64(logits))
    return z


def gumbel_pairs_backward(grad: torch.Tensor, logits: torch.Tensor, tau: Union[torch.Tensor, float],
                          seed: int) -> torch.Tensor:
    """grad (...), logits (..., 2) -> dlogits (..., 2) in logits' dtype: (+d, -d), d = grad · s (1 - s)
    / tau of the pair's soft sample."""
    logits = logits.contiguous()
    grad = grad.to(logits.dtype).contiguous()
    dlogits = torch.empty_like(logits)
    n = grad.numel()
    if n == 0:
        return dlogits
    lo, hi = _seed_words(seed)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
    _pairs_backward_kernel[grid](grad, logits, _tau(tau, logits.device), dlogits, n, size_bucket(n), lo, hi,
                                 INT64=_int64(logits))
    return dlogits


def _softmax_launch(kernel, logits: torch.Tensor, *args, **flags):
    R, C = logits.shape
    if C > MAX_SOFTMAX_COLUMNS:
        raise ValueError(f"logits: expected at most {MAX_SOFTMAX_COLUMNS} columns (dim 1), got {C}")
    block_c = triton.next_power_of_2(C)
    grid = lambda meta: (triton.cdiv(R, max(1, meta["TILE"] // block_c)),)  # noqa: E731
    kernel[grid](*args, BLOCK_C=block_c, **flags)


def gumbel_softmax_forward(logits: torch.Tensor, tau: Union[torch.Tensor, float], seed: int,
                           hard: bool) -> torch.Tensor:
    """logits (R, C), C <= 16384 -> y (R, C) in logits' dtype: hard: exactly one-hot of argmax(x + g)
    per row (lowest index on ties); soft: softmax((x + g) / tau) over C; g the Gumbel noise at
    r*C + c."""
    R, C = logits.shape
    logits = logits.contiguous()
    y = torch.empty_like(logits)
    if C > MAX_SOFTMAX_COLUMNS:
        raise ValueError(f"logits: expected at most {MAX_SOFTMAX_COLUMNS} columns (dim 1), got {C}")
    if y.numel() == 0:
        return y
    lo, hi = _seed_words(seed)
    _softmax_launch(_softmax_forward_kernel, logits, logits, _tau(tau, logits.device), y, R, C, lo, hi,
                    HARD=bool(hard), INT64=_int64(logits))
    return y


def gumbel_softmax_backward(grad: torch.Tensor, logits: torch.Tensor, tau: Union[torch.Tensor, float],
                            seed: int) -> torch.Tensor:
    """grad, logits (R, C) -> dlogits (R, C) in logits' dtype = y (grad - Σ_c grad · y) / tau, y the
    soft sample of (logits, tau, seed) (straight-through for hard samples)."""
    R, C = logits.shape
    logits = logits.contiguous()
    grad = grad.to(logits.dtype).contiguous()
    dlogits = torch.empty_like(logits)
    if C > MAX_SOFTMAX_COLUMNS:
        raise ValueError(f"logits: expected at most {MAX_SOFTMAX_COLUMNS} columns (dim 1), got {C}")
    if dlogits.numel() == 0:
        return dlogits
    lo, hi = _seed_words(seed)
    _softmax_launch(_softmax_backward_kernel, logits, grad, logits, _tau(tau, logits.device), dlogits, R, C,
                    lo, hi, INT64=_int64(logits))
    return dlogits


def allocation_combine_forward(outputs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """outputs (C, ...) any float dtype, z (C,) -> out (...) in outputs' dtype = Σ_c z_c · outputs_c /
    max(1, Σ_c z_c), accumulated in fp32."""
    C = outputs.shape[0]
    outputs = outputs.contiguous()
    out = torch.empty(outputs.shape[1:], device=outputs.device, dtype=outputs.dtype)
    N = out.numel()
    if N == 0:
        return out
    if C == 0:
        return out.zero_()
    z = z.to(device=outputs.device, dtype=torch.float32).contiguous()
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK"]),)  # noqa: E731
    _combine_forward_kernel[grid](outputs, z, out, N, COMPONENTS=C, INT64=_int64(outputs))
    return out


def allocation_combine_backward(grad: torch.Tensor, outputs: torch.Tensor,
                                z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """grad (...), outputs (C, ...), z (C,) -> (doutputs (C, ...) in outputs' dtype, doutputs_c =
    grad · z_c / m; dz (C,) fp32, dz_c = Σ grad ⊙ outputs_c / m - [S >= 1] Σ grad ⊙ (Σ_c' z_c'
    outputs_c') / m²), S = Σ z, m = max(1, S); one pass over outputs."""
    C = outputs.shape[0]
    outputs = outputs.contiguous()
    grad = grad.to(outputs.dtype).contiguous()
    doutputs = torch.empty_like(outputs)
    N = grad.numel()
    if doutputs.numel() == 0:
        return doutputs, torch.zeros((C,), device=outputs.device, dtype=torch.float32)
    z = z.to(device=outputs.device, dtype=torch.float32).contiguous()
    programs = _num_programs(outputs.device,
                             triton.cdiv(N, min(c.kwargs["BLOCK"] for c in _combine_backward_kernel.configs)))
    partials = torch.empty((programs, C), device=outputs.device, dtype=torch.float32)
    _combine_backward_kernel[(programs,)](grad, outputs, z, doutputs, partials, N, COMPONENTS=C,
                                          INT64=_int64(outputs))
    return doutputs, partials.sum(0)
