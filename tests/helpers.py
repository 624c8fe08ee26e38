"""Shared test machinery: the per-dtype tolerance table, one comparison of outputs and every
gradient against a reference, the backends this machine can exercise, and the stand-in for
pytest-benchmark's fixture that the benchmark-harness tests hand to bench's runner. (The
independent oracles of the references are in tests/oracles.py.)"""
from __future__ import annotations

import time
import types
from typing import Callable, Optional, Sequence, Tuple

import pytest
import torch

import mtlfast
from mtlfast import backends
from mtlfast.ops.definition import DEFAULT_TOLERANCES, definitions

# (atol, rtol) of a result in `dtype` against the float64 reference: the ops' one table
# (mtlfast/ops/definition.py), or an op's own with ``op=``.
TOLERANCES = DEFAULT_TOLERANCES

LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


def backend_params(device: torch.device, names: Sequence[str] = backends.BACKENDS):
    """pytest params over backends; one that cannot run on this machine is a visible skip with
    its reason (never a pass)."""
    return [pytest.param(name, marks=backend_skip(name, device), id=name) for name in names]


def backend_skip(name: str, device: torch.device) -> list:
    """pytest marks that skip backend ``name`` with its reason when it cannot run tests on ``device``."""
    reason = mtlfast.available_backends()[name]
    if reason is None and name == "cpu" and device.type != "cpu":
        reason = "the cpu backend runs CPU tensors and the tests run on CUDA"
    if reason is None and name == "cuda" and device.type != "cuda":
        reason = "tests run on CPU"
    return [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []


def tolerance(dtype: torch.dtype, op: Optional[str] = None) -> Tuple[float, float]:
    """(atol, rtol) for a result in ``dtype``: op ``op``'s table, else the ops' default one."""
    return definitions()[op].tolerance(dtype) if op is not None else TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 op: Optional[str] = None) -> None:
    atol, rtol = tolerance(dtype, op)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def round_as_triton(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> dtype as a Triton kernel's ``.to(dtype)`` rounds: to nearest on a GPU; Triton's
    interpreter truncates fp32 -> bf16 (its _convert_float without a rounding mode; fp16 goes
    through NumPy, to nearest). For references of kernels that round an fp32 operand in registers."""
    if dtype == torch.bfloat16 and backends.triton_interpreter_enabled():
        return (t.float().view(torch.int32) & -65536).view(torch.float32).to(dtype)
    return t.to(dtype)


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


class FakeBenchmark:
    """The part of pytest-benchmark's ``benchmark`` fixture that bench's Runner uses: ``group``,
    ``extra_info`` and ``pedantic``, which records per-call wall times in ``stats.stats.data``."""

    def __init__(self) -> None:
        self.group, self.extra_info = None, {}

    def pedantic(self, fn: Callable[[], object], rounds: int, iterations: int, warmup_rounds: int) -> None:
        data = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            data.append(time.perf_counter() - start)
        self.stats = types.SimpleNamespace(stats=types.SimpleNamespace(data=data))
