"""Triton kernels for sluice networks: subspace alpha mixing, layer (beta) mixing and the
subspace orthogonality penalty.

Alpha mixing. h (M, N, D) is contiguous with D = S*d; chunk i = m*S + s is h[m, :, s*d:(s+1)*d]
and alpha is (MS, MS) fp32: out chunk i = Σ_j alpha[i, j] · chunk j. A program loads one
(BLOCK_N, BLOCK_D) tile of every chunk at once, as an (MS_P, BLOCK_N, BLOCK_D) tile (MS_P: MS
rounded up to a power of two; pad chunks are masked off, so they cost no memory traffic), mixes
it and stores every output chunk once: each element is read once and written once.

The mixing is a small GEMM on tensor cores: the tile is viewed as (ROWS, PIXELS) with ROWS =
MS_P * G >= 16 (tl.dot needs 16), G = 16 / MS_P pixel groups becoming separate rows (row i*G + g
holds chunk i on pixel group g: a row-major reshape, nothing moves between chunks), and is
multiplied by alpha ⊗ I_G. Mixing with FMAs instead needs all MS² alpha entries in every
thread's registers (64 for MS = 8; AOT sm_90, bf16, 512-pixel tile: 127 registers with FMAs, 85
with the dot), so fewer tiles are in flight per SM; the dot keeps alpha in MMA fragments of 8
values per thread. alpha keeps ~16 bits (bf16) through a hi + lo split.

The backward makes one pass over dout and h: dh = (alphaᵀ ⊗ I_G) · dout per tile as above, and
dalpha[i, j] = Σ dout_i ⊙ h_j, a GEMM whose reduction runs over all N*d pixels: dout (ROWS,
PIXELS) @ hᵀ (PIXELS, ROWS) per tile, accumulated in registers across the tiles a program visits
(a tl.sum of products would instead reduce MS² values across the program for every tile). The
(ROWS, ROWS) sum holds dalpha on its G diagonal blocks, added up once per program at the end.
bf16 products are exact in the fp32 accumulators.

Layer mixing. layers (K, M, N, D) contiguous (flattened here to (K, M, L), L = N*D), beta (M, K)
fp32: out[m] = Σ_k beta[m, k] · layers[k, m]. One (K_P, BLOCK) tile of the K layers per program;
the backward writes dlayers and accumulates dbeta elementwise in registers, reducing across the
program once at the end.

The backward kernels (and the penalty) are persistent: the launcher fixes the number of
programs, each walks tiles pid, pid + P, ... and writes one fp32 partial (no atomics: the sums
are deterministic and the autotuner can rerun a kernel freely). A torch .sum over the partials
finishes the reduction. The partial count cannot depend on the autotuned tile size, which is
chosen after the launcher has allocated the partials; a persistent grid makes it not.

Orthogonality penalty. weight (R, C) with rows split in S blocks G_s (r = R/S rows each):
Σ_{s<t} ‖G_sᵀ G_t‖²_F in one kernel: a program computes (BLOCK_A, BLOCK_B) tiles of G_sᵀ G_t
with tl.dot over the r rows, squares them and accumulates the squares; no product is ever
stored. Its backward is two fp32 torch matmuls (small work).

Launch helpers allocate the outputs; autograd and validation live in mtlfast/ops.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
import triton
import triton.language as tl

from mtlfast.triton_kernels.masked_gemm import (_SHARED_BUDGET, Candidates, _dot, _int64, _upcast, autotune,
                                                persistent_programs)


@triton.constexpr_function
def _pow2(n):
    return triton.next_power_of_2(n)


@triton.constexpr_function
def _pixel_groups(chunks_p2):
    """G: pixel groups turned into rows so the alpha dots have the 16 rows tl.dot needs."""
    return max(1, 16 // chunks_p2)


# ---------------------------------------------------------------------------------------------
# Autotune candidates. The target is HBM bandwidth (H100, bf16, d = 256, MS = 8): tiles run along
# d in contiguous vectors, and enough of them must be in flight per SM, so what bounds a tile is
# the registers of the threads that hold it (every thread holds all MS_P chunks of its pixels).
# AOT on sm_90 (bf16, MS = 8, the alpha-mix-large launch in tests/triton_aot.py): 128 pixels per
# warp (64 bytes of each chunk tile per thread) take 34-62 registers in forward and 64-104 in
# backward (dout, h, dh and the dot operands); 256 per warp take 70-79 and 138-154, without
# spills but with fewer warps resident. _prune_tiles keeps the candidates within a per-thread byte
# budget for the launch's MS and dtype, so MS = 4 gets twice the pixels, fp32 half.

# (BLOCK_N, BLOCK_D, num_warps), by pixels per warp: 128, 64, 256
_ALPHA_SHAPES = {
    "forward": [(4, 128, 4), (2, 256, 4), (8, 64, 4), (2, 128, 2), (1, 128, 1), (16, 32, 4),
                (2, 128, 4), (1, 256, 4), (4, 64, 4), (1, 128, 2), (2, 32, 1),
                (8, 128, 4), (4, 256, 4), (4, 64, 1)],
    # persistent: small tiles, many programs, the loop over tiles amortising the rest. One or two
    # warps: the (ROWS, ROWS) dalpha dot is too small to split across more, so each further warp
    # holds a replica of its operands (4 warps, 512 pixels: 252 registers).
    "backward": [(1, 128, 1), (2, 64, 1), (4, 32, 1),
                 (1, 64, 1), (2, 32, 1), (1, 128, 2), (2, 64, 2),
                 (2, 128, 1), (1, 256, 1), (4, 64, 1)],
}
# (BLOCK, num_warps) over the flattened N*D of one task; K_P layers per pixel
_LAYER_SHAPES = [(1024, 4), (2048, 8), (512, 2), (2048, 4), (4096, 8), (512, 4), (256, 2)]
# (BLOCK_A, BLOCK_B, BLOCK_R, num_stages, num_warps)
_ORTHO_SHAPES = [(64, 64, 32, 3, 4), (128, 128, 32, 3, 8), (64, 64, 64, 3, 4), (128, 64, 32, 3, 4),
                 (32, 32, 32, 2, 4)]

# Bytes of one (rows x pixels) tile each thread may hold. Layer forward holds only x and the
# output; layer backward holds x, dout, dlayers and the dbeta accumulator.
_TILE_BYTES_PER_THREAD = {"alpha_forward": 64, "alpha_backward": 64, "layer_forward": 128, "layer_backward": 64}


def _alpha_configs(direction: str) -> Candidates:
    return (triton.Config({"BLOCK_N": 16, "BLOCK_D": 16}, num_warps=4),
            [triton.Config({"BLOCK_N": n, "BLOCK_D": c}, num_warps=w, num_stages=1)
             for n, c, w in _ALPHA_SHAPES[direction]])


def _layer_configs() -> Candidates:
    return (triton.Config({"BLOCK": 64}, num_warps=4),
            [triton.Config({"BLOCK": b}, num_warps=w, num_stages=1) for b, w in _LAYER_SHAPES])


def _ortho_configs() -> Candidates:
    return (triton.Config({"BLOCK_A": 16, "BLOCK_B": 16, "BLOCK_R": 16}, num_warps=4),
            [triton.Config({"BLOCK_A": a, "BLOCK_B": b, "BLOCK_R": r}, num_stages=s, num_warps=w)
             for a, b, r, s, w in _ORTHO_SHAPES])


def fits_shared_memory(config, element_bytes: int) -> bool:
    """The penalty's prune (_prune_shared) keeps the candidates that fit. Only the penalty stages
    operands in shared memory (both dot tiles, per K step); the mixing kernels pass a tile of a
    few KiB through it for their dots, never near the limit."""
    kw = config.kwargs
    if "BLOCK_R" in kw:
        per_stage = kw["BLOCK_A"] * kw["BLOCK_R"] + kw["BLOCK_R"] * kw["BLOCK_B"]
        return config.num_stages * per_stage * element_bytes <= _SHARED_BUDGET
    return True


def _pixels(config) -> int:
    kw = config.kwargs
    return kw["BLOCK_N"] * kw["BLOCK_D"] if "BLOCK_D" in kw else kw["BLOCK"]


def _prune_tiles(budget: str, rows_key: str, min_elements: int = 0):
    """early_config_prune for the mixing kernels: the candidates whose (rows x pixels) tile takes at
    most the budget's bytes per thread, rows = MS_P or K_P from the launch's constexpr (the
    smallest such tile if none does). Tiles under min_elements are never valid: the alpha
    kernels' dots need rows * pixels >= 16 * 16."""
    def prune(configs, named_args, **kwargs):
        rows = triton.next_power_of_2(kwargs[rows_key])
        element_bytes = named_args["layers_ptr" if "layers_ptr" in named_args else "h_ptr"].element_size()

        def tile_bytes(c):
            return rows * _pixels(c) * element_bytes / (32 * c.num_warps)
        valid = [c for c in configs if rows * _pixels(c) >= min_elements]
        kept = [c for c in valid if tile_bytes(c) <= _TILE_BYTES_PER_THREAD[budget]]
        return kept or [min(valid, key=tile_bytes)]
    return prune


def _prune_shared(configs, named_args, **kwargs):
    kept = [c for c in configs if fits_shared_memory(c, named_args["w_ptr"].element_size())]
    return kept or configs[-1:]


# ---------------------------------------------------------------------------------------------
# Alpha mixing

@triton.jit
def _chunk_tile(tile, N, d, S, MS: tl.constexpr, INT64: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Element offsets and mask (MS_P, BLOCK_N, BLOCK_D) of tile `tile` (column tiles fastest) of
    every chunk of a contiguous (M, N, S*d) tensor; chunk i = m*S + s starts at m*N*D + s*d."""
    MS_P: tl.constexpr = _pow2(MS)
    tiles_d = tl.cdiv(d, BLOCK_D)
    offs_n = (tile // tiles_d) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = (tile % tiles_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    chunk = tl.arange(0, MS_P)
    if INT64:
        offs_n = offs_n.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
        chunk = chunk.to(tl.int64)
    D = S * d
    start = (chunk // S) * N * D + (chunk % S) * d
    offs = start[:, None, None] + offs_n[None, :, None] * D + offs_c[None, None, :]
    mask = (chunk < MS)[:, None, None] & (offs_n < N)[None, :, None] & (offs_c < d)[None, None, :]
    return offs, mask


@triton.jit
def _mixing_matrix(alpha_ptr, MS: tl.constexpr, TRANSPOSE: tl.constexpr):
    """alpha (or alphaᵀ) ⊗ I_G on the grouped rows (ROWS, ROWS), fp32: entry (i*G + g, j*G + g') is
    alpha[i, j] where g == g' (a pixel group mixes only with itself), 0 off (MS, MS)."""
    MS_P: tl.constexpr = _pow2(MS)
    G: tl.constexpr = _pixel_groups(MS_P)
    rows = tl.arange(0, MS_P * G)[:, None]
    cols = tl.arange(0, MS_P * G)[None, :]
    i = rows // G
    j = cols // G
    if TRANSPOSE:
        offs = j * MS + i
    else:
        offs = i * MS + j
    return tl.load(alpha_ptr + offs, mask=(rows % G == cols % G) & (i < MS) & (j < MS), other=0.0)


@triton.jit
def _mix(w, x, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """w (ROWS, ROWS) fp32 @ x (ROWS, PIXELS) in fp32, on tensor cores. For 16-bit x, w is split in
    x's dtype as w_hi + w_lo: two dots with exact products and fp32 accumulation carry w to about
    16 (bf16) or 22 (fp16) bits, where rounding w once would cost more than the output's own
    rounding (fp16 x: alpha must be within fp16's range). fp32 x: one IEEE dot."""
    acc = tl.zeros((w.shape[0], x.shape[1]), dtype=tl.float32)
    if x.dtype == tl.float32:
        return _dot(w, x, acc, PRECISION, UPCAST)
    w_hi = w.to(x.dtype)
    w_lo = (w - w_hi.to(tl.float32)).to(x.dtype)
    return _dot(w_lo, x, _dot(w_hi, x, acc, PRECISION, UPCAST), PRECISION, UPCAST)


# Keys: the model's sizes only (d, MS; K; r, C): the rows (batch x length) are no key.
@autotune(_alpha_configs("forward"), key=["d", "MS"], prune=_prune_tiles("alpha_forward", "MS", 256))
@triton.jit
def _alpha_mix_forward_kernel(h_ptr, alpha_ptr, out_ptr, N, d, S, MS: tl.constexpr, INT64: tl.constexpr,
                              PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out chunk i (N, d) = Σ_j alpha[i, j] · h chunk j, for one (BLOCK_N, BLOCK_D) tile of all
    MS chunks. Grid: (row tiles × column tiles,)."""
    MS_P: tl.constexpr = _pow2(MS)
    ROWS: tl.constexpr = MS_P * _pixel_groups(MS_P)
    offs, mask = _chunk_tile(tl.program_id(0), N, d, S, MS, INT64, BLOCK_N, BLOCK_D)
    x = tl.load(h_ptr + offs, mask=mask, other=0.0)
    out = _mix(_mixing_matrix(alpha_ptr, MS, False), tl.reshape(x, (ROWS, BLOCK_N * BLOCK_D * MS_P // ROWS)),
               PRECISION, UPCAST)
    tl.store(out_ptr + offs, tl.reshape(out, (MS_P, BLOCK_N, BLOCK_D)).to(out_ptr.dtype.element_ty), mask=mask)


@autotune(_alpha_configs("backward"), key=["d", "MS"], prune=_prune_tiles("alpha_backward", "MS", 256))
@triton.jit
def _alpha_mix_backward_kernel(dout_ptr, h_ptr, alpha_ptr, dh_ptr, part_ptr, N, d, S, MS: tl.constexpr,
                               INT64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dh chunk j = Σ_i alpha[i, j] · dout chunk i for every tile this program visits, and its
    partial dalpha[i, j] = Σ dout_i ⊙ h_j over those tiles, stored at part[pid] (MS, MS).
    Grid: (P,) persistent; program pid visits tiles pid, pid + P, ..."""
    MS_P: tl.constexpr = _pow2(MS)
    G: tl.constexpr = _pixel_groups(MS_P)
    ROWS: tl.constexpr = MS_P * G
    PIXELS: tl.constexpr = BLOCK_N * BLOCK_D // G
    pid = tl.program_id(0)
    mixing_t = _mixing_matrix(alpha_ptr, MS, True)
    acc = tl.zeros((ROWS, ROWS), dtype=tl.float32)
    for tile in range(pid, tl.cdiv(N, BLOCK_N) * tl.cdiv(d, BLOCK_D), tl.num_programs(0)):
        offs, mask = _chunk_tile(tile, N, d, S, MS, INT64, BLOCK_N, BLOCK_D)
        dout = tl.reshape(tl.load(dout_ptr + offs, mask=mask, other=0.0), (ROWS, PIXELS))
        dh = _mix(mixing_t, dout, PRECISION, UPCAST)
        tl.store(dh_ptr + offs, tl.reshape(dh, (MS_P, BLOCK_N, BLOCK_D)).to(dh_ptr.dtype.element_ty), mask=mask)
        x = tl.reshape(tl.load(h_ptr + offs, mask=mask, other=0.0), (ROWS, PIXELS))
        acc = _dot(dout, tl.trans(x), acc, PRECISION, UPCAST)
    # dalpha[i, j] = Σ_g acc[i*G + g, j*G + g]: the diagonal blocks of the pixel groups
    blocks = tl.reshape(acc, (MS_P, G, MS_P, G))
    same = tl.arange(0, G)[:, None] == tl.arange(0, G)[None, :]
    dalpha = tl.sum(tl.sum(tl.where(same[None, :, None, :], blocks, 0.0), axis=3), axis=1)
    rows = tl.arange(0, MS_P)[:, None]
    cols = tl.arange(0, MS_P)[None, :]
    tl.store(part_ptr + pid * MS * MS + rows * MS + cols, dalpha, mask=(rows < MS) & (cols < MS))


# ---------------------------------------------------------------------------------------------
# Layer mixing. layers (K, M, L) and out / dout (M, L) contiguous; beta (M, K) fp32.

@triton.jit
def _layer_tile(tile, m, M, L, K: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    """(task offsets (BLOCK,), layer offsets (K_P, BLOCK), their masks) of tile `tile` of task m."""
    K_P: tl.constexpr = _pow2(K)
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    k = tl.arange(0, K_P)
    if INT64:
        offs = offs.to(tl.int64)
        k = k.to(tl.int64)
        m = m.to(tl.int64)
    in_row = offs < L
    return m * L + offs, in_row, (k * M + m)[:, None] * L + offs[None, :], (k < K)[:, None] & in_row[None, :]


@autotune(_layer_configs(), key=["K"], prune=_prune_tiles("layer_forward", "K"))
@triton.jit
def _layer_mix_forward_kernel(layers_ptr, beta_ptr, out_ptr, M, L, K: tl.constexpr, INT64: tl.constexpr,
                              BLOCK: tl.constexpr):
    """out[m] tile = Σ_k beta[m, k] · layers[k, m] tile. Grid: (tiles of L, M)."""
    K_P: tl.constexpr = _pow2(K)
    m = tl.program_id(1)
    offs, in_row, offs_k, mask_k = _layer_tile(tl.program_id(0), m, M, L, K, INT64, BLOCK)
    k = tl.arange(0, K_P)
    beta = tl.load(beta_ptr + m * K + k, mask=k < K, other=0.0)
    x = tl.load(layers_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    out = tl.sum(beta[:, None] * x, axis=0)          # the layer axis is within each thread
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=in_row)


@autotune(_layer_configs(), key=["K"], prune=_prune_tiles("layer_backward", "K"))
@triton.jit
def _layer_mix_backward_kernel(dout_ptr, layers_ptr, beta_ptr, dlayers_ptr, part_ptr, M, L, K: tl.constexpr,
                               INT64: tl.constexpr, BLOCK: tl.constexpr):
    """dlayers[k, m] = beta[m, k] · dout[m] on every tile this program visits of task m, and the
    partial dbeta[m, k] = Σ dout[m] ⊙ layers[k, m] over them, stored at part[m, pid] (K,). The
    products are summed elementwise in registers across tiles and reduced across the program
    once. Grid: (P, M) persistent; program pid visits tiles pid, pid + P, ..."""
    K_P: tl.constexpr = _pow2(K)
    pid = tl.program_id(0)
    m = tl.program_id(1)
    k = tl.arange(0, K_P)
    beta = tl.load(beta_ptr + m * K + k, mask=k < K, other=0.0)
    acc = tl.zeros((K_P, BLOCK), dtype=tl.float32)
    for tile in range(pid, tl.cdiv(L, BLOCK), tl.num_programs(0)):
        offs, in_row, offs_k, mask_k = _layer_tile(tile, m, M, L, K, INT64, BLOCK)
        dout = tl.load(dout_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
        tl.store(dlayers_ptr + offs_k, (beta[:, None] * dout[None, :]).to(dlayers_ptr.dtype.element_ty), mask=mask_k)
        x = tl.load(layers_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        acc += x * dout[None, :]
    tl.store(part_ptr + (m * tl.num_programs(0) + pid) * K + k, tl.sum(acc, axis=1), mask=k < K)


# ---------------------------------------------------------------------------------------------
# Orthogonality penalty. weight (R, C) contiguous, r = R / S rows per block.

@triton.jit
def _pair(p, S):
    """The p-th pair (s, t), s < t, in the order (0, 1), (0, 2), .., (0, S-1), (1, 2), ..: s is the
    number of first indices q >= 1 whose pairs start at or before p (start(q) = q(2S-q-1)/2)."""
    s = p * 0
    for q in range(1, S):
        s += (q * (2 * S - q - 1) // 2 <= p).to(s.dtype)
    return s, p - s * (2 * S - s - 1) // 2 + s + 1


@autotune(_ortho_configs(), key=["r", "C", "PRECISION"], prune=_prune_shared)
@triton.jit
def _orthogonality_forward_kernel(w_ptr, part_ptr, r, C, S, INT64: tl.constexpr, PRECISION: tl.constexpr,
                                  UPCAST: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                                  BLOCK_R: tl.constexpr):
    """part[pid] = Σ of the squared entries of the (BLOCK_A, BLOCK_B) tiles of G_sᵀ G_t (s < t) this
    program visits; a tile is a tl.dot over the r rows and is squared in registers, never stored.
    Grid: (P,) persistent over (pair, tile) units, pid, pid + P, ..."""
    pid = tl.program_id(0)
    tiles_b = tl.cdiv(C, BLOCK_B)
    per_pair = tl.cdiv(C, BLOCK_A) * tiles_b
    squares = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for unit in range(pid, S * (S - 1) // 2 * per_pair, tl.num_programs(0)):
        s, t = _pair(unit // per_pair, S)
        offs_a = (unit % per_pair // tiles_b) * BLOCK_A + tl.arange(0, BLOCK_A)
        offs_b = (unit % per_pair % tiles_b) * BLOCK_B + tl.arange(0, BLOCK_B)
        if INT64:
            s = s.to(tl.int64)
            t = t.to(tl.int64)
            offs_a = offs_a.to(tl.int64)
            offs_b = offs_b.to(tl.int64)
        acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
        for k0 in range(0, r, BLOCK_R):
            offs_k = k0 + tl.arange(0, BLOCK_R)
            a = tl.load(w_ptr + (s * r + offs_k)[None, :] * C + offs_a[:, None],           # G_sᵀ (BLOCK_A, BLOCK_R)
                        mask=(offs_k[None, :] < r) & (offs_a[:, None] < C), other=0.0)
            b = tl.load(w_ptr + (t * r + offs_k)[:, None] * C + offs_b[None, :],           # G_t (BLOCK_R, BLOCK_B)
                        mask=(offs_k[:, None] < r) & (offs_b[None, :] < C), other=0.0)
            acc = _dot(a, b, acc, PRECISION, UPCAST)
        squares += acc * acc
    tl.store(part_ptr + pid, tl.sum(tl.sum(squares, axis=1), axis=0))


# ---------------------------------------------------------------------------------------------
# Launch helpers

# Persistent programs per SM. The mixing backward kernels run small one- or two-warp programs,
# ~18 resident per SM: many more programs than that keep the last wave short (equal programs
# finish in waves), and their partials (MS*MS or K floats each, ~4 MiB for the H100 target) stay
# under 1% of the traffic. The penalty runs big dot tiles, a couple per SM.
_PROGRAMS_PER_SM = {"mixing": 128, "penalty": 2}


def _num_programs(device: torch.device, work: int, kind: str, share: int = 1) -> int:
    """Programs of a persistent launch, per each of `share` independent rows of its grid: at most
    `work` (the tiles of the smallest config, so none idles without need) and together at most
    _PROGRAMS_PER_SM[kind] per SM."""
    return persistent_programs(device, work, _PROGRAMS_PER_SM[kind], share)


def _min_block(configs, key: str) -> int:
    return min(c.kwargs[key] for c in configs)


def alpha_mix_forward(h: torch.Tensor, alpha: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    """h (M, N, D), D = S*d, alpha (MS, MS) -> out (M, N, D) in h's dtype, out chunk i = Σ_j
    alpha[i, j] · chunk j (chunk m*S + s = h[m, :, s*d:(s+1)*d]), accumulated in fp32."""
    M, N, D = h.shape
    S = num_subspaces
    h = h.contiguous()
    out = torch.empty_like(h)
    if out.numel() == 0:
        return out
    alpha = alpha.to(torch.float32).contiguous()
    d = D // S
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(d, meta["BLOCK_D"]),)  # noqa: E731
    _alpha_mix_forward_kernel[grid](h, alpha, out, N, d, S, MS=M * S, INT64=_int64(h), PRECISION="ieee",
                                    UPCAST=_upcast(h.dtype))
    return out


def alpha_mix_backward(dout: torch.Tensor, h: torch.Tensor, alpha: torch.Tensor,
                       num_subspaces: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """dout, h (M, N, D), alpha (MS, MS) -> (dh (M, N, D) in h's dtype, dh chunk j = Σ_i alpha[i, j]
    · dout chunk i; dalpha (MS, MS) fp32, dalpha[i, j] = Σ dout chunk i ⊙ chunk j), one pass."""
    M, N, D = h.shape
    S = num_subspaces
    MS = M * S
    h = h.contiguous()
    dout = dout.to(h.dtype).contiguous()
    dh = torch.empty_like(h)
    if h.numel() == 0:
        return dh, torch.zeros((MS, MS), device=h.device, dtype=torch.float32)
    alpha = alpha.to(torch.float32).contiguous()
    d = D // S
    configs = _alpha_mix_backward_kernel.configs
    programs = _num_programs(h.device, triton.cdiv(N, _min_block(configs, "BLOCK_N"))
                             * triton.cdiv(d, _min_block(configs, "BLOCK_D")), "mixing")
    partials = torch.empty((programs, MS, MS), device=h.device, dtype=torch.float32)
    _alpha_mix_backward_kernel[(programs,)](dout, h, alpha, dh, partials, N, d, S, MS=MS, INT64=_int64(h),
                                            PRECISION="ieee", UPCAST=_upcast(h.dtype))
    return dh, partials.sum(0)


def layer_mix_forward(layers: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """layers (K, M, N, D), beta (M, K) -> out (M, N, D) in layers' dtype, out[m] = Σ_k beta[m, k] ·
    layers[k, m], accumulated in fp32."""
    K, M = layers.shape[:2]
    layers = layers.contiguous()
    out = torch.empty(layers.shape[1:], device=layers.device, dtype=layers.dtype)
    if out.numel() == 0:
        return out
    if K == 0:
        return out.zero_()
    L = out[0].numel()
    beta = beta.to(torch.float32).contiguous()
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK"]), M)  # noqa: E731
    _layer_mix_forward_kernel[grid](layers, beta, out, M, L, K=K, INT64=_int64(layers))
    return out


def layer_mix_backward(dout: torch.Tensor, layers: torch.Tensor,
                       beta: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """dout (M, N, D), layers (K, M, N, D), beta (M, K) -> (dlayers (K, M, N, D) in layers' dtype,
    dlayers[k, m] = beta[m, k] · dout[m]; dbeta (M, K) fp32, dbeta[m, k] = Σ dout[m] ⊙ layers[k, m]),
    one pass."""
    K, M = layers.shape[:2]
    layers = layers.contiguous()
    dout = dout.to(layers.dtype).contiguous()
    dlayers = torch.empty_like(layers)
    L = layers[0, 0].numel() if K * M > 0 else 0
    if dlayers.numel() == 0:
        return dlayers, torch.zeros((M, K), device=layers.device, dtype=torch.float32)
    beta = beta.to(torch.float32).contiguous()
    programs = _num_programs(layers.device, triton.cdiv(L, _min_block(_layer_mix_backward_kernel.configs, "BLOCK")),
                             "mixing", share=M)
    partials = torch.empty((M, programs, K), device=layers.device, dtype=torch.float32)
    _layer_mix_backward_kernel[(programs, M)](dout, layers, beta, dlayers, partials, M, L, K=K,
                                              INT64=_int64(layers))
    return dlayers, partials.sum(1)


def orthogonality_penalty_forward(weight: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    """weight (R, C), rows split in S blocks G_s of r = R/S rows -> Σ_{s<t} ‖G_sᵀ G_t‖²_F, a 0-d
    fp32 tensor; products accumulate in fp32 (fp32 inputs: IEEE, not TF32)."""
    R, C = weight.shape
    S = num_subspaces
    pairs = S * (S - 1) // 2
    if pairs == 0 or R == 0 or C == 0:
        return torch.zeros((), device=weight.device, dtype=torch.float32)
    weight = weight.contiguous()
    configs = _orthogonality_forward_kernel.configs
    programs = _num_programs(weight.device, pairs * triton.cdiv(C, _min_block(configs, "BLOCK_A"))
                             * triton.cdiv(C, _min_block(configs, "BLOCK_B")), "penalty")
    partials = torch.empty((programs,), device=weight.device, dtype=torch.float32)
    _orthogonality_forward_kernel[(programs,)](weight, partials, R // S, C, S, INT64=_int64(weight),
                                               PRECISION="ieee", UPCAST=_upcast(weight.dtype))
    return partials.sum()


def orthogonality_penalty_backward(weight: torch.Tensor, num_subspaces: int,
                                   grad: Union[torch.Tensor, float]) -> torch.Tensor:
    """weight (R, C), grad (scalar) -> dweight (R, C) in weight's dtype: for each pair term
    ‖AᵀB‖²_F, d/dA = 2 B Bᵀ A and d/dB = 2 A Aᵀ B, so dG_s = 2 Σ_{t≠s} G_t G_tᵀ G_s, times grad.

    Not a kernel: two batched fp32 torch matmuls (the penalty is small work next to the layers it
    regularises, and torch's TF32 switch applies to them as to any fp32 matmul), associated so
    the intermediate is the smaller of (r, r) and (C, C)."""
    R, C = weight.shape
    S = num_subspaces
    x = weight.to(torch.float32).reshape(S, R // S, C)
    if S < 2 or x.numel() == 0:
        return torch.zeros_like(weight)
    if R // S <= C:
        gram = x @ x.transpose(1, 2)                                   # (S, r, r): G_t G_tᵀ
        dx = (gram.sum(0, keepdim=True) - gram) @ x                     # Σ_{t≠s} G_t G_tᵀ G_s
    else:
        cross = x.transpose(1, 2).unsqueeze(1) @ x.unsqueeze(0)         # (S, S, C, C): [t, s] = G_tᵀ G_s
        cross = cross * (1 - torch.eye(S, device=x.device)).view(S, S, 1, 1)
        dx = torch.einsum("trc,tsce->sre", x, cross)                   # Σ_{t≠s} G_t (G_tᵀ G_s)
    return (dx * (2 * grad)).reshape(R, C).to(weight.dtype)
