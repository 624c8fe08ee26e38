"""Compiles Triton kernels ahead of time for real GPU targets (sm_80, sm_90) on a machine with no
GPU, and reports what the compiler made of them: whether tensor-core instructions were emitted,
shared memory, registers and local-memory spills (from the bundled cuobjdump).

The interpreter checks what a kernel computes; this checks that it compiles the way the GPU will
compile it. Run as a script (TRITON_INTERPRET must be off): prints one JSON object per compile.
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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

TRITON_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
# Pointer args that are not of the data dtype: int32 mask words, int64 indices and lengths, bool
# direction flags.
INDEX_POINTERS = {"bits_ptr": "*i32", "wi_ptr": "*i64", "mi_ptr": "*i64", "len_ptr": "*i64", "rev_ptr": "*i1",
                  # fp32 whatever the data dtype: mixing weights and the per-program partial sums
                  "alpha_ptr": "*fp32", "beta_ptr": "*fp32", "part_ptr": "*fp32", "tau_ptr": "*fp32", "z_ptr": "*fp32"}
GEMM, LSTM = "mtlfast.triton_kernels.masked_gemm", "mtlfast.triton_kernels.masked_lstm"
SLUICE = "mtlfast.triton_kernels.sluice"
GUMBEL = "mtlfast.triton_kernels.gumbel"
_GUMBEL_KERNELS = ["_sigmoid_forward_kernel", "_sigmoid_backward_kernel", "_pairs_forward_kernel",
                   "_pairs_backward_kernel", "_softmax_forward_kernel", "_softmax_backward_kernel",
                   "_combine_forward_kernel", "_combine_backward_kernel"]
# (kernel module, autotuned kernel name, the strides that are 1 for contiguous inputs: the JIT
# specialises those to the constant 1, so they are compiled that way here too)
KERNELS = [
    (GEMM, "_grouped_forward_kernel", {"stride_xk", "stride_wk", "stride_bb", "stride_on"}),
    (GEMM, "_grouped_grad_input_kernel", {"stride_dn", "stride_wk", "stride_xk"}),
    (GEMM, "_grouped_grad_weight_kernel", {"stride_dn", "stride_xk", "stride_wk"}),
    (LSTM, "_forward_step_kernel", {"stride_wk", "stride_xn", "stride_lb"}),
    (LSTM, "_backward_step_kernel", {"stride_wk", "stride_dh", "stride_lb"}),
    # offsets computed from the shapes: no stride arguments
    (SLUICE, "_alpha_mix_forward_kernel", set()),
    (SLUICE, "_alpha_mix_backward_kernel", set()),
    (SLUICE, "_layer_mix_forward_kernel", set()),
    (SLUICE, "_layer_mix_backward_kernel", set()),
    (SLUICE, "_orthogonality_forward_kernel", set()),
    *((GUMBEL, name, set()) for name in _GUMBEL_KERNELS),
]
# Kernels with no matrix product (a weighted sum per element): no tensor-core instruction to expect.
NO_MATMUL = {"_layer_mix_forward_kernel", "_layer_mix_backward_kernel", *_GUMBEL_KERNELS}
# Flags a launcher may set, with the value used here (and INT64 both ways below).
FLAG_DEFAULTS = {"HAS_BIAS": True, "HAS_MASK": True, "INT64": False, "UPCAST": False,
                 "MS": 8, "K": 3,   # the mixing kernels' chunk and layer counts (constexprs without defaults)
                 "HARD": True, "COMPONENTS": 7, "BLOCK_C": 1024}   # the Gumbel kernels
SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory per block on A100 / H100


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
    module = importlib.import_module(job["module"])
    tuned = getattr(module, job["kernel"])
    fn = tuned.fn
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            if name in job["constants"]:
                constexprs[(i,)] = job["constants"][name]
            elif param.has_default:
                constexprs[(i,)] = param.default
        elif name in job["unit_strides"]:
            signature[name] = "constexpr"
            constexprs[(i,)] = 1
        elif name.endswith("_ptr"):
            signature[name] = INDEX_POINTERS.get(name, f"*{TRITON_DTYPES[job['dtype']]}")
            attrs[(i,)] = [["tt.divisibility", 16]]     # torch allocations are 16-byte aligned
        else:
            signature[name] = "i64" if job["constants"].get("INT64") else "i32"
    result = {k: job[k] for k in ("kernel", "dtype", "arch")}
    result["config"] = {k: v for k, v in job["constants"].items() if k.startswith("BLOCK")} | {
        "num_warps": job["num_warps"], "num_stages": job["num_stages"], "INT64": job["constants"]["INT64"]}
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", job["arch"], 32),
                                  options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
    except Exception as exc:  # reported, the test fails on it
        result["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
        return result
    ptx = compiled.asm["ptx"]
    result.update(ok=True, shared=compiled.metadata.shared,
                  wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
                  **_resources(compiled.asm["cubin"]))
    return result


def jobs(all_configs: bool) -> list[dict]:
    out = []
    for module_name, kernel, unit_strides in KERNELS:
        import importlib
        module = importlib.import_module(module_name)
        tuned = getattr(module, kernel)
        names = {p.name for p in tuned.fn.params}
        flags = {k: v for k, v in FLAG_DEFAULTS.items() if k in names}
        for arch in (90, 80):
            for dtype in TRITON_DTYPES:
                precision = "ieee" if dtype == "float32" else "tf32"
                element_bytes = 4 if dtype == "float32" else 2
                # the candidates the autotuner keeps for this dtype: all of them for the H100 bf16
                # case, the first elsewhere
                kept = [c for c in tuned.configs if module.fits_shared_memory(c, element_bytes)] or tuned.configs[-1:]
                configs = kept if (all_configs and arch == 90 and dtype == "bfloat16") else kept[:1]
                for config in configs:
                    for int64 in ((False, True) if config is kept[0] and dtype == "bfloat16" else (False,)):
                        constants = {**flags, **config.kwargs, "PRECISION": precision, "INT64": int64}
                        out.append(dict(module=module_name, kernel=kernel, unit_strides=sorted(unit_strides), dtype=dtype,
                                        arch=arch, constants=constants, num_warps=config.num_warps,
                                        num_stages=config.num_stages))
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
