"""Masks have one meaning and are never stale: whatever changed a mask (an in-place op, a write
through ``.data`` or a view, ``copy_``, ``set_mask``, ``load_state_dict`` with or without
``assign=True``) is what the next call uses, on every backend; mask buffers stay bool (0/1 numbers
become bool on load, anything else is refused); and a weight outside the mask never influences
anything, even an inf or NaN one, on every backend."""
from __future__ import annotations

import pytest
import torch

import mtlfast
import mtlfast.functional as MF
import mtlfast.nn as mnn
from mtlfast.ops.masked_linear import masked_linear_reference
from tests.conftest import DEVICE
from tests.helpers import assert_close, backend_params

BACKENDS = backend_params(DEVICE, ("reference", "cpu", "triton"))
LINEAR_BACKENDS = backend_params(DEVICE, ("reference", "triton", "cuda"))
T, B, I, H, N = 4, 3, 5, 6, 2


def _model(layers=1):
    torch.manual_seed(0)
    model = mnn.SparseSharingLSTM(I, H, layers, bidirectional=True, num_tasks=N).to(DEVICE)
    for task in range(N):
        for name in model.masked_parameter_names():
            model.set_mask(task, name, torch.rand(getattr(model, name).shape, device=DEVICE) < 0.6)
    return model


def _assert_matches_subnet(model, backend, x, task):
    with mtlfast.use_backend(backend), torch.no_grad():
        out, (h, c) = model(x, task=task)
    ref, (rh, rc) = model.subnet(task)(x)
    assert_close(out, ref, torch.float32, "output")
    assert_close(c, rc, torch.float32, "c_n")


def _flip_in_place(model):
    model.mask_hh_l0[1].logical_not_()


def _flip_through_data(model):
    model.mask_hh_l0.data[1] = ~model.mask_hh_l0.data[1]       # .data does not bump the version counter


def _flip_through_get_mask_view(model):
    view = model.get_mask(1, "weight_ih_l0")                    # row 1 = task 1, forward direction
    view.data.copy_(~view)


def _copy_into(model):
    model.mask_ih_l0.copy_(torch.rand(model.mask_ih_l0.shape, device=DEVICE) < 0.3)


def _set_mask(model):
    model.set_mask(1, "weight_hh_l0", torch.rand(4 * H, H, device=DEVICE) < 0.2)


def _load_state_dict(model, assign=False):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["mask_hh_l0"] = torch.rand(state["mask_hh_l0"].shape, device=DEVICE) < 0.4
    state["mask_ih_l0"] = (torch.rand(state["mask_ih_l0"].shape, device=DEVICE) < 0.4).float()  # 0/1 floats
    model.load_state_dict(state, assign=assign)


ROUTES = {"in-place op": _flip_in_place, ".data": _flip_through_data, "view of get_mask": _flip_through_get_mask_view,
          "copy_": _copy_into, "set_mask": _set_mask, "load_state_dict": _load_state_dict,
          "load_state_dict assign": lambda m: _load_state_dict(m, assign=True)}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lstm_uses_the_mask_as_it_is_now(backend, route):
    model = _model()
    x = torch.randn(T, B, I, device=DEVICE)
    _assert_matches_subnet(model, backend, x, 1)       # a first call (it would fill any cache)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("mask_")}
    ROUTES[route](model)
    assert any(not torch.equal(before[k], getattr(model, k)) for k in before), "the route changed no mask"
    assert all(getattr(model, k).dtype == torch.bool for k in before)
    _assert_matches_subnet(model, backend, x, 1)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_masked_linear_uses_the_mask_as_it_is_now(backend):
    x = torch.randn(7, 40, device=DEVICE)
    w = torch.randn(9, 40, device=DEVICE)
    mask = torch.rand(9, 40, device=DEVICE) < 0.5
    with mtlfast.use_backend(backend):
        MF.masked_linear(x, w, mask)
        for write in (lambda m: m.data.logical_not_(), lambda m: m[2].data.fill_(False), lambda m: m.logical_not_()):
            write(mask)
            assert_close(MF.masked_linear(x, w, mask), masked_linear_reference(x, w, mask), torch.float32, "output")


# ---------------------------------------------------------------------------------------------
# One meaning: bool

def test_load_converts_zero_one_masks_to_bool_and_refuses_others():
    model = _model()
    state = model.state_dict()
    as_float = {k: (v.double() if k.startswith("mask_") else v) for k, v in state.items()}
    for assign in (False, True):
        fresh = mnn.SparseSharingLSTM(I, H, bidirectional=True, num_tasks=N).to(DEVICE)
        fresh.load_state_dict(as_float, assign=assign)
        for name in ("mask_ih_l0", "mask_hh_l0"):
            assert getattr(fresh, name).dtype == torch.bool
            assert torch.equal(getattr(fresh, name), state[name])
    fresh = mnn.SparseSharingLSTM(I, H, bidirectional=True, num_tasks=N).to(DEVICE)
    bad = dict(state, mask_hh_l0=state["mask_hh_l0"].float() * 0.5)
    with pytest.raises(RuntimeError, match="mask_hh_l0.*only 0 and 1"):
        fresh.load_state_dict(bad)
    assert bool(fresh.mask_hh_l0.all()), "a refused mask must not be loaded"
    meta = dict(state, mask_ih_l0=torch.ones(state["mask_ih_l0"].shape, dtype=torch.bool, device="meta"))
    with pytest.raises(RuntimeError, match="mask_ih_l0.*meta"):
        fresh.load_state_dict(meta, assign=True)
    assert fresh.mask_ih_l0.device == DEVICE


def test_deferred_init_resets_masks():
    """Built on meta, to_empty() + reset_parameters(): nn.LSTM's initialisation and all-True masks."""
    torch.manual_seed(4)
    lstm = torch.nn.LSTM(I, H, 2, bidirectional=True)
    model = mnn.SparseSharingLSTM(I, H, 2, bidirectional=True, num_tasks=N, device="meta")
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    model.to_empty(device="cpu")
    torch.manual_seed(4)
    model.reset_parameters()
    for name, param in lstm.named_parameters():
        assert torch.equal(getattr(model, name), param), name
    assert all(m.dtype == torch.bool and bool(m.all()) for m in model.buffers())


# ---------------------------------------------------------------------------------------------
# A weight outside the mask never influences anything

def _poison(weight, mask):
    """weight with inf and NaN at some positions outside the mask (and nowhere else)."""
    out = weight.detach().clone()
    outside = (~mask).nonzero()
    assert len(outside) >= 2
    out[tuple(outside[0])] = float("inf")
    out[tuple(outside[1])] = float("nan")
    return out


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_masked_linear_ignores_inf_and_nan_outside_the_mask(backend):
    x = torch.randn(4, 40, device=DEVICE, requires_grad=True)
    mask = torch.rand(9, 40, device=DEVICE) < 0.5
    clean = torch.where(mask, torch.randn(9, 40, device=DEVICE), 0.0).requires_grad_()
    poisoned = _poison(clean, mask).requires_grad_()
    outs = []
    with mtlfast.use_backend(backend):
        for w in (clean, poisoned):
            y = MF.masked_linear(x, w, mask)
            y.square().sum().backward()
            outs.append((y.detach(), x.grad.clone(), w.grad.clone()))
            x.grad = None
    (y0, dx0, dw0), (y1, dx1, dw1) = outs
    assert torch.isfinite(y1).all() and torch.equal(y0, y1) and torch.equal(dx0, dx1)
    assert torch.equal(dw0, dw1) and bool((dw1[~mask] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_lstm_ignores_inf_and_nan_outside_the_mask(backend):
    model = _model(2)
    x = torch.randn(T, B, I, device=DEVICE)
    tasks = torch.tensor([1, 0, 1], device=DEVICE)
    results = []
    for poison in (False, True):
        if poison:       # outside every task's mask: no task may see it
            with torch.no_grad():
                for name in ("weight_hh_l0", "weight_ih_l1_reverse"):
                    kept = torch.stack([model.get_mask(t, name) for t in range(N)]).any(0)
                    getattr(model, name).copy_(_poison(getattr(model, name), kept))
        model.zero_grad()
        with mtlfast.use_backend(backend):
            out, (h, c) = model(x, task=tasks)
        (out.square().sum() + c.sum()).backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out0, g0), (out1, g1) = results
    assert torch.isfinite(out1).all()
    assert_close(out1, out0, torch.float32, "output")
    for name in g0:
        assert torch.isfinite(g1[name]).all(), name
        assert_close(g1[name], g0[name], torch.float32, name)
