"""Triton kernels of sluice networks (triton_kernels/sluice.py) against the ops' references
(mtlfast.ops.sluice.*_reference, each checked against an independent oracle in
tests/test_oracles.py) in float64, their gradients through torch.autograd on the references."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from mtlfast.ops.sluice import (alpha_mix_reference, layer_mix_reference,  # noqa: E402
                                orthogonality_penalty_reference)
from mtlfast.triton_kernels import masked_gemm, sluice as K  # noqa: E402
from tests.conftest import DEVICE  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


def close(actual, expected, dtype):
    assert_close(actual, expected, dtype, "kernel result")


def with_grads(fn, inputs, dout):
    """fn on float64 copies of inputs -> (output, gradients of Σ output ⊙ dout w.r.t. each input)."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    out = fn(*leaves)
    if not out.requires_grad:   # a constant (the penalty of one subspace): zero gradients
        return out.detach(), tuple(torch.zeros_like(t) for t in leaves)
    grads = torch.autograd.grad(out, leaves, dout.double())
    return out.detach(), grads


# ---------------------------------------------------------------------------------------------
# alpha mixing

def alpha_inputs(M, N, S, d, dtype):
    h = torch.randn(M, N, S * d, device=DEVICE).to(dtype)
    alpha = torch.randn(M * S, M * S, device=DEVICE)
    dout = torch.randn(M, N, S * d, device=DEVICE).to(dtype)
    return h, alpha, dout


# (M, N, S, d): tails in both tile axes, MS = 4, 9 (MS_P 16: one pixel group), 3, 6 (pad chunks),
# cross-stitch S = 1, one task, a single row, d = 3, MS = 1 (16 pixel groups)
ALPHA_SHAPES = [(2, 37, 2, 33), (3, 5, 3, 8), (3, 17, 1, 7), (1, 1, 3, 3), (2, 20, 3, 16), (1, 9, 1, 5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ALPHA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_alpha_mix(dtype, shape):
    M, N, S, d = shape
    h, alpha, dout = alpha_inputs(M, N, S, d, dtype)
    want, (dh_want, dalpha_want) = with_grads(lambda h_, a_: alpha_mix_reference(h_, a_, S), (h, alpha), dout)
    out = K.alpha_mix_forward(h, alpha, S)
    assert out.shape == h.shape and out.dtype == dtype
    close(out, want, dtype)
    dh, dalpha = K.alpha_mix_backward(dout, h, alpha, S)
    assert dh.shape == h.shape and dh.dtype == dtype
    assert dalpha.shape == (M * S, M * S) and dalpha.dtype == torch.float32
    close(dh, dh_want, dtype)
    close(dalpha, dalpha_want, dtype)


def test_alpha_mix_fp16():
    M, N, S, d = ALPHA_SHAPES[0]
    h, alpha, dout = alpha_inputs(M, N, S, d, torch.float16)
    want, (dh_want, dalpha_want) = with_grads(lambda h_, a_: alpha_mix_reference(h_, a_, S), (h, alpha), dout)
    close(K.alpha_mix_forward(h, alpha, S), want, torch.float16)
    dh, dalpha = K.alpha_mix_backward(dout, h, alpha, S)
    close(dh, dh_want, torch.float16)
    close(dalpha, dalpha_want, torch.float16)


def test_alpha_mix_empty():
    h, alpha, dout = alpha_inputs(2, 0, 2, 5, torch.float32)
    assert K.alpha_mix_forward(h, alpha, 2).shape == (2, 0, 10)
    dh, dalpha = K.alpha_mix_backward(dout, h, alpha, 2)
    assert dh.shape == (2, 0, 10) and torch.equal(dalpha, torch.zeros(4, 4, device=DEVICE))


def test_alpha_mix_noncontiguous():
    """A strided h (and dout) is read as its values, not as its storage."""
    h, alpha, dout = alpha_inputs(2, 12, 2, 9, torch.float32)
    strided = h.transpose(0, 1).contiguous().transpose(0, 1)              # (M, N, D), M not outermost
    assert not strided.is_contiguous()
    close(K.alpha_mix_forward(strided, alpha, 2), alpha_mix_reference(h.double(), alpha.double(), 2), torch.float32)
    _, (dh_want, dalpha_want) = with_grads(lambda h_, a_: alpha_mix_reference(h_, a_, 2), (h, alpha), dout)
    dh, dalpha = K.alpha_mix_backward(dout.transpose(0, 1).contiguous().transpose(0, 1), strided, alpha, 2)
    close(dh, dh_want, torch.float32)
    close(dalpha, dalpha_want, torch.float32)


# ---------------------------------------------------------------------------------------------
# layer mixing

# (K, M, N, D): tails, K = 1 and 3 (a pad layer), M = 1, N = 1
LAYER_SHAPES = [(3, 2, 37, 33), (1, 3, 5, 7), (3, 1, 1, 3), (2, 3, 20, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_mix(dtype, shape):
    Kl, M, N, D = shape
    layers = torch.randn(Kl, M, N, D, device=DEVICE).to(dtype)
    beta = torch.randn(M, Kl, device=DEVICE)
    dout = torch.randn(M, N, D, device=DEVICE).to(dtype)
    want, (dlayers_want, dbeta_want) = with_grads(layer_mix_reference, (layers, beta), dout)
    out = K.layer_mix_forward(layers, beta)
    assert out.shape == (M, N, D) and out.dtype == dtype
    close(out, want, dtype)
    dlayers, dbeta = K.layer_mix_backward(dout, layers, beta)
    assert dlayers.shape == layers.shape and dlayers.dtype == dtype
    assert dbeta.shape == (M, Kl) and dbeta.dtype == torch.float32
    close(dlayers, dlayers_want, dtype)
    close(dbeta, dbeta_want, dtype)


def test_layer_mix_empty():
    layers = torch.randn(3, 2, 0, 4, device=DEVICE)
    beta = torch.randn(2, 3, device=DEVICE)
    assert K.layer_mix_forward(layers, beta).shape == (2, 0, 4)
    dlayers, dbeta = K.layer_mix_backward(torch.randn(2, 0, 4, device=DEVICE), layers, beta)
    assert dlayers.shape == (3, 2, 0, 4) and torch.equal(dbeta, torch.zeros(2, 3, device=DEVICE))


# ---------------------------------------------------------------------------------------------
# orthogonality penalty

# (R, C, S): r < C and r > C (the two backward associations), C with tails, S = 3 and 4 (pair
# decoding), r = 1, S = 1 (no pair)
ORTHO_SHAPES = [(8, 5, 2), (9, 33, 3), (34, 17, 2), (20, 7, 4), (3, 40, 3), (6, 4, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ORTHO_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_orthogonality_penalty(dtype, shape):
    R, C, S = shape
    weight = (torch.randn(R, C, device=DEVICE) / C ** 0.5).to(dtype)
    grad = torch.tensor(0.7, device=DEVICE)
    want, (dweight_want,) = with_grads(lambda w: orthogonality_penalty_reference(w, S), (weight,), grad)
    penalty = K.orthogonality_penalty_forward(weight, S)
    assert penalty.shape == () and penalty.dtype == torch.float32
    close(penalty, want, dtype)
    dweight = K.orthogonality_penalty_backward(weight, S, grad)
    assert dweight.shape == weight.shape and dweight.dtype == dtype
    close(dweight, dweight_want, dtype)
    close(K.orthogonality_penalty_backward(weight, S, 0.7), dweight_want, dtype)   # a float grad


def test_orthogonality_penalty_empty():
    weight = torch.randn(4, 0, device=DEVICE)
    assert K.orthogonality_penalty_forward(weight, 2).item() == 0
    assert K.orthogonality_penalty_backward(weight, 2, 1.0).shape == (4, 0)


# ---------------------------------------------------------------------------------------------
# launch variants

def _all_outputs():
    torch.manual_seed(1)
    h, alpha, dout = alpha_inputs(2, 37, 2, 33, torch.float32)
    layers = torch.randn(3, 2, 37, 33, device=DEVICE)
    beta = torch.randn(2, 3, device=DEVICE)
    weight = torch.randn(9, 33, device=DEVICE)
    return (K.alpha_mix_forward(h, alpha, 2), *K.alpha_mix_backward(dout, h, alpha, 2),
            K.layer_mix_forward(layers, beta), *K.layer_mix_backward(dout.reshape(2, 37, 66)[..., :33].contiguous(),
                                                                     layers, beta),
            K.orthogonality_penalty_forward(weight, 3))


def test_int64_offsets_match(monkeypatch):
    """The INT64 variants (taken for huge tensors, which the interpreter cannot afford) compute the
    same as the int32 ones."""
    small = _all_outputs()
    monkeypatch.setattr(masked_gemm, "_needs_int64", lambda *t: True)   # every launcher asks there
    for a, b in zip(small, _all_outputs(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_idle_persistent_programs(monkeypatch):
    """More persistent programs than tiles (as on a GPU when the chosen tiles are larger than the
    smallest): the idle programs write zero partials."""
    small = _all_outputs()
    monkeypatch.setattr(K, "_num_programs", lambda device, work, kind, share=1: work + 5)
    for a, b in zip(small, _all_outputs(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
