"""masked_linear: y = x @ (W ⊙ M)^T + b, the building block of sparse sharing.

- ``masked_linear_reference``: pure PyTorch, any device; the test oracle and the ``reference``
  backend. Autograd gives dW = M ⊙ (dyᵀ x), zero outside the mask.
- ``MASKED_LINEAR``: the op's one definition (mtlfast/ops/definition.py) over the ``triton``,
  ``cuda`` and ``cpu`` adapters (``masked_linear_<backend>.py``): the GPU kernels read the mask
  bit-packed and W ⊙ M never exists; the CPU one reads the bool mask directly for few rows and
  runs BLAS on a masked copy for many (masked_linear_cpu.py says why).
- ``masked_linear``: applies its autocast policy, validates, picks a backend, dispatches.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol, Tuple

import torch
import torch.nn.functional as F

from mtlfast import _checks
from mtlfast.ops import common
from mtlfast.ops.definition import FLOAT_DTYPES, TRITON_DTYPES, OpDefinition

OP = "masked_linear"


def masked_linear_reference(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (..., K), weight (N, K), mask bool (N, K), bias (N,) -> (..., N): F.linear(x, W_m, bias) with
    W_m = weight where mask, else 0 (a select, not a product: an inf or NaN weight outside the mask
    gives 0, not NaN)."""
    return F.linear(x, common.select(weight, mask), bias)


# ---------------------------------------------------------------------------------------------
# Validation

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


class MaskedLinearKernels(Protocol):
    """What a backend's adapter (``ops/masked_linear_<backend>.py``) implements. ``prepared``: what
    its ``prepare`` made of the mask for calls of that many rows (the GPU kernels: the mask
    bit-packed by :func:`mtlfast.bitmask.pack`, (N, ceil(K/32)) int32)."""

    def prepare(self, weight: torch.Tensor, mask: torch.Tensor, rows: int) -> Any:
        """weight (N, K), mask (N, K) bool -> what the calls below read the mask through, for
        ``rows`` rows; made on every call (triton_kernels/bitmask.py says why nothing is cached)."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor, prepared: Any,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
        """x (M, K), weight (N, K), bias (N,) or None -> (M, N) in x's dtype."""

    def grad_input(self, grad_out: torch.Tensor, weight: torch.Tensor, prepared: Any) -> torch.Tensor:
        """grad_out (M, N) -> dx (M, K) = grad_out @ (weight ⊙ mask)."""

    def grad_weight(self, grad_out: torch.Tensor, x: torch.Tensor, prepared: Any,
                    with_bias: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """-> (dW (N, K), exactly 0 outside the mask; dbias (N,) or None)."""


def _forward(k: MaskedLinearKernels, args: tuple, save: bool):
    x, weight, mask, bias = args
    prepared = k.prepare(weight, mask, x.shape[0])
    return (k.forward(x, weight, prepared, bias),), (), (prepared if save else None)


def _backward(k: MaskedLinearKernels, args: tuple, saved: tuple, prepared: Any, needs: tuple, grads: tuple):
    x, weight, mask, bias = args
    need_x, need_w, _, need_b = needs
    grad_out = grads[0].contiguous()
    if prepared is None:
        prepared = k.prepare(weight, mask, grad_out.shape[0])
    dx = k.grad_input(grad_out, weight, prepared) if need_x else None
    if need_w:      # dbias rides on the dW kernel
        dw, dbias = k.grad_weight(grad_out, x, prepared, need_b and bias is not None)
    else:
        dw, dbias = None, (grad_out.sum(0) if need_b else None)
    return dx, dw, None, dbias


def _fake(args: tuple):
    x, weight, mask, bias = args
    return (x.new_empty((x.shape[0], weight.shape[0])),), ()


MASKED_LINEAR = OpDefinition(
    OP, "(Tensor x, Tensor weight, Tensor mask, Tensor? bias)", reference=masked_linear_reference,
    adapters={"triton": "mtlfast.ops.masked_linear_triton", "cuda": "mtlfast.ops.masked_linear_cuda",
              "cpu": "mtlfast.ops.masked_linear_cpu"},
    dtypes={"triton": TRITON_DTYPES, "cuda": FLOAT_DTYPES, "cpu": (torch.float32, torch.float64)},
    forward=_forward, backward=_backward, fake=_fake, num_outputs=1)


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
    backend = MASKED_LINEAR.select(x, weight, mask, bias)
    if backend == "reference" or not (x.numel() and weight.numel()):
        return masked_linear_reference(x, weight, mask, bias)
    if bias is not None:
        bias = bias.contiguous()  # kernels index bias with unit stride; N elements, free when already so
    if x.dim() == 2:        # no reshape either way: each is an autograd node, ~2 µs of a small call
        return MASKED_LINEAR(backend, x, weight, mask, bias)
    lead = x.shape[:-1]
    x2d = x.reshape(lead.numel(), x.shape[-1])  # explicit rows: -1 is ambiguous when K == 0
    return MASKED_LINEAR(backend, x2d, weight, mask, bias).reshape(*lead, weight.shape[0])
