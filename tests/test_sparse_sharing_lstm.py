"""SparseSharingLSTM as a drop-in torch.nn.LSTM: against torch.nn.LSTM loaded with each task's
masked weights (outputs, h_n, c_n and every gradient), for 1 and 2 layers, uni- and
bidirectional, batch_first both ways, per-sample task ids, every task at once, PackedSequence;
hard sharing equals torch.nn.LSTM; gradients are exactly zero outside each mask."""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import mtlfast
import mtlfast.nn as mnn
from tests.conftest import DEVICE
from tests.helpers import assert_close, backend_params

BACKENDS = backend_params(DEVICE, ("reference", "cpu", "triton"))
T, B, I, H, N = 5, 4, 6, 5, 3


def make_model(layers=1, bidirectional=False, batch_first=False, density=0.6, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = mnn.SparseSharingLSTM(I, H, layers, num_tasks=N, bidirectional=bidirectional,
                                  batch_first=batch_first).to(DEVICE, dtype)
    for task in range(N):
        for name in model.masked_parameter_names():
            model.set_mask(task, name, torch.rand(getattr(model, name).shape, device=DEVICE) < density)
    return model


def compare_with_subnet(model, backend, x, task, dtype=torch.float32, hx=None):
    """Model on `task` (int) vs model.subnet(task): outputs, states and the base weights'
    gradients (the subnet's gradients masked = what the shared weights must receive)."""
    sub = model.subnet(task)
    with mtlfast.use_backend(backend):
        out, (h, c) = model(x, hx, task=task)
    ref_out, (ref_h, ref_c) = sub(x, hx)
    data = lambda o: o.data if hasattr(o, "batch_sizes") else o  # noqa: E731
    assert_close(data(out), data(ref_out), dtype, "output")
    assert_close(h, ref_h, dtype, "h_n")
    assert_close(c, ref_c, dtype, "c_n")
    loss_weights = torch.randn_like(data(ref_out))
    ((data(out) * loss_weights).sum() + h.sum() + c.square().sum()).backward()
    ((data(ref_out) * loss_weights).sum() + ref_h.sum() + ref_c.square().sum()).backward()
    for name, param in model.named_parameters():
        expected = getattr(sub, name).grad
        if name.startswith("weight_"):
            expected = expected * model.get_mask(task, name)
        assert_close(param.grad, expected, dtype, f"gradient of {name}")
    model.zero_grad()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (1, True), (2, True), (2, False)])
@pytest.mark.parametrize("batch_first", [False, True])
def test_task_subnet_equals_masked_torch_lstm(backend, layers, bidirectional, batch_first):
    model = make_model(layers, bidirectional, batch_first)
    x = torch.randn(B, T, I, device=DEVICE) if batch_first else torch.randn(T, B, I, device=DEVICE)
    compare_with_subnet(model, backend, x, task=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_initial_state_and_unbatched_input(backend):
    model = make_model(2, True)
    hx = (torch.randn(4, B, H, device=DEVICE), torch.randn(4, B, H, device=DEVICE))
    compare_with_subnet(model, backend, torch.randn(T, B, I, device=DEVICE), task=2, hx=hx)
    compare_with_subnet(model, backend, torch.randn(T, I, device=DEVICE), task=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequence(backend):
    model = make_model(2, True)
    x = torch.randn(T, B, I, device=DEVICE)
    packed = pack_padded_sequence(x, torch.tensor([5, 2, 4, 1]), enforce_sorted=False)
    compare_with_subnet(model, backend, packed, task=0)


# unsorted; each task's samples back to back, as many per task (gathered by views, no copy);
# sorted but uneven
TASK_LAYOUTS = {"scattered": [2, 0, 2, 1], "blocks": [0, 0, 2, 2], "sorted-uneven": [0, 0, 0, 1]}


@pytest.mark.parametrize("layout", TASK_LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_equals_each_task_alone(backend, layout):
    model = make_model(1, True)
    x = torch.randn(T, B, I, device=DEVICE)
    tasks = torch.tensor(TASK_LAYOUTS[layout], device=DEVICE)
    with mtlfast.use_backend(backend):
        out, (h, c) = model(x, task=tasks)
        for b, task in enumerate(tasks.tolist()):
            alone, (ha, ca) = model(x[:, b:b + 1], task=task)
            assert_close(out[:, b:b + 1], alone, torch.float32, f"row {b}")
            assert_close(h[:, b:b + 1], ha, torch.float32, f"h_n row {b}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_task_at_once(backend):
    model = make_model(2, True)
    x = torch.randn(T, B, I, device=DEVICE)
    with mtlfast.use_backend(backend):
        out, (h, c) = model(x, task="all")
        assert out.shape == (N, T, B, 2 * H) and h.shape == (N, 4, B, H)
        for task in range(N):
            alone, (ha, ca) = model(x, task=task)
            assert_close(out[task], alone, torch.float32, f"task {task}")
            assert_close(c[task], ca, torch.float32, f"c_n task {task}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_sharing_equals_torch_lstm(backend):
    torch.manual_seed(3)
    model = mnn.SparseSharingLSTM(I, H, 2, bidirectional=True, num_tasks=N).to(DEVICE)
    torch.manual_seed(3)
    lstm = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True).to(DEVICE)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), lstm.parameters()))  # same init
    x = torch.randn(T, B, I, device=DEVICE)
    with mtlfast.use_backend(backend):
        out, (h, c) = model(x, task=0)
    ref, (rh, rc) = lstm(x)
    assert_close(out, ref, torch.float32, "output")
    assert_close(h, rh, torch.float32, "h_n")


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_weight_gradient_is_sum_of_masked_task_gradients(backend):
    """The mixed batch's gradient of a shared weight = Σ_t M_t ⊙ grad_t, exactly 0 where no task keeps it."""
    model = make_model(1, True, density=0.4)
    x = torch.randn(T, B, I, device=DEVICE)
    tasks = torch.tensor([0, 1, 2, 0], device=DEVICE)
    with mtlfast.use_backend(backend):
        out, _ = model(x, task=tasks)
    out.square().sum().backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for b, task in enumerate(tasks.tolist()):
        sub = model.subnet(task)
        ref, _ = sub(x[:, b:b + 1])
        ref.square().sum().backward()
        for n, p in sub.named_parameters():
            expected[n] += p.grad * (model.get_mask(task, n) if n.startswith("weight_") else 1)
    for name in model.masked_parameter_names():
        assert_close(mixed[name], expected[name], torch.float32, name)
        kept_by_any = torch.stack([model.get_mask(t, name) for t in range(N)]).any(0)
        assert torch.all(mixed[name][~kept_by_any] == 0)


def test_state_dict_loads_both_ways():
    model = make_model(2, True)
    lstm = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True).to(DEVICE)
    model.load_state_dict(lstm.state_dict())                  # strict: masks are kept
    assert all(torch.equal(getattr(model, n), p) for n, p in lstm.named_parameters())
    assert model.density(0) < 1.0
    other = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True).to(DEVICE)
    result = other.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys and all(k.startswith("mask_") for k in result.unexpected_keys)
    restored = mnn.SparseSharingLSTM(I, H, 2, bidirectional=True, num_tasks=N).to(DEVICE)
    restored.load_state_dict(model.state_dict())
    assert torch.equal(restored.get_mask(1, "weight_hh_l1_reverse"), model.get_mask(1, "weight_hh_l1_reverse"))


def test_from_lstm_and_density():
    lstm = torch.nn.LSTM(I, H, bidirectional=True, batch_first=True)
    model = mnn.SparseSharingLSTM.from_lstm(lstm, num_tasks=2)
    assert model.batch_first and model.bidirectional and model.num_tasks == 2
    assert model.density(1) == 1.0
    name = "weight_ih_l0"
    mask = torch.zeros(4 * H, I, dtype=torch.bool)
    mask[:, :3] = True
    model.set_mask(1, name, mask)
    total = sum(getattr(model, n).numel() for n in model.masked_parameter_names())
    assert model.density(1) == pytest.approx((total - 4 * H * (I - 3)) / total)
    assert model.density(0) == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_between_layers_only_in_training(backend):
    model = mnn.SparseSharingLSTM(I, H, 2, dropout=0.5, num_tasks=N).to(DEVICE)
    x = torch.randn(T, B, I, device=DEVICE)
    model.eval()
    with mtlfast.use_backend(backend):
        a, _ = model(x, task=0)
        b, _ = model(x, task=0)
        assert torch.equal(a, b)
        model.train()
        torch.manual_seed(0)
        c, _ = model(x, task=0)
    assert not torch.allclose(a, c)


BAD = [
    ("task out of range", lambda m, x: m(x, task=3), ValueError, ["'task'", "[0, 3)", "3"]),
    ("task ids out of range", lambda m, x: m(x, task=torch.tensor([0, 1, 5, 0])), ValueError, ["'task'", "[0, 3)"]),
    ("task ids wrong count", lambda m, x: m(x, task=torch.tensor([0, 1])), ValueError, ["'task'", "(4)", "(2,)"]),
    ("task wrong type", lambda m, x: m(x, task=1.5), TypeError, ["'task'", "float"]),
    ("input size", lambda m, x: m(torch.randn(T, B, I + 1), task=0), ValueError, ["'input'", "input_size", "Expected 6, got 7"]),
    ("mask wrong shape", lambda m, x: m.set_mask(0, "weight_ih_l0", torch.ones(3, 3, dtype=torch.bool)), ValueError,
     ["'mask'", "(20, 6)", "(3, 3)"]),
    ("mask not bool", lambda m, x: m.set_mask(0, "weight_ih_l0", torch.ones(20, 6)), TypeError, ["'mask'", "bool"]),
    ("unknown weight name", lambda m, x: m.get_mask(0, "bias_ih_l0"), ValueError, ["'name'", "weight_ih_l0"]),
    ("hx wrong shape", lambda m, x: m(x, task=0, hx=(torch.zeros(1, B, H), torch.zeros(2, B, H))), ValueError,
     ["'hx'", "(2, 4, 5)", "[1, 4, 5]"]),
]


@pytest.mark.parametrize("case,fn,error,fragments", BAD, ids=[b[0] for b in BAD])
def test_bad_input(case, fn, error, fragments):
    model = mnn.SparseSharingLSTM(I, H, bidirectional=True, num_tasks=N)
    with pytest.raises(error) as info:
        fn(model, torch.randn(T, B, I))
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {info.value}"


def test_native_cell_propagates_nan():
    """The native cell's hand-vectorised sigmoid and tanh (csrc/cpu/vector_math.h): NaN must
    still come out as NaN, in the steps after it and nowhere else."""
    model = make_model(1, False).cpu()   # the native cell is the CPU backend's, whatever DEVICE is
    x = torch.randn(T, B, I)
    x[2, 1, 0] = float("nan")
    with mtlfast.use_backend("cpu"):
        out, (h, c) = model(x, task=0)
    assert torch.isnan(out[2:, 1]).all() and not torch.isnan(out[:2]).any() and not torch.isnan(out[:, 0]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hidden", [16, 13])   # whole vectors, and a tail of 5 units
def test_native_cell_activations(dtype, hidden):
    """One step of the native recurrence with a zero recurrent weight, so the saved gates are the
    activations of xproj itself: within a few ulp of torch.sigmoid / torch.tanh over the whole
    range (the vector exp's reduction at every binade), exactly 0 and 1 at ±inf and past the
    range where e^-|x| underflows, NaN where xproj is NaN; and the cell's c and h from them."""
    from mtlfast.ops import masked_lstm_cpu as K

    G, B, H = 1, 7, hidden
    values = torch.cat([torch.linspace(-100, 100, 997, dtype=dtype), torch.logspace(-30, 2, 200, dtype=dtype),
                        -torch.logspace(-30, 2, 200, dtype=dtype),
                        torch.tensor([0.0, -0.0, 87.0, 88.0, -88.0, 89.0, 1e30, -1e30], dtype=dtype)])
    xproj = values.repeat(B * 4 * H // values.numel() + 1)[:B * 4 * H].view(G, 1, B, 4 * H).clone()
    xproj[0, 0, 0, :4 * H:H] = torch.tensor([float("inf"), float("-inf"), float("inf"), float("inf")])
    xproj[0, 0, 1, :4 * H:H] = torch.tensor([float("-inf"), float("inf"), float("-inf"), float("-inf")])
    xproj[0, 0, 2, 1] = float("nan")
    weights = K.prepare(torch.zeros(1, 4 * H, H, dtype=dtype), torch.zeros(1, dtype=torch.int64), None,
                        torch.full((1,), -1))
    c0 = torch.rand(G, B, H, dtype=dtype)
    hs, h_n, c_n, gates, cells, _ = K.forward_recurrence(xproj, torch.zeros(G, B, H, dtype=dtype), c0, weights,
                                                         torch.ones(G, B, dtype=torch.int64), torch.zeros(G, dtype=torch.bool))
    pre = xproj.view(B, 4, H)
    expected = torch.stack([pre[:, 0].sigmoid(), pre[:, 1].sigmoid(), pre[:, 2].tanh(), pre[:, 3].sigmoid()], 1)
    got = gates.view(B, 4, H)
    # 2 sigmoid(2x) - 1 for tanh(g) costs absolute, not relative, precision near 0
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got, expected, rtol=4 * eps, atol=4 * eps, equal_nan=True)
    assert got[0, :, 0].tolist() == [1.0, 0.0, 1.0, 1.0] and got[1, :, 0].tolist() == [0.0, 1.0, -1.0, 0.0]
    assert torch.isnan(got[2, 0, 1]) and torch.isnan(got).sum() == 1
    c = expected[:, 1] * c0[0] + expected[:, 0] * expected[:, 2]
    torch.testing.assert_close(c_n[0], c, rtol=8 * eps, atol=8 * eps, equal_nan=True)
    torch.testing.assert_close(h_n[0], expected[:, 3] * c.tanh(), rtol=8 * eps, atol=8 * eps, equal_nan=True)
    assert c_n[0, 0, 0] == 1 + 0 * c0[0, 0, 0] and h_n[0, 1, 0] == 0


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_gradients_accumulate_once(backend, compiled):
    """b_ih and b_hh get equal gradients in separate tensors: two backward passes without
    zeroing give exactly twice one pass (a shared .grad tensor would give four times)."""
    model = make_model(1, True)
    x = torch.randn(T, B, I, device=DEVICE)
    run = torch.compile(model, fullgraph=True) if compiled else model
    with mtlfast.use_backend(backend):
        run(x, task=1)[0].sum().backward()
        once = {name: p.grad.clone() for name, p in model.named_parameters()}
        run(x, task=1)[0].sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[name], msg=lambda m: f"{name}: {m}")
    assert model.bias_ih_l0.grad.data_ptr() != model.bias_hh_l0.grad.data_ptr()
    torch.testing.assert_close(once["bias_ih_l0"], once["bias_hh_l0"])
