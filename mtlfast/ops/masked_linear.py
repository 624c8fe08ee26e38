"""masked_linear: y = x @ (W ⊙ M)^T + b, the building block of sparse sharing.

- ``masked_linear_reference``: pure PyTorch, any device; the test oracle and the ``reference``
  backend. Autograd gives dW = M ⊙ (dyᵀ x), zero outside the mask.
- ``triton`` / ``cuda`` backends: fused kernels reading the mask bit-packed; W ⊙ M never exists.
  They run behind the custom op ``mtlfast::masked_linear`` (fake kernel + autograd registered),
  so ``torch.compile(fullgraph=True)`` sees one opaque node and no graph break.
- ``masked_linear``: applies its autocast policy, validates, picks a backend (mtlfast.backends),
  dispatches; higher-order gradients and torch.func transforms go through the reference
  (mtlfast/ops/common.py).
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from mtlfast import _checks, backends
from mtlfast.bitmask import pack
from mtlfast.ops import common

OP = "masked_linear"
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def masked_linear_reference(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (..., K), weight (N, K), mask bool (N, K), bias (N,) -> (..., N): F.linear(x, W_m, bias) with
    W_m = weight where mask, else 0 (a select, not a product: an inf or NaN weight outside the mask
    gives 0, not NaN)."""
    return F.linear(x, common.select(weight, mask), bias)


# ---------------------------------------------------------------------------------------------
# Validation and backend support

def _validate(x: object, weight: object, mask: object, bias: object) -> None:
    """Raises a TypeError/ValueError naming the argument; one expression when all is well, since
    it runs on every eager call (the detailed checks cost ~2x as much)."""
    Tensor = torch.Tensor
    if (isinstance(x, Tensor) and isinstance(weight, Tensor) and isinstance(mask, Tensor)
            and x.dtype in _checks.FLOAT_DTYPES and weight.dtype == x.dtype and mask.dtype == torch.bool
            and x.dim() >= 1 and weight.dim() == 2 and x.shape[-1] == weight.shape[1]
            and mask.shape == weight.shape and weight.device == x.device and mask.device == x.device
            and (bias is None or (isinstance(bias, Tensor) and bias.dtype == x.dtype
                                  and bias.device == x.device and bias.shape == weight.shape[:1]))):
        return
    _explain_invalid(x, weight, mask, bias)


def _explain_invalid(x: object, weight: object, mask: object, bias: object) -> None:
    x = _checks.tensor(OP, "x", x, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    weight = _checks.tensor(OP, "weight", weight, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    mask = _checks.tensor(OP, "mask", mask, dtypes=(torch.bool,))
    _checks.same_dtype(OP, "x", x, "weight", weight)
    _checks.same_device(OP, "x", x, "weight", weight)
    _checks.same_device(OP, "x", x, "mask", mask)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{OP}: argument 'x' must have x.shape[-1] == weight.shape[1] "
                         f"({weight.shape[1]}), got shape {tuple(x.shape)}")
    _checks.shape(OP, "mask", mask, weight.shape, "the shape of 'weight'")
    if bias is not None:
        bias = _checks.tensor(OP, "bias", bias, dtypes=_checks.FLOAT_DTYPES)
        _checks.same_dtype(OP, "x", x, "bias", bias)
        _checks.same_device(OP, "x", x, "bias", bias)
        _checks.shape(OP, "bias", bias, (weight.shape[0],), "out_features = weight.shape[0]")


DISPATCH = backends.register_op(backends.Op(
    OP, device_of=lambda x, *rest: x.device, selection_key=lambda x, *rest: (x.device, x.dtype),
    # Fastest first. On CPU torch's matmul beats a mask-decoding kernel, so no native CPU kernel.
    preference={"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}))


@DISPATCH.supports("triton")
def _triton_supports(x, weight, mask, bias=None) -> backends.Reason:
    if x.dtype not in TRITON_DTYPES:
        return f"triton masked_linear takes float16, bfloat16 or float32 (tl.dot has no float64), got {x.dtype}"
    return None


@DISPATCH.supports("cuda")
def _cuda_supports(x, weight, mask, bias=None) -> backends.Reason:
    return None


@DISPATCH.supports("cpu")
def _cpu_supports(x, weight, mask, bias=None) -> backends.Reason:
    return "no CPU kernel for masked_linear: torch's matmul (the reference) is faster on CPU"


@DISPATCH.supports("reference")
def _reference_supports(x, weight, mask, bias=None) -> backends.Reason:
    return None


_KERNEL_MODULES = {"triton": "mtlfast.triton_kernels.masked_linear", "cuda": "mtlfast._native"}


def _kernels(backend: str):
    return importlib.import_module(_KERNEL_MODULES[backend])


# ---------------------------------------------------------------------------------------------
# The custom op (forward, backward, fake kernels, autograd). Masks cross as bool and are packed
# inside, on every call (triton_kernels/bitmask.py says why nothing is cached).

@torch.library.custom_op("mtlfast::masked_linear", mutates_args=())
def _masked_linear_op(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                      bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """x (M, K), weight (N, K), mask (N, K) bool, bias (N,) -> (M, N)."""
    return _kernels(backend).masked_linear_forward(x, weight, pack(mask), bias)


@_masked_linear_op.register_fake
def _masked_linear_fake(x, weight, mask, bias, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _backward_kernels(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      mask_bits: torch.Tensor, need_input: bool, need_weight: bool, need_bias: bool,
                      backend: str) -> Tuple[Optional[torch.Tensor], ...]:
    """(dx (M, K), dW (N, K), dbias (N,)), None where not asked for; dbias rides on the dW kernel."""
    kernels = _kernels(backend)
    dx = kernels.masked_linear_grad_input(grad_out, weight, mask_bits) if need_input else None
    if need_weight:
        dw, dbias = kernels.masked_linear_grad_weight(grad_out, x, mask_bits, need_bias)
    else:
        dw, dbias = None, (grad_out.sum(0) if need_bias else None)
    return dx, dw, dbias


@torch.library.custom_op("mtlfast::masked_linear_backward", mutates_args=())
def _masked_linear_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                               mask: torch.Tensor, need_input: bool, need_weight: bool,
                               need_bias: bool, backend: str
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dW, dbias); custom ops cannot return None, so a gradient not asked for is empty (0,)."""
    grads = _backward_kernels(grad_out, x, weight, pack(mask), need_input, need_weight, need_bias, backend)
    return tuple(g if g is not None else grad_out.new_empty((0,)) for g in grads)


@_masked_linear_backward_op.register_fake
def _masked_linear_backward_fake(grad_out, x, weight, mask, need_input, need_weight, need_bias, backend):
    # one fresh tensor per output: outputs of a custom op must not alias each other
    return (x.new_empty(x.shape if need_input else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            grad_out.new_empty((weight.shape[0],) if need_bias else (0,)))


def _setup_context(ctx, inputs, output):
    x, weight, mask, bias, backend = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.backend = backend
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, weight, mask = ctx.saved_tensors
    need_x, need_w, _, need_b, _ = ctx.needs_input_grad
    need_b = need_b and ctx.has_bias
    dx, dw, dbias = torch.ops.mtlfast.masked_linear_backward(
        grad_out.contiguous(), x, weight, mask, need_x, need_w, need_b, ctx.backend)
    return (dx if need_x else None, dw if need_w else None, None, dbias if need_b else None, None)


_masked_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public entry point

class _MaskedLinearFunction(torch.autograd.Function):
    """The eager path. A custom op costs ~80 µs of host time per call with autograd against
    ~18 µs for an autograd.Function (measured on the CI CPU), more than a small kernel runs on a
    GPU, so eager calls skip the dispatcher; torch.compile gets the custom op instead."""

    @staticmethod
    def forward(ctx, x, weight, mask, bias, backend):
        bits = pack(mask)
        ctx.save_for_backward(x, weight, mask, bias, bits)
        ctx.backend = backend
        return _kernels(backend).masked_linear_forward(x, weight, bits, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mask, bias, bits = ctx.saved_tensors
        need_x, need_w, _, need_b, _ = ctx.needs_input_grad
        if common.differentiable_backward(grad_out):     # create_graph=True: differentiate the reference instead
            dx, dw, _, dbias = common.reference_grads(masked_linear_reference, (x, weight, mask, bias),
                                                      (need_x, need_w, False, need_b), (grad_out,))
            return dx, dw, None, dbias, None
        dx, dw, dbias = _backward_kernels(grad_out.contiguous(), x, weight, bits, need_x, need_w,
                                          need_b and bias is not None, ctx.backend)
        return dx, dw, None, dbias, None


@common.autocast("lower")
def masked_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ (weight * mask).T + bias`` without materialising ``weight * mask``; a weight where the
    mask is False never influences anything (not even an inf or NaN one).

    Args:
        x: (..., K) input, float16/bfloat16/float32/float64.
        weight: (N, K), dtype and device of ``x``.
        mask: (N, K) bool; weights where it is False are dropped, and get zero gradient.
        bias: (N,) or None.
    Returns:
        (..., N), dtype of ``x``. Under torch.autocast, as F.linear: x, weight and bias (unless
        float64) are cast to the autocast dtype first.
    """
    _validate(x, weight, mask, bias)
    backend = DISPATCH.select(x, weight, mask, bias)
    if backend == "reference" or common.transforms_active() or not (x.numel() and weight.numel()):
        return masked_linear_reference(x, weight, mask, bias)
    lead = x.shape[:-1]
    x2d = x.reshape(lead.numel(), x.shape[-1])  # explicit rows: -1 is ambiguous when K == 0
    if bias is not None:
        bias = bias.contiguous()  # kernels index bias with unit stride; N elements, free when already so
    if torch.compiler.is_compiling():
        out = torch.ops.mtlfast.masked_linear(x2d, weight, mask, bias, backend)
    else:
        out = _MaskedLinearFunction.apply(x2d, weight, mask, bias, backend)
    return out.reshape(*lead, weight.shape[0])
