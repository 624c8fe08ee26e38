"""Empty sizes behave as PyTorch does, the same on every backend: batch 0 gives empty outputs and
gradients (zero for the weights, as torch.nn.LSTM gives), a mixing dim of 0 gives empty or zero
results; length 0 is nn.LSTM's error (tests/test_bad_inputs.py)."""
from __future__ import annotations

import pytest
import torch

import mtlfast
import mtlfast.functional as MF
import mtlfast.nn as mnn
from tests.conftest import DEVICE
from tests.helpers import backend_params

BACKENDS = backend_params(DEVICE, ("reference", "cpu", "triton"))


def _grads(fn, *inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward([o for o in outs], [torch.ones_like(o) for o in outs])
    return outs, [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("task", [0, "tensor", "all"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_sharing_lstm_batch_zero_as_torch_lstm(backend, task):
    torch.manual_seed(0)
    model = mnn.SparseSharingLSTM(3, 4, 2, bidirectional=True, num_tasks=1).to(DEVICE)
    lstm = torch.nn.LSTM(3, 4, 2, bidirectional=True).to(DEVICE)
    x = torch.randn(5, 0, 3, device=DEVICE, requires_grad=True)
    task = torch.zeros(0, dtype=torch.int64, device=DEVICE) if task == "tensor" else task
    with mtlfast.use_backend(backend):
        out, (h, c) = model(x, task=task)
    ref, (rh, rc) = lstm(x)
    if task == "all":
        assert out.shape == (1, *ref.shape) and h.shape == (1, *rh.shape) and c.shape == (1, *rc.shape)
    else:
        assert out.shape == ref.shape and h.shape == rh.shape and c.shape == rc.shape
    (out.sum() + h.sum() + c.sum()).backward()
    assert x.grad.shape == x.shape
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.equal(param.grad, torch.zeros_like(param)), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_sluice_lstm_batch_zero(backend):
    model = mnn.SluiceLSTM(3, 4, 2, num_layers=2).to(DEVICE)
    with mtlfast.use_backend(backend):
        out = model(torch.randn(0, 5, 3, device=DEVICE))
    assert out.shape == (2, 0, 5, 8)
    out.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def _across_backends(backends, fn, *inputs):
    """Every backend's outputs and gradients: equal to the reference's."""
    results = {}
    for backend in backends:
        with mtlfast.use_backend(backend):
            results[backend] = _grads(fn, *inputs)
    ref_outs, ref_grads = results["reference"]
    for backend, (outs, grads) in results.items():
        for a, b in zip(outs, ref_outs):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), backend
        for a, b in zip(grads, ref_grads):
            assert a is not None and a.shape == b.shape and torch.equal(a, b), backend
    return ref_outs, ref_grads


def _runnable(names):
    status = mtlfast.available_backends()
    return [n for n in names if status[n] is None and not (n == "cpu" and DEVICE.type != "cpu")
            and not (n == "cuda" and DEVICE.type != "cuda")]


@pytest.mark.parametrize("shape", [(2, 3, 0), (2, 0, 4), (1, 0, 0)], ids=["D=0", "N=0", "both"])
def test_alpha_mix_empty(shape):
    h, alpha = torch.randn(*shape, device=DEVICE), torch.randn(2 * shape[0], 2 * shape[0], device=DEVICE)
    (out,), (dh, dalpha) = _across_backends(_runnable(("reference", "cpu", "triton")),
                                            lambda a, b: MF.alpha_mix(a, b, 2), h, alpha)
    assert out.shape == shape and dh.shape == shape and torch.equal(dalpha, torch.zeros_like(alpha))


@pytest.mark.parametrize("shape", [(0, 2, 3, 4), (3, 2, 0, 4), (2, 2, 3, 0)], ids=["K=0", "N=0", "D=0"])
def test_layer_mix_empty(shape):
    layers, beta = torch.randn(*shape, device=DEVICE), torch.randn(shape[1], shape[0], device=DEVICE)
    (out,), (dlayers, dbeta) = _across_backends(_runnable(("reference", "cpu", "triton")), MF.layer_mix, layers, beta)
    assert out.shape == shape[1:] and dlayers.shape == shape and torch.equal(dbeta, torch.zeros_like(beta))
    if shape[0] == 0:
        assert torch.equal(out, torch.zeros_like(out))       # a sum over no layers


@pytest.mark.parametrize("sizes", [(0, 8, 5), (3, 0, 5), (3, 8, 0)], ids=["M=0", "K=0", "N=0"])
def test_masked_linear_empty(sizes):
    M, K, N = sizes
    x, w, b = torch.randn(M, K, device=DEVICE), torch.randn(N, K, device=DEVICE), torch.randn(N, device=DEVICE)
    mask = torch.rand(N, K, device=DEVICE) < 0.5
    (out,), (dx, dw, db) = _across_backends(_runnable(("reference", "triton", "cuda")),
                                            lambda x, w, b: MF.masked_linear(x, w, mask, b), x, w, b)
    assert out.shape == (M, N) and dx.shape == x.shape and dw.shape == w.shape
    if K == 0:
        assert torch.equal(out, b.expand(M, N))


@pytest.mark.parametrize("shape", [(0, 2), (3, 0, 2)], ids=["no pairs", "empty rows"])
def test_gumbel_empty(shape):
    logits = torch.randn(*shape, device=DEVICE)
    (z,), (dlogits,) = _across_backends(_runnable(("reference", "cpu", "triton")), MF.gumbel_pairs, logits)
    assert z.shape == shape[:-1] and dlogits.shape == shape
    (y,), _ = _across_backends(_runnable(("reference", "cpu", "triton")), MF.gumbel_softmax, logits)
    assert y.shape == shape


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (3, 2, 0)], ids=["C=0", "N=0", "N=0 2-D"])
def test_allocation_combine_empty(shape):
    outputs, z = torch.randn(*shape, device=DEVICE), torch.ones(shape[0], device=DEVICE)
    (out,), (doutputs, dz) = _across_backends(_runnable(("reference", "cpu", "triton")), MF.allocation_combine,
                                              outputs, z)
    assert out.shape == shape[1:] and doutputs.shape == shape and torch.equal(dz, torch.zeros_like(z))


def test_gumbel_softmax_zero_dim_and_empty_categories_as_torch():
    one = torch.tensor(1.5, device=DEVICE, requires_grad=True)
    y = MF.gumbel_softmax(one, hard=True)
    assert y.shape == () and float(y) == 1.0 == float(torch.nn.functional.gumbel_softmax(one.detach(), hard=True))
    y.backward()
    assert one.grad is not None and float(one.grad) == 0.0           # a softmax over one category is constant
    empty = torch.randn(3, 0, device=DEVICE, requires_grad=True)
    assert MF.gumbel_softmax(empty).shape == torch.nn.functional.gumbel_softmax(empty).shape == (3, 0)
