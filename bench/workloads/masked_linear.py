"""masked_linear: the masked gate projections of the sparse-sharing LSTM (Sun et al. 2020).

Sizes follow the paper's LSTM taggers: hidden 200, so the four gates give out = 800; the
CoNLL-03 input is 130 wide (100-d word embeddings + character features), batches of 10
sentences of ~32 tokens; OntoNotes' second layer reads the 2 x 200 bidirectional output.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from bench import inputs
from bench.registry import OpBench, Workload, register

OP = "masked_linear"


def make_inputs(params: Mapping[str, Any], device: torch.device, dtype: torch.dtype,
                requires_grad: bool, seed: int) -> tuple[torch.Tensor, ...]:
    """x (tokens, in), weight (out, in), mask (out, in) with the workload density, bias (out,)."""
    m, k, n = params["tokens"], params["in_features"], params["out_features"]
    g = inputs.generator(seed)
    x = inputs.randn(g, m, k)
    weight = inputs.randn(g, n, k, scale=k ** -0.5)
    mask = inputs.random_mask(g, n, k, density=params["density"])
    bias = inputs.randn(g, n, scale=0.1)
    return (inputs.place(x, device, dtype, requires_grad),
            inputs.place(weight, device, dtype, requires_grad),
            inputs.place(mask, device),
            inputs.place(bias, device, dtype, requires_grad))


def eager(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
          bias: torch.Tensor | None = None) -> torch.Tensor:
    """What a user writes: mask the weight, then a linear layer."""
    return F.linear(x, weight * mask, bias)


def dense(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The unmasked matmul of the same shape (cuBLAS / oneDNN): the roofline reference."""
    return F.linear(x, weight, bias)


def mtlfast_fn() -> Callable[..., torch.Tensor]:
    """``mtlfast.functional.masked_linear`` (imported lazily)."""
    from mtlfast.functional import masked_linear

    return masked_linear


def flops(params: Mapping[str, Any], mode: str) -> float:
    """Dense-equivalent matmul FLOPs: 2MNK forward, 3x that with dX and dW (bias, mask ignored)."""
    forward = 2.0 * params["tokens"] * params["in_features"] * params["out_features"]
    return forward if mode == "fwd" else 3.0 * forward


def _workload(name: str, tokens: int, in_features: int, out_features: int, density: float,
              source: str, **kwargs: Any) -> Workload:
    params = {"tokens": tokens, "in_features": in_features, "out_features": out_features,
              "density": density}
    return Workload(OP, name, params, source, **kwargs)


WORKLOADS = (
    _workload("conll03-input", 320, 130, 800, 0.5,
              "sparse-sharing LSTM, CoNLL-03: input projection, batch 10 x length 32, hidden 200"),
    _workload("conll03-recurrent", 10, 200, 800, 0.5,
              "sparse-sharing LSTM, CoNLL-03: recurrent projection, one step of batch 10"),
    _workload("ontonotes-layer2-input", 320, 400, 800, 0.32,
              "sparse-sharing LSTM, OntoNotes: layer-2 input projection (2 x 200 bi-LSTM input)"),
    _workload("large-input", 8192, 1024, 4096, 0.5,
              "scaled-up input projection: 8192 tokens, 1024 -> 4 x 1024 gates"),
    _workload("gemm-4096", 4096, 4096, 4096, 0.5,
              "GPU target shape: >= 80% of dense cuBLAS and >= 1.5x eager in bf16",
              skip_on={"cpu": "GPU-only workload: 1.4e11 FLOP per forward takes seconds per call "
                              "on a CPU"}),
    _workload("tiny", 8, 12, 16, 0.5, "smoke-test size for the harness tests", default=False),
)

SPEC = OpBench(op=OP, make_inputs=make_inputs, eager=eager, dense=dense, mtlfast=mtlfast_fn,
               flops=flops)

register(SPEC, WORKLOADS)
