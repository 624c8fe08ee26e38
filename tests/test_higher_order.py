"""Higher-order gradients and torch.func through every op and the modules: float64 gradgradcheck
where a backend takes float64, second derivatives against the reference's where it does not
(triton: float32), and torch.func.grad against autograd. The fused kernels' backward passes are not
themselves differentiable; with create_graph=True the ops differentiate their reference instead
(mtlfast/ops/common.py), so a second derivative is exact, never silently zero."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import mtlfast
import mtlfast.functional as MF
import mtlfast.nn as mnn
from mtlfast.ops.gumbel import (allocation_combine_reference, gumbel_pairs_reference, gumbel_sigmoid_reference,
                                gumbel_softmax_reference)
from mtlfast.ops.masked_linear import masked_linear_reference
from mtlfast.ops.masked_lstm import masked_lstm_layer, masked_lstm_layer_reference
from mtlfast.ops.sluice import alpha_mix_reference, layer_mix_reference, orthogonality_penalty_reference
from tests.conftest import DEVICE
from tests.helpers import backend_params

F64_BACKENDS = backend_params(DEVICE, ("reference", "cpu", "cuda"))
F32_BACKENDS = backend_params(DEVICE, ("triton",))
g = torch.Generator().manual_seed(3)


def _rand(*shape, dtype=torch.float64):
    return (torch.randn(*shape, generator=g) / 2).to(device=DEVICE, dtype=dtype)


MASK_LIN = (torch.rand(5, 7, generator=g) < 0.6).to(DEVICE)
LSTM_REST = (torch.tensor([0, 1], device=DEVICE), (torch.rand(2, 8, 2, generator=g) < 0.6).to(DEVICE),
             (torch.rand(2, 8, 2, generator=g) < 0.6).to(DEVICE), torch.tensor([1, -1], device=DEVICE),
             torch.tensor([[2], [1]], device=DEVICE), torch.tensor([False, True], device=DEVICE))
GUMBEL_SEED = 1234    # a fresh generator per call: the same noise on every call gradgradcheck makes

# name -> (op, reference (same signature), differentiable inputs (G=2, T=2, B=1, I=2, H=2 for the LSTM:
# gradgradcheck perturbs every element of the inputs and of the output gradients, one call each))
OPS = {
    "masked_linear": (lambda x, w, b: MF.masked_linear(x, w, MASK_LIN, b),
                      lambda x, w, b: masked_linear_reference(x, w, MASK_LIN, b), lambda d: (_rand(3, 7, dtype=d),
                                                                                           _rand(5, 7, dtype=d),
                                                                                           _rand(5, dtype=d))),
    "masked_lstm_layer": (lambda *f: masked_lstm_layer(*f, *LSTM_REST), lambda *f: masked_lstm_layer_reference(*f, *LSTM_REST),
                          lambda d: (_rand(2, 2, 1, 2, dtype=d), _rand(2, 1, 2, dtype=d), _rand(2, 1, 2, dtype=d),
                                     _rand(2, 8, 2, dtype=d), _rand(2, 8, 2, dtype=d), _rand(2, 8, dtype=d),
                                     _rand(2, 8, dtype=d))),
    "alpha_mix": (lambda h, a: MF.alpha_mix(h, a, 2), lambda h, a: alpha_mix_reference(h, a, 2),
                  lambda d: (_rand(2, 3, 4, dtype=d), _rand(4, 4, dtype=d))),
    "layer_mix": (MF.layer_mix, layer_mix_reference, lambda d: (_rand(3, 2, 2, 3, dtype=d), _rand(2, 3, dtype=d))),
    "orthogonality_penalty": (lambda w: MF.orthogonality_penalty(w, 2), lambda w: orthogonality_penalty_reference(w, 2),
                              lambda d: (_rand(6, 3, dtype=d),)),
    "gumbel_sigmoid": (lambda x: MF.gumbel_sigmoid(x, 0.7, False, generator=torch.Generator().manual_seed(GUMBEL_SEED)),
                       None, lambda d: (_rand(7, dtype=d),)),
    "gumbel_pairs": (lambda x: MF.gumbel_pairs(x, 0.7, False, generator=torch.Generator().manual_seed(GUMBEL_SEED)),
                     None, lambda d: (_rand(4, 2, dtype=d),)),
    "gumbel_softmax": (lambda x: MF.gumbel_softmax(x, 0.7, False, generator=torch.Generator().manual_seed(GUMBEL_SEED)),
                       None, lambda d: (_rand(3, 4, dtype=d),)),
    "allocation_combine": (MF.allocation_combine, allocation_combine_reference,
                           lambda d: (_rand(3, 2, 2, dtype=d), torch.tensor([1.0, 0.3, 1.0], dtype=d, device=DEVICE))),
}


def _gumbel_reference(name):
    from mtlfast.ops.gumbel import draw_seed

    seed = draw_seed(torch.Generator().manual_seed(GUMBEL_SEED))
    return {"gumbel_sigmoid": lambda x: gumbel_sigmoid_reference(x, 0.7, False, seed),
            "gumbel_pairs": lambda x: gumbel_pairs_reference(x, 0.7, False, seed),
            "gumbel_softmax": lambda x: gumbel_softmax_reference(x, 0.7, False, -1, seed)}[name]


def _reference(name):
    return OPS[name][1] or _gumbel_reference(name)


def _runs(backend, name, inputs) -> bool:
    """Whether ``backend`` has a kernel for this op and dtype (no case otherwise, as elsewhere)."""
    from mtlfast import backends
    key = {"gumbel_pairs": "gumbel_sigmoid"}.get(name, name)
    return backends.reasons(key, *inputs)[backend] is None


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("backend", F64_BACKENDS)
def test_gradgradcheck_float64(backend, name):
    op, _, make = OPS[name]
    inputs = tuple(t.requires_grad_() for t in make(torch.float64))
    if not _runs(backend, name, inputs):
        pytest.skip(f"{backend} has no float64 {name} kernel")
    with mtlfast.use_backend(backend):
        assert gradcheck(op, inputs)
        assert gradgradcheck(op, inputs, fast_mode=name == "masked_lstm_layer")   # (its full Jacobians take ~1 min)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("backend", F32_BACKENDS)
def test_second_derivatives_match_the_reference(backend, name):
    """Backends without float64: grad of (grad · v) · u in float32 against the reference in float64."""
    op, _, make = OPS[name]
    inputs = make(torch.float32)
    if not _runs(backend, name, inputs):
        pytest.skip(f"{backend} has no {name} kernel")
    results = []
    for fn, dtype in ((op, torch.float32), (_reference(name), torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
        with mtlfast.use_backend(backend if fn is op else "reference"):
            out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        v = [torch.ones_like(o) * 0.5 + torch.arange(o.numel(), device=DEVICE).view(o.shape).to(dtype) / 10
             for o in outs]
        first = torch.autograd.grad(outs, leaves, v, create_graph=True, allow_unused=True)
        total = sum((f * (i + 1)).sum() for i, f in enumerate(first) if f is not None)
        second = torch.autograd.grad(total, leaves, allow_unused=True)
        results.append([None if s is None else s.double() for s in second])
    for i, (a, b) in enumerate(zip(*results)):
        if b is None or not b.abs().max() > 0:
            assert a is None or not a.abs().max() > 0, f"input {i}"
            continue
        assert a is not None and a.abs().max() > 0, f"input {i}: second derivative lost"
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3, msg=lambda m: f"input {i}: {m}")


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("backend", backend_params(DEVICE, ("reference", "cpu", "triton")))
def test_torch_func_grad_equals_autograd(backend, name):
    op, _, make = OPS[name]
    inputs = make(torch.float32)
    if not _runs(backend, name, inputs):
        pytest.skip(f"{backend} has no {name} kernel")
    with mtlfast.use_backend(backend):
        grads = torch.func.grad(lambda *a: sum(o.float().square().sum() for o in _tuple(op(*a))),
                                argnums=tuple(range(len(inputs))))(*inputs)
    leaves = [t.clone().requires_grad_() for t in inputs]
    with mtlfast.use_backend("reference"):
        sum(o.float().square().sum() for o in _tuple(op(*leaves))).backward()
    for i, (a, leaf) in enumerate(zip(grads, leaves)):
        torch.testing.assert_close(a, leaf.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"input {i}: {m}")


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("backend", F64_BACKENDS)
def test_sparse_sharing_lstm_gradgradcheck(backend):
    """MAML-style meta-gradients through the module: float64 gradgradcheck over input, hx and a
    weight, a mixed batch of two tasks, a bidirectional layer."""
    torch.manual_seed(0)
    model = mnn.SparseSharingLSTM(2, 2, 1, bidirectional=True, num_tasks=2).to(DEVICE).double()
    model.set_mask(1, "weight_hh_l0", torch.tensor([[True, False]] * 8, device=DEVICE))
    tasks = torch.tensor([1, 0], device=DEVICE)

    def fn(x, h0, weight):
        params = dict(model.named_parameters(), weight_hh_l0=weight)
        with mtlfast.use_backend(backend):
            out, (h, c) = torch.func.functional_call(model, params, (x, (h0, torch.zeros_like(h0))),
                                                     {"task": tasks})
        return out, h, c
    inputs = (_rand(2, 2, 2).requires_grad_(), _rand(2, 2, 2).requires_grad_(),
              model.weight_hh_l0.detach().clone().requires_grad_())
    assert gradgradcheck(fn, inputs, fast_mode=True)     # random projections of the Jacobians


@pytest.mark.parametrize("backend", backend_params(DEVICE, ("reference", "cpu")))
def test_sluice_lstm_gradgradcheck(backend):
    torch.manual_seed(0)
    model = mnn.SluiceLSTM(2, 2, 2, num_layers=1, bidirectional=False).to(DEVICE).double()

    def fn(x, alpha):
        params = dict(model.named_parameters(), **{"mixers.0.alpha": alpha})
        with mtlfast.use_backend(backend):
            return torch.func.functional_call(model, params, (x,))
    inputs = (_rand(1, 2, 2).requires_grad_(), model.mixers[0].alpha.detach().clone().requires_grad_())
    assert gradgradcheck(fn, inputs, fast_mode=True)
    with mtlfast.use_backend(backend if backend != "cpu" else "auto"):     # the penalty has no cpu kernel
        penalty = model.orthogonality_penalty()
        (grad,) = torch.autograd.grad(penalty, model.lstms[0][0].weight_ih_l0, create_graph=True)
        (second,) = torch.autograd.grad(grad.square().sum(), model.lstms[0][0].weight_ih_l0)
    assert second.abs().max() > 0

