"""Sparse-sharing masks: iterative magnitude pruning (IMP) and mask overlap.

Sparse sharing (Sun et al. 2020, "Learning Sparse Sharing Architectures for Multiple Tasks")
gives every task ``t`` a binary mask ``M_t`` over one shared base network. The masks are found
per task by iterative magnitude pruning (Algorithm 1 of the paper): starting from the rewind
weights ``θ0`` (the initial weights or the multi-task warm-up weights), train ``k`` steps on the
task with the current mask, record the dev score, prune a fraction of the *remaining* weights
with the smallest magnitude, rewind the weights to ``θ0`` and repeat; every round's mask is kept
with its score and the best one is selected (ties go to the lowest density).

The functions here work against a protocol, not a class. A masked model offers::

    model.num_tasks: int
    model.masked_parameter_names() -> list[str]      # names in named_parameters()
    model.get_mask(task, name) -> bool tensor        # shape of the parameter
    model.set_mask(task, name, mask)
    model.density(task) -> float                     # kept / total over the masked matrices

plus the ordinary ``nn.Module`` ``state_dict`` / ``load_state_dict`` / ``named_parameters``.
``mtlfast.nn.SparseSharingLSTM`` is one such model.

Counting conventions (all functions):

* "round" means round half up, ``floor(x + 0.5)``, with a 1e-9 tolerance so that decimal
  products such as ``0.15 * 10`` round as written.
* Ties in magnitude are broken by position: the matrices are concatenated in the order their
  names are given (dict order, or ``names`` order in IMP), each flattened in row-major order,
  and among equal magnitudes the earlier position is pruned first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from mtlfast import _checks

__all__ = [
    "PruningRound",
    "magnitude_masks",
    "prune_rate",
    "mask_overlap_ratio",
    "pairwise_overlap",
    "get_task_masks",
    "set_task_masks",
    "iterative_magnitude_pruning",
    "select_best",
    "sparse_sharing_masks",
]

SCOPES = ("global", "layer")
_PROTOCOL = ("num_tasks", "masked_parameter_names", "get_mask", "set_mask", "density")

TrainFn = Callable[[torch.nn.Module, int, Optional[int]], Any]
EvalFn = Callable[[torch.nn.Module, int], float]
WarmupFn = Callable[[torch.nn.Module], Any]
RewindTo = Union[str, Mapping[str, Tensor]]


# --------------------------------------------------------------------------- argument checks

def _scope(op: str, scope: object) -> str:
    if scope not in SCOPES:
        raise ValueError(f"{op}: argument 'scope' must be one of {SCOPES}, got {scope!r}")
    return scope  # type: ignore[return-value]


def _callable(op: str, name: str, value: object) -> None:
    if not callable(value):
        raise TypeError(f"{op}: argument '{name}' must be callable, got {type(value).__name__}")


def _check_model(op: str, model: object) -> None:
    missing = [attr for attr in _PROTOCOL if not hasattr(model, attr)]
    if missing or not isinstance(model, torch.nn.Module):
        what = f"missing {', '.join(missing)}" if missing else f"got {type(model).__name__}"
        raise TypeError(f"{op}: argument 'model' must be an nn.Module with the masked-model protocol "
                        f"({', '.join(_PROTOCOL)}); {what}")


def _task(op: str, name: str, model: Any, task: object) -> int:
    return _checks.integer(op, name, task, 0, model.num_tasks)


def _names(op: str, model: Any, names: Optional[Sequence[str]]) -> list[str]:
    """The parameter names to prune: ``model.masked_parameter_names()`` by default."""
    if names is None:
        return list(model.masked_parameter_names())
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise TypeError(f"{op}: argument 'names' must be a sequence of parameter names, "
                        f"got {type(names).__name__}")
    names = list(names)
    if not names:
        raise ValueError(f"{op}: argument 'names' must name at least one parameter, got []")
    if len(set(names)) != len(names):
        raise ValueError(f"{op}: argument 'names' must not repeat a name, got {names}")
    known = dict(model.named_parameters())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{op}: argument 'names' has names that are not parameters of the model: "
                         f"{unknown} (parameters: {list(known)})")
    masked = set(model.masked_parameter_names())
    for n in names:
        if n not in masked:  # e.g. a bias: only usable where the model keeps a mask for it
            try:
                model.get_mask(0, n)
            except Exception as exc:  # noqa: BLE001 - any failure means "no mask for it"
                raise ValueError(f"{op}: argument 'names' has {n!r}, which the model keeps no mask "
                                 f"for (masked: {sorted(masked)})") from exc
    return names


def _mask_dict(op: str, name: str, masks: object, shapes: Optional[Mapping[str, torch.Size]] = None
               ) -> dict[str, Tensor]:
    """Checks a ``{name: bool tensor}`` dict (shapes equal to ``shapes`` where given)."""
    if not isinstance(masks, Mapping):
        raise TypeError(f"{op}: argument '{name}' must be a dict of name -> bool tensor, "
                        f"got {type(masks).__name__}")
    for key, mask in masks.items():
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"{op}: argument '{name}' must hold bool tensors, got {got} for {key!r}")
        if shapes is not None and mask.shape != shapes[key]:
            raise ValueError(f"{op}: argument '{name}' has shape {tuple(mask.shape)} for {key!r}, "
                             f"expected {tuple(shapes[key])}")
    return dict(masks)


# --------------------------------------------------------------------------- magnitude pruning

def _round(x: float) -> int:
    """Round half up, tolerant of binary representation error (0.15 * 10 -> 2)."""
    return math.floor(x + 0.5 + 1e-9)


def _whole(t: Tensor) -> Tensor:
    """A parameter's whole value. Under FSDP2 a parameter is a DTensor shard outside its module's
    forward: its full_tensor() gathers it (a collective, made by every rank at the same point, as
    every step of IMP is); any other tensor is itself."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


def _kept(masks: Mapping[str, Tensor], names: Sequence[str]) -> int:
    return sum(int(masks[n].sum()) for n in names)


def _prune_unit(params: Mapping[str, Tensor], masks: Mapping[str, Tensor], names: Sequence[str],
                count: int, out: dict[str, Tensor]) -> None:
    """Removes the ``count`` kept weights of smallest |value| over ``names`` (one ranking)."""
    if count <= 0:
        out.update({n: masks[n].clone() for n in names})
        return
    device = masks[names[0]].device
    keep = torch.cat([masks[n].to(device).reshape(-1) for n in names])
    mags = torch.cat([params[n].detach().to(device=device, dtype=torch.float64).reshape(-1).abs()
                      for n in names])
    kept_idx = keep.nonzero().squeeze(1)          # increasing, so a stable sort breaks ties by position
    values = mags[kept_idx]
    if bool(values.isnan().any()):
        raise ValueError("magnitude pruning: argument 'params' has NaN at kept positions of "
                         f"{[n for n in names if bool(params[n].detach()[masks[n]].isnan().any())]}")
    order = torch.sort(values, stable=True).indices[:count]
    keep[kept_idx[order]] = False
    for n, part in zip(names, keep.split([masks[n].numel() for n in names])):
        out[n] = part.view(masks[n].shape).to(masks[n].device)


def _prune_counts(params: Mapping[str, Tensor], masks: Mapping[str, Tensor],
                  units: Sequence[Sequence[str]], counts: Sequence[int]) -> dict[str, Tensor]:
    params = {n: _whole(params[n]) for n in masks}
    out: dict[str, Tensor] = {}
    for unit, count in zip(units, counts):
        _prune_unit(params, masks, unit, count, out)
    return {n: out[n] for n in masks}


def _units(names: Sequence[str], scope: str) -> list[list[str]]:
    """The ranking units: all names together ("global") or one per matrix ("layer")."""
    return [list(names)] if scope == "global" else [[n] for n in names]


def magnitude_masks(params: Mapping[str, Tensor], masks: Mapping[str, Tensor], fraction: float,
                    scope: str = "global") -> dict[str, Tensor]:
    """Prunes ``fraction`` of the currently kept weights with the smallest magnitude.

    Args:
        params: ``{name: weight tensor}`` (any floating dtype, any device).
        masks: ``{name: bool tensor}`` with the same names and shapes; True = kept.
        fraction: in ``[0, 1)``; exactly ``round(fraction * kept)`` weights are removed per
            scope unit (round half up).
        scope: ``"global"`` ranks all kept weights of all matrices together; ``"layer"`` prunes
            each matrix by ``fraction`` of its own kept weights.

    Returns:
        New masks (the inputs are not modified), same names, order, shapes and devices. Pruned
        weights stay pruned: only kept weights are ranked, whatever their current value. Ties in
        magnitude go to the earlier position (matrices in dict order, row-major within each).

    Raises:
        TypeError / ValueError naming the argument: non-dict inputs, non-bool masks, names or
        shapes that differ, ``fraction`` outside ``[0, 1)``, unknown ``scope``, NaN at a kept
        position.
    """
    op = "magnitude_masks"
    fraction = _checks.real(op, "fraction", fraction, 0.0, 1.0)
    scope = _scope(op, scope)
    if not isinstance(params, Mapping):
        raise TypeError(f"{op}: argument 'params' must be a dict of name -> tensor, "
                        f"got {type(params).__name__}")
    if set(params) != set(masks if isinstance(masks, Mapping) else ()):
        got = sorted(masks) if isinstance(masks, Mapping) else type(masks).__name__
        raise ValueError(f"{op}: argument 'masks' must have the names of 'params' ({sorted(params)}), "
                         f"got {got}")
    for key, p in params.items():
        if not isinstance(p, Tensor) or not p.is_floating_point():
            got = p.dtype if isinstance(p, Tensor) else type(p).__name__
            raise TypeError(f"{op}: argument 'params' must hold floating-point tensors, got {got} for {key!r}")
    masks = _mask_dict(op, "masks", masks, {k: p.shape for k, p in params.items()})
    units = _units(list(masks), scope)
    return _prune_counts(params, masks, units, [_round(fraction * _kept(masks, u)) for u in units])


def prune_rate(final_density: float, rounds: int) -> float:
    """The per-round fraction of the remaining weights that reaches ``final_density`` after
    ``rounds`` rounds from a full mask: ``1 - final_density ** (1 / rounds)``.

    ``final_density`` must be in ``(0, 1]``, ``rounds`` an int ``>= 1``.
    """
    d = _checks.real("prune_rate", "final_density", final_density, 0.0, 1.0, low_closed=False, high_closed=True)
    n = _checks.integer("prune_rate", "rounds", rounds, 1)
    return 1.0 - d ** (1.0 / n)


# --------------------------------------------------------------------------- overlap

def _stacked(op: str, masks: object) -> Tensor:
    """A list of mask dicts as one ``(T, N)`` bool tensor (names in the first dict's order)."""
    if isinstance(masks, Mapping) or not isinstance(masks, Sequence):
        raise TypeError(f"{op}: argument 'masks' must be a list of dicts name -> bool tensor, "
                        f"got {type(masks).__name__}")
    if len(masks) == 0:
        raise ValueError(f"{op}: argument 'masks' must hold at least one task's masks, got []")
    first = _mask_dict(op, "masks[0]", masks[0])
    shapes = {k: v.shape for k, v in first.items()}
    rows = []
    for t, task_masks in enumerate(masks):
        task_masks = _mask_dict(op, f"masks[{t}]", task_masks)
        if set(task_masks) != set(shapes):
            raise ValueError(f"{op}: argument 'masks[{t}]' must have the names of masks[0] "
                             f"({list(shapes)}), got {list(task_masks)}")
        _mask_dict(op, f"masks[{t}]", task_masks, shapes)
        device = first[next(iter(shapes))].device if shapes else torch.device("cpu")
        rows.append(torch.cat([task_masks[n].to(device).reshape(-1) for n in shapes])
                    if shapes else torch.zeros(0, dtype=torch.bool))
    return torch.stack(rows)


def mask_overlap_ratio(masks: Sequence[Mapping[str, Tensor]]) -> float:
    """The overlap ratio ``|∩_t M_t| / |∪_t M_t|`` over all masked matrices together.

    Args:
        masks: one ``{name: bool tensor}`` per task, all with the same names and shapes.

    Returns:
        A float in ``[0, 1]``. When the union is empty (every mask prunes everything, or there
        are no weights) the masks are identical empty sets and the ratio is defined as ``1.0``
        (the convention of a Jaccard similarity of two empty sets). One task gives 1.0.
    """
    rows = _stacked("mask_overlap_ratio", masks)
    union = int(rows.any(0).sum())
    return 1.0 if union == 0 else int(rows.all(0).sum()) / union


def pairwise_overlap(masks: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """The ``(T, T)`` float64 CPU tensor of pairwise overlap ratios ``|M_i ∩ M_j| / |M_i ∪ M_j|``.

    Symmetric with ones on the diagonal; an empty union gives 1.0, as in
    :func:`mask_overlap_ratio` (which it equals for ``T = 2``).
    """
    rows = _stacked("pairwise_overlap", masks).to(torch.float64)
    inter = rows @ rows.T                          # exact integer counts below 2**53
    sizes = rows.sum(1)
    union = sizes[:, None] + sizes[None, :] - inter
    ratio = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))
    return ratio.cpu()


# --------------------------------------------------------------------------- model masks

def get_task_masks(model: torch.nn.Module, task: int, names: Optional[Sequence[str]] = None
                   ) -> dict[str, Tensor]:
    """Copies of task ``task``'s masks, ``{name: bool CPU tensor}``, for ``names`` (default:
    ``model.masked_parameter_names()``). Feed a list of these to :func:`mask_overlap_ratio`."""
    op = "get_task_masks"
    _check_model(op, model)
    task = _task(op, "task", model, task)
    return {n: model.get_mask(task, n).detach().to("cpu", torch.bool, copy=True)
            for n in _names(op, model, names)}


def set_task_masks(model: torch.nn.Module, task: int, masks: Mapping[str, Tensor]) -> None:
    """Sets task ``task``'s masks from ``{name: bool tensor}`` (moved to each parameter's device)."""
    params = dict(model.named_parameters())
    for n, mask in masks.items():
        model.set_mask(task, n, mask.to(params[n].device))


class _Rewinder:
    """Restores a snapshot of the state dict while keeping every task's current masks."""

    def __init__(self, op: str, model: torch.nn.Module, state: Mapping[str, Tensor],
                 mask_names: Sequence[str]):
        current = model.state_dict()
        unexpected = [k for k in state if k not in current]
        missing = [n for n, _ in model.named_parameters() if n not in state]
        if unexpected or missing:
            raise ValueError(f"{op}: argument 'rewind_to' must be a state_dict of the model; "
                             f"unexpected keys {unexpected}, missing parameters {missing}")
        for k, v in state.items():
            if not isinstance(v, Tensor) or v.shape != current[k].shape:
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"{op}: argument 'rewind_to' has {got} for {k!r}, "
                                 f"expected shape {tuple(current[k].shape)}")
        self.state = {k: v.detach().clone() for k, v in state.items()}
        self.mask_names = list(mask_names)

    def __call__(self, model: torch.nn.Module) -> None:
        masks = [{n: model.get_mask(t, n).clone() for n in self.mask_names}
                 for t in range(model.num_tasks)]
        model.load_state_dict(self.state, strict=False)
        for t, task_masks in enumerate(masks):  # masks are not rewound (and caches refresh)
            set_task_masks(model, t, task_masks)


# --------------------------------------------------------------------------- IMP

@dataclass(eq=False)
class PruningRound:
    """One IMP round: the mask that was trained and scored.

    Attributes:
        round: 0 for the starting (full or current) mask, then 1, 2, ...
        density: kept / total over the pruned parameter names (equal to ``model.density(task)``
            when the default names, all masked matrices, are pruned).
        score: the dev score returned by ``eval_fn`` (higher is better).
        masks: ``{name: bool CPU tensor}`` of the round.
    """

    round: int
    density: float
    score: float
    masks: dict[str, Tensor] = field(repr=False)

    @property
    def kept(self) -> int:
        """The number of kept weights over ``masks``."""
        return _kept(self.masks, list(self.masks))


def select_best(rounds: Sequence[PruningRound], *, atol: float = 0.0) -> PruningRound:
    """The round with the best (highest) score; ties go to the lowest density, then the earliest
    round. Scores within ``atol`` of the best count as tied (default: exact ties only). NaN scores
    rank below every number (if all are NaN, all are tied)."""
    op = "select_best"
    if isinstance(rounds, PruningRound) or not isinstance(rounds, Sequence) or not rounds:
        raise ValueError(f"{op}: argument 'rounds' must be a non-empty list of PruningRound, got {rounds!r}")
    atol = _checks.real(op, "atol", atol, 0.0, math.inf)
    pool = [r for r in rounds if not math.isnan(r.score)] or list(rounds)
    best = max((r.score for r in pool), default=math.nan)
    tied = [r for r in pool if math.isnan(best) or r.score >= best - atol]
    return min(tied, key=lambda r: (r.density, r.round))


@dataclass
class _Schedule:
    """How many weights each round removes, and when IMP stops."""

    scope: str
    rounds: Optional[int]
    rate: Optional[float]
    final_density: Optional[float]
    min_density: Optional[float]

    def counts(self, k: int, kept: Sequence[int], start: Sequence[int], ratio: float) -> list[int]:
        """Removal counts per unit for the pruning step that produces round ``k``.

        With ``rate``: ``round(rate * kept)``. With ``final_density``: the schedule is anchored to
        the start, ``kept_k = round(start * ratio ** (k / rounds))``, so rounding never accumulates
        and the last round is within half a weight of the target per unit.
        """
        if self.rate is not None:
            return [_round(self.rate * c) for c in kept]
        target = ratio ** (k / self.rounds)  # type: ignore[operator]
        return [max(0, c - _round(s * target)) for c, s in zip(kept, start)]

    def done(self, k: int, density: float) -> bool:
        return ((self.rounds is not None and k >= self.rounds)
                or (self.min_density is not None and density <= self.min_density))


def _schedule(op: str, scope: str, rounds: Optional[int], rate: Optional[float],
              final_density: Optional[float], min_density: Optional[float]) -> _Schedule:
    scope = _scope(op, scope)
    if (rate is None) == (final_density is None):
        raise ValueError(f"{op}: give exactly one of 'rate' (per round) and 'final_density' "
                         f"(with 'rounds'); got rate={rate!r}, final_density={final_density!r}")
    if rounds is not None:
        rounds = _checks.integer(op, "rounds", rounds, 1)
    if min_density is not None:
        min_density = _checks.real(op, "min_density", min_density, 0.0, 1.0)
    if rate is not None:
        rate = _checks.real(op, "rate", rate, 0.0, 1.0, low_closed=False)
        if rounds is None and min_density is None:
            raise ValueError(f"{op}: with 'rate', give 'rounds' or 'min_density' to stop; got neither")
    else:
        final_density = _checks.real(op, "final_density", final_density, 0.0, 1.0, low_closed=False)
        if rounds is None:
            raise ValueError(f"{op}: argument 'rounds' is required with 'final_density', got None")
    return _Schedule(scope, rounds, rate, final_density, min_density)


def _steps(op: str, steps_per_round: Optional[int]) -> Optional[int]:
    return None if steps_per_round is None else _checks.integer(op, "steps_per_round", steps_per_round, 0)


def _score(op: str, eval_fn: EvalFn, model: torch.nn.Module, task: int) -> float:
    value = eval_fn(model, task)
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{op}: argument 'eval_fn' must return a real "
                        f"number, got {type(value).__name__}") from exc


def _imp(op: str, model: torch.nn.Module, task: int, train_fn: TrainFn, eval_fn: EvalFn,
         schedule: _Schedule, names: list[str], rewind: _Rewinder, steps: Optional[int]
         ) -> list[PruningRound]:
    """Algorithm 1 for one task (arguments already checked)."""
    params = dict(model.named_parameters())
    masks = {n: model.get_mask(task, n).detach().to(params[n].device, torch.bool, copy=True) for n in names}
    total = sum(params[n].numel() for n in names)
    if total == 0:
        raise ValueError(f"{op}: argument 'names' selects no weights ({names} are empty)")
    units = _units(names, schedule.scope)
    start = [_kept(masks, u) for u in units]
    start_density = sum(start) / total
    ratio = 1.0
    if schedule.final_density is not None:
        if schedule.final_density >= start_density:
            raise ValueError(f"{op}: argument 'final_density' must be below the starting density "
                             f"{start_density:.6g} of task {task}, got {schedule.final_density!r}")
        ratio = schedule.final_density / start_density
    history: list[PruningRound] = []
    k = 0
    while True:
        rewind(model)
        set_task_masks(model, task, masks)
        train_fn(model, task, steps)
        density = _kept(masks, names) / total
        history.append(PruningRound(k, density, _score(op, eval_fn, model, task),
                                    {n: masks[n].to("cpu", copy=True) for n in names}))
        if schedule.done(k, density):
            break
        counts = schedule.counts(k + 1, [_kept(masks, u) for u in units], start, ratio)
        if schedule.rate is not None and sum(counts) == 0:
            break  # nothing left to remove at this rate: every later round would be the same
        masks = _prune_counts({n: params[n] for n in names}, masks, units, counts)
        k += 1
    rewind(model)
    set_task_masks(model, task, select_best(history).masks)
    return history


def _setup(op: str, model: Any, train_fn: object, eval_fn: object, names: Optional[Sequence[str]],
           steps_per_round: Optional[int], **schedule: Any) -> tuple[list[str], _Schedule, Optional[int]]:
    """Checks the arguments shared by IMP and the whole procedure."""
    _check_model(op, model)
    _callable(op, "train_fn", train_fn)
    _callable(op, "eval_fn", eval_fn)
    sched = _schedule(op, **schedule)
    return _names(op, model, names), sched, _steps(op, steps_per_round)


def _mask_names(model: Any, names: Sequence[str]) -> list[str]:
    """Every name with a mask that rewinding must preserve."""
    masked = list(model.masked_parameter_names())
    return masked + [n for n in names if n not in masked]


def iterative_magnitude_pruning(
    model: torch.nn.Module,
    task: int,
    train_fn: TrainFn,
    eval_fn: EvalFn,
    *,
    rounds: Optional[int] = None,
    rate: Optional[float] = None,
    final_density: Optional[float] = None,
    min_density: Optional[float] = None,
    scope: str = "global",
    names: Optional[Sequence[str]] = None,
    rewind_to: RewindTo = "init",
    steps_per_round: Optional[int] = None,
) -> list[PruningRound]:
    """Finds task ``task``'s mask by iterative magnitude pruning (Algorithm 1 of Sun et al. 2020).

    Each round ``z = 0, 1, ...``: rewind the weights to ``θ0``, set the task's current mask,
    ``train_fn(model, task, steps_per_round)``, record ``eval_fn(model, task)`` for that mask
    (round 0 is the starting mask: full, or whatever the model holds), then, unless IMP stops,
    prune from the *trained* weights: remove the lowest-magnitude kept weights (see
    :func:`magnitude_masks`), giving round ``z + 1``'s mask.

    Args:
        model: a masked model (see the module docstring). Only task ``task``'s mask changes.
        task: the task index, in ``[0, model.num_tasks)``.
        train_fn: ``train_fn(model, task, steps)`` trains in place with the current mask (the
            model masks gradients itself); ``steps`` is ``steps_per_round`` (may be None).
        eval_fn: ``eval_fn(model, task) -> float`` dev score, higher is better.
        rounds: the number of pruning rounds (``rounds + 1`` masks are scored); required with
            ``final_density``.
        rate: the fraction of the remaining weights pruned per round, in ``(0, 1)``.
        final_density: alternatively, the density (over ``names``) to reach after ``rounds``
            rounds, at the rate ``prune_rate``; the kept counts follow
            ``round(kept_0 * (final_density / density_0) ** (z / rounds))`` per scope unit, so
            the final density is reached to within one weight per unit.
        min_density: stop once a round's density is ``<=`` this, in ``[0, 1)``. With ``rate``,
            give ``rounds`` or ``min_density``; IMP also stops when a round would remove nothing.
        scope: ``"global"`` (one ranking over all names) or ``"layer"`` (per matrix).
        names: the parameters to prune, in tie-breaking order; default
            ``model.masked_parameter_names()`` (biases are excluded unless named here, and then
            only if the model keeps a mask for them).
        rewind_to: ``"init"``: a copy of ``model.state_dict()`` taken at the call, before
            training; or a state dict (e.g. the multi-task warm-up weights; copied at the call;
            it must hold every parameter, buffers may be left out). Masks are never rewound:
            every task's masks survive each rewind.
        steps_per_round: passed to ``train_fn`` as ``steps``.

    Returns:
        Every round's :class:`PruningRound`, in order. The model is left with the rewound
        weights and, for ``task``, the mask of :func:`select_best` over the rounds.
    """
    op = "iterative_magnitude_pruning"
    names, schedule, steps = _setup(op, model, train_fn, eval_fn, names, steps_per_round, scope=scope,
                                    rounds=rounds, rate=rate, final_density=final_density,
                                    min_density=min_density)
    task = _task(op, "task", model, task)
    if isinstance(rewind_to, str):
        if rewind_to != "init":
            raise ValueError(f"{op}: argument 'rewind_to' must be \"init\" or a state_dict, got {rewind_to!r}")
        state: Mapping[str, Tensor] = model.state_dict()
    elif isinstance(rewind_to, Mapping):
        state = rewind_to
    else:
        raise TypeError(f"{op}: argument 'rewind_to' must be \"init\" or a state_dict, "
                        f"got {type(rewind_to).__name__}")
    rewind = _Rewinder(op, model, state, _mask_names(model, names))
    return _imp(op, model, task, train_fn, eval_fn, schedule, names, rewind, steps)


def sparse_sharing_masks(
    model: torch.nn.Module,
    train_fn: TrainFn,
    eval_fn: EvalFn,
    *,
    warmup_fn: Optional[WarmupFn] = None,
    tasks: Optional[Sequence[int]] = None,
    reset_masks: bool = True,
    rounds: Optional[int] = None,
    rate: Optional[float] = None,
    final_density: Optional[float] = None,
    min_density: Optional[float] = None,
    scope: str = "global",
    names: Optional[Sequence[str]] = None,
    steps_per_round: Optional[int] = None,
) -> dict[int, list[PruningRound]]:
    """The whole sparse-sharing mask search.

    1. With ``reset_masks`` (default), every task's masks are set to all True (hard sharing).
    2. ``warmup_fn(model)``, if given, trains all tasks on that full network (multi-task warm-up).
    3. The weights are snapshotted as the rewind point ``θ0`` (the warm-up weights, or the
       current ones without warm-up).
    4. For each task of ``tasks`` (default all, in order), :func:`iterative_magnitude_pruning`
       from ``θ0`` with the remaining arguments; the task's selected mask is set.

    Returns ``{task: rounds}``. The model is left with the ``θ0`` weights and every searched
    task's selected mask. Arguments are checked before the warm-up runs.
    """
    op = "sparse_sharing_masks"
    names, schedule, steps = _setup(op, model, train_fn, eval_fn, names, steps_per_round, scope=scope,
                                    rounds=rounds, rate=rate, final_density=final_density,
                                    min_density=min_density)
    if warmup_fn is not None:
        _callable(op, "warmup_fn", warmup_fn)
    if tasks is None:
        tasks = range(model.num_tasks)
    if isinstance(tasks, (str, Integral)) or not isinstance(tasks, Iterable):
        raise TypeError(f"{op}: argument 'tasks' must be a sequence of task indices, got {type(tasks).__name__}")
    tasks = [_task(op, "tasks", model, t) for t in tasks]
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"{op}: argument 'tasks' must not repeat a task, got {tasks}")
    mask_names = _mask_names(model, names)
    if reset_masks:
        params = dict(model.named_parameters())
        full = {n: torch.ones(params[n].shape, dtype=torch.bool, device=params[n].device) for n in mask_names}
        for t in range(model.num_tasks):
            set_task_masks(model, t, full)
    if warmup_fn is not None:
        warmup_fn(model)
    rewind = _Rewinder(op, model, model.state_dict(), mask_names)
    return {t: _imp(op, model, t, train_fn, eval_fn, schedule, names, rewind, steps) for t in tasks}
