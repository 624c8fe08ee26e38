"""The grouped masked LSTM op: every backend against the reference (outputs, final states and
every gradient); lengths, reverse groups, unmasked groups, shared weight sets. The reference
against its independent oracle (torch.nn.LSTM with masked weights) is in tests/test_oracles.py."""
from __future__ import annotations

import pytest
import torch

import mtlfast
from mtlfast.ops.masked_lstm import masked_lstm_layer, masked_lstm_layer_reference, reverse_within_lengths
from tests.conftest import DEVICE
from tests.helpers import assert_close, backend_params

BACKENDS = backend_params(DEVICE, ("reference", "cpu", "triton"))


def make_case(G=4, T=6, B=3, I=5, H=7, S=2, P=3, dtype=torch.float64, lengths=None, device=DEVICE):
    g = torch.Generator().manual_seed(1)
    rnd = lambda *shape: (torch.randn(*shape, generator=g) / 2).to(device=device, dtype=dtype)  # noqa: E731
    case = dict(x=rnd(G, T, B, I), h0=rnd(G, B, H), c0=rnd(G, B, H), w_ih=rnd(S, 4 * H, I), w_hh=rnd(S, 4 * H, H),
                b_ih=rnd(S, 4 * H), b_hh=rnd(S, 4 * H),
                weight_index=torch.tensor([i % S for i in range(G)], device=device),
                masks_ih=(torch.rand(P, 4 * H, I, generator=g) < 0.6).to(device),
                masks_hh=(torch.rand(P, 4 * H, H, generator=g) < 0.6).to(device),
                mask_index=torch.tensor([(i % (P + 1)) - 1 for i in range(G)], device=device),
                lengths=(lengths if lengths is not None else torch.randint(0, T + 1, (G, B), generator=g)).to(device),
                reverse=torch.tensor([i % 2 == 1 for i in range(G)], device=device))
    return case


ORDER = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "weight_index", "masks_ih", "masks_hh", "mask_index",
         "lengths", "reverse")
DIFFERENTIABLE = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")


def call(fn, case):
    return fn(*(case[k] for k in ORDER))


def test_reverse_within_lengths_is_an_involution():
    seq = torch.arange(2 * 5 * 3).view(2, 5, 3).unsqueeze(-1)
    lengths = torch.tensor([[5, 2, 0], [3, 5, 1]])
    flipped = reverse_within_lengths(seq, lengths, torch.tensor([True, False]))
    assert flipped[0, :, 1, 0].tolist() == [seq[0, 1, 1, 0].item(), seq[0, 0, 1, 0].item()] + seq[0, 2:, 1, 0].tolist()
    assert torch.equal(flipped[1], seq[1])
    assert torch.equal(reverse_within_lengths(flipped, lengths, torch.tensor([True, False])), seq)


def _compare_backend(backend, case, dtype):
    ours = {k: (v.detach().clone().requires_grad_() if k in DIFFERENTIABLE else v) for k, v in case.items()}
    ref = {k: (v.detach().double().requires_grad_() if k in DIFFERENTIABLE else v) for k, v in case.items()}
    with mtlfast.use_backend(backend):
        out = call(masked_lstm_layer, ours)
    expected = call(masked_lstm_layer_reference, ref)
    for name, a, b in zip(("y", "h_n", "c_n"), out, expected):
        assert a.dtype == dtype
        assert_close(a, b, dtype, name)
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(e.shape, generator=gen, dtype=torch.float64).to(DEVICE) for e in expected]
    torch.autograd.backward(out, [g.to(dtype) for g in grads])
    torch.autograd.backward(expected, [g.to(dtype).double() for g in grads])
    for name in DIFFERENTIABLE:
        assert_close(ours[name].grad, ref[name].grad, dtype, f"gradient of {name}")
    return ours


# triton takes no float64 (tl.dot has none); that reason is tested in test_backends
@pytest.mark.parametrize("backend,dtype", [
    pytest.param(b.values[0], d, marks=b.marks, id=f"{b.id}-{str(d).replace('torch.', '')}")
    for b in BACKENDS for d in (torch.float64, torch.float32, torch.bfloat16)
    if not (b.values[0] == "triton" and d == torch.float64)])
def test_backend_matches_reference(backend, dtype):
    _compare_backend(backend, make_case(dtype=dtype), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_lengths_odd_sizes(backend):
    case = make_case(G=2, T=4, B=1, I=33, H=33, S=1, P=2, dtype=torch.float32,
                     lengths=torch.full((2, 1), 4))
    _compare_backend(backend, case, torch.float32)


def _cpu_recurrences(groups: int, threads: int):
    """The native forward and backward recurrences (csrc/cpu/masked_lstm.cpp) on fixed inputs, on
    ``threads`` threads: hs, h_n, c_n, gates, cells, h_prev, dgates, dh0, dc0. Only the recurrences,
    not the op: BLAS (the projections and weight gradients around them) may split its sums
    differently by thread count on other CPUs."""
    from mtlfast.ops import masked_lstm_cpu as native
    G, T, B, H = groups, 5, 11, 37
    g = torch.Generator().manual_seed(3)
    rnd = lambda *shape: torch.randn(*shape, generator=g) / 2   # noqa: E731
    weights = native.prepare(rnd(2, 4 * H, H), torch.arange(G) % 2, torch.rand(3, 4 * H, H, generator=g) < 0.6,
                             torch.arange(G) % 4 - 1)
    lengths = torch.randint(0, T + 1, (G, B), generator=g)
    reverse = torch.arange(G) % 2 == 1
    xproj, h0, c0 = rnd(G, T, B, 4 * H), rnd(G, B, H), rnd(G, B, H)
    dhs, dh_n, dc_n = rnd(G, T, B, H), rnd(G, B, H), rnd(G, B, H)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        hs, h_n, c_n, gates, cells, h_prev = native.forward_recurrence(xproj, h0, c0, weights, lengths, reverse)
        back = native.backward_recurrence(dhs, dh_n, dc_n, gates, cells, c0, weights, lengths, reverse)
    finally:
        torch.set_num_threads(saved)
    return (hs, h_n, c_n, gates, cells, h_prev, *back)


# G groups over a team of threads: dealt whole (G % threads == 0), shared one at a time with a
# barrier per step (G < threads), and both in one call (G = 5 over 2 or 3 threads)
@pytest.mark.parametrize("groups", [1, 2, 3, 5, 6])
def test_cpu_same_numbers_on_any_thread_count(groups):
    """The cpu recurrences deal groups whole to threads or split one group's unit blocks and rows
    among them: each value is computed by the same instructions either way, so every output of
    both recurrences is bit-identical on 1, 2 and 3 threads (whatever the CPU's vector width)."""
    want = _cpu_recurrences(groups, 1)
    for threads in (2, 3):
        got = _cpu_recurrences(groups, threads)
        for index, (a, b) in enumerate(zip(got, want, strict=True)):
            assert torch.equal(a, b), f"threads={threads}: recurrence output {index} differs from 1 thread"


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_matches_reference(backend):
    """Under no_grad a backend may skip storing what backward needs (the cpu one does): the
    outputs must not change."""
    case = make_case(dtype=torch.float32)
    with torch.no_grad():
        want = call(masked_lstm_layer_reference, case)
        with mtlfast.use_backend(backend):
            got = call(masked_lstm_layer, case)
    for name, a, b in zip(("y", "h_n", "c_n"), got, want, strict=True):
        assert_close(a, b, torch.float32, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_gradients_zero_outside_every_mask(backend):
    """A weight masked out in every group that uses it gets exactly zero gradient."""
    case = make_case(dtype=torch.float32, G=2, S=1, P=2)
    case["mask_index"] = torch.tensor([0, 1], device=DEVICE)
    ours = _compare_backend(backend, case, torch.float32)
    never_ih = ~(case["masks_ih"][0] | case["masks_ih"][1])
    never_hh = ~(case["masks_hh"][0] | case["masks_hh"][1])
    assert never_ih.any() and never_hh.any()
    assert torch.all(ours["w_ih"].grad[0][never_ih] == 0)
    assert torch.all(ours["w_hh"].grad[0][never_hh] == 0)


@pytest.mark.parametrize("backend", backend_params(DEVICE, ("reference", "cpu")))
def test_gradcheck_float64(backend):
    case = make_case(G=2, T=3, B=2, I=3, H=2, S=1, P=1)
    inputs = [case[k].detach().requires_grad_() for k in DIFFERENTIABLE]

    def fn(*args):
        full = dict(case, **dict(zip(DIFFERENTIABLE, args)))
        with mtlfast.use_backend(backend):
            return call(masked_lstm_layer, full)
    assert torch.autograd.gradcheck(fn, inputs)


BAD = [
    ("weight_index out of range", dict(weight_index=torch.tensor([0, 5, 0, 1])), ValueError, ["'weight_index'", "[0, 2)"]),
    ("mask_index out of range", dict(mask_index=torch.tensor([0, 3, -1, -2])), ValueError, ["'mask_index'", "[-1, 3)"]),
    ("lengths too long", dict(lengths=torch.full((4, 3), 9)), ValueError, ["'lengths'", "[0, 6]"]),
    ("input size mismatch", dict(x=torch.randn(4, 6, 3, 9, dtype=torch.float64)), ValueError, ["'w_ih'", "(2, 28, 9)"]),
    ("mask wrong shape", dict(masks_ih=torch.ones(3, 28, 4, dtype=torch.bool)), ValueError, ["'masks_ih'", "(3, 28, 5)"]),
    ("mask not bool", dict(masks_hh=torch.ones(3, 28, 7)), TypeError, ["'masks_hh'", "bool"]),
    ("h0 wrong shape", dict(h0=torch.zeros(4, 3, 8, dtype=torch.float64)), ValueError, ["'h0'", "(4, 3, 7)"]),
    ("dtype mismatch", dict(w_hh=torch.zeros(2, 28, 7)), TypeError, ["'w_hh'", "float64", "float32"]),
]


@pytest.mark.parametrize("case_name,override,error,fragments", BAD, ids=[b[0] for b in BAD])
def test_bad_input(case_name, override, error, fragments):
    case = {**make_case(device=torch.device("cpu")), **override}
    with pytest.raises(error) as info:
        call(masked_lstm_layer, case)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {info.value}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    case = make_case(dtype=torch.float32)
    ours = {k: (v.detach().clone().requires_grad_() if k in DIFFERENTIABLE else v) for k, v in case.items()}
    ref = {k: (v.detach().double().requires_grad_() if k in DIFFERENTIABLE else v) for k, v in case.items()}
    with mtlfast.use_backend(backend):
        out = call(torch.compile(masked_lstm_layer, fullgraph=True), ours)
    expected = call(masked_lstm_layer_reference, ref)
    for name, a, b in zip(("y", "h_n", "c_n"), out, expected):
        assert_close(a, b, torch.float32, name)
    torch.autograd.backward(out, [torch.ones_like(o) for o in out])
    torch.autograd.backward(expected, [torch.ones_like(o) for o in expected])
    for name in DIFFERENTIABLE:
        assert_close(ours[name].grad, ref[name].grad, torch.float32, f"gradient of {name}")

