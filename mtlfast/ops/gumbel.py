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
- ``cpu`` (csrc/cpu/gumbel.cpp, csrc/cpu/combine.cpp) and ``triton``
  (mtlfast/triton_kernels/gumbel.py): one pass forward (noise, threshold or argmax, soft value),
  one pass backward, for every op. The cpu kernels also check that the logits are finite while
  they read them (see _validate_values).
- ``tau`` is a float or a 0-d tensor; inside torch.compile it reaches the kernels as a tensor.
  A tensor tau never recompiles; a float one is symbolic after dynamo's one recompilation at the
  second value it sees (its automatic dynamic), and never after.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from mtlfast import _checks, backends
from mtlfast.ops import common
from mtlfast.ops.definition import TRITON_DTYPES, OpDefinition

Tau = Union[float, torch.Tensor]
_SEED_BOUND = 2 ** 62


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


def _straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """hard in the forward value exactly (soft - soft is exactly 0), soft's gradient."""
    return hard + (soft - soft.detach())


def gumbel_sigmoid_reference(logits: torch.Tensor, tau: Tau, hard: bool, seed: int) -> torch.Tensor:
    acc = common.accumulation_dtype(logits)
    v = logits.to(acc) + logistic_noise(seed, logits.numel(), logits.device).view(logits.shape).to(acc)
    soft = torch.sigmoid(v / _tau_tensor(tau, logits))
    out = _straight_through((v > 0).to(acc), soft) if hard else soft
    return out.to(logits.dtype)


def gumbel_pairs_reference(logits: torch.Tensor, tau: Tau, hard: bool, seed: int) -> torch.Tensor:
    """logits (..., 2) complementary pairs -> (...): 1 where component 0 of the pair wins. The
    difference is taken in the accumulation dtype (float64 pairs keep float64 differences)."""
    acc = common.accumulation_dtype(logits)
    diff = logits[..., 0].to(acc) - logits[..., 1].to(acc)
    return gumbel_sigmoid_reference(diff, tau, hard, seed).to(logits.dtype)


def gumbel_softmax_reference(logits: torch.Tensor, tau: Tau, hard: bool, dim: int, seed: int) -> torch.Tensor:
    acc = common.accumulation_dtype(logits)
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

_TAU_RANGES = {dtype: (torch.finfo(dtype).tiny, torch.finfo(dtype).max) for dtype in (torch.float32, torch.float64)}


def _tau_range(logits: torch.Tensor) -> tuple:
    """The taus a sample of ``logits`` accepts: the normal numbers of the dtype it is computed in,
    so neither tau nor 1/tau (the slope's factor) is 0 or inf there."""
    return _TAU_RANGES[common.accumulation_dtype(logits)]


# 0-d CPU tensors of float taus, reused: creating one costs more host time than a small sample
# (they are never written: arguments of the ops, saved for backward). Bounded: a schedule gives a
# new tau every step.
_TAU_TENSORS: dict = {}
_TAU_TENSORS_MAX = 64


def _tau_tensor(tau: Tau, like: torch.Tensor) -> torch.Tensor:
    """tau as a 0-d tensor in the accumulation dtype of ``like``, on its device. A tensor tau is
    clamped into the accepted range on the device: one that could not be checked on the host (on a
    GPU that would be a sync; under torch.compile it is data) still yields no inf or NaN."""
    acc = common.accumulation_dtype(like)
    if isinstance(tau, torch.Tensor):
        low, high = _tau_range(like)
        return tau.detach().to(device=like.device, dtype=acc).reshape(()).clamp(min=low, max=high)
    if like.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.tensor(float(tau), dtype=acc, device=like.device)
    key = (float(tau), acc)
    cached = _TAU_TENSORS.get(key)
    if cached is None:
        if len(_TAU_TENSORS) >= _TAU_TENSORS_MAX:
            _TAU_TENSORS.clear()
        cached = _TAU_TENSORS[key] = torch.tensor(key[0], dtype=acc)
    return cached


def nonfinite_logits_error(op: str) -> ValueError:
    """The error of a sample whose logits hold inf or NaN (raised by the validation below, and by
    the cpu kernels, which check the logits while they read them)."""
    return ValueError(f"{op}: argument 'logits' must be finite (got inf or NaN): a ±inf logit makes the pair "
                      "difference NaN; pin an allocation with a large finite logit instead")


def _validate(op: str, logits: object, tau: object, pairs: bool = False) -> None:
    """Everything but the logits' values (see _validate_values)."""
    logits = _checks.tensor(op, "logits", logits, dtypes=_checks.FLOAT_DTYPES)
    if pairs and (logits.dim() < 1 or logits.shape[-1] != 2):
        raise ValueError(f"{op}: argument 'logits' must have a last dim of 2 (complementary pairs), "
                         f"got shape {tuple(logits.shape)}")
    low, high = _tau_range(logits)

    def bad_tau(got: str) -> ValueError:
        dtype = _checks._dtype_name(common.accumulation_dtype(logits))
        return ValueError(f"{op}: argument 'tau' must be finite and > 0, in [{low:.4g}, {high:.4g}] (a normal "
                          f"{dtype} number, the dtype the sample is computed in), got {got}")

    if isinstance(tau, torch.Tensor):
        if tau.numel() != 1 or not tau.is_floating_point():
            raise ValueError(f"{op}: argument 'tau' must be a float or a one-element float tensor, got "
                             f"{tuple(tau.shape)} {tau.dtype}")
        # reading it is a device sync on a GPU and impossible while compiling: checked on CPU only
        # (elsewhere _tau_tensor clamps it)
        if tau.device.type == "cpu" and not torch.compiler.is_compiling():
            value = float(tau)
            if not (math.isfinite(value) and low <= value <= high):
                raise bad_tau(str(value))
    elif isinstance(tau, bool) or not isinstance(tau, (int, float, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{op}: argument 'tau' must be a float or a tensor, got {type(tau).__name__}")
    elif not torch.compiler.is_compiling() and not (math.isfinite(tau) and low <= tau <= high):
        # while compiling, a float tau is symbolic (so a new value does not recompile): unchecked
        raise bad_tau(repr(tau))


def _validate_values(op: str, logits: torch.Tensor, backend: str) -> None:
    """Every logit finite. Not here for the cpu backend, whose kernels check while they read the
    logits (the same error, without a pass of its own: at Gumbel-Matrix sizes this check cost as
    much as the sample)."""
    if backend == "cpu" or not logits.numel():
        return
    if _checks.host_check_is_free(logits):
        if not bool(torch.isfinite(logits).all()):
            raise nonfinite_logits_error(op)
    else:       # on the device, no sync (see _checks.values_in_range)
        torch._assert_async(torch.isfinite(logits).all(), str(nonfinite_logits_error(op)))


def _validate_combine(outputs: object, z: object) -> None:
    op = "allocation_combine"
    outputs = _checks.tensor(op, "outputs", outputs, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    z = _checks.tensor(op, "z", z, ndim=1, dtypes=_checks.FLOAT_DTYPES)
    _checks.shape(op, "z", z, (outputs.shape[0],), "one allocation per component: outputs.shape[0]")
    _checks.same_device(op, "outputs", outputs, "z", z)


# ---------------------------------------------------------------------------------------------
# The op definitions (mtlfast/ops/definition.py) over the cpu and triton adapters. The seed is a
# (1,) int64 CPU tensor throughout: torch.compile traces it as data, read inside the opaque op.

_ADAPTERS = {"cpu": "mtlfast.ops.gumbel_cpu", "triton": "mtlfast.ops.gumbel_triton"}
_DTYPES = {"triton": TRITON_DTYPES, "cpu": (torch.float32, torch.float64)}
_NO_CUDA = "no CUDA C++ kernel for {}; the triton backend runs it on GPUs"
# a sample is elementwise (no accumulation): float32 results agree to a few ulp
_SAMPLE_TOLERANCES = {torch.float32: (1e-5, 1e-5)}


def _sigmoid_forward(k, args, save):
    logits, tau, seed, hard, pairs = args
    fwd = k.gumbel_pairs_forward if pairs else k.gumbel_sigmoid_forward
    return (fwd(logits, tau, int(seed), hard),), (), None


def _sigmoid_backward(k, args, saved, cache, needs, grads):
    logits, tau, seed, hard, pairs = args
    bwd = k.gumbel_pairs_backward if pairs else k.gumbel_sigmoid_backward
    return bwd(grads[0].contiguous(), logits, tau, int(seed)), None, None, None, None


def _sigmoid_soft(logits, tau, seed, hard, pairs):
    """What a sample's gradient is the gradient of: its soft value, from the same noise."""
    ref = gumbel_pairs_reference if pairs else gumbel_sigmoid_reference
    return ref(logits, tau, False, int(seed))


def _softmax_forward(k, args, save):
    logits, tau, seed, hard = args
    return (k.gumbel_softmax_forward(logits, tau, int(seed), hard),), (), None


def _softmax_backward(k, args, saved, cache, needs, grads):
    logits, tau, seed, hard = args
    return k.gumbel_softmax_backward(grads[0].contiguous(), logits, tau, int(seed)), None, None, None


def _combine_forward(k, args, save):
    outputs, z = args
    return (k.allocation_combine_forward(outputs, z),), (), None


def _combine_backward(k, args, saved, cache, needs, grads):
    outputs, z = args
    return k.allocation_combine_backward(grads[0].contiguous(), outputs, z)


GUMBEL_SIGMOID = OpDefinition(
    "gumbel_sigmoid", "(Tensor logits, Tensor tau, Tensor seed, bool hard, bool pairs)",
    reference=lambda logits, tau, seed, hard, pairs: (gumbel_pairs_reference if pairs else gumbel_sigmoid_reference)(
        logits, tau, hard, int(seed)),
    grad_reference=_sigmoid_soft, adapters=_ADAPTERS, dtypes=_DTYPES,
    forward=_sigmoid_forward, backward=_sigmoid_backward, num_outputs=1,
    fake=lambda args: ((args[0].new_empty(args[0].shape[:-1] if args[4] else args[0].shape),), ()),
    no_kernel={"cuda": _NO_CUDA.format("gumbel_sigmoid")}, tolerances=_SAMPLE_TOLERANCES)

GUMBEL_SOFTMAX = OpDefinition(
    "gumbel_softmax", "(Tensor logits, Tensor tau, Tensor seed, bool hard)",
    reference=lambda logits, tau, seed, hard: gumbel_softmax_reference(logits, tau, hard, -1, int(seed)),
    grad_reference=lambda logits, tau, seed, hard: gumbel_softmax_reference(logits, tau, False, -1, int(seed)),
    adapters=_ADAPTERS, dtypes=_DTYPES, forward=_softmax_forward, backward=_softmax_backward, num_outputs=1,
    fake=lambda args: ((torch.empty_like(args[0]),), ()),
    no_kernel={"cuda": _NO_CUDA.format("gumbel_softmax")}, tolerances=_SAMPLE_TOLERANCES)

ALLOCATION_COMBINE = OpDefinition(
    "allocation_combine", "(Tensor outputs, Tensor z)", reference=allocation_combine_reference,
    adapters=_ADAPTERS, dtypes=_DTYPES, forward=_combine_forward, backward=_combine_backward,
    num_outputs=1, fake=lambda args: ((args[0].new_empty(args[0].shape[1:]),), ()),
    no_kernel={"cuda": _NO_CUDA.format("allocation_combine")})


# ---------------------------------------------------------------------------------------------
# Public entry points. Under torch.autocast they run unchanged (elementwise sampling; autocast does
# not cast them, and their internals run with it off).

def _sample(logits: torch.Tensor, tau: Tau, hard: bool, generator: Optional[torch.Generator], pairs: bool,
            op: str) -> torch.Tensor:
    _validate(op, logits, tau, pairs)
    backend = GUMBEL_SIGMOID.select(logits)
    _validate_values(op, logits, backend)
    seed = _seed_tensor(generator)
    compiling = torch.compiler.is_compiling()
    if compiling and backend == "reference":
        raise backends.BackendUnavailableError(f"{op}: the reference backend does not run under torch.compile "
                                               "(its noise needs the seed's value); use cpu or triton")
    if backend == "reference" or not (logits.numel() or compiling):
        ref = gumbel_pairs_reference if pairs else gumbel_sigmoid_reference
        return ref(logits, tau, hard, int(seed))
    return GUMBEL_SIGMOID(backend, logits.contiguous(), _tau_tensor(tau, logits), seed, hard, pairs)


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
    backend = GUMBEL_SOFTMAX.select(logits)
    _validate_values("gumbel_softmax", logits, backend)
    seed = _seed_tensor(generator)
    if backend == "reference" or not logits.numel():
        return gumbel_softmax_reference(logits, tau, hard, dim, int(seed))
    moved = logits.movedim(dim, -1)
    flat = moved.reshape(-1, moved.shape[-1]).contiguous()
    out = GUMBEL_SOFTMAX(backend, flat, _tau_tensor(tau, logits), seed, hard)
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
    backend = ALLOCATION_COMBINE.select(outputs, z)
    if backend == "reference" or not outputs.numel():
        return allocation_combine_reference(outputs, z)
    flat = outputs.reshape(outputs.shape[0], -1).contiguous()
    return ALLOCATION_COMBINE(backend, flat, z).view(outputs.shape[1:])
