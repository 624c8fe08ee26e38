"""masked_linear: every backend against the reference (outputs and every gradient), gradcheck,
compile, opcheck and bad input (the reference against its oracle: tests/test_oracles.py)."""
from __future__ import annotations

import pytest
import torch

import mtlfast
import mtlfast.functional as MF
from mtlfast.ops.masked_linear import masked_linear_reference
from tests.helpers import LOW_PRECISION, backend_params, compare_with_reference
from tests.conftest import DEVICE

KERNEL_BACKENDS = backend_params(DEVICE, ("reference", "triton", "cuda", "cpu"))

# (batch M, in K, out N): odd sizes, length/batch 1, not powers of two, tails on every tile edge;
# M = 16 and 17 on either side of the cpu backend's switch from its own loops to BLAS.
SHAPES = [(1, 1, 1), (7, 33, 130), (130, 7, 33), (33, 130, 7), (1, 130, 33), (64, 64, 32), (16, 67, 21),
          (17, 67, 21)]


def make_inputs(M, K, N, dtype, *, bias=True, density=0.5, device=DEVICE):
    x = torch.randn(M, K, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(N, K, device=device) / max(K, 1) ** 0.5).to(dtype).requires_grad_()
    mask = torch.rand(N, K, device=device) < density
    b = torch.randn(N, device=device).to(dtype).requires_grad_() if bias else None
    return x, weight, mask, b


def run(backend):
    def fn(*args):
        with mtlfast.use_backend(backend):
            return MF.masked_linear(*args)
    return fn


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(backend, dtype, shape, bias):
    args = make_inputs(*shape, dtype, bias=bias)
    if backend == "cpu" and dtype not in (torch.float32, torch.float64):
        # CPU BLAS has no faster half GEMM: forced, the cpu backend refuses and says so
        with pytest.raises(mtlfast.BackendUnavailableError, match="takes float32, float64"):
            run(backend)(*args)
        return
    compare_with_reference(run(backend), masked_linear_reference, args, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_float64(shape):
    compare_with_reference(run("cpu"), masked_linear_reference, make_inputs(*shape, torch.float64), torch.float64)


_PORTABLE_SCRIPT = """
import torch, mtlfast, mtlfast.functional as MF
from mtlfast.ops.masked_linear import masked_linear_reference
torch.manual_seed(0)
worst = 0.0
for M, K, N in [(1, 1, 1), (10, 200, 800), (16, 67, 21), (7, 33, 130), (3, 70, 9)]:
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(N, K, requires_grad=True)
    m = torch.rand(N, K) < 0.5
    b = torch.randn(N, requires_grad=True)
    with mtlfast.use_backend("cpu"):
        y = MF.masked_linear(x, w, m, b)
    ref = masked_linear_reference(x, w, m, b)
    g = torch.randn_like(y)
    for a, r in zip((y, *torch.autograd.grad(y, (x, w, b), g)), (ref, *torch.autograd.grad(ref, (x, w, b), g))):
        worst = max(worst, ((a - r).abs() / (1e-5 + 1e-4 * r.abs())).max().item())
print(worst)
"""


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
                    reason="the CPU has no AVX-512: the portable loops are what every other test runs")
def test_cpu_portable_loops_on_an_avx512_machine():
    """MTLFAST_CPU_VECTOR_BITS=256 runs the loops that CPUs without AVX-512 run (AVX2 clone): the same
    numbers within the tolerances as the reference, on the direct (few-rows) path."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "MTLFAST_CPU_VECTOR_BITS": "256"}
    out = subprocess.run([sys.executable, "-c", _PORTABLE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) <= 1.0


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_leading_dims_and_1d_input(backend):
    x, w, m, b = make_inputs(10, 33, 7, torch.float32)
    x3 = x.detach().reshape(2, 5, 33).requires_grad_()
    compare_with_reference(run(backend), masked_linear_reference, (x3, w, m, b), torch.float32)
    x1 = x.detach()[0].clone().requires_grad_()
    compare_with_reference(run(backend), masked_linear_reference, (x1, w, m, b), torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_inputs(backend):
    K, N = 33, 130
    x = torch.randn(K, 7, device=DEVICE).t().requires_grad_()                 # stride (1, 7)
    w = (torch.randn(K, N, device=DEVICE) / 6).t().requires_grad_()           # weight (N, K), stride (1, N)
    m = (torch.rand(K, N, device=DEVICE) < 0.5).t()
    b = torch.randn(2 * N, device=DEVICE)[::2].requires_grad_()               # stride 2
    assert not (x.is_contiguous() or w.is_contiguous() or m.is_contiguous() or b.is_contiguous())
    compare_with_reference(run(backend), masked_linear_reference, (x, w, m, b), torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 33, 7), (5, 0, 7), (5, 33, 0)], ids=["M0", "K0", "N0"])
def test_empty(backend, shape):
    x, w, m, b = make_inputs(*shape, torch.float32)
    compare_with_reference(run(backend), masked_linear_reference, (x, w, m, b if shape[2] else None),
                           torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_weight_gradient_is_zero_outside_mask(backend, density):
    x, w, m, b = make_inputs(9, 70, 40, torch.float32, density=density)
    run(backend)(x, w, m, b).square().sum().backward()
    assert torch.all(w.grad[~m] == 0)
    if density > 0:
        assert torch.count_nonzero(w.grad[m]) > 0.9 * m.sum()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_all_true_mask_is_plain_linear(backend):
    x, w, _, b = make_inputs(7, 33, 20, torch.float32)
    ones = torch.ones(w.shape, dtype=torch.bool, device=DEVICE)
    compare_with_reference(lambda *a: run(backend)(a[0], a[1], ones, a[2]),
                           lambda x_, w_, b_: torch.nn.functional.linear(x_, w_, b_), (x, w, b),
                           torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_partial_gradients(backend):
    """Only the inputs that require grad get one (the backward skips the other kernels)."""
    x, w, m, b = make_inputs(7, 33, 20, torch.float32)
    x.requires_grad_(False)
    b.requires_grad_(False)
    compare_with_reference(run(backend), masked_linear_reference, (x, w, m, b), torch.float32)
    w.requires_grad_(False)
    x.requires_grad_(True)
    compare_with_reference(run(backend), masked_linear_reference, (x, w, m, b), torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_mask_change_in_place_is_seen(backend):
    """Packed masks are cached per mask version: writing into the mask must invalidate it."""
    x, w, m, b = make_inputs(5, 40, 12, torch.float32)
    with torch.no_grad():
        first = run(backend)(x, w, m, b)
        m[:, :20] = ~m[:, :20]
        second = run(backend)(x, w, m, b)
        torch.testing.assert_close(second, masked_linear_reference(x, w, m, b), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("backend", backend_params(DEVICE, ("reference", "cuda", "cpu")))
def test_gradcheck_float64(backend):
    x, w, m, b = make_inputs(4, 37, 5, torch.float64)
    assert torch.autograd.gradcheck(run(backend), (x, w, m, b))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    x, w, m, b = make_inputs(2 * 5, 33, 40, torch.float32)
    x3 = x.detach().reshape(2, 5, 33).requires_grad_()
    with mtlfast.use_backend(backend):
        compiled = torch.compile(MF.masked_linear, fullgraph=True)
        compare_with_reference(compiled, masked_linear_reference, (x3, w, m, b), torch.float32)



def _valid():
    x, w, m, b = make_inputs(3, 8, 5, torch.float32)
    return dict(x=x.detach(), weight=w.detach(), mask=m, bias=b.detach())


BAD_INPUTS = [
    ("x not a tensor", dict(x=[[1.0] * 8]), TypeError, ["'x'", "torch.Tensor", "list"]),
    ("x integer", dict(x=torch.ones(3, 8, dtype=torch.int64)), TypeError, ["'x'", "int64"]),
    ("weight 1-D", dict(weight=torch.randn(8)), ValueError, ["'weight'", "2-D", "(8,)"]),
    ("in features mismatch", dict(x=torch.randn(3, 9)), ValueError, ["'x'", "weight.shape[1]", "(8)", "(3, 9)"]),
    ("weight dtype mismatch", dict(weight=torch.randn(5, 8, dtype=torch.float64)), TypeError,
     ["'weight'", "float32", "float64"]),
    ("mask not bool", dict(mask=torch.ones(5, 8)), TypeError, ["'mask'", "bool", "float32"]),
    ("mask wrong shape", dict(mask=torch.ones(8, 5, dtype=torch.bool)), ValueError, ["'mask'", "(5, 8)", "(8, 5)"]),
    ("bias wrong shape", dict(bias=torch.randn(8)), ValueError, ["'bias'", "(5,)", "(8,)"]),
    ("bias dtype", dict(bias=torch.randn(5, dtype=torch.float16)), TypeError, ["'bias'", "float32", "float16"]),
    ("mask on another device", dict(mask=torch.ones(5, 8, dtype=torch.bool, device="meta")), ValueError,
     ["'mask'", "cpu", "meta"]),
    ("weight on another device", dict(weight=torch.randn(5, 8, device="meta")), ValueError,
     ["'weight'", "cpu", "meta"]),
]


@pytest.mark.parametrize("case,override,error,fragments", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(case, override, error, fragments):
    args = {**_valid(), **override}
    if DEVICE.type == "cuda":  # the cross-device cases name the tensors' own devices
        fragments = [f.replace("cpu", "cuda") for f in fragments]
        args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v)
                for k, v in args.items()}
    with pytest.raises(error) as info:
        MF.masked_linear(args["x"], args["weight"], args["mask"], args["bias"])
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {info.value!s}"


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the cpu backend runs CPU tensors")
@pytest.mark.parametrize("rows", [16, 17], ids=["direct-loops", "blas"])
def test_cpu_custom_op_on_both_paths(rows):
    """opcheck (schema, fake, autograd registration) of the custom op on either side of the cpu
    backend's switch from its own loops to BLAS on a masked copy (tests/test_op_definitions.py
    samples only one size)."""
    x, w, m, b = make_inputs(rows, 40, 33, torch.float32)
    torch.library.opcheck(torch.ops.mtlfast.masked_linear.default, (x, w, m, b, "cpu"))
