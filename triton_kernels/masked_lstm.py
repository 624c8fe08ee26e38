"""Triton kernels for the grouped masked LSTM: G groups (task × direction) of one shared LSTM,
each with its own weight set and bit-packed mask, run in the same launches.

Shapes: G groups, S weight sets, P masks, T steps (every sequence array in time order: a reverse
group walks each row's first lengths[g, b] steps backwards, like a packed sequence, by indexing,
so nothing is ever reversed in memory), B batch rows, H hidden, gates in torch.nn.LSTM order
(i, f, g, o). ``weight_index[g]``
picks group g's weight set, ``mask_index[g]`` its mask (-1: unmasked); both are contiguous int64.
Masks are read bit-packed and applied to weight tiles in registers (as in masked_gemm.py), so
``W ⊙ M`` never exists in memory.

The recurrences below run one launch per step for all groups; masked_lstm_sequence.py runs the
whole sequence in one launch where the hidden size allows, and forward_recurrence /
backward_recurrence pick between them (MTLFAST_LSTM_MODE). Each step launch reads the state the previous
one wrote and writes the other of two buffers (ping-pong), so no launch reads what it writes and
a step needs no grid-wide synchronisation. Launch helpers allocate the outputs; autograd and the
step loop's callers live in mtlfast/ops/masked_lstm.py.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from mtlfast.triton_kernels import masked_gemm as _gemm
from mtlfast.triton_kernels.masked_gemm import (  # noqa: F401  (the grouped GEMMs are part of this interface)
    Candidates, _dot, _group_mask, _int64, _keep_bits_kn, _keep_bits_nk, _mask_args, _precision, _upcast, autotune,
    grouped_masked_matmul, grouped_masked_matmul_grad_input, grouped_masked_matmul_grad_weight, size_bucket)

# ---------------------------------------------------------------------------------------------
# Autotune candidates of the per-step kernels, (BLOCK_B, BLOCK_H, BLOCK_K or BLOCK_N, stages, warps).
#
# A step is a small GEMM (B × H by H × 4H) on the critical path of a sequential loop, so what
# matters is latency, not tensor-core throughput:
# - hidden 200 / batch 10 (G a few groups): the whole step's work is ~0.2 MFLOP per group and the
#   launch itself (~3-5 µs) dominates. Small hidden tiles give 7-13 programs per group, each with
#   a short serial K loop and few warps, so the step ends as soon as possible; BLOCK_B = 16 is the
#   smallest batch tile tl.dot takes (mma.sync m16; wgmma's m64 would pad the batch of 10 6x).
#   H = 200 rows are not 16-aligned, so weight loads are scalar and cannot go through cp.async:
#   pipelined tiles wait in registers, and 64-deep K tiles spill (ptxas stack 750-1400 B on sm_90
#   for the conll03 launch in tests/triton_aot.py), 32-deep ones with 2 stages do not (16 B for
#   the 32 x 32 tile).
# - hidden 1024 / batch 64: each step reads all 4H·H weights of every group (8 MiB per group in
#   bf16), so it is bound by weight bandwidth. BLOCK_B = 64 covers the whole batch, so every
#   weight is read once per step, and 32-wide hidden tiles give 32 programs per group (~132 SMs
#   busy from G = 4 on), with 3-4 stages of 64-deep K tiles (aligned: cp.async) in flight; no
#   candidate spills there.
_FORWARD_STEP_SHAPES = [(16, 16, 32, 2, 2), (16, 32, 32, 2, 4), (32, 32, 32, 2, 4), (64, 32, 64, 4, 4),
                        (64, 64, 64, 3, 8), (64, 32, 128, 3, 4)]
# The backward step reduces over 4H rows of the weight instead of H columns: the hidden tile is
# the mask word axis there (BLOCK_H a multiple of 32), and the reduction is 4x longer, so deeper
# reduction tiles pay off sooner; it holds one accumulator instead of four, so 64-deep tiles fit
# in registers even unaligned with batch tiles up to 32 (64-row ones spill ~500 B at H = 200, none
# at H = 1024).
_BACKWARD_STEP_SHAPES = [(16, 32, 64, 2, 4), (16, 32, 128, 3, 4), (32, 32, 64, 2, 4), (64, 32, 64, 4, 4),
                         (64, 64, 64, 3, 8), (64, 32, 128, 3, 4)]


def _step_configs(reduction: str, shapes) -> Candidates:
    """kwargs in (rows, cols, reduction) order, like masked_gemm's configs."""
    return (triton.Config({"BLOCK_B": 16, "BLOCK_H": 32, reduction: 32}, num_warps=4),
            [triton.Config({"BLOCK_B": b, "BLOCK_H": h, reduction: r}, num_stages=s, num_warps=w)
             for b, h, r, s, w in shapes])


def fits_shared_memory(config, element_bytes: int) -> bool:
    """masked_gemm's estimate; the forward step (BLOCK_H with BLOCK_K) stages one h tile and
    four weight tiles (one per gate) per K step. _prune_step keeps the candidates that fit (and
    tests/triton_aot.py compiles those)."""
    kw = config.kwargs
    if "BLOCK_H" in kw and "BLOCK_K" in kw:
        per_stage = kw["BLOCK_B"] * kw["BLOCK_K"] + 4 * kw["BLOCK_K"] * kw["BLOCK_H"]
        return config.num_stages * per_stage * element_bytes <= _gemm._SHARED_BUDGET
    return _gemm.fits_shared_memory(config, element_bytes)


def _prune_step(configs, named_args, **kwargs):
    # w_ptr comes first in both step kernels: the dot operands have the weight's dtype.
    element_bytes = named_args["w_ptr"].element_size()
    kept = [c for c in configs if fits_shared_memory(c, element_bytes)]
    return kept or configs[-1:]


# ---------------------------------------------------------------------------------------------
# Shared jit helpers

@triton.jit
def _time_of(step, length, rev):
    """The time slot step `step` of rows with `length` reads and writes: backwards within the
    length for a reverse group; padded steps map to themselves (a permutation of the slots)."""
    return tl.where(rev & (step < length), length - 1 - step, step)


@triton.jit
def _tanh(x):
    # libdevice.tanh does not exist under the interpreter; exp of a non-positive argument cannot
    # overflow, and the absolute error stays at fp32 rounding level near 0.
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _activate(acc_i, acc_f, acc_g, acc_o, x_tile, x_gate, tile_ok):
    """The four gates of a tile from its recurrent dot products and xproj (x_tile: gate i's
    pointers, x_gate: the offset between gates)."""
    i = tl.sigmoid(acc_i + tl.load(x_tile, mask=tile_ok, other=0.0).to(tl.float32))
    f = tl.sigmoid(acc_f + tl.load(x_tile + x_gate, mask=tile_ok, other=0.0).to(tl.float32))
    z = _tanh(acc_g + tl.load(x_tile + 2 * x_gate, mask=tile_ok, other=0.0).to(tl.float32))
    o = tl.sigmoid(acc_o + tl.load(x_tile + 3 * x_gate, mask=tile_ok, other=0.0).to(tl.float32))
    return i, f, z, o


@triton.jit
def _store_gates(ptr, gate, H, i, f, z, o, active, tile_ok):
    """A tile's four gate values (or their gradients) at gate, gate + H, ..., 0 for inactive rows."""
    tl.store(ptr + gate, tl.where(active, i, 0.0).to(ptr.dtype.element_ty), mask=tile_ok)
    tl.store(ptr + gate + H, tl.where(active, f, 0.0).to(ptr.dtype.element_ty), mask=tile_ok)
    tl.store(ptr + gate + 2 * H, tl.where(active, z, 0.0).to(ptr.dtype.element_ty), mask=tile_ok)
    tl.store(ptr + gate + 3 * H, tl.where(active, o, 0.0).to(ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _cell_backward(dh_tot, dc, i, f, z, o, tc, c_prev):
    """The cell's backward for a tile: (d_i, d_f, d_z, d_o) w.r.t. the pre-activations and the dc
    passed to the previous step, from the total dh, the carried dc, the gates and tanh(c)."""
    dc_tot = dc + dh_tot * o * (1.0 - tc * tc)
    return (dc_tot * z * i * (1.0 - i), dc_tot * c_prev * f * (1.0 - f), dc_tot * i * (1.0 - z * z),
            dh_tot * tc * o * (1.0 - o), dc_tot * f)


# ---------------------------------------------------------------------------------------------
# Recurrence steps. Grid: (batch tiles × hidden tiles, G), batch tiles fastest so the programs
# that read the same weight tiles run together and share them in L2. State buffers (G, B, H),
# hs / cells (G, T, B, H) and gates / dgates (G, T, B, 4H) are contiguous (the helpers make them).

@triton.jit
def _gate_dot(hp, w_g, stride_wn, stride_wk, bits_g, stride_bn, mask_rows, unmasked, q, H, k0, offs_k, offs_h,
              acc, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
              BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """acc + hp (BLOCK_B, BLOCK_K) @ (W ⊙ M)[q*H + offs_h, offs_k]^T for gate q."""
    w = tl.load(w_g + (q * H + offs_h)[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                mask=(offs_h[None, :] < H) & (offs_k[:, None] < H), other=0.0)      # (BLOCK_K, BLOCK_H)
    if HAS_MASK:
        keep = _keep_bits_kn(bits_g + q * H * stride_bn, stride_bn, k0, offs_h, mask_rows, H, BLOCK_K, BLOCK_H)
        w = tl.where(keep | unmasked, w, tl.zeros_like(w))
    return _dot(hp, w, acc, PRECISION, UPCAST)


# Key: the batch rows by size_bucket (a group's rows vary with the batch and the task mix), H and
# the dtypes are the model's; the length is no key (one launch per step).
@autotune(_step_configs("BLOCK_K", _FORWARD_STEP_SHAPES), key=["B_BUCKET", "H", "PRECISION"], prune=_prune_step)
@triton.jit(do_not_specialize=["step", "B_BUCKET"])
def _forward_step_kernel(w_ptr, stride_ws, stride_wn, stride_wk, wi_ptr,
                         bits_ptr, stride_bp, stride_bn, mi_ptr,
                         xproj_ptr, stride_xg, stride_xt, stride_xb, stride_xn,
                         len_ptr, stride_lg, stride_lb, rev_ptr,
                         h_in_ptr, c_in_ptr, h_out_ptr, c_out_ptr,
                         hs_ptr, cells_ptr, gates_ptr, hprev_ptr, step, T, B, H, B_BUCKET,
                         INT64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                         HAS_MASK: tl.constexpr = True):
    """One step for a (batch, hidden) tile of one group: the four gate pre-activations of the tile
    as masked dots over K = H, plus xproj, then the cell update, all in registers; the activated
    gates are stored once (for backward), never re-read. Each row reads and writes its own time
    slot (reverse groups); h_prev keeps the h that entered (for the weight gradient)."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    tiles_b = tl.cdiv(B, BLOCK_B)
    offs_b = (pid % tiles_b) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = (pid // tiles_b) * BLOCK_H + tl.arange(0, BLOCK_H)
    if INT64:
        g = g.to(tl.int64)
        step = step.to(tl.int64)
        offs_b = offs_b.to(tl.int64)
        offs_h = offs_h.to(tl.int64)
    row_ok = offs_b < B
    tile_ok = row_ok[:, None] & (offs_h[None, :] < H)
    w_g = w_ptr + tl.load(wi_ptr + g) * stride_ws
    mask_rows = H
    unmasked = False
    bits_g = bits_ptr
    if HAS_MASK:
        bits_g, mask_rows, unmasked = _group_mask(bits_ptr, stride_bp, mi_ptr, g, H)

    # h_prev is rounded to the weight's dtype for the dot (as cuDNN does), accumulation in fp32.
    h_rows = h_in_ptr + g * B * H + offs_b[:, None] * H
    acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        hp = tl.load(h_rows + offs_k[None, :], mask=row_ok[:, None] & (offs_k[None, :] < H), other=0.0)
        hp = hp.to(tl.float32).to(w_ptr.dtype.element_ty)
        acc_i = _gate_dot(hp, w_g, stride_wn, stride_wk, bits_g, stride_bn, mask_rows, unmasked, 0, H, k0, offs_k,
                          offs_h, acc_i, HAS_MASK, PRECISION, UPCAST, BLOCK_K, BLOCK_H)
        acc_f = _gate_dot(hp, w_g, stride_wn, stride_wk, bits_g, stride_bn, mask_rows, unmasked, 1, H, k0, offs_k,
                          offs_h, acc_f, HAS_MASK, PRECISION, UPCAST, BLOCK_K, BLOCK_H)
        acc_g = _gate_dot(hp, w_g, stride_wn, stride_wk, bits_g, stride_bn, mask_rows, unmasked, 2, H, k0, offs_k,
                          offs_h, acc_g, HAS_MASK, PRECISION, UPCAST, BLOCK_K, BLOCK_H)
        acc_o = _gate_dot(hp, w_g, stride_wn, stride_wk, bits_g, stride_bn, mask_rows, unmasked, 3, H, k0, offs_k,
                          offs_h, acc_o, HAS_MASK, PRECISION, UPCAST, BLOCK_K, BLOCK_H)

    length = tl.load(len_ptr + g * stride_lg + offs_b * stride_lb, mask=row_ok, other=0)
    t_b = _time_of(step, length, tl.load(rev_ptr + g) != 0)[:, None]
    x_tile = xproj_ptr + g * stride_xg + t_b * stride_xt + offs_b[:, None] * stride_xb + offs_h[None, :] * stride_xn
    i, f, z, o = _activate(acc_i, acc_f, acc_g, acc_o, x_tile, H * stride_xn, tile_ok)

    state = g * B * H + offs_b[:, None] * H + offs_h[None, :]
    c_prev = tl.load(c_in_ptr + state, mask=tile_ok, other=0.0).to(tl.float32)
    c = f * c_prev + i * z
    h = o * _tanh(c)
    active = (step < length)[:, None]
    # Inactive rows carry their state; its h is re-read only here (a tile already in L1/L2).
    h_prev = tl.load(h_in_ptr + state, mask=tile_ok, other=0.0).to(tl.float32)
    c = tl.where(active, c, c_prev)
    tl.store(h_out_ptr + state, tl.where(active, h, h_prev).to(h_out_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(c_out_ptr + state, c.to(c_out_ptr.dtype.element_ty), mask=tile_ok)

    seq = ((g * T + t_b) * B + offs_b[:, None]) * H + offs_h[None, :]
    tl.store(hs_ptr + seq, tl.where(active, h, 0.0).to(hs_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(cells_ptr + seq, c.to(cells_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(hprev_ptr + seq, h_prev.to(hprev_ptr.dtype.element_ty), mask=tile_ok)
    gate = ((g * T + t_b) * B + offs_b[:, None]) * (4 * H) + offs_h[None, :]
    _store_gates(gates_ptr, gate, H, i, f, z, o, active, tile_ok)


@autotune(_step_configs("BLOCK_N", _BACKWARD_STEP_SHAPES), key=["B_BUCKET", "H", "PRECISION"], prune=_prune_step)
@triton.jit(do_not_specialize=["step", "B_BUCKET"])
def _backward_step_kernel(w_ptr, stride_ws, stride_wn, stride_wk, wi_ptr,
                          bits_ptr, stride_bp, stride_bn, mi_ptr,
                          dhs_ptr, stride_dg, stride_dt, stride_db, stride_dh,
                          len_ptr, stride_lg, stride_lb, rev_ptr,
                          dh_in_ptr, dc_in_ptr, dh_out_ptr, dc_out_ptr,
                          gates_ptr, cells_ptr, c0_ptr, dgates_ptr, step, T, B, H, B_BUCKET,
                          INT64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                          HAS_MASK: tl.constexpr = True):
    """Backward step `step` (T-1 down to -1) for a (batch, hidden) tile of one group.

    First it completes the dh entering this step: dgates[step+1] @ (W ⊙ M) over all 4H rows for
    rows active at step+1 (that product needs every hidden tile of step+1, so it could not be
    finished by the launch that wrote dgates[step+1]), else the dh the previous launch carried.
    Then the pointwise part of this step writes dgates[step] and the carried dc. Launch -1 only
    completes dh and passes dc through: it produces dh0 and dc0."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    tiles_b = tl.cdiv(B, BLOCK_B)
    offs_b = (pid % tiles_b) * BLOCK_B + tl.arange(0, BLOCK_B)
    h0 = (pid // tiles_b) * BLOCK_H
    offs_h = h0 + tl.arange(0, BLOCK_H)
    if INT64:
        g = g.to(tl.int64)
        step = step.to(tl.int64)
        offs_b = offs_b.to(tl.int64)
        offs_h = offs_h.to(tl.int64)
    row_ok = offs_b < B
    tile_ok = row_ok[:, None] & (offs_h[None, :] < H)
    w_g = w_ptr + tl.load(wi_ptr + g) * stride_ws
    if HAS_MASK:
        bits_g, mask_rows, unmasked = _group_mask(bits_ptr, stride_bp, mi_ptr, g, 4 * H)
    length = tl.load(len_ptr + g * stride_lg + offs_b * stride_lb, mask=row_ok, other=0)
    rev = tl.load(rev_ptr + g) != 0
    state = g * B * H + offs_b[:, None] * H + offs_h[None, :]

    # dgates is 0 at inactive steps, so the dot is 0 for rows inactive at step+1; the row mask
    # only saves their loads (and keeps step+1 = T in bounds).
    next_active = (step + 1 < length) & (step + 1 < T)
    dg_rows = dgates_ptr + ((g * T + _time_of(step + 1, length, rev)[:, None]) * B + offs_b[:, None]) * (4 * H)
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for n0 in range(0, 4 * H, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if INT64:
            offs_n = offs_n.to(tl.int64)
        dg = tl.load(dg_rows + offs_n[None, :], mask=next_active[:, None] & (offs_n[None, :] < 4 * H), other=0.0)
        # rounded to the weight's dtype for the dot, as in forward (and cuDNN)
        dg = dg.to(tl.float32).to(w_ptr.dtype.element_ty)
        w = tl.load(w_g + offs_n[:, None] * stride_wn + offs_h[None, :] * stride_wk,
                    mask=(offs_n[:, None] < 4 * H) & (offs_h[None, :] < H), other=0.0)   # (BLOCK_N, BLOCK_H)
        if HAS_MASK:
            keep = _keep_bits_nk(bits_g, stride_bn, h0, offs_n, mask_rows, H, BLOCK_N, BLOCK_H)
            w = tl.where(keep | unmasked, w, tl.zeros_like(w))
        acc = _dot(dg, w, acc, PRECISION, UPCAST)
    dh_carried = tl.load(dh_in_ptr + state, mask=tile_ok, other=0.0).to(tl.float32)
    dh = tl.where(next_active[:, None], acc, dh_carried)
    dc = tl.load(dc_in_ptr + state, mask=tile_ok, other=0.0).to(tl.float32)

    if step >= 0:
        active = (step < length)[:, None]
        t_b = _time_of(step, length, rev)[:, None]
        seq = ((g * T + t_b) * B + offs_b[:, None]) * H + offs_h[None, :]
        gate = ((g * T + t_b) * B + offs_b[:, None]) * (4 * H) + offs_h[None, :]
        i = tl.load(gates_ptr + gate, mask=tile_ok, other=0.0).to(tl.float32)
        f = tl.load(gates_ptr + gate + H, mask=tile_ok, other=0.0).to(tl.float32)
        z = tl.load(gates_ptr + gate + 2 * H, mask=tile_ok, other=0.0).to(tl.float32)
        o = tl.load(gates_ptr + gate + 3 * H, mask=tile_ok, other=0.0).to(tl.float32)
        tc = _tanh(tl.load(cells_ptr + seq, mask=tile_ok, other=0.0).to(tl.float32))
        if step > 0:
            t_prev = _time_of(step - 1, length, rev)[:, None]
            c_prev = tl.load(cells_ptr + ((g * T + t_prev) * B + offs_b[:, None]) * H + offs_h[None, :], mask=tile_ok,
                             other=0.0).to(tl.float32)
        else:
            c_prev = tl.load(c0_ptr + state, mask=tile_ok, other=0.0).to(tl.float32)
        dh_tot = dh + tl.load(dhs_ptr + g * stride_dg + t_b * stride_dt + offs_b[:, None] * stride_db
                              + offs_h[None, :] * stride_dh, mask=tile_ok, other=0.0).to(tl.float32)
        d_i, d_f, d_z, d_o, dc_prev = _cell_backward(dh_tot, dc, i, f, z, o, tc, c_prev)
        _store_gates(dgates_ptr, gate, H, d_i, d_f, d_z, d_o, active, tile_ok)
        dc = tl.where(active, dc_prev, dc)
    # dh is stored before this step's own dot product is known: the next launch uses it only for
    # rows inactive here, which pass dh through unchanged.
    tl.store(dh_out_ptr + state, dh.to(dh_out_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(dc_out_ptr + state, dc.to(dc_out_ptr.dtype.element_ty), mask=tile_ok)


# ---------------------------------------------------------------------------------------------
# Per-group gradients summed into their weight sets

_SET_SUM_BLOCK = 1024


@triton.jit
def _set_sum_kernel(src_ptr, wi_ptr, out_ptr, G, SIZE, BLOCK: tl.constexpr):
    """out[s, i] = Σ_{g: wi[g] = s} src[g, i], the groups added in index order (deterministic, no
    atomics); a masked load, not a product, so a NaN in one set's groups stays out of the others."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s = tl.program_id(1)
    ok = offs < SIZE
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    row = src_ptr + offs
    for g in range(0, G):
        mine = tl.load(wi_ptr + g) == s
        acc += tl.load(row, mask=ok & mine, other=0.0).to(tl.float32)
        row += SIZE     # pointer arithmetic is 64-bit: no int32 product g * SIZE to overflow
    tl.store(out_ptr + s.to(tl.int64) * SIZE + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def sum_into_sets(grads: torch.Tensor, weight_index: torch.Tensor, num_sets: int,
                  out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """grads (G, ...) fp32, weight_index (G,) int64 in [0, num_sets) -> (num_sets, ...) in one launch,
    summed in fp32 and written in out_dtype (default grads'): a parameter's dtype, so autograd
    need not convert the gradient in another launch."""
    grads = grads.contiguous()
    out = grads.new_empty((num_sets, *grads.shape[1:]), dtype=out_dtype or grads.dtype)
    size = grads.shape[1:].numel()
    if out.numel():         # no groups: every set's sum is 0, which the kernel writes too
        _set_sum_kernel[(triton.cdiv(size, _SET_SUM_BLOCK), num_sets)](grads, weight_index, out, grads.shape[0], size,
                                                                      BLOCK=_SET_SUM_BLOCK)
    return out


# ---------------------------------------------------------------------------------------------
# Launch helpers

# The sequence kernels import this module's jit helpers; imported here, after them
from mtlfast.triton_kernels import masked_lstm_sequence as _sequence  # noqa: E402

def _step_grid(B: int, H: int, G: int):
    return lambda meta: (triton.cdiv(B, meta["BLOCK_B"]) * triton.cdiv(H, meta["BLOCK_H"]), G)


def _weight_args(w_hh: torch.Tensor, weight_index: torch.Tensor, bits_hh: Optional[torch.Tensor],
                 mask_index: torch.Tensor) -> tuple:
    """The leading arguments every recurrence kernel takes: the weight, its sets and masks."""
    bits_arg, stride_bp, stride_bn = _mask_args(bits_hh, weight_index)
    return (w_hh, w_hh.stride(0), w_hh.stride(1), w_hh.stride(2), weight_index, bits_arg, stride_bp, stride_bn,
            mask_index)


def _flags(w_hh: torch.Tensor, bits_hh: Optional[torch.Tensor], *tensors: torch.Tensor) -> dict:
    return dict(INT64=_int64(w_hh, bits_hh, *tensors), PRECISION=_precision(w_hh.dtype),
                UPCAST=_upcast(w_hh.dtype), HAS_MASK=bits_hh is not None)


def _mode(mode: Optional[str], hidden: int) -> str:
    if mode is None:
        return _sequence.lstm_mode(hidden)
    if mode not in ("step", "sequence"):
        raise ValueError(f"mode must be 'step', 'sequence' or None, got {mode!r}")
    return mode


def forward_recurrence(xproj: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor,
                       weight_index: torch.Tensor, bits_hh: Optional[torch.Tensor], mask_index: torch.Tensor,
                       lengths: torch.Tensor, reverse: torch.Tensor, mode: Optional[str] = None,
                       out_dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, ...]:
    """xproj (G, T, B, 4H) fp32, h0 / c0 (G, B, H) (any float dtype, read as fp32), w_hh (S, 4H, H),
    lengths (G, B) int64, reverse (G,) bool -> (hs (G, T, B, H), h_n, c_n (G, B, H), in out_dtype;
    gates (G, T, B, 4H) activated, cells (G, T, B, H), h_prev (G, T, B, H): the h entering each
    step, fp32), in time order; hs and gates are 0 at padded steps, cells carries c there. The
    state stays fp32 throughout: only the outputs are rounded to out_dtype (a model's dtype, so no
    conversion launch follows). ``mode``: 'step' (one launch per step) or 'sequence' (one launch:
    masked_lstm_sequence.py); None = lstm_mode's choice."""
    G, T, B, H4 = xproj.shape
    H = H4 // 4
    mode = _mode(mode, H)
    f32 = dict(device=xproj.device, dtype=torch.float32)
    out = dict(device=xproj.device, dtype=out_dtype)
    hs = torch.empty((G, T, B, H), **out)
    cells = torch.empty((G, T, B, H), **f32)
    h_prev = torch.empty((G, T, B, H), **f32)
    gates = torch.empty((G, T, B, H4), **f32)
    h_n = torch.empty((G, B, H), **out)
    c_n = torch.empty((G, B, H), **out)
    if T == 0 or G * B * H == 0:
        h_n.copy_(h0)
        c_n.copy_(c0)
        return hs, h_n, c_n, gates, cells, h_prev
    head = (*_weight_args(w_hh, weight_index, bits_hh, mask_index), xproj, *xproj.stride(), lengths, *lengths.stride(),
            reverse)
    flags = _flags(w_hh, bits_hh, xproj, gates)
    h_in, c_in = h0.contiguous(), c0.contiguous()
    if mode == "sequence":
        _sequence._forward_sequence_kernel[_sequence.grid(B, G)](
            *head, h_in, c_in, h_n, c_n, hs, cells, gates, h_prev, T, B, H, size_bucket(B), **flags)
        return hs, h_n, c_n, gates, cells, h_prev
    # Two fp32 state buffers in turn (no launch reads what it writes), the last step into (h_n, c_n)
    spares = _state_buffers(G, B, H, f32)
    grid = _step_grid(B, H, G)
    bucket = size_bucket(B)
    for s in range(T):
        h_out, c_out = (h_n, c_n) if s == T - 1 else spares[s % 2]
        _forward_step_kernel[grid](*head, h_in, c_in, h_out, c_out, hs, cells, gates, h_prev, s, T, B, H, bucket,
                                   **flags)
        h_in, c_in = h_out, c_out
    return hs, h_n, c_n, gates, cells, h_prev


def _state_buffers(G: int, B: int, H: int, f32: dict) -> tuple:
    """The step kernels' two pairs of fp32 (G, B, H) state buffers (ping-pong)."""
    return tuple((torch.empty((G, B, H), **f32), torch.empty((G, B, H), **f32)) for _ in range(2))


def backward_recurrence(dhs: torch.Tensor, dh_n: torch.Tensor, dc_n: torch.Tensor, gates: torch.Tensor,
                        cells: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor, weight_index: torch.Tensor,
                        bits_hh: Optional[torch.Tensor], mask_index: torch.Tensor,
                        lengths: torch.Tensor, reverse: torch.Tensor,
                        mode: Optional[str] = None,
                        out_dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dhs (G, T, B, H) (any strides), dh_n / dc_n / c0 (G, B, H) (any float dtype, read as fp32),
    gates / cells from forward_recurrence -> (dgates (G, T, B, 4H) fp32 w.r.t. the pre-activations,
    0 at padded steps; dh0, dc0 in out_dtype), in time order; the running dh and dc stay fp32.
    ``mode`` as in forward_recurrence (either mode's backward takes either's saved tensors: they
    are the same)."""
    G, T, B, H4 = gates.shape
    H = H4 // 4
    mode = _mode(mode, H)
    f32 = dict(device=gates.device, dtype=torch.float32)
    dgates = torch.empty((G, T, B, H4), **f32)
    dh0 = torch.empty((G, B, H), device=gates.device, dtype=out_dtype)
    dc0 = torch.empty((G, B, H), device=gates.device, dtype=out_dtype)
    if T == 0 or G * B * H == 0:
        dh0.copy_(dh_n)
        dc0.copy_(dc_n)
        return dgates.zero_(), dh0, dc0
    gates, cells, c0 = gates.contiguous(), cells.contiguous(), c0.contiguous()
    head = (*_weight_args(w_hh, weight_index, bits_hh, mask_index), dhs, *dhs.stride(), lengths, *lengths.stride(),
            reverse)
    flags = _flags(w_hh, bits_hh, dhs, gates)
    dh_in, dc_in = dh_n.contiguous(), dc_n.contiguous()
    if mode == "sequence":
        # the running dh / dc: dh0 / dc0 themselves when fp32, else fp32 buffers
        run = (dh0, dc0) if out_dtype == torch.float32 else _state_buffers(G, B, H, f32)[0]
        _sequence._backward_sequence_kernel[_sequence.grid(B, G)](
            *head, dh_in, dc_in, *run, dh0, dc0, gates, cells, c0, dgates, T, B, H, size_bucket(B), **flags)
        return dgates, dh0, dc0
    # T + 1 launches, steps T-1 .. -1, into two fp32 state buffers in turn; the last into (dh0, dc0)
    spares = _state_buffers(G, B, H, f32)
    grid = _step_grid(B, H, G)
    bucket = size_bucket(B)
    for j in range(T + 1):
        s = T - 1 - j
        dh_out, dc_out = (dh0, dc0) if j == T else spares[j % 2]
        _backward_step_kernel[grid](*head, dh_in, dc_in, dh_out, dc_out, gates, cells, c0, dgates, s, T, B, H, bucket,
                                    **flags)
        dh_in, dc_in = dh_out, dc_out
    return dgates, dh0, dc0
