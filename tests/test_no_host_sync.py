"""No host syncs in a training step: SparseSharingLSTM with a per-sample task tensor, SluiceLSTM with
lengths and GumbelMatrix. Where reading a value on the host would be a device sync (a GPU) or
impossible (a torch.compile trace), the modules use layouts whose shapes do not depend on the
data (per-sample tasks: every task a padded group) and check values on the device. On a CPU the
same steps compile with fullgraph=True and match eager; on a GPU they run under
``torch.cuda.set_sync_debug_mode("error")`` and inside a CUDA graph capture."""
from __future__ import annotations

import pytest
import torch

import mtlfast
import mtlfast.nn as mnn
from mtlfast import _checks
from tests.conftest import DEVICE
from tests.helpers import assert_close

needs_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="a GPU test: device syncs and CUDA graphs")
TASKS = torch.tensor([2, 0, 2, 1, 0, 2, 2])        # unsorted, unequal counts


def _lstm():
    torch.manual_seed(0)
    return mnn.SparseSharingLSTM(5, 6, num_layers=2, bidirectional=True, num_tasks=3).to(DEVICE)


def _lstm_step(model, x, task):
    out, (h, c) = model(x, task=task)
    loss = out.square().mean() + h.sum() + c.mean()
    loss.backward()
    return loss.detach(), out.detach(), [p.grad.clone() for p in model.parameters()]


def _force_device_layout(monkeypatch):
    """Every host read counts as a sync, as on a GPU: the modules take their sync-free paths."""
    monkeypatch.setattr(_checks, "host_check_is_free", lambda t: False)


def test_padded_task_groups_match_the_host_layout(monkeypatch):
    x = torch.randn(4, 7, 5, device=DEVICE)
    task = TASKS.to(DEVICE)
    model = _lstm()
    for m in model.masked_parameter_names():
        for t in range(3):
            model.set_mask(t, m, torch.rand(getattr(model, m).shape, device=DEVICE) < 0.6)
    expected = _lstm_step(model, x, task)
    model.zero_grad()
    with monkeypatch.context() as patch:
        _force_device_layout(patch)
        got = _lstm_step(model, x, task)
    assert_close(got[0], expected[0], torch.float32, "loss")
    assert_close(got[1], expected[1], torch.float32, "output")
    for i, (a, b) in enumerate(zip(got[2], expected[2])):
        assert_close(a, b, torch.float32, f"gradient {i}")


def test_out_of_range_task_ids_fail_on_the_device_path_too(monkeypatch):
    _force_device_layout(monkeypatch)
    with pytest.raises(RuntimeError, match="task"):
        _lstm()(torch.randn(4, 3, 5, device=DEVICE), task=torch.tensor([0, 1, 3], device=DEVICE))


def test_sluice_lengths_are_checked_on_the_device_path(monkeypatch):
    _force_device_layout(monkeypatch)
    model = mnn.SluiceLSTM(4, 6, num_tasks=2, num_layers=2).to(DEVICE)
    with pytest.raises(RuntimeError, match="lengths"):
        model(torch.randn(3, 5, 4, device=DEVICE), lengths=torch.tensor([5, 6, 1], device=DEVICE))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU half: the GPU runs the sync-debug tests below")
def test_training_steps_compile_fullgraph():
    torch._dynamo.reset()
    model = _lstm()
    x = torch.randn(4, 7, 5, device=DEVICE)
    task = TASKS.to(DEVICE)
    expected = _lstm_step(model, x, task)
    model.zero_grad()
    got = _lstm_step(torch.compile(model, fullgraph=True), x, task)
    assert_close(got[1], expected[1], torch.float32, "SparseSharingLSTM output")
    for i, (a, b) in enumerate(zip(got[2], expected[2])):
        assert_close(a, b, torch.float32, f"SparseSharingLSTM gradient {i}")

    sluice = mnn.SluiceLSTM(4, 6, num_tasks=2, num_layers=2).to(DEVICE)
    xs, lengths = torch.randn(3, 5, 4, device=DEVICE), torch.tensor([5, 2, 4], device=DEVICE)
    eager = sluice(xs, lengths=lengths)
    # SluiceLSTM keeps each task's weights in torch.nn.LSTM containers (never called), which dynamo
    # refuses to trace unless allowed
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(sluice, fullgraph=True)(xs, lengths=lengths)
    assert_close(compiled, eager, torch.float32, "SluiceLSTM output")

    matrix = mnn.GumbelMatrix(3, [4, 5]).to(DEVICE)
    torch.manual_seed(3)
    eager = matrix.sample_all()
    torch.manual_seed(3)
    with mtlfast.use_backend("cpu"):
        compiled = torch.compile(matrix.sample_all, fullgraph=True)()
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


@needs_cuda
def test_training_step_issues_no_sync():
    model = _lstm()
    sluice = mnn.SluiceLSTM(4, 6, num_tasks=2, num_layers=2).to(DEVICE)
    matrix = mnn.GumbelMatrix(3, [4, 5]).to(DEVICE)
    x, task = torch.randn(4, 7, 5, device=DEVICE), TASKS.to(DEVICE)
    xs, lengths = torch.randn(3, 5, 4, device=DEVICE), torch.tensor([5, 2, 4], device=DEVICE)
    for _ in range(2):      # the first call warms caches (autotuning reads timings on the host)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _lstm_step(model, x, task)
            sluice(xs, lengths=lengths).sum().backward()
            sum(z.sum() for z in matrix.sample_all()).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_training_step_is_captured_in_a_cuda_graph():
    model = _lstm()
    x, task = torch.randn(4, 7, 5, device=DEVICE), TASKS.to(DEVICE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):      # warm-up outside the capture (autotuning, allocator)
            model.zero_grad(set_to_none=False)
            expected = _lstm_step(model, x, task)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        out, (h, c) = model(x, task=task)
        loss = out.square().mean() + h.sum() + c.mean()
        loss.backward()
    model.zero_grad(set_to_none=False)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(loss.detach(), expected[0], torch.float32, "loss replayed from the graph")
    for i, (p, g) in enumerate(zip(model.parameters(), expected[2])):
        assert_close(p.grad, g, torch.float32, f"gradient {i} replayed from the graph")
