"""The reproducers of the hardening issue (#12), each as written there, as regression tests: two
killed the process, seven returned a wrong number without an error. Every one now raises or
computes the right number. The crashing ones run in a subprocess, so a regression fails one test
instead of killing the run."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import mtlfast
import mtlfast.functional as MF
import mtlfast.nn as mnn
from tests.conftest import DEVICE


def _run(code: str) -> subprocess.CompletedProcess:
    src = "import torch, mtlfast, mtlfast.nn as mnn\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("code,error", [
    ("mnn.SparseSharingLSTM(3, 4, num_tasks=2).double()(torch.randn(5, 2, 3), task=0)",
     "RNN input dtype (torch.float32) does not match weight dtype (torch.float64)"),
    ("mnn.SparseSharingLSTM(3, 4, num_tasks=2)(torch.randn(5, 2, 3), task=0, "
     "hx=(torch.zeros(1, 2, 4, device='meta'),) * 2)", "hidden tensor at meta"),
], ids=["float64 module, float32 input", "meta hx"])
def test_no_crash(code, error):
    result = _run(code)
    assert result.returncode == 1, f"exit {result.returncode} (negative: killed by a signal)\n{result.stderr[-2000:]}"
    assert error in result.stderr and "Traceback" in result.stderr


def test_float32_module_float64_input_raises_as_torch_lstm():
    model = mnn.SparseSharingLSTM(3, 4, num_tasks=2)
    with pytest.raises(ValueError, match="does not match weight dtype"):
        model(torch.randn(5, 2, 3, dtype=torch.float64), (torch.zeros(1, 2, 4, dtype=torch.float64),) * 2, task=0)


def test_mask_edited_through_data_is_used():
    backend = "triton"
    reason = mtlfast.available_backends()[backend]
    if reason:
        pytest.skip(reason)
    x, w = torch.randn(4, 40, device=DEVICE), torch.randn(9, 40, device=DEVICE)
    mask = torch.rand(9, 40, device=DEVICE) < 0.5
    model = mnn.SparseSharingLSTM(5, 6, num_tasks=2).to(DEVICE)
    seq = torch.randn(3, 2, 5, device=DEVICE)
    with mtlfast.use_backend(backend):
        MF.masked_linear(x, w, mask)
        model(seq, task=1)
        mask.data[:] = ~mask.data
        model.mask_hh_l0.data[1] = torch.rand(24, 6, device=DEVICE) < 0.3
        torch.testing.assert_close(MF.masked_linear(x, w, mask), x @ torch.where(mask, w, 0).t())
        out, _ = model(seq, task=1)
    torch.testing.assert_close(out, model.subnet(1)(seq)[0], atol=1e-5, rtol=1e-4)


def test_float64_pairs_and_tiny_tau():
    torch.manual_seed(0)
    pair = torch.tensor([[1e8 + 3, 1e8]], dtype=torch.float64).expand(40000, 2).contiguous()
    assert abs(float(MF.gumbel_pairs(pair).mean()) - 0.9526) < 0.01
    assert torch.isfinite(MF.gumbel_pairs(torch.tensor([[1e300, 1e300]], dtype=torch.float64), hard=False)).all()
    logits = torch.randn(10, requires_grad=True)
    with pytest.raises(ValueError, match="'tau'"):
        MF.gumbel_sigmoid(logits, tau=1e-50, hard=False)               # float32 cannot hold it
    wide = logits.detach().double().requires_grad_()
    MF.gumbel_sigmoid(wide, tau=1e-50, hard=False).sum().backward()    # float64 can
    assert torch.isfinite(wide.grad).all()


def test_masks_loaded_as_floats_stay_bool_and_meta_masks_are_refused():
    model = mnn.SparseSharingLSTM(3, 4, num_tasks=2)
    model.set_mask(1, "weight_hh_l0", torch.rand(16, 4) < 0.5)
    state = {k: (v.float() if k.startswith("mask_") else v) for k, v in model.state_dict().items()}
    fresh = mnn.SparseSharingLSTM(3, 4, num_tasks=2)
    fresh.load_state_dict(state, assign=True)
    assert fresh.mask_hh_l0.dtype == torch.bool and torch.equal(fresh.mask_hh_l0, model.mask_hh_l0)
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(fresh(x, task=1)[0], model(x, task=1)[0])
    state["mask_ih_l0"] = torch.ones(2, 16, 3, dtype=torch.bool, device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        fresh.load_state_dict(state, assign=True)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_backends_agree_on_masked_out_inf_and_nan(backend):
    if mtlfast.available_backends()[backend]:
        pytest.skip(mtlfast.available_backends()[backend])
    model = mnn.SparseSharingLSTM(3, 4, num_tasks=1).to(DEVICE)
    mask = torch.rand(16, 4, device=DEVICE) < 0.5
    model.set_mask(0, "weight_hh_l0", mask)
    x = torch.randn(5, 2, 3, device=DEVICE)
    with mtlfast.use_backend(backend):
        clean, _ = model(x)
        with torch.no_grad():
            model.weight_hh_l0[~mask] = float("nan")
            model.weight_hh_l0[tuple((~mask).nonzero()[0].tolist())] = float("inf")
        poisoned, _ = model(x)
    assert torch.isfinite(poisoned).all() and torch.equal(clean, poisoned)


def test_second_derivatives_are_not_zero():
    model = mnn.SparseSharingLSTM(3, 4, num_tasks=2).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(model(x, task=0)[0].sum(), x, create_graph=True)
    assert g.requires_grad
    (second,) = torch.autograd.grad(g.square().sum(), model.weight_hh_l0)
    assert second.abs().max() > 0
    assert torch.autograd.gradgradcheck(lambda x: model(x, task=0)[0], (x[:2, :1].detach().requires_grad_(),))


def test_sluice_refuses_fractional_lengths():
    with pytest.raises(TypeError, match="'lengths'"):
        mnn.SluiceLSTM(3, 4, 2, num_layers=1)(torch.randn(2, 5, 3), lengths=torch.tensor([2.5, 5.0]))


def test_unclear_errors_are_now_clear():
    model = mnn.SparseSharingLSTM(3, 4, num_tasks=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(5, 2, 3), task=0)[0].dtype == torch.bfloat16
        assert mnn.SluiceLSTM(3, 4, 2, num_layers=1)(torch.randn(2, 5, 3)).dtype == torch.bfloat16
    out, (h, c) = model(torch.randn(5, 0, 3), task=0)
    assert out.shape == (5, 0, 4) and h.shape == (1, 0, 4)
    with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0"):
        model(torch.randn(0, 2, 3), task=0)
    for bad in (torch.ones(5, 2, 3, dtype=torch.int64), torch.ones(5, 2, 3, dtype=torch.bool),
                torch.ones(5, 2, 3, dtype=torch.complex64), torch.ones(5, 2, 3, device="meta")):
        with pytest.raises(ValueError, match="'input'"):
            model(bad, task=0)
    with pytest.raises(ValueError, match="'layer_mix'"):
        mnn.SluiceLSTM(3, 4, 2, layer_mix="sum")
    with pytest.raises(TypeError, match="'tau'"):
        mnn.GumbelMatrix(2, [3], tau="1")
    with pytest.raises(TypeError, match="'dim'"):
        MF.gumbel_softmax(torch.randn(2, 3), dim=True)
    assert float(MF.gumbel_softmax(torch.tensor(0.3))) == 1.0
