"""Gumbel-Matrix: MF.gumbel_sigmoid / gumbel_pairs / gumbel_softmax / allocation_combine on every
backend (same Philox noise everywhere, so samples are compared exactly), their statistics, the
straight-through gradient, numerical safety, and GumbelMatrix / ModularLayer."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import mtlfast
import mtlfast.functional as MF
import mtlfast.nn as mnn
from mtlfast.ops.gumbel import allocation_combine_reference, draw_seed, gumbel_noise, logistic_noise
from tests.conftest import DEVICE
from tests.helpers import assert_close, backend_params

BACKENDS = backend_params(DEVICE, ("reference", "cpu", "triton"))
# The interpreter runs Philox's ten rounds through numpy, ~0.3 ms per thousand draws: under it the
# Triton kernels draw 2^13 samples per case (the statistics at full size are the cpu backend's,
# whose stream is bit-identical: test_backends_draw_the_same_samples and tests/test_triton_gumbel.py).
INTERPRETED = DEVICE.type == "cpu"
INTERPRETER_DRAWS = 1 << 13


def _draws(backend: str, n: int) -> int:
    return INTERPRETER_DRAWS if backend == "triton" and INTERPRETED else n


@pytest.mark.parametrize("backend", BACKENDS)
def test_frequency_matches_sigmoid(backend):
    """Over ~10^6 draws (2^13 per logit under the interpreter) the frequency of 1 is sigmoid(logit)
    within 5 binomial standard deviations (+1 draw for the extreme logits)."""
    logits = torch.tensor([-20.0, -3.0, -0.5, 0.0, 0.5, 3.0, 20.0], device=DEVICE)
    n = _draws(backend, 150_000)
    torch.manual_seed(0)
    with mtlfast.use_backend(backend):
        z = MF.gumbel_sigmoid(logits.repeat_interleave(n), hard=True).view(len(logits), n)
    assert set(z.unique().tolist()) <= {0.0, 1.0}
    p = torch.sigmoid(logits.double()).cpu()
    freq = z.double().mean(1).cpu()
    bound = 5 * torch.sqrt(p * (1 - p) / n) + 1.0 / n
    assert torch.all((freq - p).abs() <= bound), (freq, p, bound)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hard", (True, False), ids=("hard", "soft"))
def test_straight_through_gradient_equals_soft_autograd(backend, hard):
    x = (torch.randn(3, 37, device=DEVICE) * 2).requires_grad_()
    tau = 0.7
    torch.manual_seed(5)
    with mtlfast.use_backend(backend):
        y = MF.gumbel_sigmoid(x, tau=tau, hard=hard)
    torch.manual_seed(5)
    noise = logistic_noise(draw_seed(), x.numel(), x.device).view(x.shape).double()
    v = x.detach().double().requires_grad_() + noise
    soft = torch.sigmoid(v / tau)
    expected = (v > 0).double() if hard else soft
    if hard:
        decided = v.detach().abs() > 1e-4           # the sign can differ in the last bit only there
        assert decided.float().mean() > 0.99
        assert torch.equal(y.detach().double()[decided], expected.detach()[decided])
    else:
        assert_close(y, expected, torch.float32, "soft sample")
    grad = torch.randn_like(y)
    y.backward(grad)
    (gx,) = torch.autograd.grad(soft, v, grad.double())
    assert_close(x.grad, gx, torch.float32, "straight-through gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairs_are_the_difference_of_two_gumbels(backend):
    """gumbel_pairs(l) is gumbel_sigmoid(l[..., 0] - l[..., 1]) with the same noise, gradient (+g, -g)."""
    logits = torch.randn(4, 9, 2, device=DEVICE, requires_grad=True)
    torch.manual_seed(3)
    with mtlfast.use_backend(backend):
        z = MF.gumbel_pairs(logits, tau=0.5)
        z.sum().backward()
    diff = (logits[..., 0] - logits[..., 1]).detach().requires_grad_()
    torch.manual_seed(3)
    with mtlfast.use_backend(backend):
        z2 = MF.gumbel_sigmoid(diff, tau=0.5)
        z2.sum().backward()
    assert torch.equal(z, z2)
    assert_close(logits.grad[..., 0], diff.grad, torch.float32, "d logit 0")
    assert_close(logits.grad[..., 1], -diff.grad, torch.float32, "d logit 1")


def test_backends_draw_the_same_samples():
    x = torch.randn(1000, device=DEVICE)
    samples = {}
    for backend in ("reference", "cpu"):
        torch.manual_seed(11)
        with mtlfast.use_backend(backend):
            samples[backend] = MF.gumbel_sigmoid(x, tau=1.0, hard=False)
    assert_close(samples["cpu"], samples["reference"], torch.float32, "cpu vs reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds(backend):
    x = torch.zeros(4096, device=DEVICE)
    with mtlfast.use_backend(backend):
        torch.manual_seed(1)
        a = MF.gumbel_sigmoid(x)
        torch.manual_seed(1)
        b = MF.gumbel_sigmoid(x)
        c = MF.gumbel_sigmoid(x)                                            # the next draw
        g1 = torch.Generator().manual_seed(9)
        g2 = torch.Generator().manual_seed(9)
        d, e = MF.gumbel_sigmoid(x, generator=g1), MF.gumbel_sigmoid(x, generator=g2)
    assert torch.equal(a, b) and torch.equal(d, e)
    assert not torch.equal(a, c) and not torch.equal(a, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_nan_or_inf_at_extreme_logits(backend):
    """10^7 draws at logits ±1e4 and tau 1e-3: finite samples and gradients. Fewer where the draw
    is slow and the stream is the same anyway (bit-identical to cpu's, tested): 10^6 for the
    pure-PyTorch reference, 2^13 under the interpreter."""
    n = 1_000_000 if backend == "reference" else _draws(backend, 10_000_000)
    x = torch.tensor([1e4, -1e4], device=DEVICE).repeat(n // 2).requires_grad_()
    with mtlfast.use_backend(backend):
        for hard in (True, False):
            y = MF.gumbel_sigmoid(x, tau=1e-3, hard=hard)
            (g,) = torch.autograd.grad(y.sum(), x)
            assert torch.isfinite(y).all() and torch.isfinite(g).all()
        assert torch.equal(MF.gumbel_sigmoid(x, hard=True).detach(), (x > 0).float())


F64_BACKENDS = backend_params(DEVICE, ("reference", "cpu"))      # triton computes in float32 (no fp64 tl ops)


@pytest.mark.parametrize("backend", F64_BACKENDS)
def test_float64_pairs_keep_float64_differences(backend):
    """(1e8+3, 1e8): a difference of 3 only float64 holds (float32 rounds both to 1e8), so z = 1 with
    frequency sigmoid(3) = 0.953; (1e300, 1e300), soft: 0.5 ± the noise, finite (float32: inf - inf)."""
    n = 40_000
    logits = torch.tensor([[1e8 + 3, 1e8]], dtype=torch.float64, device=DEVICE).expand(n, 2).contiguous()
    with mtlfast.use_backend(backend):
        freq = float(MF.gumbel_pairs(logits).mean())
        soft = MF.gumbel_pairs(torch.tensor([[1e300, 1e300]] * 100, dtype=torch.float64, device=DEVICE), hard=False)
    p = math.exp(3) / (1 + math.exp(3))
    assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / n), freq
    assert torch.isfinite(soft).all() and 0.2 < float(soft.mean()) < 0.8


TINY = {torch.float32: torch.finfo(torch.float32).tiny, torch.float64: 1e-50}


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_smallest_accepted_tau_gives_finite_samples_and_gradients(backend, dtype):
    """The smallest tau accepted for the dtype (1e-50 is refused for float32, which would round it to
    0, and accepted for float64): finite soft samples and gradients, sigmoid and softmax, including
    logits at exactly 0 where the slope is largest."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton takes float16, bfloat16 and float32")
    x = torch.cat([torch.zeros(8), torch.randn(64) * 3]).to(device=DEVICE, dtype=dtype).requires_grad_()
    tau = TINY[dtype]
    with mtlfast.use_backend(backend):
        for y in (MF.gumbel_sigmoid(x, tau=tau, hard=False), MF.gumbel_pairs(x.view(-1, 2), tau=tau, hard=False),
                  MF.gumbel_softmax(x.view(-1, 4), tau=tau), MF.gumbel_softmax(x.view(-1, 4), tau=tau, hard=True)):
            (grad,) = torch.autograd.grad((y * torch.linspace(0, 1, y.numel(), device=DEVICE,
                                                              dtype=dtype).view(y.shape)).sum(), x)
            assert torch.isfinite(y).all() and torch.isfinite(grad).all()
        with pytest.raises(ValueError, match="'tau'"):
            MF.gumbel_sigmoid(x, tau=tau / 2 if dtype == torch.float32 else 1e-320)


def test_tensor_tau_is_clamped_where_it_is_not_read():
    """A tau tensor is read on the host only where that costs no sync; under torch.compile (as on a
    GPU) a zero tau is clamped to the smallest normal number instead of dividing by zero."""
    x = torch.randn(16, 2, device=DEVICE, requires_grad=True)
    compiled = torch.compile(lambda x, tau: MF.gumbel_pairs(x, tau=tau, hard=False), fullgraph=True)
    with mtlfast.use_backend("cpu" if DEVICE.type == "cpu" else "triton"):
        y = compiled(x, torch.tensor(0.0, device=DEVICE))
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(y).all() and torch.isfinite(grad).all()


def test_noise_is_never_infinite():
    """u never reaches 0 or 1: the largest and smallest Philox words give finite noise."""
    from mtlfast.ops import philox
    words = torch.tensor([0, 2 ** 32 - 1])
    u = philox.uniform_from_bits(words)
    assert torch.all((u > 0) & (u < 1))
    assert torch.isfinite(torch.log(u) - torch.log(1 - u)).all() and torch.isfinite(-torch.log(-torch.log(u))).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hard", (True, False), ids=("hard", "soft"))
def test_gumbel_softmax(backend, hard):
    x = torch.randn(5, 7, 6, device=DEVICE, requires_grad=True)
    tau = 0.8
    torch.manual_seed(4)
    with mtlfast.use_backend(backend):
        y = MF.gumbel_softmax(x, tau=tau, hard=hard, dim=1)
    torch.manual_seed(4)
    moved = x.detach().double().movedim(1, -1).requires_grad_()
    g = gumbel_noise(draw_seed(), moved.numel(), x.device).view(moved.shape).double()
    soft = torch.softmax((moved + g) / tau, dim=-1)
    got = y.movedim(1, -1)
    if hard:
        assert torch.equal(got.detach().sum(-1), torch.ones(5, 6, dtype=got.dtype, device=DEVICE))
        assert set(got.detach().unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(got.detach().argmax(-1), soft.detach().argmax(-1))
    else:
        assert_close(got, soft, torch.float32, "soft sample")
    grad = torch.randn_like(got)
    got.backward(grad)
    (expected,) = torch.autograd.grad(soft, moved, grad.double())
    assert_close(x.grad.movedim(1, -1), expected, torch.float32, "softmax gradient")


def test_gumbel_softmax_hard_like_torch():
    """The contract of torch.nn.functional.gumbel_softmax(hard=True), on the automatic backend: the
    forward is exactly the one-hot of the argmax of the soft sample y = softmax((logits + g) / tau),
    and the gradient is y's, computed here in float64 from the same noise g (the op's seed drawn
    again after the same torch.manual_seed)."""
    tau = 0.5
    logits = (torch.randn(6, 5, device=DEVICE) * 2).requires_grad_()
    torch.manual_seed(7)
    z = MF.gumbel_softmax(logits, tau=tau, hard=True)
    torch.manual_seed(7)
    g = gumbel_noise(draw_seed(), logits.numel(), DEVICE).view(logits.shape).double()
    leaf = logits.detach().double().requires_grad_()
    soft = torch.softmax((leaf + g) / tau, dim=-1)
    one_hot = torch.nn.functional.one_hot(soft.argmax(-1), 5).to(z.dtype)
    assert torch.equal(z.detach(), one_hot)
    grad = torch.randn(6, 5, device=DEVICE)
    (dlogits,) = torch.autograd.grad(z, logits, grad)
    (expected,) = torch.autograd.grad(soft, leaf, grad.double())
    assert expected.abs().max() > 0.01                                     # a gradient that can be told from 0
    assert_close(dlogits, expected, torch.float32, "straight-through gradient")


COMBINE_BACKENDS = backend_params(DEVICE, ("reference", "cpu", "triton"))


@pytest.mark.parametrize("backend", COMBINE_BACKENDS)
@pytest.mark.parametrize("z", ([1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.3, 0.9, 0.2, 0.1]),
                         ids=("three", "none", "one", "soft"))
def test_allocation_combine(backend, z):
    outputs = torch.randn(4, 3, 5, device=DEVICE, requires_grad=True)
    zt = torch.tensor(z, device=DEVICE, requires_grad=True)
    with mtlfast.use_backend(backend):
        out = MF.allocation_combine(outputs, zt)
    o64, z64 = outputs.detach().double().requires_grad_(), zt.detach().double().requires_grad_()
    want = allocation_combine_reference(o64, z64)
    assert_close(out, want, torch.float32, "combine")
    if sum(z) == 0:
        assert torch.equal(out.detach(), torch.zeros_like(out))
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad.double())
    assert_close(outputs.grad, o64.grad, torch.float32, "d outputs")
    assert_close(zt.grad, z64.grad, torch.float32, "d z")


@pytest.mark.parametrize("backend", COMBINE_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=("fp32", "fp64"))
def test_allocation_combine_odd_shapes_and_strides(backend, dtype):
    """An odd element count (no multiple of any vector width or chunk; past the cpu kernel's chunk
    and per-thread sizes, smaller under the interpreter), non-contiguous outputs (a transposed
    view), a soft z summing above 1 and one below: outputs and both gradients as the float64
    reference."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton takes float16, bfloat16 and float32")
    rows = 3 * (13 if backend == "triton" and INTERPRETED else 1013)
    base = torch.randn(5, 17, rows, device=DEVICE, dtype=dtype)
    outputs = base.transpose(1, 2).requires_grad_()
    assert not outputs.is_contiguous()
    for values in ([0.3, 0.9, 0.0, 0.5, 0.2], [0.1, 0.0, 0.2, 0.0, 0.3]):
        z = torch.tensor(values, device=DEVICE, dtype=dtype, requires_grad=True)
        with mtlfast.use_backend(backend):
            out = MF.allocation_combine(outputs, z)
        o64, z64 = outputs.detach().double().requires_grad_(), z.detach().double().requires_grad_()
        want = allocation_combine_reference(o64, z64)
        assert out.shape == want.shape == (rows, 17)
        assert_close(out, want, dtype, "combine")
        grad = torch.randn_like(out)
        gout, gz = torch.autograd.grad(out, (outputs, z), grad)
        wout, wz = torch.autograd.grad(want, (o64, z64), grad.double())
        assert_close(gout, wout, dtype, "d outputs")
        assert_close(gz, wz, dtype, "d z")


@pytest.mark.parametrize("backend", COMBINE_BACKENDS)
@pytest.mark.parametrize("components", (2, 7, 8, 9, 19))
def test_allocation_combine_component_counts(backend, components):
    """Component counts on both sides of the cpu kernel's eight per pass (one pass, a partial one,
    several), the last component unallocated and holding an inf: outputs (NaN where the reference's
    0 * inf is) and d outputs as the float64 reference, d z finite where the reference's is."""
    outputs = torch.randn(components, 2, 37, device=DEVICE)
    outputs[-1, 1, 3] = float("inf")
    z = (torch.arange(components, device=DEVICE) % 3 != 2).float()
    z[0], z[-1] = 0.7, 0.0
    outputs.requires_grad_()
    z.requires_grad_()
    with mtlfast.use_backend(backend):
        out = MF.allocation_combine(outputs, z)
    o64, z64 = outputs.detach().double().requires_grad_(), z.detach().double().requires_grad_()
    want = allocation_combine_reference(o64, z64)
    assert want.isnan().sum() == 1
    assert torch.equal(out.isnan(), want.isnan())
    assert_close(out.nan_to_num(), want.nan_to_num(), torch.float32, "combine")
    grad = torch.randn_like(out)
    gout, gz = torch.autograd.grad(out, (outputs, z), grad)
    wout, wz = torch.autograd.grad(want, (o64, z64), grad.double())
    assert_close(gout, wout, torch.float32, "d outputs")
    assert torch.equal(gz.isfinite(), wz.isfinite())


@pytest.mark.parametrize("backend", backend_params(DEVICE, ("cpu",)))
def test_allocation_combine_gradcheck(backend):
    outputs = torch.randn(4, 3, 7, device=DEVICE, dtype=torch.float64, requires_grad=True)
    for z in ([1.0, 0.0, 1.0, 1.0], [0.3, 0.2, 0.1, 0.1]):
        zt = torch.tensor(z, device=DEVICE, dtype=torch.float64, requires_grad=True)
        with mtlfast.use_backend(backend):
            assert torch.autograd.gradcheck(MF.allocation_combine, (outputs, zt))


@pytest.mark.parametrize("backend", backend_params(DEVICE, ("cpu",)))
def test_allocation_combine_compiles_fullgraph(backend):
    outputs = torch.randn(3, 2, 5, device=DEVICE, requires_grad=True)
    z = torch.tensor([1.0, 0.0, 1.0], device=DEVICE, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(MF.allocation_combine, fullgraph=True)
    with mtlfast.use_backend(backend):
        out = compiled(outputs, z)
        eager = MF.allocation_combine(outputs, z)
    assert torch.equal(out, eager)
    grads = torch.autograd.grad(out, (outputs, z), torch.ones_like(out))
    want = torch.autograd.grad(eager, (outputs, z), torch.ones_like(eager))
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", backend_params(DEVICE, ("cpu",)))
def test_gumbel_softmax_compiles_fullgraph(backend):
    """The native softmax inside torch.compile: the same sample and gradient as eager from the
    same seed."""
    x = torch.randn(4, 5, 3, device=DEVICE, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: MF.gumbel_softmax(x, tau=0.5, hard=True, dim=1), fullgraph=True)
    grad = torch.randn(4, 5, 3, device=DEVICE)
    with mtlfast.use_backend(backend):
        torch.manual_seed(2)
        got = compiled(x)
        (dgot,) = torch.autograd.grad(got, x, grad)
        torch.manual_seed(2)
        eager = MF.gumbel_softmax(x, tau=0.5, hard=True, dim=1)
        (deager,) = torch.autograd.grad(eager, x, grad)
    assert torch.equal(got, eager)
    torch.testing.assert_close(dgot, deager)


def test_cpu_noise_is_the_philox_stream_bit_for_bit():
    """The native (AVX2 or baseline) Philox of mtlfast._C against mtlfast/ops/philox.py, at offsets
    that cross a 2^32 boundary of the counter, and a sample of every op from the same stream as
    the reference: a bit-identical u gives the reference's hard samples."""
    from mtlfast._native import capsule, lib
    from mtlfast.ops import philox
    try:
        native = lib()
    except ImportError as error:
        pytest.skip(f"mtlfast._C is not built: {error}")
    seed = 0x0123456789ABCDEF
    for offset0, n in ((0, 1), (5, 1001), (2 ** 32 - 300, 613)):
        u = torch.empty(n)
        native.philox_uniform(seed, offset0, capsule(u), 2)
        want = philox.uniform(seed, torch.arange(offset0, offset0 + n))
        assert torch.equal(u.view(torch.int32), want.view(torch.int32))
    x = torch.randn(333, 7)
    for backend in ("reference", "cpu"):
        torch.manual_seed(3)
        with mtlfast.use_backend(backend):
            if backend == "reference":
                hard, pairs = MF.gumbel_softmax(x, hard=True), MF.gumbel_pairs(x[:, :2].contiguous())
            else:
                assert torch.equal(MF.gumbel_softmax(x, hard=True), hard)
                assert torch.equal(MF.gumbel_pairs(x[:, :2].contiguous()), pairs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", (lambda x: MF.gumbel_softmax(x, dim=0), lambda x: MF.gumbel_sigmoid(x),
                                  lambda x: MF.gumbel_pairs(x.view(-1, 2))), ids=("softmax", "sigmoid", "pairs"))
@pytest.mark.parametrize("bad", (float("inf"), float("-inf"), float("nan")), ids=("inf", "-inf", "nan"))
def test_nonfinite_logits_are_refused_on_every_backend(backend, call, bad):
    """The cpu kernels check the logits while they read them, the other backends before: the same
    ValueError naming the argument, wherever the bad value sits (here past the first vector and
    block of the native kernels)."""
    x = torch.randn(300, 4, device=DEVICE)
    x[271, 3] = bad
    with mtlfast.use_backend(backend), pytest.raises(ValueError, match="argument 'logits' must be finite"):
        call(x)


# ---------------------------------------------------------------------------------------------
# Bad input

BAD = [
    ("tau zero", lambda: MF.gumbel_sigmoid(torch.zeros(3), tau=0.0), ValueError, ["tau", "> 0", "0.0"]),
    ("tau nan", lambda: MF.gumbel_sigmoid(torch.zeros(3), tau=float("nan")), ValueError, ["tau"]),
    ("tau tensor negative", lambda: MF.gumbel_softmax(torch.zeros(3), tau=torch.tensor(-1.0)), ValueError, ["tau"]),
    ("inf logit", lambda: MF.gumbel_sigmoid(torch.tensor([0.0, float("inf")])), ValueError, ["logits", "finite"]),
    ("nan logit", lambda: MF.gumbel_pairs(torch.tensor([[0.0, float("nan")]])), ValueError, ["logits", "finite"]),
    ("pairs without 2", lambda: MF.gumbel_pairs(torch.zeros(3, 3)), ValueError, ["logits", "last dim of 2"]),
    ("int logits", lambda: MF.gumbel_sigmoid(torch.zeros(3, dtype=torch.int64)), TypeError, ["logits", "dtype"]),
    ("bad dim", lambda: MF.gumbel_softmax(torch.zeros(3, 4), dim=2), ValueError, ["dim"]),
    ("combine z shape", lambda: MF.allocation_combine(torch.zeros(3, 4), torch.zeros(2)), ValueError, ["z", "(3,)"]),
    ("matrix components", lambda: mnn.GumbelMatrix(2, []), ValueError, ["components"]),
    ("matrix p_init", lambda: mnn.GumbelMatrix(2, [3], p_init=1.0), ValueError, ["p_init"]),
    ("matrix task", lambda: mnn.GumbelMatrix(2, [3])(5), ValueError, ["task", "[0, 2)"]),
    ("modular allocation", lambda: mnn.ModularLayer([nn.Linear(2, 2)])(torch.zeros(1, 2), torch.ones(2)),
     ValueError, ["allocation", "(1,)"]),
]


@pytest.mark.parametrize("case,call,error,fragments", BAD, ids=[b[0] for b in BAD])
def test_bad_input(case, call, error, fragments):
    with pytest.raises(error) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {info.value}"


# ---------------------------------------------------------------------------------------------
# torch.compile: a new tau does not recompile

@pytest.mark.parametrize("backend", backend_params(DEVICE, ("cpu",)))
def test_new_tau_does_not_recompile(backend):
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    counter = CompileCounter()
    x = torch.randn(6, 3, 2, requires_grad=True)

    def sample(x, tau):
        return MF.gumbel_pairs(x, tau=tau, hard=True)

    compiled = torch.compile(sample, backend=counter, fullgraph=True)
    with mtlfast.use_backend(backend):
        compiled(x, torch.tensor(1.0)).sum().backward()
        # the first call may compile twice (the backend choice it caches is guarded on); what
        # matters is that new values compile nothing
        compiled(x, torch.tensor(1.0)).sum().backward()
        frames = counter.frame_count
        for tau in (0.5, 0.25, 3.0):
            z = compiled(x, torch.tensor(tau))
            z.sum().backward()
    assert counter.frame_count == frames
    assert set(z.detach().unique().tolist()) <= {0.0, 1.0} and x.grad is not None


@pytest.mark.parametrize("backend", backend_params(DEVICE, ("cpu",)))
def test_float_tau_becomes_dynamic(backend):
    """A float tau is symbolic: dynamo recompiles at most once, at the second value it sees (its
    automatic dynamic), then never again. A tensor tau never recompiles (above)."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    counter = CompileCounter()
    x = torch.randn(6, 3, 2, requires_grad=True)
    compiled = torch.compile(lambda x, tau: MF.gumbel_pairs(x, tau=tau), backend=counter, fullgraph=True)
    with mtlfast.use_backend(backend):
        for tau in (1.0, 1.0, 0.5):          # see above; the second value makes the float dynamic
            compiled(x, tau).sum().backward()
        frames = counter.frame_count
        for tau in (0.25, 0.125, 2.0):
            compiled(x, tau).sum().backward()
    assert counter.frame_count == frames


# ---------------------------------------------------------------------------------------------
# Modules

def test_gumbel_matrix_hand_made():
    gm = mnn.GumbelMatrix(3, [2, 3], p_init=0.5)
    with torch.no_grad():
        gm.logits.zero_()
        # task 0 uses layer 0 comp 0 and layer 1 comp 2; task 1 the same; task 2 only layer 1 comp 0
        for t, c in ((0, 0), (0, 4), (1, 0), (1, 4), (2, 2)):
            gm.logits[t, c, 0] = 3.0
    emb = gm.task_embeddings()
    assert emb.tolist() == [[1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [0, 0, 1, 0, 0]]
    sim = gm.task_similarity()
    assert sim[0, 1].item() == pytest.approx(1.0) and sim[0, 2].item() == 0.0 and sim[2, 2].item() == pytest.approx(1.0)
    expected = (5 * torch.sigmoid(torch.tensor(3.0)) + 10 * 0.5) / 15          # mean allocation probability
    assert gm.budget_penalty(0.2, weight=2.0).item() == pytest.approx(2.0 * (expected.item() - 0.2), rel=1e-6)
    assert gm.budget_penalty(0.9).item() == 0.0
    gm.eval()
    assert [a.tolist() for a in gm(0)] == [[1.0, 0.0], [0.0, 0.0, 1.0]]      # greedy: p > 0.5
    probs = gm.probabilities()
    assert probs[0].shape == (3, 2) and probs[1].shape == (3, 3)


def test_gumbel_matrix_training_sampling_and_schedule():
    gm = mnn.GumbelMatrix(4, [7, 7, 3], tau=2.0, tau_min=0.5)
    layers = gm.sample_all()
    assert [tuple(a.shape) for a in layers] == [(4, 7), (4, 7), (4, 3)]
    sum(a.sum() for a in layers).backward()
    assert gm.logits.grad is not None and gm.logits.grad.abs().sum() > 0
    assert gm.tau == 2.0
    for _ in range(3):
        gm.advance()
    assert gm.tau == pytest.approx(1.0)                                        # 2 / sqrt(4)
    for _ in range(100):
        gm.advance()
    assert gm.tau == 0.5
    group = gm.optimizer_param_group(1e-3)
    assert group["lr"] == pytest.approx(4e-3) and group["params"][0] is gm.logits
    assert gm.layer_logits(1).shape == (4, 7, 2)


def test_modular_layer_skips_unallocated_components_in_eval():
    calls = []

    class Probe(nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = k

        def forward(self, x):
            calls.append(self.k)
            return x * (self.k + 1)

    layer = mnn.ModularLayer([Probe(k) for k in range(4)])
    x = torch.ones(2, 3)
    z = torch.tensor([1.0, 0.0, 1.0, 0.0])
    train_out = layer(x, z)
    assert sorted(calls) == [0, 1, 2, 3]
    calls.clear()
    layer.eval()
    eval_out = layer(x, z)
    assert sorted(calls) == [0, 2]                                             # components 1 and 3 skipped
    assert torch.equal(train_out, eval_out) and torch.allclose(eval_out, x * 2)
    assert torch.equal(layer(x, torch.zeros(4)), torch.zeros(2, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_allocation_combine_non_finite_outputs_of_unallocated_components(backend):
    """An inf or NaN output of a component with z = 0 gives NaN on every backend (0 * inf), as the
    reference's tensordot: no backend hides it, so they agree on every input."""
    outputs = torch.randn(4, 37, device=DEVICE)
    outputs[1, 5] = float("inf")
    outputs[3, 9] = float("nan")
    z = torch.tensor([1.0, 0.0, 1.0, 0.0], device=DEVICE)
    with mtlfast.use_backend(backend):
        out = MF.allocation_combine(outputs, z)
    ref = allocation_combine_reference(outputs, z)
    assert torch.isnan(out[5]) and torch.isnan(out[9]) and torch.isnan(ref[5]) and torch.isnan(ref[9])
    finite = torch.ones(37, dtype=torch.bool, device=DEVICE)
    finite[[5, 9]] = False
    torch.testing.assert_close(out[finite], ref[finite])
