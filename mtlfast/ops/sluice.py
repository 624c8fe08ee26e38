"""Sluice-network mixing (Ruder et al. 2019): alpha mixing of subspaces across tasks, beta mixing of
layer outputs per task, and the subspace orthogonality penalty.

- ``*_reference``: plain PyTorch (one einsum each, fp32 accumulation); the oracle and the
  ``reference`` backend.
- ``ALPHA_MIX``, ``LAYER_MIX``, ``ORTHOGONALITY_PENALTY``: the ops' definitions (definition.py) over
  the ``triton`` (triton_kernels/sluice.py) and ``cpu`` (csrc/cpu/sluice.cpp) adapters: one pass
  that reads every input element once and writes every output once; backward computes the input
  gradient and the mixing-weight gradient in the same pass. No stacking copy: h is used in place
  as (M, N, D).
"""
from __future__ import annotations

import torch

from mtlfast import _checks
from mtlfast.ops import common
from mtlfast.ops.definition import FLOAT_DTYPES, TRITON_DTYPES, OpDefinition


# ---------------------------------------------------------------------------------------------
# References

def alpha_mix_reference(h: torch.Tensor, alpha: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    """h (M, ..., D) with D = S*d, alpha (MS, MS) -> (M, ..., D): chunk i = m*S + s is
    h[m, ..., s*d:(s+1)*d], and output chunk i = Σ_j alpha[i, j] · chunk j."""
    M, D, S = h.shape[0], h.shape[-1], num_subspaces
    acc = common.accumulation_dtype(h, alpha)
    chunks = h.reshape(M, h.shape[1:-1].numel(), S, D // S).to(acc)     # explicit rows: -1 is ambiguous at D = 0
    out = torch.einsum("asbt,bntd->ansd", alpha.to(acc).view(M, S, M, S), chunks)
    return out.reshape(h.shape).to(h.dtype)


def layer_mix_reference(layers: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """layers (K, M, ..., D), beta (M, K) -> (M, ..., D): out[m] = Σ_k beta[m, k] · layers[k, m]."""
    acc = common.accumulation_dtype(layers, beta)
    return torch.einsum("mk,km...->m...", beta.to(acc), layers.to(acc)).to(layers.dtype)


def orthogonality_penalty_reference(weight: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    """weight (R, C), rows split into S equal blocks G_s (R/S, C) -> Σ_{s<s'} ‖G_sᵀ G_s'‖²_F, a 0-d
    tensor in weight's dtype."""
    S = num_subspaces
    blocks = weight.to(common.accumulation_dtype(weight)).view(S, weight.shape[0] // S, weight.shape[1])
    total = weight.new_zeros((), dtype=blocks.dtype)
    for s in range(S):
        for t in range(s + 1, S):
            total = total + (blocks[s].t() @ blocks[t]).square().sum()
    return total.to(weight.dtype)


# ---------------------------------------------------------------------------------------------
# Validation

def _subspaces(op: str, num_subspaces: object, D: int, what: str) -> int:
    _checks.integer(op, "num_subspaces", num_subspaces, low=1)
    if D % num_subspaces:
        raise ValueError(f"{op}: argument 'num_subspaces' ({num_subspaces}) must divide {what} ({D})")
    return num_subspaces


def _validate_alpha_mix(h: object, alpha: object, num_subspaces: object) -> None:
    op = "alpha_mix"
    h = _checks.tensor(op, "h", h, min_ndim=2, dtypes=_checks.FLOAT_DTYPES)
    alpha = _checks.tensor(op, "alpha", alpha, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    S = _subspaces(op, num_subspaces, h.shape[-1], "the last dim of 'h'")
    MS = h.shape[0] * S
    _checks.shape(op, "alpha", alpha, (MS, MS), f"(M*S, M*S) with M = h.shape[0] = {h.shape[0]} tasks, S = {S}")
    _checks.same_device(op, "h", h, "alpha", alpha)


def _validate_layer_mix(layers: object, beta: object) -> None:
    op = "layer_mix"
    layers = _checks.tensor(op, "layers", layers, min_ndim=3, dtypes=_checks.FLOAT_DTYPES)
    beta = _checks.tensor(op, "beta", beta, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    K, M = layers.shape[:2]
    _checks.shape(op, "beta", beta, (M, K), f"(tasks, layers) = (layers.shape[1], layers.shape[0])")
    _checks.same_device(op, "layers", layers, "beta", beta)


def _validate_penalty(weight: object, num_subspaces: object) -> None:
    op = "orthogonality_penalty"
    weight = _checks.tensor(op, "weight", weight, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _subspaces(op, num_subspaces, weight.shape[0], "the rows of 'weight'")


# ---------------------------------------------------------------------------------------------
# The op definitions (mtlfast/ops/definition.py) over the cpu and triton adapters

_ADAPTERS = {"cpu": "mtlfast.ops.sluice_cpu", "triton": "mtlfast.ops.sluice_triton"}
_DTYPES = {"triton": TRITON_DTYPES, "cpu": FLOAT_DTYPES}     # cpu: float16 / bfloat16 computed in float32
_NO_CUDA = "no CUDA C++ kernel for {}; the triton backend runs it on GPUs"


def _alpha_mix_forward(k, args, save):
    h, alpha, num_subspaces = args
    return (k.alpha_mix_forward(h, alpha, num_subspaces),), (), None


def _alpha_mix_backward(k, args, saved, cache, needs, grads):
    h, alpha, num_subspaces = args
    return (*k.alpha_mix_backward(grads[0].contiguous(), h, alpha, num_subspaces), None)


def _layer_mix_forward(k, args, save):
    layers, beta = args
    return (k.layer_mix_forward(layers, beta),), (), None


def _layer_mix_backward(k, args, saved, cache, needs, grads):
    layers, beta = args
    return k.layer_mix_backward(grads[0].contiguous(), layers, beta)


def _penalty_forward(k, args, save):
    weight, num_subspaces = args
    return (k.orthogonality_penalty_forward(weight, num_subspaces).to(weight.dtype),), (), None


def _penalty_backward(k, args, saved, cache, needs, grads):
    weight, num_subspaces = args
    return k.orthogonality_penalty_backward(weight, num_subspaces, grads[0]), None


ALPHA_MIX = OpDefinition(
    "alpha_mix", "(Tensor h, Tensor alpha, int num_subspaces)", reference=alpha_mix_reference,
    adapters=_ADAPTERS, dtypes=_DTYPES, forward=_alpha_mix_forward, backward=_alpha_mix_backward,
    fake=lambda args: ((torch.empty_like(args[0]),), ()), num_outputs=1,
    no_kernel={"cuda": _NO_CUDA.format("alpha_mix")})

LAYER_MIX = OpDefinition(
    "layer_mix", "(Tensor layers, Tensor beta)", reference=layer_mix_reference,
    adapters=_ADAPTERS, dtypes=_DTYPES, forward=_layer_mix_forward, backward=_layer_mix_backward,
    fake=lambda args: ((args[0].new_empty(args[0].shape[1:]),), ()), num_outputs=1,
    no_kernel={"cuda": _NO_CUDA.format("layer_mix")})

ORTHOGONALITY_PENALTY = OpDefinition(
    "orthogonality_penalty", "(Tensor weight, int num_subspaces)", reference=orthogonality_penalty_reference,
    adapters={"triton": _ADAPTERS["triton"]}, dtypes=_DTYPES, forward=_penalty_forward, backward=_penalty_backward,
    fake=lambda args: ((args[0].new_empty(()),), ()), num_outputs=1,
    no_kernel={"cuda": _NO_CUDA.format("orthogonality_penalty"),
               "cpu": "no CPU kernel for orthogonality_penalty: torch's matmul (the reference) is the fast CPU path"})


# ---------------------------------------------------------------------------------------------
# Public entry points

@common.autocast("lower")
def alpha_mix(h: torch.Tensor, alpha: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    """Mixes the subspaces of M task representations (a sluice / cross-stitch unit).

    Args:
        h: (M, ..., D), task m's representation at h[m]; D = S*d. Used in place (no stacking).
        alpha: (M*S, M*S); chunk i = m*S + s is h[m, ..., s*d:(s+1)*d].
        num_subspaces: S (1 = cross-stitch).
    Returns:
        (M, ..., D) in h's dtype: output chunk i = Σ_j alpha[i, j] · chunk j (fp32 accumulation).
        Under torch.autocast it is a matmul: h and alpha (unless float64) are cast to the autocast
        dtype first.
    """
    _validate_alpha_mix(h, alpha, num_subspaces)
    backend = ALPHA_MIX.select(h, alpha)
    if backend == "reference" or not h.numel():
        return alpha_mix_reference(h, alpha, num_subspaces)
    h3 = h.reshape(h.shape[0], -1, h.shape[-1]).contiguous()
    return ALPHA_MIX(backend, h3, alpha, num_subspaces).view(h.shape)


@common.autocast("lower")
def layer_mix(layers: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Mixes the K layer outputs of each of M tasks (the sluice beta).

    Args:
        layers: (K, M, ..., D): layer k's output for task m at layers[k, m].
        beta: (M, K).
    Returns:
        (M, ..., D) in layers' dtype: out[m] = Σ_k beta[m, k] · layers[k, m] (fp32 accumulation).
    """
    _validate_layer_mix(layers, beta)
    backend = LAYER_MIX.select(layers, beta)
    if backend == "reference" or not layers.numel():
        return layer_mix_reference(layers, beta)
    K, M, D = layers.shape[0], layers.shape[1], layers.shape[-1]
    flat = layers.reshape(K, M, -1, D).contiguous()
    return LAYER_MIX(backend, flat, beta).view(layers.shape[1:])


@common.autocast("fp32")
def orthogonality_penalty(weight: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    """Σ_{s<s'} ‖G_sᵀ G_s'‖²_F over the S equal row blocks G_s of ``weight`` (R, C): pushes the
    subspaces a weight produces apart (sluice networks). Returns a 0-d tensor in weight's dtype
    (float32 under torch.autocast: a sum of squares, computed as autocast computes reductions)."""
    _validate_penalty(weight, num_subspaces)
    backend = ORTHOGONALITY_PENALTY.select(weight)
    if backend == "reference" or num_subspaces == 1 or not weight.numel():
        return orthogonality_penalty_reference(weight, num_subspaces)
    return ORTHOGONALITY_PENALTY(backend, weight.contiguous(), num_subspaces)
