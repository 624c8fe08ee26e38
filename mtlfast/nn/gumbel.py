"""Gumbel-Matrix routing (Maziarz et al.): which components of each layer a task uses.

For every layer l, task t and component c the allocation is a binary variable with two
complementary logits, initialised to log[p, 1 - p]: z = 1 (the component is used) when logit 0
wins. Training samples every allocation with Gumbel noise, hard 0/1 forward and the tempered
softmax's gradient backward (straight-through); eval takes the greedy allocation p > 0.5. A
task's layer output is the mean of its allocated components' outputs (ModularLayer).

The logits of all layers live in ONE parameter (T, Σ_l C_l, 2), so sampling every layer of every
task is one launch forward and one backward (MF.gumbel_pairs); layer l's logits are a view.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn

from mtlfast import _checks
from mtlfast.ops.gumbel import allocation_combine, gumbel_pairs


def _positive_int(owner: str, name: str, value: object) -> int:
    return _checks.integer(owner, name, value, low=1)


class GumbelMatrix(nn.Module):
    """Per-layer task-to-component allocations.

    Args:
        num_tasks: T.
        components: one component count C_l per layer.
        p_init: initial probability that a task uses a component (logits log[p, 1 - p]).
        tau: temperature; with ``tau_min`` it is the start τ₀ of the original schedule
            τ = max(τ_min, τ₀ / √(step + 1)), stepped by :meth:`advance`.
    """

    def __init__(self, num_tasks: int, components: Sequence[int], p_init: float = 0.5, tau: float = 1.0,
                 tau_min: Optional[float] = None) -> None:
        super().__init__()
        owner = "GumbelMatrix"
        self.num_tasks = _positive_int(owner, "num_tasks", num_tasks)
        if isinstance(components, int) or not len(components):
            raise ValueError(f"{owner}: argument 'components' must be a non-empty list of counts, got {components!r}")
        self.components = [_positive_int(owner, "components", c) for c in components]
        for name, value in (("p_init", p_init), ("tau", tau), ("tau_min", tau_min)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise TypeError(f"{owner}: argument '{name}' must be a real number, got {type(value).__name__}")
        if not 0.0 < float(p_init) < 1.0:
            raise ValueError(f"{owner}: argument 'p_init' must be in (0, 1), got {p_init!r}")
        for name, value in (("tau", tau), ("tau_min", tau_min)):
            # a float32 normal number: the samples are computed in float32 for float32 logits
            if value is not None and not (math.isfinite(value) and torch.finfo(torch.float32).tiny <= value
                                          <= torch.finfo(torch.float32).max):
                raise ValueError(f"{owner}: argument '{name}' must be finite and > 0 (a normal float32 number), "
                                 f"got {value!r}")
        self.tau0, self.tau_min = float(tau), tau_min
        init = torch.tensor([math.log(p_init), math.log(1.0 - p_init)])
        self.logits = nn.Parameter(init.expand(num_tasks, sum(self.components), 2).clone())
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    # -----------------------------------------------------------------------------------------
    # Temperature and optimisation

    @property
    def tau(self) -> float:
        """The current temperature: τ₀, or the schedule's value at the current step."""
        if self.tau_min is None:
            return self.tau0
        return max(self.tau_min, self.tau0 / math.sqrt(int(self.step) + 1))

    def advance(self) -> None:
        """One training step of the temperature schedule."""
        self.step += 1

    def optimizer_param_group(self, lr: float, scale: Optional[float] = None) -> dict:
        """A param group for the allocation logits with their own learning rate: ``lr`` times
        ``scale`` (default T, as the paper: the logits of a task see 1/T of the batches)."""
        return {"params": [self.logits], "lr": lr * (self.num_tasks if scale is None else scale)}

    # -----------------------------------------------------------------------------------------
    # Sampling

    def layer_logits(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s logits (T, C_l, 2), a view of the packed parameter."""
        start = sum(self.components[:layer])
        return self.logits[:, start:start + self.components[layer]]

    def _split(self, packed: torch.Tensor) -> List[torch.Tensor]:
        # torch.split_with_sizes, not Tensor.split: the same views without Tensor.split's Python
        # wrapper (3 of its 13 µs for 8 layers, on the CPU where a whole sample takes ~60 µs)
        return list(torch.split_with_sizes(packed, self.components, dim=-1))

    def _allocate(self, logits: torch.Tensor) -> torch.Tensor:
        if self.training:
            return gumbel_pairs(logits, self.tau, hard=True)
        return (logits[..., 0] > logits[..., 1]).to(logits.dtype)          # greedy: p > 0.5

    def forward(self, task: int) -> List[torch.Tensor]:
        """Task ``task``'s allocation per layer: a list of (C_l,) 0/1 rows (sampled with a
        straight-through gradient in training, greedy in eval)."""
        _checks.integer("GumbelMatrix", "task", task, 0, self.num_tasks)
        return self._split(self._allocate(self.logits[task]))

    def sample_all(self) -> List[torch.Tensor]:
        """Every task's allocation per layer, (T, C_l) each, in one sampling pass."""
        return self._split(self._allocate(self.logits))

    def probabilities(self) -> List[torch.Tensor]:
        """P(component used) per layer, (T, C_l) each: softmax of the pair, = sigmoid(l0 - l1)."""
        return self._split(torch.sigmoid(self.logits[..., 0] - self.logits[..., 1]))

    # -----------------------------------------------------------------------------------------
    # Regularisation and analysis

    def budget_penalty(self, budget: float, weight: float = 1.0) -> torch.Tensor:
        """weight · max(0, e_c - budget), e_c the expected fraction of active allocations over
        every task, layer and component."""
        expected = torch.sigmoid(self.logits[..., 0] - self.logits[..., 1]).mean()
        return weight * torch.clamp(expected - budget, min=0)

    def task_embeddings(self, threshold: float = 0.5) -> torch.Tensor:
        """(T, Σ C_l) binary: the greedy allocations of all layers side by side."""
        with torch.no_grad():
            return (torch.sigmoid(self.logits[..., 0] - self.logits[..., 1]) > threshold).to(self.logits.dtype)

    def task_similarity(self, threshold: float = 0.5) -> torch.Tensor:
        """(T, T) cosine similarity of the task embeddings (0 for a task that uses nothing)."""
        emb = self.task_embeddings(threshold)
        norms = emb.norm(dim=1, keepdim=True)
        unit = torch.where(norms > 0, emb / norms.clamp(min=1e-12), torch.zeros_like(emb))
        return unit @ unit.t()

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, components={self.components}"


class ModularLayer(nn.Module):
    """C components whose outputs a task combines by its allocation: ``forward(x, allocation)`` =
    ``MF.allocation_combine(stack(c(x) for c), allocation)``, the mean of the allocated
    components' outputs (0 if none). In eval mode the components with allocation 0 are not run
    (real compute saved at inference; the allocation is read on the host)."""

    def __init__(self, components: Sequence[nn.Module]) -> None:
        super().__init__()
        if not len(components):
            raise ValueError("ModularLayer: argument 'components' must be a non-empty list of modules")
        self.components = nn.ModuleList(components)

    def forward(self, x: torch.Tensor, allocation: torch.Tensor) -> torch.Tensor:
        if not isinstance(allocation, torch.Tensor) or allocation.shape != (len(self.components),):
            raise ValueError(f"ModularLayer: argument 'allocation' must be a tensor of shape "
                             f"({len(self.components)},), got "
                             f"{tuple(allocation.shape) if isinstance(allocation, torch.Tensor) else type(allocation).__name__}")
        if self.training:
            return allocation_combine(torch.stack([c(x) for c in self.components]), allocation)
        active = [int(i) for i in torch.nonzero(allocation).flatten().tolist()]
        if not active:
            with torch.no_grad():
                return torch.zeros_like(self.components[0](x))
        outputs = torch.stack([self.components[i](x) for i in active])
        return allocation_combine(outputs, allocation[active])
