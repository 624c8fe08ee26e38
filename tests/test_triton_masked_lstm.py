"""Triton kernels of the grouped masked LSTM (triton_kernels/masked_lstm.py), each primitive against
a plain-PyTorch oracle written here: per-group loops over materialised masked weights, the
recurrence as a per-step loop, its backward through torch.autograd on that loop."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from mtlfast.bitmask import pack_mask  # noqa: E402
from mtlfast.ops.masked_lstm import reverse_within_lengths  # noqa: E402
from mtlfast.triton_kernels import masked_gemm, masked_lstm as K  # noqa: E402
from tests.conftest import DEVICE  # noqa: E402
from tests.helpers import assert_close, round_as_triton  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


def close(actual, expected, dtype):
    assert_close(actual, expected, dtype, "kernel result")


def groups(G, S, P, unmasked=(1,)):
    """weight_index cycles over S sets, mask_index over P masks, -1 for the groups in `unmasked`."""
    wi = torch.arange(G) % S
    mi = torch.tensor([-1 if g in unmasked else (g * 7 + 1) % P for g in range(G)])
    return wi.to(DEVICE), mi.to(DEVICE)


def masks(P, N, Kdim, density=0.6):
    return torch.rand(P, N, Kdim, device=DEVICE) < density


def masked_weights(weight, wi, m, mi):
    """Per group (fp64): weight[wi[g]] ⊙ M[mi[g]], or the bare weight when unmasked."""
    out = []
    for g in range(len(wi)):
        w = weight[wi[g]].double()
        if m is not None and mi[g] >= 0:
            w = w * m[mi[g]]
        out.append(w)
    return out


# ---------------------------------------------------------------------------------------------
# grouped masked GEMMs

# (G, R, K, N, S, P): tails on every tile edge, batch 1, K = 33 and 1
GEMM_SHAPES = [(3, 5, 33, 7, 2, 2), (2, 1, 130, 33, 1, 3), (4, 37, 1, 130, 2, 1)]


def gemm_inputs(G, R, Kdim, N, S, P, dtype, *, shared_x=False, with_masks=True):
    x = torch.randn(1 if shared_x else G, R, Kdim, device=DEVICE).to(dtype)
    if shared_x:
        x = x.expand(G, R, Kdim)                      # group stride 0
    weight = (torch.randn(S, N, Kdim, device=DEVICE) / Kdim ** 0.5).to(dtype)
    m = masks(P, N, Kdim) if with_masks else None
    wi, mi = groups(G, S, P)
    return x, weight, m, wi, mi


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_grouped_matmul(dtype, shape):
    G, R, Kdim, N, S, P = shape
    x, weight, m, wi, mi = gemm_inputs(*shape, dtype)
    # one bias and two (an LSTM's b_ih and b_hh, a strided one among them), a row per weight set,
    # in the weights' dtype: added in fp32 by the kernel, never summed in low precision first
    b_ih = torch.randn(S, N, device=DEVICE).to(dtype)
    b_hh = torch.randn(N, S, device=DEVICE).to(dtype).t()
    ws = masked_weights(weight, wi, m, mi)
    for biases in ((b_ih,), (b_ih, b_hh)):
        out = K.grouped_masked_matmul(x, weight, wi, pack_mask(m), mi, biases=biases)
        assert out.shape == (G, R, N) and out.dtype == dtype
        for g in range(G):
            bias = sum(b[wi[g]].double() for b in biases)
            close(out[g], x[g].double() @ ws[g].T + bias, dtype)
    out32 = K.grouped_masked_matmul(x, weight, wi, pack_mask(m), mi, out_dtype=torch.float32)
    assert out32.dtype == torch.float32
    for g in range(G):
        close(out32[g], x[g].double() @ ws[g].T, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_matmul_shared_input_no_bits(dtype):
    G, R, Kdim, N, S, P = 3, 5, 33, 7, 2, 1
    x, weight, _, wi, _ = gemm_inputs(G, R, Kdim, N, S, P, dtype, shared_x=True, with_masks=False)
    assert x.stride(0) == 0
    out = K.grouped_masked_matmul(x, weight, wi, None, torch.full((G,), -1, device=DEVICE))
    for g in range(G):
        close(out[g], x[g].double() @ weight[wi[g]].double().T, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GEMM_SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_grouped_grad_input(dtype, shape):
    G, R, Kdim, N, S, P = shape
    _, weight, m, wi, mi = gemm_inputs(*shape, dtype)
    dy = torch.randn(G, R, N, device=DEVICE).to(dtype)
    dx = K.grouped_masked_matmul_grad_input(dy, weight, wi, pack_mask(m), mi)
    assert dx.shape == (G, R, Kdim) and dx.dtype == dtype
    for g, w in enumerate(masked_weights(weight, wi, m, mi)):
        close(dx[g], dy[g].double() @ w, dtype)
    dx = K.grouped_masked_matmul_grad_input(dy, weight, wi, None, mi)
    for g in range(G):
        close(dx[g], dy[g].double() @ weight[wi[g]].double(), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GEMM_SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_grouped_grad_weight(dtype, shape):
    G, R, Kdim, N, S, P = shape
    x, _, m, _, mi = gemm_inputs(*shape, dtype, shared_x=True)
    dy = torch.randn(G, R, N, device=DEVICE).to(dtype)
    dw = K.grouped_masked_matmul_grad_weight(dy, x, pack_mask(m), mi)
    assert dw.shape == (G, N, Kdim) and dw.dtype == torch.float32
    for g in range(G):
        full = dy[g].double().T @ x[g].double()
        if mi[g] >= 0:
            keep = m[mi[g]]
            assert torch.all(dw[g][~keep] == 0)      # exactly 0, not merely small
            full = full * keep
        close(dw[g], full, dtype)
    dw = K.grouped_masked_matmul_grad_weight(dy, x, None, mi)
    for g in range(G):
        close(dw[g], dy[g].double().T @ x[g].double(), dtype)


def test_int64_offsets_match(mode, monkeypatch):
    """The INT64 variants (taken for huge tensors, which the interpreter cannot afford) compute the
    same as the int32 ones."""
    G, R, Kdim, N, S, P = GEMM_SHAPES[0]
    x, weight, m, wi, mi = gemm_inputs(*GEMM_SHAPES[0], torch.float32)
    bits = pack_mask(m)
    dy = torch.randn(G, R, N, device=DEVICE)
    small = (K.grouped_masked_matmul(x, weight, wi, bits, mi), K.grouped_masked_matmul_grad_input(dy, weight, wi, bits, mi),
             K.grouped_masked_matmul_grad_weight(dy, x, bits, mi))
    fwd = recurrence_inputs(2, 3, 5, 7, torch.float32)
    rec = K.forward_recurrence(*fwd)
    monkeypatch.setattr(masked_gemm, "_needs_int64", lambda *t: True)   # every launcher asks there
    large = (K.grouped_masked_matmul(x, weight, wi, bits, mi), K.grouped_masked_matmul_grad_input(dy, weight, wi, bits, mi),
             K.grouped_masked_matmul_grad_weight(dy, x, bits, mi))
    for a, b in zip(small, large):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for a, b in zip(rec, K.forward_recurrence(*fwd)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    xproj, h0, c0, w_hh, wi, bits_hh, mi, lengths, reverse = fwd
    _, _, _, gates, cells, _ = rec
    G_, T, B, H4 = gates.shape
    grads = [torch.randn(G_, T, B, H4 // 4, device=DEVICE), torch.randn(G_, B, H4 // 4, device=DEVICE),
             torch.randn(G_, B, H4 // 4, device=DEVICE)]
    args = (*grads, gates, cells, c0, w_hh, wi, bits_hh, mi, lengths, reverse)
    large_b = K.backward_recurrence(*args)
    monkeypatch.undo()
    for a, b in zip(K.backward_recurrence(*args), large_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# recurrence: every test in both modes, one launch per step and one per sequence
# (triton_kernels/masked_lstm_sequence.py)

@pytest.fixture(params=["step", "sequence"])
def mode(request):
    # its own MonkeyPatch: a test's monkeypatch.undo() must not drop the mode
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MTLFAST_LSTM_MODE", request.param)
        yield request.param

def recurrence_inputs(G, T, B, H, dtype, *, S=2, P=2, with_masks=True, lengths=None):
    xproj = torch.randn(G, T, B, 4 * H, device=DEVICE)
    h0 = torch.randn(G, B, H, device=DEVICE) * 0.5
    c0 = torch.randn(G, B, H, device=DEVICE) * 0.5
    w_hh = (torch.randn(S, 4 * H, H, device=DEVICE) / H ** 0.5).to(dtype)
    m = masks(P, 4 * H, H) if with_masks else None
    wi, mi = groups(G, S, P)
    if lengths is None:
        lengths = torch.randint(0, T + 1, (G, B), device=DEVICE)
        lengths[0, 0] = 0                      # a row that never runs
        lengths[-1, -1] = T                    # one that runs every step
    bits = pack_mask(m) if with_masks else None
    reverse = torch.arange(G, device=DEVICE) % 2 == 1         # every other group runs backwards
    return xproj, h0, c0, w_hh, wi, bits, mi, lengths.to(torch.int64), reverse


def oracle_forward(xproj, h0, c0, w_hh, wi, bits, mi, lengths, reverse):
    """Per-step loop in fp32, differentiable in xproj, h0, c0; reverse groups by reversing each
    row's first lengths steps around the loop. h is rounded to w_hh's dtype for the product, as
    the kernels (and cuDNN) do. -> hs, h_n, c_n, gates, cells, h_prev (the h entering each step)."""
    G, T, B, H4 = xproj.shape
    H = H4 // 4
    m = None if bits is None else _unpack(bits, H)
    ws = torch.stack(masked_weights(w_hh, wi, m, mi)).float()      # (G, 4H, H), values of w_hh's dtype
    xproj = reverse_within_lengths(xproj, lengths, reverse)
    h, c = h0, c0
    hs, gates, cells, h_prev = [], [], [], []
    for s in range(T):
        h_prev.append(h)
        pre = xproj[:, s] + torch.bmm(h.to(w_hh.dtype).float(), ws.transpose(1, 2))
        i, f, z, o = pre.chunk(4, dim=-1)
        i, f, z, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(z), torch.sigmoid(o)
        c_new = f * c + i * z
        h_new = o * torch.tanh(c_new)
        active = (lengths > s).unsqueeze(-1)
        h = torch.where(active, h_new, h)
        c = torch.where(active, c_new, c)
        hs.append(torch.where(active, h_new, 0.0))
        gates.append(torch.where(active, torch.cat((i, f, z, o), -1), 0.0))
        cells.append(c)
    back = lambda seq: reverse_within_lengths(torch.stack(seq, 1), lengths, reverse)   # noqa: E731
    return back(hs), h, c, back(gates), back(cells), back(h_prev)


def _unpack(bits, columns):
    from mtlfast.bitmask import unpack_mask
    return unpack_mask(bits, columns)


# (G, T, B, H): H = 7 and 33 (one and two mask words, tails in every tile), B = 1 and 5, T = 1,
# B = 17 (two batch tiles of 16: two sequence programs per group)
REC_SHAPES = [(3, 4, 5, 7), (2, 3, 1, 33), (3, 3, 5, 33), (2, 1, 3, 7), (2, 2, 17, 7)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", REC_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_recurrence(mode, dtype, shape):
    args = recurrence_inputs(*shape, dtype)
    got = K.forward_recurrence(*args)
    want = oracle_forward(*args)
    for name, a, b in zip(("hs", "h_n", "c_n", "gates", "cells", "h_prev"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        close(a, b, dtype)
    lengths = args[7]
    G, T, B, H = shape
    inactive = torch.arange(T, device=DEVICE).view(1, T, 1) >= lengths.unsqueeze(1)     # (G, T, B)
    assert torch.all(got[0][inactive] == 0) and torch.all(got[3][inactive] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_recurrence_unmasked(mode, dtype):
    G, T, B, H = 2, 3, 5, 7
    args = list(recurrence_inputs(G, T, B, H, dtype, with_masks=False, lengths=torch.tensor([[3, 1, 0, 2, 3]] * G)))
    args[6] = torch.full((G,), -1, device=DEVICE)
    for a, b in zip(K.forward_recurrence(*args), oracle_forward(*args)):
        close(a, b, dtype)


def test_forward_recurrence_fp16(mode):
    args = recurrence_inputs(2, 3, 5, 33, torch.float16)
    for a, b in zip(K.forward_recurrence(*args), oracle_forward(*args)):
        close(a, b, torch.float16)


def test_forward_recurrence_zero_steps(mode):
    xproj, h0, c0, w_hh, wi, bits, mi, lengths, reverse = recurrence_inputs(2, 1, 3, 7, torch.float32)
    hs, h_n, c_n, gates, cells, h_prev = K.forward_recurrence(xproj[:, :0], h0, c0, w_hh, wi, bits, mi, lengths * 0,
                                                              reverse)
    assert hs.shape == (2, 0, 3, 7) and gates.shape == (2, 0, 3, 28)
    assert torch.equal(h_n, h0) and torch.equal(c_n, c0)


def oracle_backward(dhs, dh_n, dc_n, fwd_args):
    xproj, h0, c0, *rest = fwd_args
    xproj, h0, c0 = (t.detach().clone().requires_grad_() for t in (xproj, h0, c0))
    hs, h_n, c_n, gates, cells, _ = oracle_forward(xproj, h0, c0, *rest)
    loss = (hs * dhs).sum() + (h_n * dh_n).sum() + (c_n * dc_n).sum()
    loss.backward()
    # xproj enters each pre-activation additively, so its gradient is dgates
    return (xproj.grad, h0.grad, c0.grad), (gates.detach(), cells.detach())


def backward_recurrence_case(shape, dtype, mode=None):
    """(got, want, lengths): the backward recurrence kernel (``mode``: step, sequence or None for the
    automatic choice) and its oracle on random inputs."""
    G, T, B, H = shape
    args = recurrence_inputs(*shape, dtype)
    dhs = torch.randn(G, T, B, H, device=DEVICE)
    dh_n, dc_n = torch.randn(G, B, H, device=DEVICE), torch.randn(G, B, H, device=DEVICE)
    want, (gates, cells) = oracle_backward(dhs, dh_n, dc_n, args)
    xproj, h0, c0, w_hh, wi, bits, mi, lengths, reverse = args
    got = K.backward_recurrence(dhs, dh_n, dc_n, gates, cells, c0, w_hh, wi, bits, mi, lengths, reverse, mode=mode)
    return got, want, lengths


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", REC_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backward_recurrence(mode, dtype, shape):
    T = shape[1]
    got, want, lengths = backward_recurrence_case(shape, dtype)
    for name, a, b in zip(("dgates", "dh0", "dc0"), got, want):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        close(a, b, dtype)
    inactive = torch.arange(T, device=DEVICE).view(1, T, 1) >= lengths.unsqueeze(1)
    assert torch.all(got[0][inactive] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_recurrence_unmasked_strided_grads(mode, dtype):
    """bits None, every group unmasked; dhs with group stride 0 and dh_n / dc_n zeros expanded, as
    an orchestrator passes gradients that were never produced."""
    G, T, B, H = 2, 3, 5, 7
    args = list(recurrence_inputs(G, T, B, H, dtype, with_masks=False, lengths=torch.tensor([[3, 1, 0, 2, 3]] * G)))
    args[6] = torch.full((G,), -1, device=DEVICE)
    dhs = torch.randn(1, T, B, H, device=DEVICE).expand(G, T, B, H)
    dh_n = torch.zeros(1, 1, 1, device=DEVICE).expand(G, B, H)
    dc_n = torch.randn(G, B, H, device=DEVICE)
    want, (gates, cells) = oracle_backward(dhs, dh_n, dc_n, args)
    xproj, h0, c0, w_hh, wi, bits, mi, lengths, reverse = args
    got = K.backward_recurrence(dhs, dh_n, dc_n, gates, cells, c0, w_hh, wi, bits, mi, lengths, reverse)
    for a, b in zip(got, want):
        close(a, b, dtype)


def test_backward_recurrence_from_kernel_forward(mode):
    """Forward and backward kernels chained, as the orchestrator runs them."""
    G, T, B, H = 3, 4, 5, 33
    args = recurrence_inputs(G, T, B, H, torch.float32)
    hs, h_n, c_n, gates, cells, _ = K.forward_recurrence(*args)
    dhs = torch.randn(G, T, B, H, device=DEVICE)
    dh_n, dc_n = torch.randn(G, B, H, device=DEVICE), torch.randn(G, B, H, device=DEVICE)
    want, _ = oracle_backward(dhs, dh_n, dc_n, args)
    xproj, h0, c0, w_hh, wi, bits, mi, lengths, reverse = args
    got = K.backward_recurrence(dhs, dh_n, dc_n, gates, cells, c0, w_hh, wi, bits, mi, lengths, reverse)
    for a, b in zip(got, want):
        close(a, b, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(3, 4, 5, 7), (2, 1, 17, 33)], ids=lambda s: "x".join(map(str, s)))
def test_recurrences_read_and_write_the_model_dtype(mode, dtype, shape):
    """h0, c0, dhs, dh_n, dc_n in a low-precision dtype are read as fp32 and y, h_n, c_n, dh0, dc0
    written in out_dtype, the state staying fp32 between steps: bit for bit the fp32 run on the
    same (rounded) values with its outputs rounded once at the end. Were the state rounded on
    the way (a low-precision output reused as a step's state buffer), T > 1 would differ."""
    G, T, B, H = shape
    xproj, h0, c0, w_hh, wi, bits, mi, lengths, reverse = recurrence_inputs(*shape, dtype)
    h0, c0 = h0.to(dtype), c0.to(dtype)
    lengths[:, 0] = T                       # rows that run every step, whose state is carried longest
    low = K.forward_recurrence(xproj, h0, c0, w_hh, wi, bits, mi, lengths, reverse, out_dtype=dtype)
    ref = K.forward_recurrence(xproj, h0.float(), c0.float(), w_hh, wi, bits, mi, lengths, reverse)
    for name, a, b in zip(("hs", "h_n", "c_n"), low[:3], ref[:3], strict=True):
        assert a.dtype == dtype, name
        assert torch.equal(a, round_as_triton(b, dtype)), name
    for name, a, b in zip(("gates", "cells", "h_prev"), low[3:], ref[3:], strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b), name
    gates, cells = ref[3], ref[4]
    dhs, dh_n, dc_n = (torch.randn(*size, device=DEVICE).to(dtype) for size in ((G, T, B, H), (G, B, H), (G, B, H)))
    low = K.backward_recurrence(dhs, dh_n, dc_n, gates, cells, c0, w_hh, wi, bits, mi, lengths, reverse,
                                out_dtype=dtype)
    ref = K.backward_recurrence(dhs.float(), dh_n.float(), dc_n.float(), gates, cells, c0.float(), w_hh, wi, bits,
                                mi, lengths, reverse)
    assert low[0].dtype == torch.float32 and torch.equal(low[0], ref[0]), "dgates"
    for name, a, b in zip(("dh0", "dc0"), low[1:], ref[1:], strict=True):
        assert a.dtype == dtype and torch.equal(a, round_as_triton(b, dtype)), name


def test_sum_into_sets():
    """Each set's groups summed in one launch: unsorted set indices, a set no group uses (zeros),
    and a NaN in one set's group that stays out of the other set's sum."""
    grads = torch.randn(5, 3, 7, device=DEVICE)
    grads[1, 0, 0] = float("nan")
    wi = torch.tensor([2, 0, 2, 1, 0], device=DEVICE)
    out = K.sum_into_sets(grads, wi, 4)
    want = torch.zeros(4, 3, 7, device=DEVICE).index_add_(0, wi, grads)
    torch.testing.assert_close(out, want, equal_nan=True, atol=1e-6, rtol=1e-6)
    assert torch.isnan(out[0, 0, 0]) and not torch.isnan(out[[1, 2]]).any()
    assert torch.all(out[3] == 0)
    assert K.sum_into_sets(grads[:0], wi[:0], 2).eq(0).all() and K.sum_into_sets(grads, wi, 4).shape == (4, 3, 7)
