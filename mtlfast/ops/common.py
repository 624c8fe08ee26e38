"""What every op's entry point does the same way, whatever its kernels: the accumulation dtype, its
behaviour under torch.autocast, and the paths that keep autograd exact beyond first derivatives
(higher-order gradients, torch.func transforms).

Why the fused kernels are not differentiated themselves: their backward passes are hand-written
kernels, themselves not differentiable. When a caller asks for a graph of the gradient
(``create_graph=True``: gradgradcheck, meta-gradients, gradient penalties) the backward instead
recomputes the op's pure-PyTorch reference from the saved inputs and differentiates that, slower
but exact; a torch.func transform (grad, vmap, jacrev, ...) runs the reference from the start.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Tuple

import torch

# Autocast policies, as torch's own op lists: "lower" casts floating inputs (not float64) to the
# autocast dtype, like a matmul; "fp32" casts them to float32, like a precision-sensitive reduction;
# "keep" leaves them (elementwise ops). In every case the op then runs with autocast off, so its
# internal torch ops are not recast behind its back (the native kernels would get a dtype they do
# not take, the reference would round where the kernels do not).
POLICIES = ("lower", "fp32", "keep")


def accumulation_dtype(*items: "torch.dtype | torch.Tensor") -> torch.dtype:
    """float64 if any of ``items`` (dtypes or tensors) is, else float32: the one rule of mtlfast's
    precision, low precision accumulates in fp32."""
    dtypes = [i.dtype if isinstance(i, torch.Tensor) else i for i in items]
    return torch.float64 if torch.float64 in dtypes else torch.float32


def transforms_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, ...) is tracing this call: the native and
    Triton kernels cannot see through its wrapped tensors, so ops run their reference."""
    return torch._C._are_functorch_transforms_active()


def differentiable_backward(*grads: Optional[torch.Tensor]) -> bool:
    """Whether an autograd Function's backward, given its output gradients ``grads``, must
    differentiate the reference instead of running its kernels: the caller asked for a graph of the
    gradient (create_graph=True: grad mode is on inside backward), or a vmap runs over the backward
    (batched gradients, as gradcheck checks them; jacrev, hessian), whose batched tensors have no
    storage the kernels could read."""
    return (torch.is_grad_enabled() or transforms_active()
            or any(g is not None and _legacy_batched(g) for g in grads))


def _legacy_batched(t: torch.Tensor) -> bool:
    # torch.autograd.gradcheck's batched-gradient check still uses the legacy vmap (never inside a
    # torch.compile trace, which cannot call this check)
    if torch.compiler.is_compiling():
        return False
    check = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)
    return bool(check and check(t))


def _autocast_target(policy: str, device: torch.device) -> Optional[torch.dtype]:
    """The dtype ``policy`` casts to on ``device`` now; None when autocast is off there."""
    if device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type) if policy == "lower" else torch.float32


def _cast(value: object, dtype: torch.dtype) -> object:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.to(dtype)
    return value


def autocast(policy: str) -> Callable[[Callable], Callable]:
    """Decorator for an op's entry point: under torch.autocast on the device of its first tensor
    argument, apply ``policy`` (see POLICIES) to its tensor arguments and run it with autocast off.
    Outside autocast it costs one flag read."""
    if policy not in POLICIES:
        raise ValueError(f"autocast policy must be one of {POLICIES}, got {policy!r}")

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def entry(*args, **kwargs):
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            target = _autocast_target(policy, first.device) if first is not None else None
            if target is None:
                return fn(*args, **kwargs)
            if policy != "keep":
                args = tuple(_cast(a, target) for a in args)
                kwargs = {k: _cast(v, target) for k, v in kwargs.items()}
            with torch.autocast(first.device.type, enabled=False):
                return fn(*args, **kwargs)
        return entry
    return decorate


_SAME_WIDTH_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
                   torch.float64: torch.int64}


class _Select(torch.autograd.Function):
    """``weight`` where ``mask``, else +0, as the weights' bits times the mask: an exact select
    (an inf or NaN weight outside the mask gives 0, where ``weight * mask`` gives NaN), and on
    CPUs 4-5x faster than ``torch.where`` with a bool condition (an integer multiply vectorises, the
    bool select does not: 28 µs against 500 µs for 800 x 200 float32 on the CI CPU). Its gradient
    is the same select of the gradient, so it is differentiable to any order; its vmap rule is
    generated, so torch.func transforms run it."""
    generate_vmap_rule = True

    @staticmethod
    def forward(weight, mask):
        if _legacy_batched(weight):      # gradcheck's batched gradients: its vmap has no bit views
            return torch.where(mask, weight, 0)
        return select_values(weight, mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return _Select.apply(grad, mask), None


def is_identity_index(index: torch.Tensor, size: int) -> bool:
    """Whether ``index`` (n,) int is exactly ``arange(size)`` (group g uses set g: sluice networks),
    so that a gather or a group sum over it can be skipped. A host read, so only answered for CPU
    tensors outside torch.compile tracing (False elsewhere: the general path runs)."""
    # tolist, not torch.equal with an arange: no operator calls (a few per layer otherwise)
    return (index.device.type == "cpu" and not torch.compiler.is_compiling() and index.shape == (size,)
            and index.tolist() == list(range(size)))


def select_values(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight`` where ``mask`` (broadcast against it), else +0, without autograd: the exact select
    of :class:`_Select`, as the weights' bits times the mask."""
    return (weight.view(_SAME_WIDTH_INT[weight.dtype]) * mask).view(weight.dtype)


def select(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """weight (any float dtype) where mask (bool, broadcastable), else 0; differentiable in weight."""
    return _Select.apply(weight, mask)


def reference_grads(reference: Callable[..., object], inputs: Sequence[object], needs: Sequence[bool],
                    grad_outputs: Sequence[Optional[torch.Tensor]]) -> Tuple[Optional[torch.Tensor], ...]:
    """Gradients of ``reference(*inputs)`` with respect to the inputs flagged in ``needs`` (None for
    the others), as differentiable tensors: the backward of an autograd Function when the caller
    asked for ``create_graph=True``. ``inputs`` are the Function's saved inputs, which still carry
    their autograd history, so the result is a graph in them and in ``grad_outputs``."""
    with torch.enable_grad():
        outputs = reference(*inputs)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
             if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
    targets = [t for t, need in zip(inputs, needs) if need]
    if not targets or not pairs:
        return tuple(None for _ in needs)
    grads = iter(torch.autograd.grad([o for o, _ in pairs], targets, [g for _, g in pairs], create_graph=True,
                                     allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)
