"""gumbel_matrix, gumbel_sigmoid and allocation_combine: Gumbel-Matrix routing (Maziarz et al.,
"Flexible Multi-task Networks by Learning Parameter Allocation"), the sampling of every layer's
task x component allocation, a large straight-through Gumbel-sigmoid, and the allocation-weighted
combination of the components' outputs.

Per layer l, per task and component, two complementary logits ``(T, C_l, 2)`` initialised to
``log[p, 1 - p]``; a binary allocation is drawn with Gumbel noise, hard 0/1 in the forward, the
gradient of the tempered softmax in the backward (straight-through).

**gumbel_matrix** and **gumbel_sigmoid** are random: every provider draws from its own random stream
(torch's generator for eager, Philox for mtlfast, inductor's for compile), so none is compared with
eager sample by sample (``OpBench.random``). Each provider's sample is checked by a statistic
instead (:func:`check_binary_sample`): every output is 0 or 1, and among the entries of probability
``<= 0.5`` and among those ``> 0.5`` the fraction of ones is within ``3/sqrt(n) + 0.02`` of their mean
probability (6 standard deviations of a Bernoulli mean at worst, plus the bias of bf16 noise and
rounding: about 0.004 for eager at 2**24 logits).

**gumbel_matrix**: arguments ``(logits, config)``, ``logits`` ``(T, ΣC_l, 2)`` (the layers' logits
packed along dim 1, layer l in columns ``[ΣC_<l, ΣC_≤l)``), ``config`` a :class:`Config` (tasks,
components per layer, tau). Every provider returns ``(T, ΣC_l)``: ``z = 1`` where component 0 of the
pair wins. Providers: ``eager`` (what the original code does: per layer
``F.gumbel_softmax(logits_l, tau, hard=True)[..., 0]`` on a view of the packed logits, the layers
concatenated), ``compile`` and the mtlfast backends (``mtlfast.nn.GumbelMatrix.sample_all()`` with the benchmark's
logits bound as its parameter ``logits``, see :func:`gumbel_matrix`; the per-layer results
concatenated). Logits: per entry ``log[p, 1 - p]`` with ``p`` uniform in [0.05, 0.95] (not the
paper's p = 0.5 initialisation, so that the statistic check sees different probabilities; the work
does not depend on the values).

**gumbel_sigmoid**: arguments ``(logits, tau)``; ``mtlfast.functional.gumbel_sigmoid(logits, tau)``
(hard) against the eager formulation users write (:func:`gumbel_sigmoid_eager`: logistic noise
from ``torch.rand_like``, ``sigmoid((x + L) / tau)``, hard by straight-through).

**allocation_combine**: arguments ``(outputs, z)``, ``outputs`` ``(C, ...)`` the C components'
outputs on one input, ``z`` ``(C,)`` a binary allocation; returns ``Σ_c z_c · outputs_c / max(1, Σ_c z_c)``
(deterministic: checked against eager as usual).

FLOPs (stated conventions, not measured): sampling one binary choice (a logit pair, or one logit of
gumbel_sigmoid) counts 20 FLOPs (two uniforms to Gumbel or logistic noise: 4 logs, the tempered
difference, the exp of the sigmoid / softmax, the comparison); fwd+bwd counts 40 (the backward
recomputes the noise and the soft sample, then the softmax gradient). allocation_combine: 2·C FLOPs
per output element, 3x for fwd+bwd (d outputs, dz). Bytes are the harness's count: inputs, outputs
and in fwd+bwd the output gradients and the gradients once.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bench import inputs
from bench.check import WrongResult
from bench.registry import OpBench, Workload, register

MATRIX_OP = "gumbel_matrix"
SIGMOID_OP = "gumbel_sigmoid"
COMBINE_OP = "allocation_combine"

SAMPLE_FLOPS = 20.0  # per binary choice (logit pair) sampled; see the module docstring
SLACK = 0.02  # allowed bias of a fraction of ones beyond 6 standard deviations (bf16 noise and rounding)
# The random ops' logits come from a generator seeded with seed + INPUT_SEED_OFFSET: seeded like torch's
# global generator (tests run torch.manual_seed(0)), the logits and eager's noise would be the same
# Mersenne-Twister stream, correlated, and the sample statistic would fail.
INPUT_SEED_OFFSET = 0x6D75


def _input_generator(seed: int) -> torch.Generator:
    return inputs.generator(seed + INPUT_SEED_OFFSET)


def _flops_per_sample(samples: int, mode: str) -> float:
    return SAMPLE_FLOPS * samples * (1 if mode == "fwd" else 2)


def check_binary_sample(outputs: Sequence[torch.Tensor], probability: torch.Tensor) -> str:
    """The statistic a random provider's sample is checked by (``OpBench.sample_check``).

    ``outputs``: the provider's outputs (one tensor, shaped like ``probability``, the probability
    of a 1 per entry). Raises :class:`bench.check.WrongResult` unless every entry is 0 or 1 (up to
    a few ulps: straight-through ``hard - soft.detach() + soft`` rounds) and, separately over the
    entries with ``p <= 0.5`` and with ``p > 0.5``, the fraction of ones is within
    ``3/sqrt(n) + SLACK`` of the mean probability (so a sampler that ignores the logits or inverts
    them fails at the workloads' sizes); returns what was checked."""
    if len(outputs) != 1:
        raise WrongResult(f"expected one output, got {len(outputs)}")
    (z,) = outputs
    if z.shape != probability.shape:
        raise WrongResult(f"output shape {tuple(z.shape)}, expected {tuple(probability.shape)}")
    ulps = 4 * torch.finfo(z.dtype).eps
    z, probability = z.detach().double(), probability.detach().double()
    off = float((z - z.round()).abs().max()) if z.numel() else 0.0
    if not (off <= ulps and bool(((z.round() == 0) | (z.round() == 1)).all())):
        raise WrongResult(f"outputs are not all 0 or 1 (largest distance to an integer {off:.2e})")
    checked = []
    for name, part in (("p <= 0.5", probability <= 0.5), ("p > 0.5", probability > 0.5)):
        n = int(part.sum())
        if n == 0:
            continue
        mean, expected = float(z[part].mean()), float(probability[part].mean())
        tol = 3.0 / math.sqrt(n) + SLACK
        if not abs(mean - expected) <= tol:
            raise WrongResult(f"where {name}: fraction of ones {mean:.4f}, expected {expected:.4f} ± {tol:.4f} "
                              f"over {n} samples")
        checked.append(f"{mean:.3f} vs {expected:.3f} ± {tol:.3f} where {name}")
    return "sample checked: all 0/1; fraction of ones vs mean probability: " + ", ".join(checked)


# ---------------------------------------------------------------------------------------------
# gumbel_matrix: every layer's allocation sampled at once


@dataclass(frozen=True)
class Config:
    """Gumbel-Matrix sizes and temperature (the last argument of every provider)."""

    num_tasks: int
    components: tuple[int, ...]  # per layer
    tau: float = 1.0

    @property
    def total(self) -> int:
        return sum(self.components)


def config_of(params: Mapping[str, Any]) -> Config:
    return Config(params["num_tasks"], tuple(params["components"]), params["tau"])


def matrix_inputs(params: Mapping[str, Any], device: torch.device, dtype: torch.dtype,
                  requires_grad: bool, seed: int) -> tuple:
    """(logits, config): logits ``(T, ΣC_l, 2)`` = ``log[p, 1 - p]``, p uniform in [0.05, 0.95]."""
    cfg = config_of(params)
    p = 0.05 + 0.9 * torch.rand(cfg.num_tasks, cfg.total, generator=_input_generator(seed))
    logits = torch.stack([p.log(), (1 - p).log()], dim=-1)
    return inputs.place(logits, device, dtype, requires_grad), cfg


def matrix_probability(logits: torch.Tensor) -> torch.Tensor:
    """P(z = 1) per task and component: component 0's softmax probability ``(T, ΣC_l)``."""
    return torch.softmax(logits.detach().double(), dim=-1)[..., 0]


def matrix_eager(logits: torch.Tensor, cfg: Config) -> torch.Tensor:
    """The original code per layer, on views of the packed logits:
    ``F.gumbel_softmax(logits_l, tau=tau, hard=True)[..., 0]``; the layers concatenated ``(T, ΣC_l)``."""
    return torch.cat([F.gumbel_softmax(layer, tau=cfg.tau, hard=True)[..., 0]
                      for layer in logits.split(list(cfg.components), dim=1)], dim=1)


class AllLayers(torch.nn.Module):
    """``gm.sample_all()`` (a list of ``(T, C_l)``) concatenated to ``(T, ΣC_l)``."""

    def __init__(self, gm: torch.nn.Module) -> None:
        super().__init__()
        self.gm = gm

    def forward(self) -> torch.Tensor:
        return torch.cat(list(self.gm.sample_all()), dim=1)


PARAM_NAME = "gm.logits"  # GumbelMatrix's one parameter, ``logits`` (T, ΣC_l, 2), in AllLayers


def check_names(model: torch.nn.Module, cfg: Config) -> None:
    """Raises ValueError unless ``model`` (AllLayers of a GumbelMatrix of ``cfg``) has exactly one
    parameter, :data:`PARAM_NAME`, of shape ``(T, ΣC_l, 2)``."""
    own = {name: tuple(p.shape) for name, p in model.named_parameters()}
    ours = {PARAM_NAME: (cfg.num_tasks, cfg.total, 2)}
    if own != ours:
        raise ValueError(f"GumbelMatrix's parameters {own} differ from bench/workloads/gumbel.py's {ours}")


_MODELS: dict[tuple, torch.nn.Module] = {}


def _model(cfg: Config, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from mtlfast.nn import GumbelMatrix

    key = (cfg, device, dtype)
    if key not in _MODELS:
        gm = GumbelMatrix(cfg.num_tasks, list(cfg.components), p_init=0.5, tau=cfg.tau)
        model = AllLayers(gm).to(device=device, dtype=dtype).train()
        check_names(model, cfg)
        _MODELS[key] = model
    return _MODELS[key]


def gumbel_matrix(logits: torch.Tensor, cfg: Config) -> torch.Tensor:
    """mtlfast: ``GumbelMatrix.sample_all()`` with the benchmark's logits as its parameter.

    The logits are bound into the model once per logits tensor, as ``functional_call`` binds them
    for the duration of one call (the same tensor in ``_parameters``: gradients reach the
    benchmark's logits), not on every call: ``functional_call``'s swap and restore cost ~40 µs of
    host time, as much as the whole sample on a CPU, and neither a user's training step (whose
    module owns its logits) nor the other providers pay it."""
    model = _model(cfg, logits.device, logits.dtype)
    gm = model.gm
    if gm._parameters["logits"] is not logits:
        gm._parameters["logits"] = logits
    return model()


def gumbel_matrix_fn() -> Callable[..., torch.Tensor]:
    """The mtlfast provider (imports mtlfast.nn.GumbelMatrix: fails here, not at registration)."""
    from mtlfast.nn import GumbelMatrix  # noqa: F401

    return gumbel_matrix


def matrix_flops(params: Mapping[str, Any], mode: str) -> float:
    """20 FLOPs per logit pair sampled (T·ΣC_l pairs), 40 in fwd+bwd."""
    return _flops_per_sample(params["num_tasks"] * sum(params["components"]), mode)


def matrix_check(args: Sequence[Any], outputs: Sequence[torch.Tensor]) -> str:
    return check_binary_sample(outputs, matrix_probability(args[0]))


def _matrix_workload(name: str, num_tasks: int, components: Sequence[int], source: str, tau: float = 1.0,
                     **kwargs: Any) -> Workload:
    params = {"num_tasks": num_tasks, "components": tuple(components), "tau": tau}
    return Workload(MATRIX_OP, name, params, source, **kwargs)


MATRIX_WORKLOADS = (
    _matrix_workload("omniglot", 20, [7] * 8,
                     "Gumbel-Matrix (Maziarz et al.), Omniglot: 20 tasks, 8 layers x 7 components, "
                     "every layer sampled per step"),
    _matrix_workload("clusters", 40, [16] * 3,
                     "Gumbel-Matrix (Maziarz et al.), synthetic clusters: 40 tasks, 3 layers x 16 components"),
    _matrix_workload("gumbel-matrix-tiny", 3, [2, 4, 3], "smoke-test size for the harness tests", default=False),
)

MATRIX_SPEC = OpBench(op=MATRIX_OP, make_inputs=matrix_inputs, eager=matrix_eager, dense=None,
                      mtlfast=gumbel_matrix_fn, flops=matrix_flops, random=True, sample_check=matrix_check,
                      library_ops=("gumbel_sigmoid",))

register(MATRIX_SPEC, MATRIX_WORKLOADS)

# ---------------------------------------------------------------------------------------------
# gumbel_sigmoid: one large straight-through Gumbel-sigmoid


def sigmoid_inputs(params: Mapping[str, Any], device: torch.device, dtype: torch.dtype,
                   requires_grad: bool, seed: int) -> tuple:
    """(logits, tau): logits ``(n,)`` standard normal."""
    logits = inputs.randn(_input_generator(seed), params["n"])
    return inputs.place(logits, device, dtype, requires_grad), params["tau"]


def gumbel_sigmoid_eager(x: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """What users write: logistic noise ``L = log u - log(1 - u)`` from ``torch.rand_like`` (u clamped
    to ``[eps, 1 - eps]`` of the dtype), ``y_soft = sigmoid((x + L) / tau)``, hard 0/1 forward with
    the gradient of ``y_soft`` (straight-through)."""
    eps = torch.finfo(x.dtype).eps
    u = torch.rand_like(x).clamp(eps, 1 - eps)
    noise = u.log() - (1 - u).log()
    y_soft = torch.sigmoid((x + noise) / tau)
    return (y_soft > 0.5).to(x.dtype) - y_soft.detach() + y_soft


def gumbel_sigmoid_fn() -> Callable[..., torch.Tensor]:
    """``mtlfast.functional.gumbel_sigmoid`` (imported lazily; ``hard=True`` is its default)."""
    from mtlfast.functional import gumbel_sigmoid

    return gumbel_sigmoid


def sigmoid_flops(params: Mapping[str, Any], mode: str) -> float:
    """20 FLOPs per logit sampled, 40 in fwd+bwd."""
    return _flops_per_sample(params["n"], mode)


def sigmoid_check(args: Sequence[Any], outputs: Sequence[torch.Tensor]) -> str:
    return check_binary_sample(outputs, torch.sigmoid(args[0].detach().double()))


SIGMOID_WORKLOADS = (
    Workload(SIGMOID_OP, "gumbel-large", {"n": 2 ** 24, "tau": 1.0},
             "bandwidth-bound size: 2**24 logits, hard straight-through Gumbel-sigmoid (tau 1)",
             skip_on={"cpu": "GPU-only workload: on a 2-core CPU eager takes 0.72 s per fwd and 0.92 s per "
                             "fwd+bwd call (fp32), and eager with compile alone ran 46 s"}),
    Workload(SIGMOID_OP, "gumbel-sigmoid-tiny", {"n": 1000, "tau": 1.0}, "smoke-test size for the harness tests",
             default=False),
)

SIGMOID_SPEC = OpBench(op=SIGMOID_OP, make_inputs=sigmoid_inputs, eager=gumbel_sigmoid_eager, dense=None,
                       mtlfast=gumbel_sigmoid_fn, flops=sigmoid_flops, random=True, sample_check=sigmoid_check)

register(SIGMOID_SPEC, SIGMOID_WORKLOADS)

# ---------------------------------------------------------------------------------------------
# allocation_combine: the allocation-weighted mean of the components' outputs


def combine_inputs(params: Mapping[str, Any], device: torch.device, dtype: torch.dtype,
                   requires_grad: bool, seed: int) -> tuple:
    """(outputs, z): outputs ``(C, *shape)`` standard normal, z ``(C,)`` the workload's 0/1 allocation."""
    z = torch.tensor(params["allocation"], dtype=torch.float32)
    outputs = inputs.randn(inputs.generator(seed), len(z), *params["shape"])
    return inputs.place(outputs, device, dtype, requires_grad), inputs.place(z, device, dtype, requires_grad)


def combine_eager(outputs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """What a user writes: ``(z.view(-1, 1, ...) * outputs).sum(0) / z.sum().clamp(min=1)``."""
    return (z.view(-1, *(1,) * (outputs.dim() - 1)) * outputs).sum(0) / z.sum().clamp(min=1)


def combine_fn() -> Callable[..., torch.Tensor]:
    """``mtlfast.functional.allocation_combine`` (imported lazily)."""
    from mtlfast.functional import allocation_combine

    return allocation_combine


def combine_flops(params: Mapping[str, Any], mode: str) -> float:
    """2·C FLOPs per output element (C products and sums); fwd+bwd 3x (d outputs, dz)."""
    forward = 2.0 * len(params["allocation"]) * math.prod(params["shape"])
    return forward if mode == "fwd" else 3.0 * forward


COMBINE_WORKLOADS = (
    Workload(COMBINE_OP, "combine", {"shape": (16, 48, 26, 26), "allocation": (1, 0, 1, 1, 0, 0, 1)},
             "Gumbel-Matrix Omniglot layer: 7 components' conv outputs (batch 16, 48 channels, 26 x 26), "
             "4 of them allocated"),
    Workload(COMBINE_OP, "combine-tiny", {"shape": (2, 3, 4), "allocation": (1, 0, 1)},
             "smoke-test size for the harness tests", default=False),
)

COMBINE_SPEC = OpBench(op=COMBINE_OP, make_inputs=combine_inputs, eager=combine_eager, dense=None,
                       mtlfast=combine_fn, flops=combine_flops)

register(COMBINE_SPEC, COMBINE_WORKLOADS)
