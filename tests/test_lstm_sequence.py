"""The sequence-persistent masked LSTM kernels (triton_kernels/masked_lstm_sequence.py): which mode
runs (automatic, MTLFAST_LSTM_MODE, the reasons), the launch budget of a layer, and the op end to
end in both modes against the reference. The kernels' own numbers in both modes (outputs, final
states, every gradient; T = 1, odd H, B = 1, two batch tiles, lengths with zeros, reverse and
unmasked groups, shared weight sets) are tests/test_triton_masked_lstm.py's, every autotune
candidate's tests/test_autotune.py's, their compilation for sm_80 / sm_90 tests/triton_aot.py's."""
from __future__ import annotations

import collections
import contextlib

import pytest
import torch

pytest.importorskip("triton")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import mtlfast  # noqa: E402
from mtlfast.ops.masked_lstm import run_layer  # noqa: E402
from mtlfast.triton_kernels import masked_lstm_sequence as SEQ  # noqa: E402
from tests.conftest import DEVICE  # noqa: E402
from tests.helpers import backend_skip  # noqa: E402
from tests.test_masked_lstm import DIFFERENTIABLE, ORDER, _compare_backend, make_case  # noqa: E402

TRITON = backend_skip("triton", DEVICE)


@pytest.fixture(params=["step", "sequence"])
def mode(request, monkeypatch):
    monkeypatch.setenv(SEQ.MODE_VARIABLE, request.param)
    return request.param


# ---------------------------------------------------------------------------------------------
# Which mode runs

def test_automatic_mode_is_sequence_where_it_fits(monkeypatch):
    monkeypatch.delenv(SEQ.MODE_VARIABLE, raising=False)
    assert SEQ.lstm_mode(200) == "sequence" and SEQ.lstm_mode(SEQ.MAX_HIDDEN) == "sequence"
    assert SEQ.lstm_mode(SEQ.MAX_HIDDEN + 1) == "step" and SEQ.lstm_mode(1024) == "step"
    monkeypatch.setenv(SEQ.MODE_VARIABLE, "auto")
    assert SEQ.lstm_mode(100) == "sequence"


def test_forced_modes(monkeypatch):
    monkeypatch.setenv(SEQ.MODE_VARIABLE, "step")
    assert SEQ.lstm_mode(100) == "step"
    monkeypatch.setenv(SEQ.MODE_VARIABLE, "Sequence")
    assert SEQ.lstm_mode(100) == "sequence"
    with pytest.raises(ValueError, match=r"MTLFAST_LSTM_MODE=sequence cannot run this layer: hidden size 1024 > 256"):
        SEQ.lstm_mode(1024)
    monkeypatch.setenv(SEQ.MODE_VARIABLE, "persistent")
    with pytest.raises(ValueError, match=r"MTLFAST_LSTM_MODE='persistent': expected one of auto, step, sequence"):
        SEQ.lstm_mode(100)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=TRITON)])
def test_forced_sequence_refuses_an_unfit_layer_with_its_reason(backend, monkeypatch):
    monkeypatch.setenv(SEQ.MODE_VARIABLE, "sequence")
    monkeypatch.setattr(SEQ, "MAX_HIDDEN", 6)               # a hidden size of 7 is then "too large"
    case = make_case(H=7, dtype=torch.float32)
    with mtlfast.use_backend(backend), pytest.raises(ValueError, match="hidden size 7 > 6"):
        run_layer(*(case[k] for k in ORDER))


# ---------------------------------------------------------------------------------------------
# The op in both modes

@pytest.mark.parametrize("backend", [pytest.param("triton", marks=TRITON)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_layer_matches_reference_in_both_modes(backend, dtype, mode):
    """Outputs, final states and every gradient (x, h0, c0, both weights, both biases) against the
    reference: four groups over two weight sets and three masks (one group unmasked), every other
    group reversed, random lengths with zeros, T = 6, odd sizes."""
    _compare_backend(backend, make_case(dtype=dtype), dtype)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=TRITON)])
def test_modes_agree(backend, monkeypatch):
    """Both modes run the same per-tile arithmetic: their outputs and gradients agree to fp32
    rounding (the reduction tiles may differ, so not bit for bit)."""
    case = make_case(G=3, T=5, B=17, I=9, H=40, dtype=torch.float32)
    results = {}
    for name in ("step", "sequence"):
        monkeypatch.setenv(SEQ.MODE_VARIABLE, name)
        leaves = {k: (v.detach().requires_grad_() if k in DIFFERENTIABLE else v) for k, v in case.items()}
        with mtlfast.use_backend(backend):
            out = run_layer(*(leaves[k] for k in ORDER))
        torch.autograd.backward(out, [torch.ones_like(o) for o in out])
        results[name] = [o.detach() for o in out] + [leaves[k].grad for k in DIFFERENTIABLE]
    for index, (a, b) in enumerate(zip(results["step"], results["sequence"], strict=True)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=f"output/gradient {index}")


# ---------------------------------------------------------------------------------------------
# Launch budget

# Operators that launch nothing on a GPU: allocations, views, detach
_NO_KERNEL = ("aten.empty", "aten.new_empty", "aten.detach", "aten.alias", "aten.lift_fresh")


class _Counter(TorchDispatchMode):
    """Triton launches by kernel name, and the PyTorch operators called outside them that would
    launch a kernel on a GPU (the interpreter's own tensor handling inside a launch is not counted)."""

    def __init__(self):
        super().__init__()
        self.launches: list = []
        self.ops: list = []
        self.inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not self.inside and not func.is_view and not name.startswith(_NO_KERNEL):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def counting(self):
        # the class whose run every launch goes through: InterpretedFunction here, JITFunction on a GPU
        runner = type(SEQ._forward_sequence_kernel.fn)
        original = runner.run
        counter = self

        def run(fn_self, *args, **kwargs):
            counter.launches.append(fn_self.fn.__name__)
            counter.inside += 1
            try:
                return original(fn_self, *args, **kwargs)
            finally:
                counter.inside -= 1

        runner.run = run
        try:
            with self:
                yield self
        finally:
            runner.run = original


def _layer_counts(G: int, T: int, dtype: torch.dtype = torch.float32):
    """({'forward': (launches, small ops), 'backward': ...}) of one layer through run_layer (what
    SparseSharingLSTM and SluiceLSTM call per layer) laid out as SparseSharingLSTM's: G = tasks x 2
    directions, weight set = direction, each group its own mask."""
    case = make_case(G=G, T=T, B=3, I=5, H=7, S=2, P=G, dtype=dtype)
    case["mask_index"] = torch.arange(G, device=DEVICE)
    case["weight_index"] = torch.arange(G, device=DEVICE) // (G // 2)
    leaves = {k: (v.detach().requires_grad_() if k in DIFFERENTIABLE else v) for k, v in case.items()}
    counts = {}
    with mtlfast.use_backend("triton"):
        with _Counter().counting() as c:
            out = run_layer(*(leaves[k] for k in ORDER))
        counts["forward"] = (c.launches, c.ops)
        grads = [torch.ones_like(o) for o in out]
        with _Counter().counting() as c:
            torch.autograd.backward(out, grads)
        counts["backward"] = (c.launches, c.ops)
    return counts


@pytest.mark.skipif(bool(TRITON), reason="the triton backend cannot run here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_launch_budget_per_layer_independent_of_steps_and_tasks(dtype, monkeypatch):
    """Per layer: forward = the input projection (both biases read by it) and one sequence launch,
    plus at most 4 small operations (the two masks' packing counted among them: the masks are
    packed on every call, never cached); backward = one sequence launch and the GEMMs for dx,
    dW_ih (with the bias gradient) and dW_hh, plus at most 6 small operations (the sums of the
    groups' weight and bias gradients into the two directions' weight sets among them, one launch
    each); the same counts for 1 or 7 steps and 2 or 3 tasks (x 2 directions), and no host read (a
    device sync on a GPU). In every dtype: bf16 / fp16 layers keep fp32 state and accumulation
    inside the kernels, which read the model's dtype and write it (y, h_n, c_n, every gradient),
    so no conversion launch comes on top (one would be an aten._to_copy here)."""
    monkeypatch.delenv(SEQ.MODE_VARIABLE, raising=False)
    seen = {}
    for G, T in ((4, 1), (6, 7)):
        counts = _layer_counts(G, T, dtype)
        launches, ops = counts["forward"]
        heavy = [name for name in launches if name != "_pack_kernel"]
        assert heavy == ["_grouped_forward_kernel", "_forward_sequence_kernel"], launches
        small = launches.count("_pack_kernel") + len(ops)
        assert small <= 4, (launches, ops)
        b_launches, b_ops = counts["backward"]
        b_heavy = [name for name in b_launches if name != "_set_sum_kernel"]
        assert b_heavy.count("_backward_sequence_kernel") == 1 and "_backward_step_kernel" not in b_heavy
        assert len(b_heavy) <= 5, b_launches
        assert b_launches.count("_set_sum_kernel") + len(b_ops) <= 6, (b_launches, b_ops)
        assert not any("_local_scalar_dense" in op or "_to_copy" in op for op in ops + b_ops), (ops, b_ops)
        seen[(G, T)] = (collections.Counter(launches), len(ops), collections.Counter(b_launches), len(b_ops))
    assert len(set(map(repr, seen.values()))) == 1, seen


@pytest.mark.skipif(bool(TRITON), reason="the triton backend cannot run here")
def test_step_mode_launches_grow_with_the_steps(monkeypatch):
    """The count above can fail: the step kernels launch once per step (T forward, T + 1 backward);
    in bf16 they too read and write the model's dtype around their fp32 state (no conversions)."""
    monkeypatch.setenv(SEQ.MODE_VARIABLE, "step")
    for dtype in (torch.float32, torch.bfloat16):
        counts = _layer_counts(4, 7, dtype)
        assert counts["forward"][0].count("_forward_step_kernel") == 7
        assert counts["backward"][0].count("_backward_step_kernel") == 8
        assert not any("_to_copy" in op for op in counts["forward"][1] + counts["backward"][1]), counts
