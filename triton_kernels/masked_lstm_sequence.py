"""Sequence-persistent Triton kernels of the grouped masked LSTM: the whole recurrence of a layer
(all T steps, every group) in one launch forward and one backward, against T and T + 1 launches
of the step kernels (masked_lstm.py). They take the step kernels' arguments (less the step
index) and write the same outputs; masked_lstm.forward_recurrence / backward_recurrence allocate
those and launch either.

Design. One program owns a (batch tile, group) pair for the whole sequence. Its rows depend on
nothing but their own earlier steps and the group's weight, so no program ever waits for another:
the only synchronisation is a barrier among the program's own threads between steps. A program
computes every hidden unit of its rows at each step, walking the 4H x H recurrent weight in
(BLOCK_K x BLOCK_H) tiles per gate with the group's bit-packed mask applied in registers (as the
step kernels do: ``W ⊙ M`` never exists in memory), and runs the cell on each hidden tile as soon
as its four accumulators are complete.

Where the state lives. The cell state of a tile is read back from ``cells`` (which backward
needs anyway) and the h that enters step s from ``h_prev`` (likewise): the program writes them at
step s - 1 and reads them at step s, so they travel through the L1/L2 of the program's own SM, a
few KB per step, and nothing else is allocated. Triton cannot index a register tensor by a
run-time tile, so an h held in registers could not feed the next step's dot products tile by
tile; this is the price of that, and it is small next to the weight tiles every step streams.
Backward keeps its running dh and dc in its outputs dh0 and dc0 the same way.

Why it is fast, and where it stops being. At the papers' sizes (sparse sharing: H = 200, B = 10,
6 groups; sluice: H = 100, B = 32) a step is ~0.3 MFLOP per group: the step kernels spend more
time launching than computing. Here a group's weight (4H x H: 320 KB in bf16 at H = 200) is
re-read from L2 every step by one program per batch tile, and each program does its step's work
alone. That wins while the weight is small; at H = 1024 (8 MiB per group) one program per group
would serialise what the step kernels spread over 32 programs per group, so above MAX_HIDDEN
``sequence_unfit`` sends the layer to the step kernels (and MTLFAST_LSTM_MODE=sequence refuses it
with that reason).

Launch budget per layer: forward 1 (plus the input projection, a batched GEMM), backward 1 (plus
the GEMMs for dx and the two weight gradients); tests/test_lstm_sequence.py counts them.
"""
from __future__ import annotations

import os
from typing import Optional

import triton
import triton.language as tl

from mtlfast.triton_kernels.masked_gemm import _dot, _group_mask, _keep_bits_nk, autotune
from mtlfast.triton_kernels.masked_lstm import (_activate, _cell_backward, _gate_dot, _prune_step, _step_configs,
                                                _store_gates, _tanh, _time_of)

# Above this hidden size one program per (batch tile, group) streams too much weight per step
# (4H x H per step: 2 MiB in bf16 at 512) for the work one SM can do with it; the step kernels
# spread the hidden units over many programs instead.
MAX_HIDDEN = 256

MODE_VARIABLE = "MTLFAST_LSTM_MODE"
MODES = ("auto", "step", "sequence")

# (BLOCK_B, BLOCK_H, BLOCK_K or BLOCK_N, stages, warps). One program does a step alone and keeps
# its row state, loop bounds and pointers live across the step's hidden loop, on top of a tile's
# accumulators (four in the forward): with 4 warps every tile spilled (ptxas stack 16-3500 B on
# sm_90 for conll03's launch, tests/triton_aot.py), with 8 warps the registers per thread halve
# and these candidates compile without a stack frame in fp16 / bf16 (fp32, which runs on FMA units
# as the correctness dtype, keeps 8-48 B). BLOCK_K and the backward's BLOCK_H are multiples of 32
# (the mask word).
_FORWARD_SHAPES = [(16, 32, 32, 2, 8), (16, 32, 32, 1, 8)]     # 32 x 32 and 16 x 64 tiles spilled 40-740 B
_BACKWARD_SHAPES = [(16, 32, 64, 2, 8), (16, 64, 64, 2, 8), (16, 32, 128, 3, 4), (16, 32, 128, 2, 8),
                    (32, 32, 64, 2, 8)]


def sequence_unfit(hidden: int) -> Optional[str]:
    """Why the sequence kernels cannot run a layer of this hidden size well, or None."""
    if hidden > MAX_HIDDEN:
        return (f"hidden size {hidden} > {MAX_HIDDEN}: one program per batch tile and group would stream the "
                f"group's whole 4H x H recurrent weight every step; the step kernels spread it over "
                f"{triton.cdiv(hidden, 32)} programs per group")
    return None


def lstm_mode(hidden: int) -> str:
    """'step' or 'sequence' for a layer: MTLFAST_LSTM_MODE (auto, step or sequence; unset = auto),
    automatic = sequence where it fits. A forced mode that does not fit raises ValueError."""
    wanted = os.environ.get(MODE_VARIABLE, "").strip().lower() or "auto"
    if wanted not in MODES:
        raise ValueError(f"{MODE_VARIABLE}={os.environ.get(MODE_VARIABLE)!r}: expected one of {', '.join(MODES)}")
    if wanted == "step":
        return "step"
    reason = sequence_unfit(hidden)
    if wanted == "sequence" and reason is not None:
        raise ValueError(f"{MODE_VARIABLE}=sequence cannot run this layer: {reason}")
    return "step" if reason is not None else "sequence"


# ---------------------------------------------------------------------------------------------
# Kernels. Grid: (batch tiles, G). cells / h_prev (G, T, B, H) and gates / dgates (G, T, B, 4H)
# are contiguous fp32 (the launchers make them), as is the running state; what leaves the layer
# (hs, h_n, c_n, dh0, dc0) is written in its own dtype and h0, c0, dh_n, dc_n, dhs read in theirs.

# Key: the batch rows by size_bucket, H and the dtypes; the length is no key (T only bounds loops).
@autotune(_step_configs("BLOCK_K", _FORWARD_SHAPES), key=["B_BUCKET", "H", "PRECISION"], prune=_prune_step)
@triton.jit(do_not_specialize=["T", "B_BUCKET"])
def _forward_sequence_kernel(w_ptr, stride_ws, stride_wn, stride_wk, wi_ptr,
                             bits_ptr, stride_bp, stride_bn, mi_ptr,
                             xproj_ptr, stride_xg, stride_xt, stride_xb, stride_xn,
                             len_ptr, stride_lg, stride_lb, rev_ptr,
                             h0_ptr, c0_ptr, h_n_ptr, c_n_ptr,
                             hs_ptr, cells_ptr, gates_ptr, hprev_ptr, T, B, H, B_BUCKET,
                             INT64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                             BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                             HAS_MASK: tl.constexpr = True):
    """Every step of one batch tile of one group; per step and hidden tile what the forward step
    kernel computes, with the h entering step s read from h_prev (written at step s - 1) and the
    cell state from cells."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    if INT64:
        g = g.to(tl.int64)
        offs_b = offs_b.to(tl.int64)
    row_ok = offs_b < B
    w_g = w_ptr + tl.load(wi_ptr + g) * stride_ws
    mask_rows = H
    unmasked = False
    bits_g = bits_ptr
    if HAS_MASK:
        bits_g, mask_rows, unmasked = _group_mask(bits_ptr, stride_bp, mi_ptr, g, H)
    length = tl.load(len_ptr + g * stride_lg + offs_b * stride_lb, mask=row_ok, other=0)
    rev = tl.load(rev_ptr + g) != 0
    rows = (g * T * B + offs_b)[:, None]            # + t * B: a row's slot at time t

    # h0 is the h entering step 0: into h_prev, where every step reads its h from
    t0 = _time_of(0, length, rev)[:, None]
    for j0 in range(0, H, BLOCK_H):
        offs_h = j0 + tl.arange(0, BLOCK_H)
        tile_ok = row_ok[:, None] & (offs_h[None, :] < H)
        h0 = tl.load(h0_ptr + (g * B + offs_b[:, None]) * H + offs_h[None, :], mask=tile_ok, other=0.0)
        tl.store(hprev_ptr + (rows + t0 * B) * H + offs_h[None, :], h0.to(tl.float32), mask=tile_ok)
    tl.debug_barrier()

    for s in range(0, T):
        # only the h rows' pointers stay live across the hidden loop; the rest of a row's step
        # (its slots, whether it is active) is recomputed after each tile's dot products, which
        # keeps the accumulators out of local memory
        h_rows = (rows + _time_of(s, length, rev)[:, None] * B) * H     # offsets: half a pointer's registers
        for j0 in range(0, H, BLOCK_H):
            offs_h = j0 + tl.arange(0, BLOCK_H)
            if INT64:
                offs_h = offs_h.to(tl.int64)
            tile_ok = row_ok[:, None] & (offs_h[None, :] < H)
            acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            acc_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            acc_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            acc_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                # .cg: read at L2, where the other threads' stores of step s - 1 are
                hp = tl.load(hprev_ptr + h_rows + offs_k[None, :], mask=row_ok[:, None] & (offs_k[None, :] < H),
                             other=0.0, cache_modifier=".cg")
                hp = hp.to(tl.float32).to(w_ptr.dtype.element_ty)
                acc_i = _gate_dot(hp, w_g, stride_wn, stride_wk, bits_g, stride_bn, mask_rows, unmasked, 0, H, k0,
                                  offs_k, offs_h, acc_i, HAS_MASK, PRECISION, UPCAST, BLOCK_K, BLOCK_H)
                acc_f = _gate_dot(hp, w_g, stride_wn, stride_wk, bits_g, stride_bn, mask_rows, unmasked, 1, H, k0,
                                  offs_k, offs_h, acc_f, HAS_MASK, PRECISION, UPCAST, BLOCK_K, BLOCK_H)
                acc_g = _gate_dot(hp, w_g, stride_wn, stride_wk, bits_g, stride_bn, mask_rows, unmasked, 2, H, k0,
                                  offs_k, offs_h, acc_g, HAS_MASK, PRECISION, UPCAST, BLOCK_K, BLOCK_H)
                acc_o = _gate_dot(hp, w_g, stride_wn, stride_wk, bits_g, stride_bn, mask_rows, unmasked, 3, H, k0,
                                  offs_k, offs_h, acc_o, HAS_MASK, PRECISION, UPCAST, BLOCK_K, BLOCK_H)

            t_b = _time_of(s, length, rev)[:, None]
            x_tile = xproj_ptr + g * stride_xg + t_b * stride_xt + offs_b[:, None] * stride_xb + offs_h[None, :] * stride_xn
            i, f, z, o = _activate(acc_i, acc_f, acc_g, acc_o, x_tile, H * stride_xn, tile_ok)

            state = (g * B + offs_b[:, None]) * H + offs_h[None, :]
            c_first = tl.load(c0_ptr + state, mask=tile_ok & (s == 0), other=0.0)
            c_later = tl.load(cells_ptr + (rows + _time_of(s - 1, length, rev)[:, None] * B) * H + offs_h[None, :],
                              mask=tile_ok & (s > 0), other=0.0, cache_modifier=".cg")
            c_prev = tl.where(s == 0, c_first, c_later).to(tl.float32)
            c = f * c_prev + i * z
            h = o * _tanh(c)
            seq = (rows + t_b * B) * H + offs_h[None, :]
            # inactive rows carry their state
            h_prev = tl.load(hprev_ptr + seq, mask=tile_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
            active = (s < length)[:, None]
            c = tl.where(active, c, c_prev)
            h_out = tl.where(active, h, h_prev)
            tl.store(hprev_ptr + (rows + _time_of(s + 1, length, rev)[:, None] * B) * H + offs_h[None, :], h_out,
                     mask=tile_ok & (s + 1 < T))
            tl.store(h_n_ptr + state, h_out.to(h_n_ptr.dtype.element_ty), mask=tile_ok & (s == T - 1))
            tl.store(c_n_ptr + state, c.to(c_n_ptr.dtype.element_ty), mask=tile_ok & (s == T - 1))
            tl.store(hs_ptr + seq, tl.where(active, h, 0.0).to(hs_ptr.dtype.element_ty), mask=tile_ok)
            tl.store(cells_ptr + seq, c.to(cells_ptr.dtype.element_ty), mask=tile_ok)
            _store_gates(gates_ptr, (rows + t_b * B) * (4 * H) + offs_h[None, :], H, i, f, z, o, active, tile_ok)
        # step s + 1 reads every hidden tile of step s's h_prev and cells
        tl.debug_barrier()


@autotune(_step_configs("BLOCK_N", _BACKWARD_SHAPES), key=["B_BUCKET", "H", "PRECISION"], prune=_prune_step)
@triton.jit(do_not_specialize=["T", "B_BUCKET"])
def _backward_sequence_kernel(w_ptr, stride_ws, stride_wn, stride_wk, wi_ptr,
                              bits_ptr, stride_bp, stride_bn, mi_ptr,
                              dhs_ptr, stride_dg, stride_dt, stride_db, stride_dh,
                              len_ptr, stride_lg, stride_lb, rev_ptr,
                              dh_n_ptr, dc_n_ptr, dh_run_ptr, dc_run_ptr, dh0_ptr, dc0_ptr,
                              gates_ptr, cells_ptr, c0_ptr, dgates_ptr, T, B, H, B_BUCKET,
                              INT64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                              HAS_MASK: tl.constexpr = True):
    """Steps T-1 down to -1 of one batch tile of one group; per step and hidden tile what the
    backward step kernel computes (the dh entering step s from dgates[s+1] @ (W ⊙ M), then the
    cell's backward), with the running dh and dc kept in fp32 in dh_run and dc_run: each hidden
    tile reads and writes only its own part of them; step -1 writes the answer to dh0 and dc0
    instead (in their dtype; they may be dh_run and dc_run themselves)."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    if INT64:
        g = g.to(tl.int64)
        offs_b = offs_b.to(tl.int64)
    row_ok = offs_b < B
    w_g = w_ptr + tl.load(wi_ptr + g) * stride_ws
    mask_rows = 4 * H
    unmasked = False
    bits_g = bits_ptr
    if HAS_MASK:
        bits_g, mask_rows, unmasked = _group_mask(bits_ptr, stride_bp, mi_ptr, g, 4 * H)
    length = tl.load(len_ptr + g * stride_lg + offs_b * stride_lb, mask=row_ok, other=0)
    rev = tl.load(rev_ptr + g) != 0
    rows = (g * T * B + offs_b)[:, None]

    for j0 in range(0, H, BLOCK_H):
        offs_h = j0 + tl.arange(0, BLOCK_H)
        tile_ok = row_ok[:, None] & (offs_h[None, :] < H)
        state = (g * B + offs_b[:, None]) * H + offs_h[None, :]
        tl.store(dh_run_ptr + state, tl.load(dh_n_ptr + state, mask=tile_ok, other=0.0).to(tl.float32), mask=tile_ok)
        tl.store(dc_run_ptr + state, tl.load(dc_n_ptr + state, mask=tile_ok, other=0.0).to(tl.float32), mask=tile_ok)
    tl.debug_barrier()

    for j in range(0, T + 1):
        s = T - 1 - j
        # dgates is 0 at inactive steps; the row mask saves the loads and keeps step + 1 = T in bounds
        next_active = ((s + 1 < length) & (s + 1 < T))[:, None]
        dg_rows = dgates_ptr + (rows + _time_of(s + 1, length, rev)[:, None] * B) * (4 * H)
        for j0 in range(0, H, BLOCK_H):
            offs_h = j0 + tl.arange(0, BLOCK_H)
            if INT64:
                offs_h = offs_h.to(tl.int64)
            tile_ok = row_ok[:, None] & (offs_h[None, :] < H)
            acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            for n0 in range(0, 4 * H, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                if INT64:
                    offs_n = offs_n.to(tl.int64)
                dg = tl.load(dg_rows + offs_n[None, :], mask=next_active & (offs_n[None, :] < 4 * H), other=0.0,
                             cache_modifier=".cg")
                dg = dg.to(tl.float32).to(w_ptr.dtype.element_ty)
                w = tl.load(w_g + offs_n[:, None] * stride_wn + offs_h[None, :] * stride_wk,
                            mask=(offs_n[:, None] < 4 * H) & (offs_h[None, :] < H), other=0.0)   # (BLOCK_N, BLOCK_H)
                if HAS_MASK:
                    keep = _keep_bits_nk(bits_g, stride_bn, j0, offs_n, mask_rows, H, BLOCK_N, BLOCK_H)
                    w = tl.where(keep | unmasked, w, tl.zeros_like(w))
                acc = _dot(dg, w, acc, PRECISION, UPCAST)
            state = (g * B + offs_b[:, None]) * H + offs_h[None, :]
            dh = tl.where(next_active, acc, tl.load(dh_run_ptr + state, mask=tile_ok, other=0.0))
            dc = tl.load(dc_run_ptr + state, mask=tile_ok, other=0.0)
            if s >= 0:
                t_b = _time_of(s, length, rev)[:, None]
                t_prev = _time_of(s - 1, length, rev)[:, None]
                active = (s < length)[:, None]
                seq = (rows + t_b * B) * H + offs_h[None, :]
                gate = (rows + t_b * B) * (4 * H) + offs_h[None, :]
                i = tl.load(gates_ptr + gate, mask=tile_ok, other=0.0).to(tl.float32)
                f = tl.load(gates_ptr + gate + H, mask=tile_ok, other=0.0).to(tl.float32)
                z = tl.load(gates_ptr + gate + 2 * H, mask=tile_ok, other=0.0).to(tl.float32)
                o = tl.load(gates_ptr + gate + 3 * H, mask=tile_ok, other=0.0).to(tl.float32)
                tc = _tanh(tl.load(cells_ptr + seq, mask=tile_ok, other=0.0).to(tl.float32))
                c_first = tl.load(c0_ptr + state, mask=tile_ok & (s == 0), other=0.0)
                c_later = tl.load(cells_ptr + (rows + t_prev * B) * H + offs_h[None, :], mask=tile_ok & (s > 0),
                                  other=0.0)
                c_prev = tl.where(s == 0, c_first, c_later).to(tl.float32)
                dh_tot = dh + tl.load(dhs_ptr + g * stride_dg + t_b * stride_dt + offs_b[:, None] * stride_db
                                      + offs_h[None, :] * stride_dh, mask=tile_ok, other=0.0).to(tl.float32)
                d_i, d_f, d_z, d_o, dc_prev = _cell_backward(dh_tot, dc, i, f, z, o, tc, c_prev)
                _store_gates(dgates_ptr, gate, H, d_i, d_f, d_z, d_o, active, tile_ok)
                dc = tl.where(active, dc_prev, dc)
            tl.store(dh_run_ptr + state, dh, mask=tile_ok & (s >= 0))
            tl.store(dc_run_ptr + state, dc, mask=tile_ok & (s >= 0))
            tl.store(dh0_ptr + state, dh.to(dh0_ptr.dtype.element_ty), mask=tile_ok & (s < 0))
            tl.store(dc0_ptr + state, dc.to(dc0_ptr.dtype.element_ty), mask=tile_ok & (s < 0))
        # step s - 1 reads every hidden tile of dgates[s]
        tl.debug_barrier()


def grid(B: int, G: int):
    """The kernels' grid: (batch tiles, G). masked_lstm.forward_recurrence / backward_recurrence
    launch them with the step kernels' arguments (less the step index)."""
    return lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), G)
