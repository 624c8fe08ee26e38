"""Backend availability, reasons, forcing (context manager and MTLFAST_BACKEND) and selection."""
import importlib
import inspect

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


# The automatic choice, written out per device type for the full development environment (triton
# importable, mtlfast._C built; on a GPU with its CUDA kernels): (op, dtype, the backends whose
# reason is None, the backend that runs). Fastest first: on CPU the native kernels, else torch (the
# interpreter is never picked); on CUDA triton, then the CUDA C++ kernel (masked_linear only), else torch.
CHOICES = {
    "cpu": [
        ("masked_linear", torch.float32, {"reference", "triton", "cpu"}, "cpu"),
        ("masked_linear", torch.float64, {"reference", "cpu"}, "cpu"),
        ("masked_linear", torch.float16, {"reference", "triton"}, "reference"),        # cpu: float32/64 only
        ("alpha_mix", torch.float32, {"reference", "triton", "cpu"}, "cpu"),
        ("layer_mix", torch.float64, {"reference", "cpu"}, "cpu"),
        ("orthogonality_penalty", torch.float32, {"reference", "triton"}, "reference"),  # no CPU kernel
        ("gumbel_sigmoid", torch.float32, {"reference", "triton", "cpu"}, "cpu"),
        ("allocation_combine", torch.float32, {"reference", "triton", "cpu"}, "cpu"),
        ("allocation_combine", torch.float16, {"reference", "triton"}, "reference"),     # cpu: fp32, fp64
    ],
    "cuda": [
        ("masked_linear", torch.float32, {"reference", "triton", "cuda"}, "triton"),
        ("masked_linear", torch.float64, {"reference", "cuda"}, "cuda"),                # tl.dot has no float64
        ("alpha_mix", torch.float32, {"reference", "triton"}, "triton"),
        ("layer_mix", torch.float64, {"reference"}, "reference"),
        ("orthogonality_penalty", torch.float32, {"reference", "triton"}, "triton"),
        ("gumbel_sigmoid", torch.float32, {"reference", "triton"}, "triton"),
        ("allocation_combine", torch.float32, {"reference", "triton"}, "triton"),
    ],
}
FAMILY = {"masked_linear": "masked_linear", "alpha_mix": "sluice", "layer_mix": "sluice",
          "orthogonality_penalty": "sluice", "gumbel_sigmoid": "gumbel", "allocation_combine": "gumbel"}


def _call(op, dtype):
    """(the public call of ``op`` on small inputs in ``dtype``, its arguments)."""
    r = lambda *shape: torch.randn(*shape, device=DEVICE, dtype=dtype)  # noqa: E731
    return {
        "masked_linear": (MF.masked_linear, (r(3, 8), r(5, 8), torch.rand(5, 8, device=DEVICE) < 0.5, None)),
        "alpha_mix": (lambda h, a: MF.alpha_mix(h, a, 2), (r(2, 3, 4), r(4, 4))),
        "layer_mix": (MF.layer_mix, (r(3, 2, 4), r(2, 3))),
        "orthogonality_penalty": (lambda w: MF.orthogonality_penalty(w, 2), (r(6, 5),)),
        "gumbel_sigmoid": (lambda x: MF.gumbel_sigmoid(x, 0.7), (r(10),)),
        "allocation_combine": (MF.allocation_combine,
                               (r(3, 4), torch.tensor([1.0, 0.0, 1.0], device=DEVICE, dtype=dtype))),
    }[op]


def _backend_that_ran(op, fn, args):
    """Which backend ran ``fn(*args)``: the one whose kernel glue (mtlfast/ops/<family>_<backend>.py,
    DESIGN.md's layout) was entered, every function of those modules wrapped to record it;
    "reference" when none was."""
    entered = set()

    def recording(fn, backend):
        def wrapper(*a, **k):
            entered.add(backend)
            return fn(*a, **k)
        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        for backend in ("triton", "cuda", "cpu"):
            try:
                module = importlib.import_module(f"mtlfast.ops.{FAMILY[op]}_{backend}")
            except ImportError:
                continue
            for name, value in list(vars(module).items()):
                if inspect.isroutine(value):
                    mp.setattr(module, name, recording(value, backend))
        fn(*args)
    assert len(entered) <= 1, f"{op}: more than one backend ran: {entered}"
    return entered.pop() if entered else "reference"


@pytest.mark.parametrize("op,dtype,can_run,chosen", CHOICES[DEVICE.type],
                         ids=[f"{c[0]}-{str(c[1]).replace('torch.', '')}" for c in CHOICES[DEVICE.type]])
def test_automatic_choice(monkeypatch, op, dtype, can_run, chosen):
    status = mtlfast.available_backends()
    needed = ("triton", "cpu") if DEVICE.type == "cpu" else ("triton", "cuda")
    if any(status[b] for b in needed):
        pytest.skip(f"the table is for a machine where {' and '.join(needed)} run: {status}")
    monkeypatch.delenv("MTLFAST_BACKEND", raising=False)
    fn, args = _call(op, dtype)
    assert {b for b, r in backends.reasons(op, *args).items() if r is None} == can_run
    # the observation works: a forced backend is seen running
    for backend in can_run:
        with mtlfast.use_backend(backend):
            assert _backend_that_ran(op, fn, args) == backend
    assert _backend_that_ran(op, fn, args) == chosen
