"""Shared test machinery: the per-dtype tolerance table, one comparison of outputs and every
gradient against a reference, and the backends this machine can exercise."""
from __future__ import annotations

from typing import Callable, Sequence

import pytest
import torch

import mtlfast
from mtlfast import backends

# (atol, rtol) for a kernel's result in `dtype` against the reference computed in float64 from
# the same inputs. Low precision is dominated by rounding the fp32 accumulator to the output type
# (fp16 ε = 9.8e-4, bf16 ε = 7.8e-3), so tolerances sit a few ε above that.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


def backend_params(device: torch.device, names: Sequence[str] = backends.BACKENDS):
    """pytest params over backends; one that cannot run on this machine is a visible skip with
    its reason (never a pass)."""
    params = []
    status = mtlfast.available_backends()
    for name in names:
        reason = status[name]
        if reason is None and name == "cpu" and device.type != "cpu":
            reason = "the cpu backend runs CPU tensors and the tests run on CUDA"
        if reason is None and name == "cuda" and device.type != "cuda":
            reason = "tests run on CPU"
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    atol, rtol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def compare_with_reference(fn: Callable[..., torch.Tensor], reference: Callable[..., torch.Tensor],
                           inputs: Sequence[object], dtype: torch.dtype) -> None:
    """Runs ``fn`` on ``inputs`` and ``reference`` on float64 copies of them; compares the outputs
    and the gradient of every floating-point input that requires grad (same upstream gradient)."""
    def leaf(t, to64):
        if not isinstance(t, torch.Tensor):
            return t
        out = t.detach().double() if (to64 and t.is_floating_point()) else t.detach()
        return out.requires_grad_(t.requires_grad)

    ours = [leaf(t, False) for t in inputs]
    ref = [leaf(t, True) for t in inputs]
    out = fn(*ours)
    expected = reference(*ref)
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
    assert_close(out, expected, dtype, "output")
    if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in ours):
        return
    grad = torch.randn_like(expected).to(dtype)
    out.backward(grad)
    expected.backward(grad.double())
    for i, (a, b) in enumerate(zip(ours, ref)):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            assert a.grad is not None, f"input {i} got no gradient"
            assert a.grad.dtype == a.dtype
            assert_close(a.grad, b.grad, dtype, f"gradient of input {i}")
