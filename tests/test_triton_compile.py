"""Every Triton kernel compiles for sm_90 and sm_80 (fp16, bf16, fp32; every autotune candidate
its prune keeps for H100 bf16) as the JIT compiles it for the launches of the GPU target workloads
(pointer dtypes as the launchers pass them, the JIT's specialisation of integers), with
tensor-core instructions, shared memory within the device's limit and a spill-free H100 bf16
candidate for each workload — checked here without a GPU by compiling ahead of time
(tests/triton_aot.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
from tests.triton_aot import SHARED_LIMIT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_aot.py"), "--all-configs"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=1500)
    assert run.returncode == 0, run.stderr[-4000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert results, run.stderr[-4000:]
    return results


def test_every_kernel_compiles(compiled):
    failures = [r for r in compiled if not r.get("ok")]
    assert not failures, json.dumps(failures, indent=1)[:6000]
    kernels = {r["kernel"] for r in compiled}
    from tests.triton_aot import KERNELS
    assert {name for _, name in KERNELS} == kernels


# The recurrence kernels' pointers to what enters or leaves a layer, in the model's dtype (the first
# recorded launch of a step kernel reads h0 / dh_n and writes an fp32 state buffer: h_out, dh_out)
_LAYER_BOUNDARY = {"h0_ptr", "c0_ptr", "h_in_ptr", "c_in_ptr", "h_n_ptr", "c_n_ptr", "hs_ptr",
                   "dhs_ptr", "dh_n_ptr", "dc_n_ptr", "dh_in_ptr", "dc_in_ptr", "dh0_ptr", "dc0_ptr"}


def test_pointers_have_the_launchers_dtypes(compiled):
    """The masked LSTM keeps its projections, running state, gates and their gradients in fp32
    whatever the weights' dtype, and reads and writes what enters and leaves a layer (h0, c0, y,
    h_n, c_n, the biases and their gradients) in the model's dtype; indices are int64, mask words
    int32, directions bool; the mixing weights, tau, allocations and per-program partials fp32."""
    short = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}
    for r in compiled:
        p = r["pointers"]
        for name, kind in p.items():
            if name in ("wi_ptr", "mi_ptr", "len_ptr"):
                assert kind == "*i64", r
            elif name == "bits_ptr":
                assert kind == "*i32", r
            elif name == "rev_ptr":
                assert kind == "*u1", r
            elif name in ("alpha_ptr", "beta_ptr", "part_ptr", "tau_ptr"):
                assert kind == "*fp32", r
            elif name == "z_ptr" and r["kernel"].startswith("_combine"):    # the allocation (pairs: the sample)
                assert kind == "*fp32", r
        if r["kernel"] in ("_forward_step_kernel", "_backward_step_kernel", "_forward_sequence_kernel",
                           "_backward_sequence_kernel"):
            assert p["w_ptr"] == short[r["dtype"]], r
            for name, kind in p.items():
                if name not in ("w_ptr", "wi_ptr", "mi_ptr", "len_ptr", "bits_ptr", "rev_ptr"):
                    assert kind == (short[r["dtype"]] if name in _LAYER_BOUNDARY else "*fp32"), (name, r)
        if r["kernel"] == "_grouped_forward_kernel" and r["workload"].startswith("lstm"):
            assert ((p["x_ptr"], p["w_ptr"], p["bias_ptr"], p["bias2_ptr"], p["out_ptr"])
                    == (short[r["dtype"]],) * 4 + ("*fp32",)), r
        if r["kernel"] == "_grouped_grad_weight_kernel" and r["workload"].startswith("lstm"):
            assert p["dw_ptr"] == "*fp32", r


def test_integers_are_specialised_as_the_jit_does(compiled):
    """Unit strides are the constant 1; the 16-aligned workload's sizes and strides are known
    16-divisible and the unaligned one's hidden size is not; the autotune-key buckets and the step
    index are never specialised (they would compile a kernel per value)."""
    for r in compiled:
        if r["kernel"] == "_forward_step_kernel":
            assert {"stride_wk", "stride_xn", "stride_lb"} <= set(r["ones"]), r
            assert ("H" in r["divisible"]) == (r["workload"] == "lstm-large"), r
            assert "B_BUCKET" not in r["divisible"] and "step" not in r["divisible"], r
        if r["kernel"] in ("_forward_sequence_kernel", "_backward_sequence_kernel"):
            # the length is a loop bound: a kernel per length would recompile every batch
            assert "T" not in r["divisible"] and "T" not in r["ones"] and "B_BUCKET" not in r["divisible"], r
        if r["kernel"] == "_grouped_forward_kernel":
            assert {"stride_xk", "stride_wk", "stride_on"} <= set(r["ones"]), r
            assert "M_BUCKET" not in r["divisible"], r


def test_tensor_cores_are_used(compiled):
    from tests.triton_aot import NO_MATMUL
    for r in compiled:
        if r["dtype"] in ("float16", "bfloat16") and r["kernel"] not in NO_MATMUL:
            if r["arch"] == 90:
                assert r["wgmma"] > 0 or r["mma_sync"] > 0, r
            else:
                assert r["mma_sync"] > 0, r


def test_shared_memory_fits(compiled):
    for r in compiled:
        assert r["shared"] <= SHARED_LIMIT[r["arch"]], r


def test_every_kernel_has_a_spill_free_h100_bf16_config(compiled):
    """Spills (stack / local memory) cost speed, not correctness, and the autotuner picks by
    measured time; what must hold is that the H100 bf16 case of each workload has a candidate that
    does not spill. (fp32 runs on FMA units, not tensor cores, and is the correctness dtype: its
    spills are reported by tests/triton_aot.py, not asserted.)"""
    by_kernel = {}
    for r in compiled:
        if r["arch"] == 90 and r["dtype"] == "bfloat16" and not r["config"]["INT64"]:
            by_kernel.setdefault((r["kernel"], r["workload"]), []).append(r["stack"] == 0 and r["local"] == 0)
    assert by_kernel and all(any(flags) for flags in by_kernel.values()), by_kernel


def test_sequence_kernels_never_spill(compiled):
    """The sequence kernels keep a row's state and loop bounds live across every step's hidden loop:
    no candidate compiled for A100 or H100 in fp16 or bf16 (the dtypes the GPU's tensor cores run)
    spills registers (no stack frame, no local memory). fp32's few bytes are reported, as for the
    other kernels."""
    sequence = [r for r in compiled if r["kernel"] in ("_forward_sequence_kernel", "_backward_sequence_kernel")
                and r["dtype"] in ("float16", "bfloat16")]
    assert {r["arch"] for r in sequence} == {80, 90}, sequence
    spills = [(r["kernel"], r["workload"], r["dtype"], r["arch"], r["config"], r["stack"], r["local"])
              for r in sequence if r["stack"] or r["local"]]
    assert not spills, spills
