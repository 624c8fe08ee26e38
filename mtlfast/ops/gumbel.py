"""Straight-through Gumbel sampling (Gumbel-Matrix, Maziarz et al.) and the allocation-weighted
combine of component outputs.

Noise: element i of a call draws u = ((philox(seed, i) >> 9) + 0.5) · 2⁻²³, the stream of
Triton's ``tl.randint`` (mtlfast/ops/philox.py in PyTorch, csrc/cpu/gumbel.cpp natively), with
``seed`` drawn from torch's generator (the default one unless ``generator`` is given): the same
``torch.manual_seed`` gives the same sample on every backend, and backward recomputes the noise
instead of storing it. u lies strictly inside (0, 1), so the logistic and Gumbel noise are
finite and no finite logit or ``tau > 0`` yields NaN or inf. Non-finite logits are rejected
(a ±inf logit would make the complementary-pair difference NaN): use a large finite logit to pin
an allocation.

- ``*_reference``: plain PyTorch from the same noise; the oracle and the ``reference`` backend.
- ``cpu`` (csrc/cpu/gumbel.cpp) and ``triton`` (mtlfast/triton_kernels/gumbel.py): one pass
  forward (noise, threshold or argmax, soft value), one pass backward.
- ``tau`` is a float or a 0-d tensor; inside torch.compile it reaches the kernels as a tensor.
  A tensor tau never recompiles; a float one is symbolic after dynamo's one recompilation at the
  second value it sees (its automatic dynamic), and never after.
"""
from __future__ import annotations

import importlib
import math
from typing import Optional, Union

import torch

from mtlfast import _checks, backends
from mtlfast.ops import common

Tau = Union[float, torch.Tensor]
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CPU_DTYPES = (torch.float32, torch.float64)
_KERNEL_MODULES = {"cpu": "mtlfast.ops.gumbel_cpu", "triton": "mtlfast.triton_kernels.gumbel"}
_SEED_BOUND = 2 ** 62


def _kernels(backend: str):
    return importlib.import_module(_KERNEL_MODULES[backend])


def _seed_tensor(generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A Philox key (1,) int64 drawn from torch's generator: torch.manual_seed (or ``generator``'s
    state) reproduces it. On the CPU (a CUDA generator's draw is copied back): no device sync for
    the default generator, and a tensor torch.compile can trace without reading it."""
    if generator is not None and generator.device.type != "cpu":
        return torch.randint(0, _SEED_BOUND, (1,), generator=generator, device=generator.device).cpu()
    return torch.randint(0, _SEED_BOUND, (1,), generator=generator)


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """The seed of the next sample, as an int (see _seed_tensor)."""
    return int(_seed_tensor(generator))


# ---------------------------------------------------------------------------------------------
# References (pure PyTorch, the same noise)

def _noise_uniform(seed: int, n: int, device: torch.device) -> torch.Tensor:
    from mtlfast.ops import philox
    return philox.uniform(seed, torch.arange(n, device=device, dtype=torch.int64))


def logistic_noise(seed: int, n: int, device: torch.device) -> torch.Tensor:
    """(n,) float32 logistic noise log u - log(1 - u) of elements 0 .. n-1 of the stream."""
    u = _noise_uniform(seed, n, device)
    return torch.log(u) - torch.log(1 - u)


def gumbel_noise(seed: int, n: int, device: torch.device) -> torch.Tensor:
    """(n,) float32 Gumbel noise -log(-log u) of elements 0 .. n-1 of the stream."""
    return -torch.log(-torch.log(_noise_uniform(seed, n, device)))


def _acc(x: torch.Tensor) -> torch.dtype:
    return common.accumulation_dtype(x.dtype)


def _straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """hard in the forward value exactly (soft - soft is exactly 0), soft's gradient."""
    return hard + (soft - soft.detach())


def gumbel_sigmoid_reference(logits: torch.Tensor, tau: Tau, hard: bool, seed: int) -> torch.Tensor:
    acc = _acc(logits)
    v = logits.to(acc) + logistic_noise(seed, logits.numel(), logits.device).view(logits.shape).to(acc)
    soft = torch.sigmoid(v / _tau_tensor(tau, logits))
    out = _straight_through((v > 0).to(acc), soft) if hard else soft
    return out.to(logits.dtype)


def gumbel_pairs_reference(logits: torch.Tensor, tau: Tau, hard: bool, seed: int) -> torch.Tensor:
    """logits (..., 2) complementary pairs -> (...): 1 where component 0 of the pair wins. The
    difference is taken in the accumulation dtype (float64 pairs keep float64 differences)."""
    acc = _acc(logits)
    diff = logits[..., 0].to(acc) - logits[..., 1].to(acc)
    return gumbel_sigmoid_reference(diff, tau, hard, seed).to(logits.dtype)


def gumbel_softmax_reference(logits: torch.Tensor, tau: Tau, hard: bool, dim: int, seed: int) -> torch.Tensor:
    acc = _acc(logits)
    moved = logits.movedim(dim, -1)
    v = moved.to(acc) + gumbel_noise(seed, moved.numel(), logits.device).view(moved.shape).to(acc)
    # the max is subtracted before dividing: (v - max) / tau cannot overflow for any tau > 0
    soft = torch.softmax((v - v.amax(-1, keepdim=True).detach()) / _tau_tensor(tau, logits), dim=-1)
    if hard:
        one_hot = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
        soft = _straight_through(one_hot, soft)
    return soft.movedim(-1, dim).to(logits.dtype)


def allocation_combine_reference(outputs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """outputs (C, ...), z (C,) -> Σ_c z_c · outputs_c / max(1, Σ_c z_c) (clamp's gradient at 1)."""
    acc = common.accumulation_dtype(outputs.dtype, z.dtype)
    zc = z.to(acc)
    total = torch.tensordot(zc, outputs.to(acc), dims=1)
    return (total / zc.sum().clamp(min=1)).to(outputs.dtype)


# ---------------------------------------------------------------------------------------------
# Validation

def _tau_range(logits: torch.Tensor) -> tuple:
    """The taus a sample of ``logits`` accepts: the normal numbers of the dtype it is computed in,
    so neither tau nor 1/tau (the slope's factor) is 0 or inf there."""
    info = torch.finfo(_acc(logits))
    return info.tiny, info.max


def _tau_tensor(tau: Tau, like: torch.Tensor) -> torch.Tensor:
    """tau as a 0-d tensor in the accumulation dtype of ``like``, on its device. A tensor tau is
    clamped into the accepted range on the device: one that could not be checked on the host (on a
    GPU that would be a sync; under torch.compile it is data) still yields no inf or NaN."""
    acc = _acc(like)
    if isinstance(tau, torch.Tensor):
        low, high = _tau_range(like)
        return tau.detach().to(device=like.device, dtype=acc).reshape(()).clamp(min=low, max=high)
    return torch.tensor(float(tau), dtype=acc, device=like.device)


def _validate(op: str, logits: object, tau: object, pairs: bool = False) -> None:
    logits = _checks.tensor(op, "logits", logits, dtypes=_checks.FLOAT_DTYPES)
    if pairs and (logits.dim() < 1 or logits.shape[-1] != 2):
        raise ValueError(f"{op}: argument 'logits' must have a last dim of 2 (complementary pairs), "
                         f"got shape {tuple(logits.shape)}")
    low, high = _tau_range(logits)
    expected = (f"finite and > 0, in [{low:.4g}, {high:.4g}] (a normal {_checks._dtype_name(_acc(logits))} "
                f"number, the dtype the sample is computed in)")
    if isinstance(tau, torch.Tensor):
        if tau.numel() != 1 or not tau.is_floating_point():
            raise ValueError(f"{op}: argument 'tau' must be a float or a one-element float tensor, got "
                             f"{tuple(tau.shape)} {tau.dtype}")
        # reading it is a device sync on a GPU and impossible while compiling: checked on CPU only
        # (elsewhere _tau_tensor clamps it)
        if tau.device.type == "cpu" and not torch.compiler.is_compiling():
            value = float(tau)
            if not (math.isfinite(value) and low <= value <= high):
                raise ValueError(f"{op}: argument 'tau' must be {expected}, got {value}")
    elif isinstance(tau, bool) or not isinstance(tau, (int, float, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{op}: argument 'tau' must be a float or a tensor, got {type(tau).__name__}")
    elif not torch.compiler.is_compiling() and not (math.isfinite(tau) and low <= tau <= high):
        # while compiling, a float tau is symbolic (so a new value does not recompile): unchecked
        raise ValueError(f"{op}: argument 'tau' must be {expected}, got {tau!r}")
    if not torch.compiler.is_compiling() and logits.numel() and not bool(torch.isfinite(logits).all()):
        raise ValueError(f"{op}: argument 'logits' must be finite (got inf or NaN): a ±inf logit makes the "
                         "pair difference NaN; pin an allocation with a large finite logit instead")


def _validate_combine(outputs: object, z: object) -> None:
    op = "allocation_combine"
    outputs = _checks.tensor(op, "outputs", outputs, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    z = _checks.tensor(op, "z", z, ndim=1, dtypes=_checks.FLOAT_DTYPES)
    _checks.shape(op, "z", z, (outputs.shape[0],), "one allocation per component: outputs.shape[0]")
    _checks.same_device(op, "outputs", outputs, "z", z)


# ---------------------------------------------------------------------------------------------
# Backend support

def _register(name: str, cpu_reason: Optional[str] = None) -> backends.Op:
    op = backends.register_op(backends.Op(
        name, device_of=lambda first, *rest: first.device,
        selection_key=lambda first, *rest: (first.device, first.dtype),
        preference={"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}))
    op.supports("reference")(lambda first, *rest: None)

    @op.supports("triton")
    def _triton(first, *rest) -> backends.Reason:
        if first.dtype not in _TRITON_DTYPES:
            return f"triton {name} takes float16, bfloat16 or float32, got {first.dtype}"
        return None

    @op.supports("cpu")
    def _cpu(first, *rest) -> backends.Reason:
        if cpu_reason:
            return cpu_reason
        if first.dtype not in _CPU_DTYPES:
            return f"the cpu {name} takes float32 or float64, got {first.dtype}"
        return None

    op.supports("cuda")(lambda first, *rest: f"no CUDA C++ kernel for {name}; the triton backend runs it on GPUs")
    return op


SIGMOID = _register("gumbel_sigmoid")
SOFTMAX = _register("gumbel_softmax")
COMBINE = _register("allocation_combine",
                    cpu_reason="no CPU kernel for allocation_combine: torch's ops (the reference) are the CPU path")
# GumbelMatrix as a whole (its sampler is the pair form of gumbel_sigmoid), for reporting
GUMBEL_MATRIX = _register("gumbel_matrix")


# ---------------------------------------------------------------------------------------------
# Custom ops (torch.compile) and autograd Functions (eager) over the backends' kernels

@torch.library.custom_op("mtlfast::gumbel_sigmoid", mutates_args=())
def _sigmoid_op(logits: torch.Tensor, tau: torch.Tensor, seed: torch.Tensor, hard: bool, pairs: bool,
                backend: str) -> torch.Tensor:
    k = _kernels(backend)
    fwd = k.gumbel_pairs_forward if pairs else k.gumbel_sigmoid_forward
    return fwd(logits, tau, int(seed), hard)


@_sigmoid_op.register_fake
def _(logits, tau, seed, hard, pairs, backend):
    return logits.new_empty(logits.shape[:-1] if pairs else logits.shape)


@torch.library.custom_op("mtlfast::gumbel_sigmoid_backward", mutates_args=())
def _sigmoid_backward_op(grad: torch.Tensor, logits: torch.Tensor, tau: torch.Tensor, seed: torch.Tensor,
                         pairs: bool, backend: str) -> torch.Tensor:
    k = _kernels(backend)
    bwd = k.gumbel_pairs_backward if pairs else k.gumbel_sigmoid_backward
    return bwd(grad.contiguous(), logits, tau, int(seed))


@_sigmoid_backward_op.register_fake
def _(grad, logits, tau, seed, pairs, backend):
    return torch.empty_like(logits)


def _sigmoid_setup(ctx, inputs, output):
    logits, tau, seed, hard, pairs, backend = inputs
    ctx.save_for_backward(logits, tau, seed)
    ctx.pairs, ctx.backend = pairs, backend


def _sigmoid_autograd(ctx, grad):
    logits, tau, seed = ctx.saved_tensors
    return (torch.ops.mtlfast.gumbel_sigmoid_backward(grad, logits, tau, seed, ctx.pairs, ctx.backend),
            None, None, None, None, None)


_sigmoid_op.register_autograd(_sigmoid_autograd, setup_context=_sigmoid_setup)


class _GumbelSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tau, seed, hard, pairs, backend):
        ctx.save_for_backward(logits, tau)
        ctx.seed, ctx.pairs, ctx.backend = seed, pairs, backend
        k = _kernels(backend)
        return (k.gumbel_pairs_forward if pairs else k.gumbel_sigmoid_forward)(logits, tau, seed, hard)

    @staticmethod
    def backward(ctx, grad):
        logits, tau = ctx.saved_tensors
        if common.differentiable_backward(grad):     # create_graph=True: differentiate the soft reference (same gradient)
            ref = gumbel_pairs_reference if ctx.pairs else gumbel_sigmoid_reference
            (dlogits,) = common.reference_grads(lambda x: ref(x, tau, False, ctx.seed), (logits,),
                                                ctx.needs_input_grad[:1], (grad,))
            return dlogits, None, None, None, None, None
        k = _kernels(ctx.backend)
        bwd = k.gumbel_pairs_backward if ctx.pairs else k.gumbel_sigmoid_backward
        return bwd(grad.contiguous(), logits, tau, ctx.seed), None, None, None, None, None


class _GumbelSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tau, seed, hard, backend):
        ctx.save_for_backward(logits, tau)
        ctx.seed, ctx.backend = seed, backend
        return _kernels(backend).gumbel_softmax_forward(logits, tau, seed, hard)

    @staticmethod
    def backward(ctx, grad):
        logits, tau = ctx.saved_tensors
        if common.differentiable_backward(grad):
            (dlogits,) = common.reference_grads(lambda x: gumbel_softmax_reference(x, tau, False, -1, ctx.seed),
                                                (logits,), ctx.needs_input_grad[:1], (grad,))
            return dlogits, None, None, None, None
        return (_kernels(ctx.backend).gumbel_softmax_backward(grad.contiguous(), logits, tau, ctx.seed),
                None, None, None, None)


class _AllocationCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, outputs, z, backend):
        ctx.save_for_backward(outputs, z)
        ctx.backend = backend
        return _kernels(backend).allocation_combine_forward(outputs, z)

    @staticmethod
    def backward(ctx, grad):
        outputs, z = ctx.saved_tensors
        if common.differentiable_backward(grad):
            doutputs, dz = common.reference_grads(allocation_combine_reference, (outputs, z),
                                                  ctx.needs_input_grad[:2], (grad,))
            return doutputs, dz, None
        doutputs, dz = _kernels(ctx.backend).allocation_combine_backward(grad.contiguous(), outputs, z)
        return doutputs, dz.to(z.dtype), None


# ---------------------------------------------------------------------------------------------
# Public entry points. Under torch.autocast they run unchanged (elementwise sampling; autocast does
# not cast them, and their internals run with it off).

def _sample(logits: torch.Tensor, tau: Tau, hard: bool, generator: Optional[torch.Generator], pairs: bool,
            op: str) -> torch.Tensor:
    _validate(op, logits, tau, pairs)
    seed = _seed_tensor(generator)
    backend = SIGMOID.select(logits)
    x = logits.contiguous()
    if torch.compiler.is_compiling():   # the seed stays a tensor: read inside the opaque op
        if backend == "reference":
            raise backends.BackendUnavailableError(f"{op}: the reference backend does not run under torch.compile "
                                                   "(its noise needs the seed's value); use cpu or triton")
        return torch.ops.mtlfast.gumbel_sigmoid(x, _tau_tensor(tau, logits), seed, hard, pairs, backend)
    if backend == "reference" or common.transforms_active() or not logits.numel():
        ref = gumbel_pairs_reference if pairs else gumbel_sigmoid_reference
        return ref(logits, tau, hard, int(seed))
    return _GumbelSigmoid.apply(x, _tau_tensor(tau, logits), int(seed), hard, pairs, backend)


@common.autocast("keep")
def gumbel_sigmoid(logits: torch.Tensor, tau: Tau = 1.0, hard: bool = True,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A Bernoulli(sigmoid(logits)) sample per element with a straight-through gradient.

    Args:
        logits: any shape, float; finite (see the module docstring).
        tau: temperature > 0, float or 0-d tensor, a normal number of the compute dtype (float32,
            float64 for float64 logits): no accepted tau gives inf or NaN.
        hard: 0/1 forward (exactly) with the gradient of the soft value; else the soft value.
        generator: torch.Generator the Philox seed is drawn from (default: torch's).
    Returns:
        Same shape and dtype: hard = (logits + L > 0), soft = sigmoid((logits + L) / tau), L logistic
        noise. The gradient is that of the soft value.
    """
    return _sample(logits, tau, hard, generator, pairs=False, op="gumbel_sigmoid")


@common.autocast("keep")
def gumbel_pairs(logits: torch.Tensor, tau: Tau = 1.0, hard: bool = True,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Gumbel-Matrix's sampler on complementary logit pairs (..., 2) -> (...): 1 where component 0
    wins, distributed as ``F.gumbel_softmax(logits, tau, hard)[..., 0]`` (a difference of two Gumbel
    variables is logistic), with that gradient; one pass each way for any number of pairs. The pair
    difference is taken in the compute dtype (float64 for float64 logits)."""
    return _sample(logits, tau, hard, generator, pairs=True, op="gumbel_pairs")


def _softmax_dim(logits: torch.Tensor, dim: object) -> int:
    """``dim`` checked as torch.softmax checks it (a 0-d tensor has dims -1 and 0)."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"gumbel_softmax: argument 'dim' must be an int, got {type(dim).__name__}")
    n = max(1, logits.dim())
    if not -n <= dim < n:
        raise _checks.DimError(f"gumbel_softmax: argument 'dim' must be in [{-n}, {n - 1}] (logits has "
                               f"{logits.dim()} dims), got {dim}")
    return dim


@common.autocast("keep")
def gumbel_softmax(logits: torch.Tensor, tau: Tau = 1.0, hard: bool = False, dim: int = -1,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``torch.nn.functional.gumbel_softmax`` semantics (hard: one-hot forward, exactly, with the
    softmax gradient) with counter-based noise and a ``generator``. A 0-d tensor is one category
    (the sample is 1); a hard sample over an empty dim is an error, as in torch."""
    _validate("gumbel_softmax", logits, tau)
    dim = _softmax_dim(logits, dim)
    if logits.dim() == 0:
        return gumbel_softmax(logits.reshape(1), tau, hard, -1, generator).reshape(())
    if logits.shape[dim] == 0:
        if hard:
            raise ValueError(f"gumbel_softmax: argument 'logits' has no category along dim {dim} (shape "
                             f"{tuple(logits.shape)}): a hard sample needs at least one")
        return logits * 0       # empty, and still part of the graph
    seed = draw_seed(generator)
    backend = SOFTMAX.select(logits)
    if backend == "reference" or common.transforms_active() or not logits.numel():
        return gumbel_softmax_reference(logits, tau, hard, dim, seed)
    moved = logits.movedim(dim, -1)
    flat = moved.reshape(-1, moved.shape[-1]).contiguous()
    out = _GumbelSoftmax.apply(flat, _tau_tensor(tau, logits), seed, hard, backend)
    return out.view(moved.shape).movedim(-1, dim)


@common.autocast("keep")
def allocation_combine(outputs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The output of a modular layer: Σ_c z_c · outputs_c / max(1, Σ_c z_c) (0 when nothing is
    allocated), with gradients to the outputs and to z.

    Args:
        outputs: (C, ...) the C components' outputs.
        z: (C,) allocations (0/1 samples or soft values).
    Returns:
        (...) in outputs' dtype, fp32 accumulation (fp64 if either is float64).
    """
    _validate_combine(outputs, z)
    backend = COMBINE.select(outputs, z)
    if backend == "reference" or common.transforms_active() or not outputs.numel():
        return allocation_combine_reference(outputs, z)
    flat = outputs.reshape(outputs.shape[0], -1).contiguous()
    return _AllocationCombine.apply(flat, z, backend).view(outputs.shape[1:])
