"""Backend availability, reasons, forcing (context manager and MTLFAST_BACKEND) and selection."""
import pytest
import torch

import mtlfast
import mtlfast.functional as MF
from mtlfast import backends
from tests.conftest import DEVICE


def _inputs(dtype=torch.float32):
    x = torch.randn(3, 8, device=DEVICE, dtype=dtype)
    w = torch.randn(5, 8, device=DEVICE, dtype=dtype)
    return x, w, torch.rand(5, 8, device=DEVICE) < 0.5, None


def test_available_backends_lists_every_backend():
    status = mtlfast.available_backends()
    assert list(status) == ["reference", "triton", "cuda", "cpu"]
    assert status["reference"] is None
    for name, reason in status.items():
        assert reason is None or (isinstance(reason, str) and reason), name
    if not torch.cuda.is_available():
        assert "CUDA" in status["cuda"] or "cuda" in status["cuda"]


def test_reasons_per_input():
    reasons = backends.reasons("masked_linear", *_inputs(torch.float64))
    assert reasons["reference"] is None
    assert "float64" in reasons["triton"] or "CPU" in reasons["triton"] or "cpu" in reasons["triton"]
    if DEVICE.type == "cpu":
        assert "CUDA tensors" in reasons["cuda"]
        assert "TRITON_INTERPRET" not in (reasons["triton"] or "")  # the interpreter is on in tests


def test_unknown_op_and_backend_names():
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        backends.reasons("nope")
    with pytest.raises(ValueError, match="unknown backend 'fast'.*reference"):
        with mtlfast.use_backend("fast"):
            pass


def test_forced_backend_that_cannot_run_raises_with_reasons():
    x, w, m, b = _inputs(torch.float64)
    with mtlfast.use_backend("triton"), pytest.raises(mtlfast.BackendUnavailableError) as info:
        MF.masked_linear(x, w, m, b)
    message = str(info.value)
    assert "'triton'" in message and "float64" in message and "Backends that can: reference" in message


def test_forced_cuda_on_cpu_tensors_raises():
    x, w, m, b = (t.cpu() if t is not None else None for t in _inputs())
    with mtlfast.use_backend("cuda"), pytest.raises(mtlfast.BackendUnavailableError, match="CUDA tensors"):
        MF.masked_linear(x, w, m, b)


def test_env_var_forces_backend(monkeypatch):
    args = _inputs(torch.float64)
    monkeypatch.setenv("MTLFAST_BACKEND", "triton")
    with pytest.raises(mtlfast.BackendUnavailableError):
        MF.masked_linear(*args)
    monkeypatch.setenv("MTLFAST_BACKEND", "reference")
    assert backends.forced_backend() == "reference"
    MF.masked_linear(*args)
    monkeypatch.setenv("MTLFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        MF.masked_linear(*args)


def test_use_backend_nests_and_wins_over_env(monkeypatch):
    monkeypatch.setenv("MTLFAST_BACKEND", "triton")
    with mtlfast.use_backend("reference"):
        assert backends.forced_backend() == "reference"
        with mtlfast.use_backend("auto"):
            assert backends.forced_backend() == "auto"
        assert backends.forced_backend() == "reference"
    assert backends.forced_backend() == "triton"


def test_automatic_choice_is_first_in_preference_that_can_run(monkeypatch):
    monkeypatch.delenv("MTLFAST_BACKEND", raising=False)
    op = backends._OPS["masked_linear"]
    args = _inputs()
    chosen = op.select(*args)
    reasons = op.reasons(*args)
    expected = next(n for n in op.preference[DEVICE.type] if reasons[n] is None)
    assert chosen == expected
    if DEVICE.type == "cpu":
        # the interpreter is slow: it must never be picked automatically
        assert chosen == "reference"
