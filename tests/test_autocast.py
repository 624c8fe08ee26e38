"""Every op and module under torch.autocast (cpu bfloat16 here; cuda float16 and bfloat16 on a GPU),
on every backend. Each op's policy (mtlfast/ops/common.py) is torch's for its kind: the matmul-like
ops (masked_linear, masked_lstm_layer, alpha_mix, layer_mix) cast their floating inputs, unless
float64, to the autocast dtype; the orthogonality penalty computes in float32; the Gumbel ops and
allocation_combine run unchanged. Each result is compared with the reference computed in float64
from the inputs as the policy cast them, outputs and gradients; torch.compile agrees with eager."""
from __future__ import annotations

import pytest
import torch

import mtlfast
import mtlfast.functional as MF
import mtlfast.nn as mnn
from mtlfast.ops.masked_linear import masked_linear_reference
from mtlfast.ops.masked_lstm import masked_lstm_layer, masked_lstm_layer_reference
from mtlfast.ops.sluice import alpha_mix_reference, layer_mix_reference, orthogonality_penalty_reference
from tests.conftest import DEVICE
from tests.helpers import assert_close, backend_params

BACKENDS = backend_params(DEVICE, ("reference", "cpu", "triton"))
AUTOCAST_DTYPES = (torch.bfloat16,) if DEVICE.type == "cpu" else (torch.float16, torch.bfloat16)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def check_lower(op, reference, inputs, dtype, backend, compiled=False):
    """``op(*inputs)`` under autocast to ``dtype`` = ``reference`` in float64 of the inputs cast to
    ``dtype`` (floating ones): the output has ``dtype``; outputs and the gradients of the original
    (float32) inputs agree within ``dtype``'s tolerance."""
    ours = _leaves(*inputs)
    ref = [t.detach().to(dtype).double().requires_grad_() if t.is_floating_point() else t for t in inputs]
    run = torch.compile(op, fullgraph=True) if compiled else op
    with mtlfast.use_backend(backend), torch.autocast(DEVICE.type, dtype=dtype):
        out = run(*ours)
    expected = reference(*ref)
    out, expected = (out if isinstance(out, tuple) else (out,)), (expected if isinstance(expected, tuple) else (expected,))
    for i, (a, b) in enumerate(zip(out, expected)):
        assert a.dtype == dtype, f"output {i}: {a.dtype}, expected {dtype}"
        assert_close(a, b, dtype, f"output {i}")
    grads = [torch.randn_like(b) for b in expected]
    torch.autograd.backward(out, [g.to(dtype) for g in grads])
    torch.autograd.backward(expected, grads)
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a.requires_grad:
            assert a.grad.dtype == a.dtype
            assert_close(a.grad, b.grad, dtype, f"gradient of input {i}")


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("backend", backend_params(DEVICE, ("reference", "triton", "cuda")))
def test_masked_linear(backend, dtype):
    x, w, b = torch.randn(6, 33, device=DEVICE), torch.randn(10, 33, device=DEVICE) / 4, torch.randn(10, device=DEVICE)
    mask = torch.rand(10, 33, device=DEVICE) < 0.5
    check_lower(lambda x, w, b: MF.masked_linear(x, w, mask, b), lambda x, w, b: masked_linear_reference(x, w, mask, b),
                (x, w, b), dtype, backend)


def _lstm_case():
    g = torch.Generator().manual_seed(2)
    G, T, B, I, H = 3, 3, 2, 5, 4
    rnd = lambda *s: (torch.randn(*s, generator=g) / 2).to(DEVICE)  # noqa: E731
    floats = (rnd(G, T, B, I), rnd(G, B, H), rnd(G, B, H), rnd(2, 4 * H, I), rnd(2, 4 * H, H), rnd(2, 4 * H),
              rnd(2, 4 * H))
    rest = (torch.tensor([0, 1, 0], device=DEVICE), (torch.rand(2, 4 * H, I, generator=g) < 0.6).to(DEVICE),
            (torch.rand(2, 4 * H, H, generator=g) < 0.6).to(DEVICE), torch.tensor([0, -1, 1], device=DEVICE),
            torch.tensor([[3, 1], [2, 3], [0, 3]], device=DEVICE), torch.tensor([False, True, False], device=DEVICE))
    return floats, rest


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_lstm_layer(backend, dtype):
    floats, rest = _lstm_case()
    check_lower(lambda *f: masked_lstm_layer(*f, *rest), lambda *f: masked_lstm_layer_reference(*f, *rest),
                floats, dtype, backend)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_mix_and_layer_mix(backend, dtype):
    h, alpha = torch.randn(2, 3, 8, device=DEVICE), torch.randn(4, 4, device=DEVICE)
    check_lower(lambda h, a: MF.alpha_mix(h, a, 2), lambda h, a: alpha_mix_reference(h, a, 2), (h, alpha), dtype,
                backend)
    layers, beta = torch.randn(3, 2, 4, 5, device=DEVICE), torch.randn(2, 3, device=DEVICE)
    check_lower(MF.layer_mix, layer_mix_reference, (layers, beta), dtype, backend)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("backend", backend_params(DEVICE, ("reference", "triton")))
def test_orthogonality_penalty_runs_in_float32(backend, dtype):
    weight = torch.randn(8, 5, device=DEVICE).to(dtype).requires_grad_()
    with mtlfast.use_backend(backend), torch.autocast(DEVICE.type, dtype=dtype):
        out = MF.orthogonality_penalty(weight, 2)
    assert out.dtype == torch.float32
    ref_weight = weight.detach().double().requires_grad_()
    expected = orthogonality_penalty_reference(ref_weight, 2)
    assert_close(out, expected, torch.float32, "penalty")
    out.backward()
    expected.backward()
    assert weight.grad.dtype == dtype
    assert_close(weight.grad, ref_weight.grad, dtype, "gradient")


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gumbel_ops_run_unchanged(backend, dtype):
    """Elementwise sampling: the same sample, dtype and gradient as without autocast."""
    logits = torch.randn(6, 2, device=DEVICE)
    outputs, z = torch.randn(3, 4, device=DEVICE).to(dtype), torch.tensor([1.0, 0.0, 1.0], device=DEVICE)
    calls = [lambda l: MF.gumbel_sigmoid(l, tau=0.5, hard=False), lambda l: MF.gumbel_pairs(l, tau=0.7),
             lambda l: MF.gumbel_softmax(l, tau=0.5, hard=True)]
    if mtlfast.backends.reasons("allocation_combine", outputs, z)[backend] is None:   # the cpu backend has none yet
        calls.append(lambda l: MF.allocation_combine(outputs, MF.gumbel_pairs(l, tau=0.7)[:3]))
    for i, call in enumerate(calls):
        results = []
        for enabled in (False, True):
            leaf = logits.clone().requires_grad_()
            torch.manual_seed(7)
            with mtlfast.use_backend(backend), torch.autocast(DEVICE.type, dtype=dtype, enabled=enabled):
                out = call(leaf)
            out.float().square().sum().backward()
            results.append((out, leaf.grad))
        (a, ga), (b, gb) = results
        assert a.dtype == b.dtype and torch.equal(a, b) and torch.equal(ga, gb), f"call {i}"


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_sharing_lstm_as_torch_lstm(backend, dtype):
    """A float32 SparseSharingLSTM under autocast returns ``dtype`` as nn.LSTM does, and computes what
    its subnet computes in float64 from the cast input and weights."""
    torch.manual_seed(0)
    model = mnn.SparseSharingLSTM(5, 4, 2, bidirectional=True, num_tasks=2).to(DEVICE)
    model.set_mask(1, "weight_hh_l0", torch.rand(16, 4, device=DEVICE) < 0.5)
    x = torch.randn(3, 2, 5, device=DEVICE)
    with mtlfast.use_backend(backend), torch.autocast(DEVICE.type, dtype=dtype):
        out, (h, c) = model(x, task=1)
        ref_out, (ref_h, _) = model.subnet(1)(x)
    assert out.dtype == h.dtype == c.dtype == ref_out.dtype == ref_h.dtype == dtype
    exact = model.subnet(1).double()
    with torch.no_grad():
        for p in exact.parameters():
            p.copy_(p.to(dtype))
    expected, _ = exact(x.to(dtype).double())
    assert_close(out, expected, dtype, "output")
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sluice_lstm(backend, dtype):
    torch.manual_seed(0)
    model = mnn.SluiceLSTM(5, 4, 2, num_layers=2).to(DEVICE)
    x = torch.randn(2, 3, 5, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=dtype):
        with mtlfast.use_backend(backend):
            out = model(x)
        penalty = model.orthogonality_penalty()     # automatic backend: the cpu backend has no penalty kernel
    assert out.dtype == dtype and penalty.dtype == torch.float32
    exact = mnn.SluiceLSTM(5, 4, 2, num_layers=2).to(DEVICE).double()
    exact.load_state_dict({k: v.to(dtype).double() for k, v in model.state_dict().items()})
    with mtlfast.use_backend("reference"):
        expected = exact(x.to(dtype).double())
    torch.testing.assert_close(out.double(), expected, atol=4e-2, rtol=4e-2)   # rounded between layers too
    (out.float().sum() + penalty).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("backend", backend_params(DEVICE, ("cpu", "triton")))
def test_compiled_agrees_with_eager(backend, dtype):
    torch._dynamo.reset()
    x, w, b = torch.randn(6, 33, device=DEVICE), torch.randn(10, 33, device=DEVICE) / 4, torch.randn(10, device=DEVICE)
    mask = torch.rand(10, 33, device=DEVICE) < 0.5
    if backend != "cpu":       # masked_linear has no cpu kernel (its cpu path is the reference)
        check_lower(lambda x, w, b: MF.masked_linear(x, w, mask, b),
                    lambda x, w, b: masked_linear_reference(x, w, mask, b), (x, w, b), dtype, backend, compiled=True)
    h, alpha = torch.randn(2, 3, 8, device=DEVICE), torch.randn(4, 4, device=DEVICE)
    check_lower(lambda h, a: MF.alpha_mix(h, a, 2), lambda h, a: alpha_mix_reference(h, a, 2), (h, alpha), dtype,
                backend, compiled=True)
