"""Sluice-network mixing (Ruder et al. 2019): alpha mixing of subspaces across tasks, beta mixing of
layer outputs per task, and the subspace orthogonality penalty.

- ``*_reference``: plain PyTorch (one einsum each, fp32 accumulation); the oracle and the
  ``reference`` backend.
- ``triton`` (mtlfast/triton_kernels/sluice.py) and ``cpu`` (csrc/cpu/mixing.cpp) backends: one
  pass that reads every input element once and writes every output once; backward computes the
  input gradient and the mixing-weight gradient in the same pass. No stacking copy: h is used in
  place as (M, N, D).
- Eager calls go through autograd Functions (cheap host time); torch.compile sees custom ops
  (``mtlfast::alpha_mix`` ...) with fake kernels, so fullgraph compiles have no graph break.
"""
from __future__ import annotations

import importlib
from typing import Tuple

import torch

from mtlfast import _checks, backends
from mtlfast.ops import common

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CPU_DTYPES = _checks.FLOAT_DTYPES     # float16 / bfloat16 computed in float32 (ops/sluice_cpu.py)
_KERNEL_MODULES = {"cpu": "mtlfast.ops.sluice_cpu", "triton": "mtlfast.triton_kernels.sluice"}


def _kernels(backend: str):
    return importlib.import_module(_KERNEL_MODULES[backend])


def _acc(*tensors: torch.Tensor) -> torch.dtype:
    return common.accumulation_dtype(*(t.dtype for t in tensors))


# ---------------------------------------------------------------------------------------------
# References

def alpha_mix_reference(h: torch.Tensor, alpha: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    """h (M, ..., D) with D = S*d, alpha (MS, MS) -> (M, ..., D): chunk i = m*S + s is
    h[m, ..., s*d:(s+1)*d], and output chunk i = Σ_j alpha[i, j] · chunk j."""
    M, D, S = h.shape[0], h.shape[-1], num_subspaces
    acc = _acc(h, alpha)
    chunks = h.reshape(M, h.shape[1:-1].numel(), S, D // S).to(acc)     # explicit rows: -1 is ambiguous at D = 0
    out = torch.einsum("asbt,bntd->ansd", alpha.to(acc).view(M, S, M, S), chunks)
    return out.reshape(h.shape).to(h.dtype)


def layer_mix_reference(layers: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """layers (K, M, ..., D), beta (M, K) -> (M, ..., D): out[m] = Σ_k beta[m, k] · layers[k, m]."""
    acc = _acc(layers, beta)
    return torch.einsum("mk,km...->m...", beta.to(acc), layers.to(acc)).to(layers.dtype)


def orthogonality_penalty_reference(weight: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    """weight (R, C), rows split into S equal blocks G_s (R/S, C) -> Σ_{s<s'} ‖G_sᵀ G_s'‖²_F, a 0-d
    tensor in weight's dtype."""
    S = num_subspaces
    blocks = weight.to(_acc(weight)).view(S, weight.shape[0] // S, weight.shape[1])
    total = weight.new_zeros((), dtype=blocks.dtype)
    for s in range(S):
        for t in range(s + 1, S):
            total = total + (blocks[s].t() @ blocks[t]).square().sum()
    return total.to(weight.dtype)


# ---------------------------------------------------------------------------------------------
# Validation

def _subspaces(op: str, num_subspaces: object, D: int, what: str) -> int:
    if not isinstance(num_subspaces, int) or isinstance(num_subspaces, bool) or num_subspaces < 1:
        raise ValueError(f"{op}: argument 'num_subspaces' must be an int >= 1, got {num_subspaces!r}")
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
# Backend support

def _register(name: str, cpu_kernel: bool) -> backends.Op:
    op = backends.register_op(backends.Op(
        name, device_of=lambda first, *rest: first.device,
        selection_key=lambda first, *rest: (first.device, first.dtype),
        preference={"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}))

    @op.supports("reference")
    def _reference(first, *rest) -> backends.Reason:
        return None

    @op.supports("triton")
    def _triton(first, *rest) -> backends.Reason:
        if first.dtype not in _TRITON_DTYPES:
            return f"triton {name} takes float16, bfloat16 or float32, got {first.dtype}"
        return None

    @op.supports("cpu")
    def _cpu(first, *rest) -> backends.Reason:
        if not cpu_kernel:
            return f"no CPU kernel for {name}: torch's matmul (the reference) is the fast CPU path"
        if first.dtype not in _CPU_DTYPES:
            return f"the cpu {name} takes floating point input, got {first.dtype}"
        return None

    @op.supports("cuda")
    def _cuda(first, *rest) -> backends.Reason:
        return f"no CUDA C++ kernel for {name}; the triton backend runs it on GPUs"
    return op


ALPHA_MIX = _register("alpha_mix", cpu_kernel=True)
LAYER_MIX = _register("layer_mix", cpu_kernel=True)
PENALTY = _register("orthogonality_penalty", cpu_kernel=False)


# ---------------------------------------------------------------------------------------------
# Custom ops (what torch.compile sees)

@torch.library.custom_op("mtlfast::alpha_mix", mutates_args=())
def _alpha_mix_op(h: torch.Tensor, alpha: torch.Tensor, num_subspaces: int, backend: str) -> torch.Tensor:
    return _kernels(backend).alpha_mix_forward(h, alpha, num_subspaces)


@_alpha_mix_op.register_fake
def _(h, alpha, num_subspaces, backend):
    return torch.empty_like(h)


@torch.library.custom_op("mtlfast::alpha_mix_backward", mutates_args=())
def _alpha_mix_backward_op(dout: torch.Tensor, h: torch.Tensor, alpha: torch.Tensor, num_subspaces: int,
                           backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    dh, dalpha = _kernels(backend).alpha_mix_backward(dout, h, alpha, num_subspaces)
    return dh, dalpha.to(alpha.dtype)


@_alpha_mix_backward_op.register_fake
def _(dout, h, alpha, num_subspaces, backend):
    return torch.empty_like(h), torch.empty_like(alpha)


def _alpha_mix_setup(ctx, inputs, output):
    h, alpha, num_subspaces, backend = inputs
    ctx.save_for_backward(h, alpha)
    ctx.num_subspaces, ctx.backend = num_subspaces, backend


def _alpha_mix_autograd(ctx, dout):
    h, alpha = ctx.saved_tensors
    dh, dalpha = torch.ops.mtlfast.alpha_mix_backward(dout.contiguous(), h, alpha, ctx.num_subspaces, ctx.backend)
    return dh, dalpha, None, None


_alpha_mix_op.register_autograd(_alpha_mix_autograd, setup_context=_alpha_mix_setup)


@torch.library.custom_op("mtlfast::layer_mix", mutates_args=())
def _layer_mix_op(layers: torch.Tensor, beta: torch.Tensor, backend: str) -> torch.Tensor:
    return _kernels(backend).layer_mix_forward(layers, beta)


@_layer_mix_op.register_fake
def _(layers, beta, backend):
    return layers.new_empty(layers.shape[1:])


@torch.library.custom_op("mtlfast::layer_mix_backward", mutates_args=())
def _layer_mix_backward_op(dout: torch.Tensor, layers: torch.Tensor, beta: torch.Tensor,
                           backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    dlayers, dbeta = _kernels(backend).layer_mix_backward(dout, layers, beta)
    return dlayers, dbeta.to(beta.dtype)


@_layer_mix_backward_op.register_fake
def _(dout, layers, beta, backend):
    return torch.empty_like(layers), torch.empty_like(beta)


def _layer_mix_setup(ctx, inputs, output):
    layers, beta, backend = inputs
    ctx.save_for_backward(layers, beta)
    ctx.backend = backend


def _layer_mix_autograd(ctx, dout):
    layers, beta = ctx.saved_tensors
    dlayers, dbeta = torch.ops.mtlfast.layer_mix_backward(dout.contiguous(), layers, beta, ctx.backend)
    return dlayers, dbeta, None


_layer_mix_op.register_autograd(_layer_mix_autograd, setup_context=_layer_mix_setup)


@torch.library.custom_op("mtlfast::orthogonality_penalty", mutates_args=())
def _penalty_op(weight: torch.Tensor, num_subspaces: int, backend: str) -> torch.Tensor:
    return _kernels(backend).orthogonality_penalty_forward(weight, num_subspaces).to(weight.dtype)


@_penalty_op.register_fake
def _(weight, num_subspaces, backend):
    return weight.new_empty(())


@torch.library.custom_op("mtlfast::orthogonality_penalty_backward", mutates_args=())
def _penalty_backward_op(weight: torch.Tensor, num_subspaces: int, grad: torch.Tensor,
                         backend: str) -> torch.Tensor:
    return _kernels(backend).orthogonality_penalty_backward(weight, num_subspaces, grad).to(weight.dtype)


@_penalty_backward_op.register_fake
def _(weight, num_subspaces, grad, backend):
    return torch.empty_like(weight)


def _penalty_setup(ctx, inputs, output):
    weight, num_subspaces, backend = inputs
    ctx.save_for_backward(weight)
    ctx.num_subspaces, ctx.backend = num_subspaces, backend


def _penalty_autograd(ctx, grad):
    (weight,) = ctx.saved_tensors
    return torch.ops.mtlfast.orthogonality_penalty_backward(weight, ctx.num_subspaces, grad, ctx.backend), None, None


_penalty_op.register_autograd(_penalty_autograd, setup_context=_penalty_setup)


# ---------------------------------------------------------------------------------------------
# The eager path: autograd Functions over the same kernels (a custom op costs ~60 µs more host
# time per call, see masked_linear)

class _AlphaMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, alpha, num_subspaces, backend):
        ctx.save_for_backward(h, alpha)
        ctx.num_subspaces, ctx.backend = num_subspaces, backend
        return _kernels(backend).alpha_mix_forward(h, alpha, num_subspaces)

    @staticmethod
    def backward(ctx, dout):
        h, alpha = ctx.saved_tensors
        if common.differentiable_backward(dout):     # create_graph=True: differentiate the reference instead
            dh, dalpha = common.reference_grads(lambda a, b: alpha_mix_reference(a, b, ctx.num_subspaces), (h, alpha),
                                                ctx.needs_input_grad[:2], (dout,))
            return dh, dalpha, None, None
        dh, dalpha = _kernels(ctx.backend).alpha_mix_backward(dout.contiguous(), h, alpha, ctx.num_subspaces)
        return dh, dalpha.to(alpha.dtype), None, None


class _LayerMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layers, beta, backend):
        ctx.save_for_backward(layers, beta)
        ctx.backend = backend
        return _kernels(backend).layer_mix_forward(layers, beta)

    @staticmethod
    def backward(ctx, dout):
        layers, beta = ctx.saved_tensors
        if common.differentiable_backward(dout):
            dlayers, dbeta = common.reference_grads(layer_mix_reference, (layers, beta), ctx.needs_input_grad[:2],
                                                    (dout,))
            return dlayers, dbeta, None
        dlayers, dbeta = _kernels(ctx.backend).layer_mix_backward(dout.contiguous(), layers, beta)
        return dlayers, dbeta.to(beta.dtype), None


class _Penalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, num_subspaces, backend):
        ctx.save_for_backward(weight)
        ctx.num_subspaces, ctx.backend = num_subspaces, backend
        return _kernels(backend).orthogonality_penalty_forward(weight, num_subspaces).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        if common.differentiable_backward(grad):
            (dweight,) = common.reference_grads(lambda w: orthogonality_penalty_reference(w, ctx.num_subspaces),
                                                (weight,), ctx.needs_input_grad[:1], (grad,))
            return dweight, None, None
        dweight = _kernels(ctx.backend).orthogonality_penalty_backward(weight, ctx.num_subspaces, grad)
        return dweight.to(weight.dtype), None, None


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
    if backend == "reference" or common.transforms_active() or not h.numel():
        return alpha_mix_reference(h, alpha, num_subspaces)
    h3 = h.reshape(h.shape[0], -1, h.shape[-1]).contiguous()
    if torch.compiler.is_compiling():
        out = torch.ops.mtlfast.alpha_mix(h3, alpha, num_subspaces, backend)
    else:
        out = _AlphaMix.apply(h3, alpha, num_subspaces, backend)
    return out.view(h.shape)


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
    if backend == "reference" or common.transforms_active() or not layers.numel():
        return layer_mix_reference(layers, beta)
    K, M, D = layers.shape[0], layers.shape[1], layers.shape[-1]
    flat = layers.reshape(K, M, -1, D).contiguous()
    if torch.compiler.is_compiling():
        out = torch.ops.mtlfast.layer_mix(flat, beta, backend)
    else:
        out = _LayerMix.apply(flat, beta, backend)
    return out.view(layers.shape[1:])


@common.autocast("fp32")
def orthogonality_penalty(weight: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    """Σ_{s<s'} ‖G_sᵀ G_s'‖²_F over the S equal row blocks G_s of ``weight`` (R, C): pushes the
    subspaces a weight produces apart (sluice networks). Returns a 0-d tensor in weight's dtype
    (float32 under torch.autocast: a sum of squares, computed as autocast computes reductions)."""
    _validate_penalty(weight, num_subspaces)
    backend = PENALTY.select(weight)
    if backend == "reference" or num_subspaces == 1 or common.transforms_active() or not weight.numel():
        return orthogonality_penalty_reference(weight, num_subspaces)
    weight = weight.contiguous()
    if torch.compiler.is_compiling():
        return torch.ops.mtlfast.orthogonality_penalty(weight, num_subspaces, backend)
    return _Penalty.apply(weight, num_subspaces, backend)


# ---------------------------------------------------------------------------------------------
# SluiceLSTM as a whole (for reporting, e.g. the benchmark's per-backend reasons): a backend runs
# it when it runs both of its ops, the grouped LSTM and alpha_mix.

def _sluice_lstm_op() -> backends.Op:
    from mtlfast.ops.masked_lstm import DISPATCH as LSTM

    op = backends.register_op(backends.Op(
        "sluice_lstm", device_of=lambda x, *rest: x.device,
        preference={"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}))
    for name in backends.BACKENDS:
        def check(x, *rest, _name=name) -> backends.Reason:
            return LSTM.reason(_name, x) or ALPHA_MIX.reason(_name, x, None)
        op.supports(name)(check)
    return op


SLUICE_LSTM = _sluice_lstm_op()
