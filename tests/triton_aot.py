"""Compiles Triton kernels ahead of time for real GPU targets (sm_80, sm_90) on a machine with no
GPU, and reports what the compiler made of them: whether tensor-core instructions were emitted,
shared memory, registers and local-memory spills (from the bundled cuobjdump).

The interpreter checks what a kernel computes; this checks that it compiles the way the GPU will
compile it, for the launches that really happen. The launchers of mtlfast.triton_kernels run on
meta tensors (no memory, no device) at the GPU target workloads (WORKLOADS), in each dtype; every
kernel launch is recorded instead of run, and Triton's own binder turns the recorded arguments into
what the JIT would compile: each pointer with the dtype the launcher passes (the masked LSTM's
fp32 projections, state, gates and partial sums, fp32 tau / alpha / beta / z, int64 indices and
lengths, int32 mask words, bool flags), integers equal to 1 as constants, and pointers and integers
divisible by 16 marked so (torch allocations are aligned). The candidates compiled are those the
kernel's own prune keeps for the launch: the first everywhere (what MTLFAST_AUTOTUNE=0 runs), all
of them for H100 (sm_90) bf16, and the first once more with INT64 offsets (the launchers' flag for
tensors past 2**31 elements, which no workload here reaches; the integers keep the workload's types).

Run as a script (TRITON_INTERPRET must be off): prints one JSON object per compile.
    python tests/triton_aot.py [--all-configs]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DTYPES = ("float16", "bfloat16", "float32")
GEMM, LSTM = "mtlfast.triton_kernels.masked_gemm", "mtlfast.triton_kernels.masked_lstm"
LSTM_SEQUENCE = "mtlfast.triton_kernels.masked_lstm_sequence"
SLUICE = "mtlfast.triton_kernels.sluice"
GUMBEL = "mtlfast.triton_kernels.gumbel"
_GUMBEL_KERNELS = ["_sigmoid_forward_kernel", "_sigmoid_backward_kernel", "_pairs_forward_kernel",
                   "_pairs_backward_kernel", "_softmax_forward_kernel", "_softmax_backward_kernel",
                   "_combine_forward_kernel", "_combine_backward_kernel"]
# (kernel module, autotuned kernel name): every autotuned kernel (tests/test_autotune.py checks
# the modules hold no other)
KERNELS = [
    (GEMM, "_grouped_forward_kernel"), (GEMM, "_grouped_grad_input_kernel"), (GEMM, "_grouped_grad_weight_kernel"),
    (LSTM, "_forward_step_kernel"), (LSTM, "_backward_step_kernel"),
    (LSTM_SEQUENCE, "_forward_sequence_kernel"), (LSTM_SEQUENCE, "_backward_sequence_kernel"),
    (SLUICE, "_alpha_mix_forward_kernel"), (SLUICE, "_alpha_mix_backward_kernel"),
    (SLUICE, "_layer_mix_forward_kernel"), (SLUICE, "_layer_mix_backward_kernel"),
    (SLUICE, "_orthogonality_forward_kernel"),
    *((GUMBEL, name) for name in _GUMBEL_KERNELS),
]
# Kernels with no matrix product (a weighted sum per element): no tensor-core instruction to expect.
NO_MATMUL = {"_layer_mix_forward_kernel", "_layer_mix_backward_kernel", *_GUMBEL_KERNELS}
SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory per block on A100 / H100


# ---------------------------------------------------------------------------------------------
# The workloads: each runs launchers as the ops (mtlfast/ops/<family>_triton.py) call them, on
# meta tensors, at the GPU benchmark's sizes (bench/workloads/).

def _meta(torch, *shape, dtype):
    return torch.empty(shape, device="meta", dtype=dtype)


def _lstm_layer(tasks: int, input_size: int, hidden: int, batch: int, length: int):
    """One bidirectional layer of SparseSharingLSTM (fwd+bwd, each task its own batch): G = tasks x 2
    groups, weight set = direction, a mask per group; mtlfast/ops/masked_lstm.py's _forward and
    _backward through masked_lstm_triton.py."""
    def run(dtype):
        import torch

        from mtlfast.triton_kernels import masked_lstm as K
        from mtlfast.triton_kernels.masked_lstm_sequence import sequence_unfit
        f32, i64 = torch.float32, torch.int64
        G, I, H, B, T = 2 * tasks, input_size, hidden, batch, length
        e = lambda *shape, dtype=dtype: _meta(torch, *shape, dtype=dtype)   # noqa: E731
        x = e(G, T, B, I)
        w_ih, w_hh = e(2, 4 * H, I), e(2, 4 * H, H)
        wi, mi = e(G, dtype=i64), e(G, dtype=i64)
        bits_ih = e(G, 4 * H, (I + 31) // 32, dtype=torch.int32)
        bits_hh = e(G, 4 * H, (H + 31) // 32, dtype=torch.int32)
        lengths, reverse = e(G, B, dtype=i64), e(G, dtype=torch.bool)
        b_ih, b_hh = e(2, 4 * H), e(2, 4 * H)            # read by the projection, by weight set
        xproj = K.grouped_masked_matmul(x.reshape(G, T * B, I), w_ih, wi, bits_ih, mi, biases=(b_ih, b_hh),
                                        out_dtype=f32).view(G, T, B, 4 * H)
        h0, c0 = e(G, B, H), e(G, B, H)
        # both recurrence modes where the sequence kernels take the size (the automatic choice
        # there), the step kernels alone above it; state fp32, what enters and leaves in dtype
        modes = ("sequence", "step") if sequence_unfit(H) is None else ("step",)
        for mode in modes:
            _, _, _, gates, cells, h_prev = K.forward_recurrence(xproj, h0, c0, w_hh, wi, bits_hh, mi, lengths,
                                                                 reverse, mode=mode, out_dtype=dtype)
            dgates, _, _ = K.backward_recurrence(e(G, T, B, H), e(G, B, H), e(G, B, H), gates, cells, c0, w_hh, wi,
                                                 bits_hh, mi, lengths, reverse, mode=mode, out_dtype=dtype)
        dg = dgates.reshape(G, T * B, 4 * H)             # fp32: the GEMMs round it in registers
        K.grouped_masked_matmul_grad_input(dg, w_ih, wi, bits_ih, mi)
        K.grouped_masked_matmul_grad_weight(dg, x.reshape(G, T * B, I), bits_ih, mi, with_bias=True, dot_dtype=dtype)
        K.grouped_masked_matmul_grad_weight(dg, h_prev.reshape(G, T * B, H), bits_hh, mi, dot_dtype=dtype)
    return run


def _masked_linear(m: int, n: int, k: int):
    """MF.masked_linear with bias, forward and backward (mtlfast/ops/masked_linear_triton.py)."""
    def run(dtype):
        import torch

        from mtlfast.ops import masked_linear_triton as T
        e = lambda *shape, dtype=dtype: _meta(torch, *shape, dtype=dtype)   # noqa: E731
        x, weight, bias = e(m, k), e(n, k), e(n)
        bits = e(n, (k + 31) // 32, dtype=torch.int32)
        T.forward(x, weight, bits, bias)
        T.grad_input(e(m, n), weight, bits)
        T.grad_weight(e(m, n), x, bits, with_bias=True)
    return run


def _sluice(tasks: int, subspaces: int, rows: int, features: int, layers: int, layer_tasks: int, layer_rows: int,
            layer_features: int, penalty_rows: int, penalty_cols: int):
    """alpha mixing (h (M, rows, features)), layer mixing (K layers of M tasks), the penalty."""
    def run(dtype):
        import torch

        from mtlfast.triton_kernels import sluice as K
        e = lambda *shape, dtype=dtype: _meta(torch, *shape, dtype=dtype)   # noqa: E731
        MS = tasks * subspaces
        h, alpha = e(tasks, rows, features), e(MS, MS, dtype=torch.float32)
        K.alpha_mix_forward(h, alpha, subspaces)
        K.alpha_mix_backward(e(tasks, rows, features), h, alpha, subspaces)
        stack, beta = e(layers, layer_tasks, layer_rows, layer_features), e(layer_tasks, layers, dtype=torch.float32)
        K.layer_mix_forward(stack, beta)
        K.layer_mix_backward(e(layer_tasks, layer_rows, layer_features), stack, beta)
        K.orthogonality_penalty_forward(e(penalty_rows, penalty_cols), 2)
    return run


def _gumbel(n: int, rows: int, columns: int, components: int, pixels: int):
    def run(dtype):
        import torch

        from mtlfast.triton_kernels import gumbel as K
        e = lambda *shape, dtype=dtype: _meta(torch, *shape, dtype=dtype)   # noqa: E731
        tau, seed = e(dtype=torch.float32), 2**40 + 3
        K.gumbel_sigmoid_forward(e(n), tau, seed, True)
        K.gumbel_sigmoid_backward(e(n), e(n), tau, seed)
        K.gumbel_pairs_forward(e(n, 2), tau, seed, True)
        K.gumbel_pairs_backward(e(n), e(n, 2), tau, seed)
        K.gumbel_softmax_forward(e(rows, columns), tau, seed, True)
        K.gumbel_softmax_backward(e(rows, columns), e(rows, columns), tau, seed)
        z = e(components, dtype=torch.float32)
        K.allocation_combine_forward(e(components, pixels), z)
        K.allocation_combine_backward(e(pixels), e(components, pixels), z)
    return run


WORKLOADS = {
    # bench "large": 3 tasks, bi-LSTM 1024 -> 1024, batch 64 x length 128 (every size 16-aligned)
    "lstm-large": _lstm_layer(3, 1024, 1024, 64, 128),
    # bench "conll03": 3 tasks, bi-LSTM 130 -> 200, batch 10 x length 32 (no size 16-aligned)
    "lstm-conll03": _lstm_layer(3, 130, 200, 10, 32),
    # bench masked_linear 4096^3
    "masked-linear-4096": _masked_linear(4096, 4096, 4096),
    # bench alpha-mix-large (4 tasks x 2 subspaces, 262144 rows of 512); the paper's stitch of 3
    # layers of a 2 x 100 bi-LSTM (2 tasks, batch 32 x length 32); the penalty on its w_ih (400, 164)
    "sluice": _sluice(4, 2, 262144, 512, 3, 2, 1024, 200, 400, 164),
    # bench gumbel-large (2**24 logits); a (4096, 1000) softmax; bench combine (7 components of
    # 16 x 48 x 26 x 26)
    "gumbel": _gumbel(2**24, 4096, 1000, 7, 16 * 48 * 26 * 26),
}


# ---------------------------------------------------------------------------------------------
# Recording launches and specialising them as the JIT does

def _tuners():
    import importlib
    return {name: getattr(importlib.import_module(module), name) for module, name in KERNELS}


def record(workload: str, dtype_name: str) -> dict:
    """{kernel: (args, kwargs)} of the first launch of each kernel in `workload` run in `dtype`."""
    import torch
    launches, tuners = {}, _tuners()

    def recorder(name):
        def run(*args, **kwargs):
            launches.setdefault(name, (args, kwargs))
        return run

    for name, tuner in tuners.items():
        tuner.run = recorder(name)
    try:
        WORKLOADS[workload](getattr(torch, dtype_name))
    finally:
        for tuner in tuners.values():
            del tuner.run
    return launches


def specialise(fn, args: tuple, kwargs: dict, config, arch: int, int64: bool) -> dict:
    """(signature, constexprs, attrs) of the JIT's compile of `fn` for this launch and config."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    launch = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    if int64:
        launch["INT64"] = True
    bound, specialization, _ = binder(*args, **launch, **config.all_kwargs())
    names = [p.name for p in fn.params]
    signature = {name: spec[0] for name, spec in zip(names, specialization)}
    constexprs = {(i,): bound[name] for i, name in enumerate(names) if signature[name] == "constexpr"}
    attrs = {(i,): backend.parse_attr(spec[1]) for i, spec in enumerate(specialization) if isinstance(spec[1], str)}
    return dict(signature=signature, constexprs=constexprs, attrs={k: v for k, v in attrs.items() if v})


def _cuobjdump() -> Path:
    import triton
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(_cuobjdump()), "-res-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out))  # shared comes from triton metadata
    return {k.lower(): int(v) for k, v in fields.items()}


def compile_one(job: dict) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = getattr(importlib.import_module(job["module"]), job["kernel"]).fn
    names = [p.name for p in fn.params]
    result = {k: job[k] for k in ("kernel", "workload", "dtype", "arch", "config")}
    # what the JIT specialised: pointer dtypes, the arguments known to be 16-divisible, the
    # non-constexpr parameters it made the constant 1
    result["pointers"] = {k: v for k, v in job["signature"].items() if v.startswith("*")}
    result["divisible"] = [names[i] for (i,), attr in job["attrs"].items() if ["tt.divisibility", 16] in attr]
    result["ones"] = [names[i] for (i,), v in job["constexprs"].items() if not fn.params[i].is_constexpr]
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=job["signature"], constexprs=job["constexprs"],
                                            attrs=job["attrs"]),
                                  target=GPUTarget("cuda", job["arch"], 32),
                                  options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
    except Exception as exc:  # reported, the test fails on it
        result["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
        return result
    ptx = compiled.asm["ptx"]
    result.update(ok=True, seconds=round(time.perf_counter() - start, 2), shared=compiled.metadata.shared,
                  wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
                  **_resources(compiled.asm["cubin"]))
    return result


def jobs(all_configs: bool) -> list[dict]:
    import importlib
    modules = {name: module for module, name in KERNELS}
    out = []
    for workload in WORKLOADS:
        for dtype in DTYPES:
            for kernel, (args, kwargs) in record(workload, dtype).items():
                tuner = getattr(importlib.import_module(modules[kernel]), kernel)
                named = dict(zip(tuner.arg_names, args))
                prune = tuner.candidate_prune
                kept = list(prune(list(tuner.candidates), named, **kwargs) if prune else tuner.candidates)
                for arch in (90, 80):
                    configs = kept if (all_configs and arch == 90 and dtype == "bfloat16") else kept[:1]
                    for config in configs:
                        for int64 in ((False, True) if config is kept[0] and dtype == "bfloat16" else (False,)):
                            spec = specialise(tuner.fn, args, kwargs, config, arch, int64)
                            described = {k: v for k, v in config.kwargs.items()} | {
                                "num_warps": config.num_warps, "num_stages": config.num_stages, "INT64": int64,
                                "first": config is kept[0]}
                            out.append(dict(module=modules[kernel], kernel=kernel, workload=workload, dtype=dtype,
                                            arch=arch, config=described, num_warps=config.num_warps,
                                            num_stages=config.num_stages, **spec))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--all-configs", action="store_true")
    args = parser.parse_args()
    work = jobs(args.all_configs)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for result in pool.map(compile_one, work):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    # Compiling for a GPU needs the real JIT: the interpreter must be off before triton loads.
    # (Only here: importing this module, as the tests do for its constants, changes nothing.)
    os.environ["TRITON_INTERPRET"] = "0"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
