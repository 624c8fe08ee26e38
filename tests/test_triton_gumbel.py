"""Triton kernels of Gumbel-Matrix (triton_kernels/gumbel.py) against float64 formulations written
here on the PyTorch Philox noise of mtlfast/ops/philox.py, which is itself checked bit for bit
against tl.randint; gradients through torch.autograd on the soft formulas with the same noise."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from mtlfast.ops import philox  # noqa: E402
from mtlfast.triton_kernels import gumbel as K, masked_gemm  # noqa: E402
from tests.conftest import DEVICE  # noqa: E402
from tests.helpers import tolerance  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
SEEDS = [0, 1, 2**31 + 5, 2**32 + 7, 2**63 + 11, 2**64 - 1]
SIZES = [1, 7, 33, 1000]


def close(actual, expected, dtype):
    atol, rtol = tolerance(dtype, "gumbel_sigmoid")     # the Gumbel ops share one table
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def tau_tensor(value):
    return torch.tensor(value, device=DEVICE, dtype=torch.float32)


def flat_index(n):
    return torch.arange(n, device=DEVICE, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# The noise: PyTorch Philox == tl.randint, the uniform recipe, the kernels' own noise

@triton.jit
def _randint_kernel(off_ptr, out_ptr, seed, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    offs = tl.load(off_ptr + i, mask=i < n, other=0)
    tl.store(out_ptr + i, tl.randint(seed, offs).to(tl.int64), mask=i < n)   # uint32 -> int64 zero-extends


@triton.jit
def _uniform_kernel(off_ptr, out_ptr, seed_lo, seed_hi, n, INT64: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    offs = tl.load(off_ptr + i, mask=i < n, other=0)
    if not INT64:
        offs = offs.to(tl.int32)
    tl.store(out_ptr + i, K._uniform(seed_lo, seed_hi, offs, INT64), mask=i < n)


# int64 offsets beyond int32 (the interpreter computes in int64 as the GPU does)
OFFSETS = [0, 1, 2, 3, 63, 1000, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 3, 2**40 + 17, 2**62 + 9]


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_matches_tl_randint(seed):
    offsets = torch.tensor(OFFSETS, device=DEVICE, dtype=torch.int64)
    got = torch.empty_like(offsets)
    _randint_kernel[(1,)](offsets, got, seed, len(OFFSETS), BLOCK=16)
    want = philox.philox_randint(seed, offsets)
    assert want.min() >= 0 and want.max() < 2**32
    assert torch.equal(got, want)


@pytest.mark.parametrize("seed", [0, 2**31 + 5, 2**63 + 11])
@pytest.mark.parametrize("int64", [False, True])
def test_kernel_uniform_is_bit_identical(seed, int64):
    """The kernels' noise (seed split in two int32 words) is philox.uniform, bit for bit."""
    offsets = torch.tensor(OFFSETS if int64 else OFFSETS[:7], device=DEVICE, dtype=torch.int64)
    got = torch.empty(len(offsets), device=DEVICE, dtype=torch.float32)
    _uniform_kernel[(1,)](offsets, got, *K._seed_words(seed), len(offsets), INT64=int64, BLOCK=16)
    assert torch.equal(got.view(torch.int32), philox.uniform(seed, offsets).view(torch.int32))


def test_seed_words_are_int32():
    for seed in SEEDS:
        lo, hi = K._seed_words(seed)
        assert -2**31 <= lo < 2**31 and -2**31 <= hi < 2**31
        assert (lo & 0xFFFFFFFF) | ((hi & 0xFFFFFFFF) << 32) == seed
    for bad in (-1, 2**64, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            K._seed_words(bad)


def test_uniform_strictly_inside_at_the_extremes():
    x = torch.tensor([0, 1, 2**31, 2**32 - 1], device=DEVICE, dtype=torch.int64)
    u = philox.uniform_from_bits(x)
    assert u.dtype == torch.float32
    assert (u > 0).all() and (u < 1).all() and (1 - u > 0).all()
    assert u[0].item() == 2.0**-24 and u[-1].item() == 1 - 2.0**-24
    assert ((u * 2**24) % 2 == 1).all()              # exact midpoints (2k + 1) / 2**24
    logistic = torch.log(u) - torch.log(1 - u)
    gumbel = -torch.log(-torch.log(u))
    assert torch.isfinite(logistic).all() and torch.isfinite(gumbel).all()
    assert logistic[0].item() == -logistic[-1].item()   # antisymmetric: x -> ~x flips the sign


def test_noise_distribution():
    """Mean and spread of u over 2**16 draws: uniform on (0, 1)."""
    u = philox.uniform(123, flat_index(2**16)).double()
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002


# ---------------------------------------------------------------------------------------------
# Gumbel-sigmoid

def sigmoid_oracle(x, tau, seed):
    """(soft, hard) in float64 from x (float64, any shape), noise at the flat index."""
    L = philox.logistic_noise(seed, flat_index(x.numel())).double().reshape(x.shape)
    v = x + L
    return torch.sigmoid(v / tau), (v > 0).double()


def soft_and_grad(oracle, x, tau, seed, grad):
    leaf = x.detach().double().requires_grad_()
    soft, hard = oracle(leaf, tau, seed)
    (dx,) = torch.autograd.grad(soft, leaf, grad.double())
    return soft.detach(), hard.detach(), dx


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_gumbel_sigmoid(dtype, n):
    seed, tau = 2**40 + 3, 0.7
    x = (torch.randn(n, device=DEVICE) * 2).to(dtype)
    grad = torch.randn(n, device=DEVICE).to(dtype)
    soft, hard, dx = soft_and_grad(sigmoid_oracle, x, tau, seed, grad)
    y_hard = K.gumbel_sigmoid_forward(x, tau_tensor(tau), seed, True)
    assert y_hard.dtype == dtype and torch.equal(y_hard.double(), hard)
    close(K.gumbel_sigmoid_forward(x, tau_tensor(tau), seed, False), soft, dtype)
    close(K.gumbel_sigmoid_backward(grad, x, tau_tensor(tau), seed), dx, dtype)


def test_gumbel_sigmoid_any_shape():
    x = torch.randn(3, 5, 7, device=DEVICE)
    soft, hard = sigmoid_oracle(x.double(), 1.0, 9)
    assert torch.equal(K.gumbel_sigmoid_forward(x, tau_tensor(1.0), 9, True).double(), hard)
    close(K.gumbel_sigmoid_forward(x.transpose(0, 2), tau_tensor(1.0), 9, False),
          sigmoid_oracle(x.transpose(0, 2).contiguous().double(), 1.0, 9)[0], torch.float32)


def test_gumbel_sigmoid_is_bernoulli():
    """Hard samples of logit 0.8 are 1 with probability sigmoid(0.8) (4096 draws, ~5 sigma)."""
    y = K.gumbel_sigmoid_forward(torch.full((4096,), 0.8, device=DEVICE), tau_tensor(1.0), 77, True)
    assert abs(y.mean().item() - torch.sigmoid(torch.tensor(0.8)).item()) < 0.035


def test_new_seed_new_sample_same_seed_same_sample():
    x = torch.zeros(256, device=DEVICE)
    a = K.gumbel_sigmoid_forward(x, tau_tensor(1.0), 5, True)
    assert torch.equal(a, K.gumbel_sigmoid_forward(x, tau_tensor(1.0), 5, True))
    assert not torch.equal(a, K.gumbel_sigmoid_forward(x, tau_tensor(1.0), 6, True))


# ---------------------------------------------------------------------------------------------
# Gumbel-sigmoid on complementary pairs

def pairs_oracle(logits, tau, seed):
    x = logits[..., 0] - logits[..., 1]
    L = philox.logistic_noise(seed, flat_index(x.numel())).double().reshape(x.shape)
    v = x + L
    return torch.sigmoid(v / tau), (v > 0).double()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_gumbel_pairs(dtype, n):
    seed, tau = 31, 0.5
    logits = torch.randn(n, 2, device=DEVICE).to(dtype)
    grad = torch.randn(n, device=DEVICE).to(dtype)
    soft, hard, dlogits = soft_and_grad(pairs_oracle, logits, tau, seed, grad)
    z = K.gumbel_pairs_forward(logits, tau_tensor(tau), seed, True)
    assert z.shape == (n,) and z.dtype == dtype and torch.equal(z.double(), hard)
    close(K.gumbel_pairs_forward(logits, tau_tensor(tau), seed, False), soft, dtype)
    got = K.gumbel_pairs_backward(grad, logits, tau_tensor(tau), seed)
    assert got.shape == (n, 2)
    close(got, dlogits, dtype)
    assert torch.equal(got[:, 0], -got[:, 1])


def test_gumbel_pairs_batched_shape():
    """(T, C, 2) logits as GumbelMatrix holds them: the pair index runs over T*C."""
    logits = torch.randn(3, 11, 2, device=DEVICE)
    soft, hard = pairs_oracle(logits.double(), 1.0, 4)
    assert torch.equal(K.gumbel_pairs_forward(logits, tau_tensor(1.0), 4, True).double(), hard)
    close(K.gumbel_pairs_forward(logits, tau_tensor(1.0), 4, False), soft, torch.float32)


# ---------------------------------------------------------------------------------------------
# Gumbel-softmax

def softmax_oracle(x, tau, seed):
    R, C = x.shape
    g = philox.gumbel_noise(seed, flat_index(R * C)).double().reshape(R, C)
    v = x + g
    return torch.softmax(v / tau, dim=1), torch.nn.functional.one_hot(v.argmax(1), C).double()


# (R, C): single row and column, odd widths (pad columns), widths above the program's tile
SOFTMAX_SHAPES = [(1, 1), (7, 3), (33, 5), (5, 33), (3, 100), (2, 1000)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gumbel_softmax(dtype, shape):
    seed, tau = 2**33 + 1, 0.8
    x = torch.randn(shape, device=DEVICE).to(dtype)
    grad = torch.randn(shape, device=DEVICE).to(dtype)
    soft, hard, dx = soft_and_grad(softmax_oracle, x, tau, seed, grad)
    y_hard = K.gumbel_softmax_forward(x, tau_tensor(tau), seed, True)
    assert y_hard.dtype == dtype and torch.equal(y_hard.double(), hard)
    assert torch.equal(y_hard.sum(1), torch.ones(shape[0], device=DEVICE, dtype=dtype))
    close(K.gumbel_softmax_forward(x, tau_tensor(tau), seed, False), soft, dtype)
    close(K.gumbel_softmax_backward(grad, x, tau_tensor(tau), seed), dx, dtype)


def test_gumbel_softmax_ties_take_the_lowest_index():
    """Logits so large that the noise vanishes in fp32: every row is a tie, column 0 wins."""
    x = torch.full((4, 6), 3e9, device=DEVICE)
    y = K.gumbel_softmax_forward(x, tau_tensor(1.0), 0, True)
    assert torch.equal(y, torch.nn.functional.one_hot(torch.zeros(4, dtype=torch.int64), 6).float().to(DEVICE))


def test_gumbel_softmax_is_categorical():
    probs = torch.tensor([0.2, 0.5, 0.3])
    x = probs.log().expand(1500, 3).contiguous().to(DEVICE)
    freq = K.gumbel_softmax_forward(x, tau_tensor(1.0), 11, True).mean(0).cpu()
    assert (freq - probs).abs().max() < 0.06


def test_gumbel_softmax_too_wide():
    x = torch.zeros(1, K.MAX_SOFTMAX_COLUMNS + 1, device=DEVICE)
    with pytest.raises(ValueError, match="logits"):
        K.gumbel_softmax_forward(x, tau_tensor(1.0), 0, False)
    with pytest.raises(ValueError, match="logits"):
        K.gumbel_softmax_backward(x, x, tau_tensor(1.0), 0)


# ---------------------------------------------------------------------------------------------
# Extremes: no NaN or inf at logits ±1e4 and tau 1e-3

# the interpreter's numpy warns where exp overflows to inf, which the sigmoid then turns into 0
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_extreme_logits_and_tau():
    tau = tau_tensor(1e-3)
    x = torch.tensor([1e4, -1e4, 0.0, 5.0, -5.0, 1e4, -1e4], device=DEVICE)
    grad = torch.ones_like(x)
    pairs = torch.stack([x, -x.flip(0)], dim=1)
    rows = x.reshape(1, 7).expand(3, 7).contiguous()
    results = [K.gumbel_sigmoid_forward(x, tau, 3, hard) for hard in (False, True)]
    results += [K.gumbel_sigmoid_backward(grad, x, tau, 3)]
    results += [K.gumbel_pairs_forward(pairs, tau, 3, hard) for hard in (False, True)]
    results += [K.gumbel_pairs_backward(grad, pairs, tau, 3)]
    results += [K.gumbel_softmax_forward(rows, tau, 3, hard) for hard in (False, True)]
    results += [K.gumbel_softmax_backward(torch.ones_like(rows), rows, tau, 3)]
    for r in results:
        assert torch.isfinite(r).all(), r
    soft, hard = sigmoid_oracle(x.double(), 1e-3, 3)
    assert torch.equal(results[1].double(), hard)
    torch.testing.assert_close(results[0].double(), soft, atol=1e-5, rtol=0)
    assert results[2][[0, 1]].abs().max() == 0     # the slope at ±1e7 underflows to 0, not NaN


# ---------------------------------------------------------------------------------------------
# Allocation-weighted combine

def combine_oracle(outputs, z):
    return (z[:, None] * outputs).sum(0) / z.sum().clamp(min=1)


# z: a hard sample, all off (S = 0: m = 1, the clamp passes no gradient), one on (S = 1: at the
# clamp's bound, which passes it), soft values summing below and above 1
ALLOCATIONS = {
    "hard": [1, 0, 1, 1, 0, 1, 1], "none": [0] * 7, "one": [0, 0, 1, 0, 0, 0, 0],
    "soft_small": [0.1, 0.2, 0.05, 0.3, 0.0, 0.1, 0.15], "soft": [0.9, 0.2, 0.7, 0.3, 0.6, 0.1, 0.8],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("allocation", list(ALLOCATIONS))
def test_allocation_combine(dtype, n, allocation):
    z = torch.tensor(ALLOCATIONS[allocation], device=DEVICE, dtype=torch.float32)
    outputs = torch.randn(7, n, device=DEVICE).to(dtype)
    grad = torch.randn(n, device=DEVICE).to(dtype)
    o_leaf = outputs.double().requires_grad_()
    z_leaf = z.double().requires_grad_()
    want = combine_oracle(o_leaf, z_leaf)
    do_want, dz_want = torch.autograd.grad(want, (o_leaf, z_leaf), grad.double())
    out = K.allocation_combine_forward(outputs, z)
    assert out.shape == (n,) and out.dtype == dtype
    close(out, want.detach(), dtype)
    doutputs, dz = K.allocation_combine_backward(grad, outputs, z)
    assert doutputs.dtype == dtype and dz.dtype == torch.float32
    close(doutputs, do_want, dtype)
    # dz sums n products: its fp32 accumulation error grows with n
    torch.testing.assert_close(dz.double(), dz_want, atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=1e-4)


@pytest.mark.parametrize("components", [1, 3, 8])
def test_allocation_combine_components_and_shape(components):
    """Any component count (pad components of C_P), outputs (C, ...) with out (...)."""
    outputs = torch.randn(components, 3, 5, 7, device=DEVICE)
    z = (torch.rand(components, device=DEVICE) > 0.4).float()
    o_leaf = outputs.double().requires_grad_()
    z_leaf = z.double().requires_grad_()
    want = combine_oracle(o_leaf.reshape(components, -1), z_leaf).reshape(3, 5, 7)
    grad = torch.randn(3, 5, 7, device=DEVICE)
    do_want, dz_want = torch.autograd.grad(want, (o_leaf, z_leaf), grad.double())
    close(K.allocation_combine_forward(outputs, z), want.detach(), torch.float32)
    doutputs, dz = K.allocation_combine_backward(grad, outputs, z)
    close(doutputs, do_want, torch.float32)
    torch.testing.assert_close(dz.double(), dz_want, atol=1e-5, rtol=1e-5)


def test_idle_persistent_programs(monkeypatch):
    """More persistent programs than tiles: the idle ones write zero partials."""
    outputs = torch.randn(7, 40, device=DEVICE)
    z = torch.tensor(ALLOCATIONS["soft"], device=DEVICE)
    grad = torch.randn(40, device=DEVICE)
    before = K.allocation_combine_backward(grad, outputs, z)
    monkeypatch.setattr(K, "_num_programs", lambda device, work: work + 5)
    for a, b in zip(before, K.allocation_combine_backward(grad, outputs, z), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Empty inputs, int64 offsets

def test_empty():
    tau = tau_tensor(1.0)
    assert K.gumbel_sigmoid_forward(torch.zeros(0, 3, device=DEVICE), tau, 0, True).shape == (0, 3)
    assert K.gumbel_sigmoid_backward(torch.zeros(0, device=DEVICE), torch.zeros(0, device=DEVICE), tau, 0).shape == (0,)
    assert K.gumbel_pairs_forward(torch.zeros(0, 2, device=DEVICE), tau, 0, False).shape == (0,)
    assert K.gumbel_pairs_backward(torch.zeros(0, device=DEVICE), torch.zeros(0, 2, device=DEVICE), tau, 0).shape == (0, 2)
    assert K.gumbel_softmax_forward(torch.zeros(0, 5, device=DEVICE), tau, 0, True).shape == (0, 5)
    assert K.gumbel_softmax_backward(torch.zeros(4, 0, device=DEVICE), torch.zeros(4, 0, device=DEVICE), tau, 0).shape == (4, 0)
    assert K.allocation_combine_forward(torch.zeros(7, 0, device=DEVICE), torch.ones(7, device=DEVICE)).shape == (0,)
    assert torch.equal(K.allocation_combine_forward(torch.zeros(0, 5, device=DEVICE), torch.zeros(0, device=DEVICE)),
                       torch.zeros(5, device=DEVICE))
    doutputs, dz = K.allocation_combine_backward(torch.zeros(0, device=DEVICE), torch.zeros(7, 0, device=DEVICE),
                                                 torch.ones(7, device=DEVICE))
    assert doutputs.shape == (7, 0) and torch.equal(dz, torch.zeros(7, device=DEVICE))


def _all_outputs():
    tau = tau_tensor(0.6)
    x = torch.randn(77, device=DEVICE)
    pairs = torch.randn(45, 2, device=DEVICE)
    rows = torch.randn(9, 13, device=DEVICE)
    outputs = torch.randn(7, 70, device=DEVICE)
    z = torch.tensor(ALLOCATIONS["soft"], device=DEVICE)
    seed = 2**35 + 1
    return (K.gumbel_sigmoid_forward(x, tau, seed, True), K.gumbel_sigmoid_forward(x, tau, seed, False),
            K.gumbel_sigmoid_backward(x.flip(0), x, tau, seed),
            K.gumbel_pairs_forward(pairs, tau, seed, True), K.gumbel_pairs_forward(pairs, tau, seed, False),
            K.gumbel_pairs_backward(pairs[:, 0], pairs, tau, seed),
            K.gumbel_softmax_forward(rows, tau, seed, True), K.gumbel_softmax_forward(rows, tau, seed, False),
            K.gumbel_softmax_backward(rows.flip(0), rows, tau, seed),
            K.allocation_combine_forward(outputs, z), *K.allocation_combine_backward(outputs[0], outputs, z))


def test_int64_offsets_match(monkeypatch):
    """The INT64 variants (taken for huge tensors, which the interpreter cannot afford) compute the
    same, noise included (offsets below 2**32 have a zero high counter word either way)."""
    torch.manual_seed(0)
    small = _all_outputs()
    torch.manual_seed(0)
    monkeypatch.setattr(masked_gemm, "_needs_int64", lambda *t: True)   # every launcher asks there
    for a, b in zip(small, _all_outputs(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
