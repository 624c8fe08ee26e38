"""``python -m bench.profile WORKLOAD``: a benchmark workload's eager formulation against mtlfast,
side by side, through ``mtlfast.profile.compare`` (wall time, device kernel time, launches, peak
memory, top kernels; ``--out DIR`` also writes ``comparison.json`` and a Chrome trace per side).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from mtlfast.profile import Comparison, compare

from bench import registry

_WHERE = "bench.profile"


def workload_functions(name: str, mode: str, device: torch.device, dtype: torch.dtype, baseline: Optional[str],
                       backend: Optional[str]) -> tuple[str, Callable[..., Any], Callable[..., Any], tuple]:
    """(baseline name, baseline fn, mtlfast fn, inputs) of a registered workload."""
    try:
        (workload, *more) = registry.find([name])
    except ValueError as exc:
        raise SystemExit(f"{_WHERE}: {exc}") from None
    if more:
        raise SystemExit(f"{_WHERE}: {name!r} names several workloads ({workload.key}, "
                         f"{', '.join(w.key for w in more)}); give op/name")
    reason = workload.unsupported_reason(device.type)
    if reason:
        raise SystemExit(f"{_WHERE}: {workload.key} does not run on {device.type}: {reason}")
    spec = registry.op(workload.op)
    choices = {spec.eager_name: spec.eager, **spec.variants}
    baseline = baseline or spec.eager_name
    if baseline not in choices:
        raise SystemExit(f"{_WHERE}: unknown baseline {baseline!r} for {workload.op}; valid: {', '.join(choices)}")
    inputs = spec.make_inputs(workload.params, device, dtype, mode == "fwd+bwd", 0)
    fast = spec.mtlfast()
    if backend is not None:
        import mtlfast

        plain = fast

        def fast(*args: Any) -> Any:
            with mtlfast.use_backend(backend):
                return plain(*args)
    return baseline, choices[baseline], fast, inputs


def main(argv: Optional[Sequence[str]] = None) -> Comparison:
    p = argparse.ArgumentParser(prog="python -m bench.profile",
                                description="Profile a benchmark workload eager against mtlfast, side by side.")
    p.add_argument("workload", help="a workload of the benchmark registry, e.g. conll03, sluice-step, omniglot")
    p.add_argument("--mode", choices=("fwd", "fwd+bwd"), default="fwd+bwd")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--baseline", default=None, help="the eager formulation (default: the op's eager; e.g. eager-lstm)")
    p.add_argument("--backend", default=None, help="force an mtlfast backend (default: automatic choice)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--out", type=Path, default=None, help="also write comparison.json and the traces here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    baseline, slow, fast, inputs = workload_functions(args.workload, args.mode, device, dtype, args.baseline,
                                                      args.backend)
    result = compare(slow, fast, *inputs, labels=(baseline, "mtlfast"), backward=args.mode == "fwd+bwd",
                     warmup=args.warmup, iters=args.iters, top=args.top)
    print(f"{args.workload} ({args.mode}, {dtype}, {torch.get_num_threads()} threads)")
    print(result.table())
    if args.out is not None:
        paths = result.save(args.out)
        print("written: " + ", ".join(str(x) for x in paths.values()))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
