"""mtlfast.profile: the side-by-side comparison's fields (timing order, exact operator counts on
a CPU, kernel launches on a GPU, memory, top list), backward work counted, saved JSON and Chrome
traces, clear errors for bad arguments; the workload command line (``python -m bench.profile``,
the benchmark harness's), and that the library imports neither bench nor examples."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mtlfast
from mtlfast import profile
from tests.conftest import DEVICE

ROOT = Path(__file__).resolve().parent.parent
N = 4096


def three_adds(x):
    return x + 1 + 2 + 3


def one_mul(x):
    return x * 2


def big_temporary(x):
    return (x.repeat(8) * 2).sum()


def test_compare_fields_are_sane_and_consistent():
    x = torch.randn(N, device=DEVICE)
    c = profile.compare(three_adds, one_mul, x, labels=("loop", "fused"), warmup=1, iters=7)
    for side, label in ((c.a, "loop"), (c.b, "fused")):
        assert side.label == label and side.iters == 7 and side.device == str(DEVICE)
        assert 0 < side.wall_ms_p10 <= side.wall_ms <= side.wall_ms_p90
        assert side.top and all(t.ms_per_call >= 0 and t.calls_per_call > 0 for t in side.top)
        assert [t.ms_per_call for t in side.top] == sorted((t.ms_per_call for t in side.top), reverse=True)
    if DEVICE.type == "cpu":
        # exactly the operators called: three adds against one mul
        assert (c.a.launches, c.b.launches) == (3, 1) and c.a.launch_kind == "operator calls"
        assert c.a.device_ms is None and c.ratios()["device_ms"] is None
        assert {t.name for t in c.a.top} >= {"aten::add"} and c.a.top[0].calls_per_call in (1, 3)
    else:
        assert c.a.launches >= 3 and c.b.launches >= 1 and c.a.launch_kind == "kernel launches"
        assert c.a.device_ms > 0 and c.b.device_ms > 0
    # every add keeps one N-float result alive while the next is made; the mul makes one
    assert c.a.peak_memory_bytes >= 2 * 4 * N and c.b.peak_memory_bytes >= 4 * N
    r = c.ratios()
    assert r["wall_ms"] == pytest.approx(c.a.wall_ms / c.b.wall_ms)
    assert r["launches"] == pytest.approx(c.a.launches / c.b.launches)
    table = c.table()
    assert "| | loop | fused | loop / fused |" in table and f"{r['launches']:.2f}×" in table
    assert str(c) == table


def test_peak_memory_grows_with_what_a_call_allocates():
    x = torch.randn(N, device=DEVICE)
    c = profile.compare(one_mul, big_temporary, x, warmup=1, iters=2)
    # 8 N floats repeated, 8 N more for the product
    assert c.b.peak_memory_bytes >= 16 * 4 * N > c.a.peak_memory_bytes >= 4 * N


def test_backward_counts_backward_work():
    w = torch.randn(N, device=DEVICE, requires_grad=True)
    forward = profile.count_launches(three_adds, w)
    both = profile.count_launches(three_adds, w, backward=True)
    assert both.per_call > forward.per_call
    c = profile.compare(three_adds, one_mul, w, backward=True, warmup=1, iters=3)
    assert c.backward and "forward + backward" in c.table()
    if DEVICE.type == "cpu":
        assert forward.per_call == 3
        # mul's backward multiplies by 2 and accumulates into w.grad: its forward plus two
        assert c.b.launches == 3
        assert any("MulBackward0" in t.name for t in c.b.top)
    assert w.grad is not None  # a training step's gradients accumulate as usual


def test_count_launches_of_an_mtlfast_layer():
    """The sparse-sharing BiLSTM's operator (kernel) count does not grow with the sequence
    length: one native (or per-step Triton) recurrence per layer, not a loop of operators."""
    import mtlfast.nn as mnn

    model = mnn.SparseSharingLSTM(6, 5, bidirectional=True, num_tasks=2).to(DEVICE)
    counts = [profile.count_launches(lambda x: model(x, task=0), torch.randn(T, 3, 6, device=DEVICE)).per_call
              for T in (4, 16)]
    if DEVICE.type == "cpu":
        assert counts[0] == counts[1]
    else:  # the Triton recurrence launches one kernel per step
        assert counts[1] > counts[0]


def test_save_writes_json_and_traces(tmp_path):
    x = torch.randn(N, device=DEVICE)
    c = profile.compare(three_adds, one_mul, x, labels=("eager", "my fused"), warmup=0, iters=2)
    paths = c.save(tmp_path / "out")
    data = json.loads(paths["comparison"].read_text())
    assert data["a"]["label"] == "eager" and data["b"]["launches"] == c.b.launches
    assert data["ratios"]["wall_ms"] == pytest.approx(c.ratios()["wall_ms"])
    assert "trace" not in data["a"]
    assert paths["my fused"].name == "trace_my_fused.json"
    for label in ("eager", "my fused"):
        trace = json.loads(paths[label].read_text())
        names = {e.get("name") for e in trace["traceEvents"]}
        assert ("aten::add" if label == "eager" else "aten::mul") in names


@pytest.mark.parametrize("kwargs,error,fragments", [
    ({"fn_a": 3}, TypeError, ["'fn_a'", "callable", "int"]),
    ({"fn_b": "f"}, TypeError, ["'fn_b'", "callable", "str"]),
    ({"labels": ("a", "a")}, ValueError, ["'labels'", "two different"]),
    ({"labels": ("a",)}, ValueError, ["'labels'"]),
    ({"iters": 0}, ValueError, ["'iters'", ">= 1", "0"]),
    ({"warmup": -1}, ValueError, ["'warmup'", ">= 0"]),
    ({"inputs": (torch.zeros(2), torch.zeros(2, device="meta"))}, ValueError,
     ["one device", "cpu (inputs[0])", "meta (inputs[1])"]),
    ({"inputs": ([torch.zeros(2)], {"k": torch.zeros(2, device="meta")})}, ValueError, ["meta (inputs[1])"]),
])
def test_bad_arguments(kwargs, error, fragments):
    args = {"fn_a": three_adds, "fn_b": one_mul, "inputs": (torch.zeros(2),), **kwargs}
    inputs = args.pop("inputs")
    with pytest.raises(error) as info:
        profile.compare(args.pop("fn_a"), args.pop("fn_b"), *inputs, iters=args.pop("iters", 1), **args)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {info.value}"


@pytest.mark.parametrize("fn,fragment", [
    (lambda x: "done", "returned str with no tensor"),
    (lambda x: (x > 0, x.detach()), "requires_grad=False"),
    (lambda x: {"n": x.long()}, "torch.int64"),
])
def test_backward_of_outputs_it_cannot_reduce(fn, fragment):
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError) as info:
        profile.compare(fn, one_mul, x, backward=True, warmup=0, iters=1)
    assert "'fn_a'" in str(info.value) and "backward=True" in str(info.value) and fragment in str(info.value)


def test_reached_from_the_package():
    assert mtlfast.profile.compare is profile.compare


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.profile", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_command_line_profiles_a_workload(tmp_path):
    proc = _cli("lstm-tiny", "--device", "cpu", "--iters", "2", "--warmup", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| | eager-loop | mtlfast | eager-loop / mtlfast |" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr
    data = json.loads((tmp_path / "comparison.json").read_text())
    assert data["backward"] is True and data["a"]["launches"] > data["b"]["launches"] > 0
    assert (tmp_path / "trace_eager-loop.json").exists() and (tmp_path / "trace_mtlfast.json").exists()
    other = _cli("lstm-tiny", "--device", "cpu", "--mode", "fwd", "--baseline", "eager-lstm", "--iters", "1")
    assert other.returncode == 0 and "| | eager-lstm | mtlfast |" in other.stdout and "forward on cpu" in other.stdout


@pytest.mark.parametrize("args,fragment", [
    (("no-such-workload",), "unknown workload 'no-such-workload'; valid:"),
    (("lstm-tiny", "--device", "cpu", "--baseline", "nope"), "unknown baseline 'nope' for masked_lstm; valid: eager-loop, eager-lstm"),
    (("large", "--device", "cpu"), "does not run on cpu"),
])
def test_command_line_errors(args, fragment):
    proc = _cli(*args)
    assert proc.returncode != 0 and fragment in proc.stderr, proc.stderr[-2000:]


def test_the_library_imports_no_bench_examples_or_tests():
    # every import statement of the package's source, function-level ones included
    found = []
    for folder in ("mtlfast", "triton_kernels"):   # triton_kernels/ is installed as mtlfast.triton_kernels
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                else:
                    continue
                found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] in ("bench", "examples", "tests")]
    assert not found, found
