"""Training runs that must give the same parameters on one process and under DistributedDataParallel.

Each scenario trains a few optimizer steps and returns what it ends with (parameters, buffers,
masks). It runs in two places: in the test process on one process with the whole batch
(``world=1``), and on every rank of tests/distributed_worker.py under DDP with its contiguous
share of the same batch. Losses are means over the local batch and the shares are equal, so
DDP's averaged gradient is the gradient of the whole batch's mean: the parameters agree to
float32 rounding (the order of the sums differs), the tests' 1e-5.

Random numbers: the models are built under fixed seeds, the data comes from per-step generators,
and torch's global generator (which GumbelMatrix draws its Philox seed from) is seeded the same
way on every rank and on the single process before training, so every rank draws the allocation
the single process draws.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import mtlfast.nn as mnn
from mtlfast import pruning as P

WORLD = 2
STEPS = 3
BATCH = 8          # the whole batch; each of the WORLD ranks trains on BATCH // WORLD samples

Wrap = Callable[..., nn.Module]      # wrap(module, **ddp_kwargs) -> DDP(module), or module itself
State = Dict[str, torch.Tensor]


class Context:
    """Where a scenario runs: rank and world size, and how to wrap a model (DDP or not)."""

    def __init__(self, rank: int = 0, world: int = 1, wrap: Optional[Wrap] = None, folder: Optional[str] = None,
                 device: str = "cpu"):
        self.rank, self.world, self.folder, self.device = rank, world, folder, torch.device(device)
        self.wrap: Wrap = wrap or (lambda module, **kwargs: module)

    def share(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's contiguous share of a whole-batch tensor along ``dim``, on the device."""
        return (t.chunk(self.world, dim)[self.rank] if self.world > 1 else t).to(self.device)

    def mean(self, value: float) -> float:
        """The mean over ranks of a per-rank number (the whole batch's mean for equal shares)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _state(module: nn.Module) -> State:
    """The module's state dict as plain tensors (FSDP2's sharded parameters gathered: a collective)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in module.state_dict().items()}


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.9)


# ---------------------------------------------------------------------------------------------
# Sparse sharing


def sparse_model(num_tasks: int = 3, hidden: int = 6) -> mnn.SparseSharingLSTM:
    """A 2-layer bidirectional SparseSharingLSTM with random masks of density ~0.6 per task."""
    torch.manual_seed(11)
    model = mnn.SparseSharingLSTM(5, hidden, num_layers=2, bidirectional=True, batch_first=True,
                                  num_tasks=num_tasks)
    gen = _generator(12)
    for task in range(num_tasks):
        for name in model.masked_parameter_names():
            shape = getattr(model, name).shape
            model.set_mask(task, name, torch.rand(shape, generator=gen) < 0.6)
    return model


# ranks hold different task mixes: rank 0 samples 0-3 (tasks 0, 0, 0, 1), rank 1 samples 4-7 (1, 2, 2, 2)
MIXED_TASKS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])


def _sequence_batch(step: int, features: int = 5, length: int = 7) -> torch.Tensor:
    return torch.randn(BATCH, length, features, generator=_generator(100 + step))


def sparse_mixed(ctx: Context) -> State:
    """Per-sample task ids, a different mix of tasks on each rank."""
    model = sparse_model().to(ctx.device)
    net = ctx.wrap(model)
    opt = _sgd(model)
    for step in range(STEPS):
        x = ctx.share(_sequence_batch(step))
        out, (h, c) = net(x, task=ctx.share(MIXED_TASKS))
        loss = out.square().mean() + h.mean() - c.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _state(model)


def sparse_all(ctx: Context) -> State:
    """``task="all"``: every task's subnet on the same input, outputs stacked."""
    model = sparse_model().to(ctx.device)
    net = ctx.wrap(model)
    opt = _sgd(model)
    weights = torch.tensor([1.0, -0.5, 2.0], device=ctx.device).view(3, 1, 1, 1)
    for step in range(STEPS):
        x = ctx.share(_sequence_batch(step))
        out, _ = net(x, task="all")                              # (3, B, L, 2H)
        loss = (weights * out).sin().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _state(model)


# ---------------------------------------------------------------------------------------------
# Sluice networks


def sluice_model() -> mnn.SluiceLSTM:
    torch.manual_seed(21)
    return mnn.SluiceLSTM(5, 6, num_tasks=2, num_layers=2, num_subspaces=2)


def sluice(ctx: Context) -> State:
    """SluiceLSTM (2 tasks, 2 layers, 2 subspaces, stitched layers) with the orthogonality penalty
    added outside the DDP forward (its gradient joins the data gradient before the all-reduce)."""
    model = sluice_model()
    net = ctx.wrap(model)
    opt = _sgd(model)
    lengths = torch.tensor([7, 3, 5, 7, 1, 6, 7, 2])
    for step in range(STEPS):
        x = ctx.share(_sequence_batch(step))
        target = ctx.share(torch.randn(2, BATCH, 7, 12, generator=_generator(200 + step)), dim=1)
        out = net(x, lengths=ctx.share(lengths))                 # (2, B, L, 12)
        loss = F.mse_loss(out, target) + 0.1 * model.orthogonality_penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _state(model)


# ---------------------------------------------------------------------------------------------
# Gumbel-Matrix routing


class Routed(nn.Module):
    """GumbelMatrix allocations over two ModularLayers of 3 linear components; one output per task."""

    def __init__(self, num_tasks: int = 3, width: int = 4) -> None:
        super().__init__()
        self.gm = mnn.GumbelMatrix(num_tasks, [3, 3], tau=2.0, tau_min=0.5)
        self.layers = nn.ModuleList(mnn.ModularLayer([nn.Linear(width, width) for _ in range(3)]) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, width) -> (num_tasks, B, width)."""
        allocations = self.gm.sample_all()                         # per layer (T, C)
        outs = []
        for task in range(self.gm.num_tasks):
            h = x
            for layer, allocation in zip(self.layers, allocations):
                h = torch.tanh(layer(h, allocation[task]))
            outs.append(h)
        return torch.stack(outs)


def routed_model() -> Routed:
    torch.manual_seed(31)
    model = Routed()
    with torch.no_grad():   # away from p = 0.5, so the greedy (eval) allocation leaves components out
        model.gm.logits.copy_(torch.randn(model.gm.logits.shape, generator=_generator(32)))
    return model


def _routed_training(ctx: Context, model: Routed, net: nn.Module, opt: torch.optim.Optimizer, steps: range,
                     penalty: bool) -> None:
    for step in steps:
        x = ctx.share(torch.randn(BATCH, 4, generator=_generator(300 + step)))
        target = ctx.share(torch.randn(3, BATCH, 4, generator=_generator(400 + step)), dim=1)
        loss = F.mse_loss(net(x), target)
        if penalty:
            loss = loss + model.gm.budget_penalty(0.3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.gm.advance()


def gumbel_train(ctx: Context) -> State:
    """Train mode: every component runs (the combine's gradient reaches all of them, 0 for the
    unallocated), the logits get the straight-through gradient: DDP's default
    find_unused_parameters=False suffices."""
    model = routed_model().to(ctx.device)
    net = ctx.wrap(model)
    opt = _sgd(model)
    torch.manual_seed(33)     # GumbelMatrix's seeds: the same draws on every rank
    _routed_training(ctx, model, net, opt, range(STEPS), penalty=True)
    return _state(model)


def gumbel_eval(ctx: Context) -> State:
    """Eval mode (greedy allocation, training the components under a fixed routing): unallocated
    components do not run and the logits get no gradient, so DDP needs find_unused_parameters=True."""
    model = routed_model().eval()
    net = ctx.wrap(model, find_unused_parameters=True)
    opt = _sgd(model)
    _routed_training(ctx, model, net, opt, range(STEPS), penalty=False)
    return _state(model)


def gumbel_eval_without_unused(ctx: Context) -> State:
    """What happens in eval mode with DDP's default find_unused_parameters=False: DDP's error at the
    second step (the first step's reduction never finished)."""
    model = routed_model().eval()
    net = ctx.wrap(model)
    opt = _sgd(model)
    _routed_training(ctx, model, net, opt, range(STEPS), penalty=False)
    return _state(model)


# ---------------------------------------------------------------------------------------------
# Iterative magnitude pruning under DDP


def imp(ctx: Context) -> State:
    """``pruning.sparse_sharing_masks`` on the DDP-wrapped model's module: warm-up and IMP rounds
    train through the DDP wrapper; the dev score is the mean over ranks (so every rank selects the
    same round). The masks depend only on the (all-reduced, identical) weights."""
    model = sparse_model(num_tasks=2, hidden=4)
    net = ctx.wrap(model)
    batches = iter(range(1000))
    dev_x = ctx.share(_sequence_batch(999))

    def loss_of(out: torch.Tensor, task: Optional[int]) -> torch.Tensor:
        # opposite targets, so the tasks' weights (and masks) move apart
        target = torch.tensor([0.6, -0.6]).view(2, 1, 1, 1) if task is None else 0.6 - 1.2 * task
        return (out - target).square().mean()

    def train(_: nn.Module, task: Optional[int], steps: Optional[int]) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        for _step in range(steps or 2):
            x = ctx.share(_sequence_batch(next(batches)))
            out, _ = net(x, task="all" if task is None else task)
            opt.zero_grad()
            loss_of(out, task).backward()
            opt.step()

    def score(m: nn.Module, task: int) -> float:
        with torch.no_grad():
            out, _ = m(dev_x, task=task)
        return -ctx.mean(float(loss_of(out, task)))

    found = P.sparse_sharing_masks(model, train, score, warmup_fn=lambda m: train(m, None, 3), rounds=2, rate=0.5,
                                   steps_per_round=2)
    state = _state(model)
    for task, rounds in found.items():    # every round's mask, not only the selected one
        for r in rounds:
            state.update({f"round.{task}.{r.round}.{name}": mask for name, mask in r.masks.items()})
            state[f"round.{task}.{r.round}.score"] = torch.tensor(r.score)
    return state


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _checkpointed_model() -> nn.ModuleDict:
    return nn.ModuleDict({"lstm": sparse_model(), "routed": routed_model()})


def _checkpoint_training(ctx: Context, model: nn.ModuleDict, net: nn.Module, opt: torch.optim.Optimizer,
                         steps: range) -> None:
    for step in steps:
        x = ctx.share(_sequence_batch(step))
        out = net(x, ctx.share(MIXED_TASKS))
        loss = out.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model["routed"].gm.advance()


class _Both(nn.Module):
    """The checkpointed model's forward: the LSTM on per-sample tasks, the routing on its last step."""

    def __init__(self, model: nn.ModuleDict) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        out, _ = self.model["lstm"](x, task=tasks)
        return self.model["routed"](out[:, -1, :4])


def _sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _whole_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple:
    """(model, optimizer) state dicts of whole tensors: ``state_dict()`` as users save them, or
    under FSDP2 (sharded parameters) the gathered full state dicts (a collective on every rank)."""
    if not _sharded(model):
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, opt, options=options)


def _load_whole_state(model: nn.Module, opt: torch.optim.Optimizer, model_state: dict, opt_state: dict) -> None:
    if not _sharded(model):
        model.load_state_dict(model_state)
        opt.load_state_dict(opt_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, opt, opt_state, options=options)


def checkpoint(ctx: Context) -> State:
    """Rank 0 saves model (masks, logits, the temperature schedule's step) and optimizer after 2
    of 4 Adam steps, with torch's RNG state (the next Gumbel seeds); every rank loads into a fresh
    model and continues. Returns the resumed run's state and, under ``uninterrupted.*``, the state
    of the same 4 steps without the checkpoint (the tests compare the two)."""
    def fresh():
        model = _checkpointed_model()
        net = ctx.wrap(_Both(model))
        return model, net, torch.optim.Adam(model.parameters(), lr=0.01)

    path = os.path.join(ctx.folder or ".", "checkpoint.pt")
    torch.manual_seed(41)
    model, net, opt = fresh()
    _checkpoint_training(ctx, model, net, opt, range(2))
    model_state, opt_state = _whole_state(model, opt)
    if ctx.rank == 0:
        torch.save({"model": model_state, "opt": opt_state, "rng": torch.get_rng_state()}, path)
    if ctx.world > 1:
        dist.barrier()
    _checkpoint_training(ctx, model, net, opt, range(2, 4))
    uninterrupted = _state(model)

    model, net, opt = fresh()
    saved = torch.load(path, weights_only=True)
    _load_whole_state(model, opt, saved["model"], saved["opt"])
    torch.set_rng_state(saved["rng"])
    resumed_step = int(model["routed"].gm.step)
    _checkpoint_training(ctx, model, net, opt, range(2, 4))
    state = _state(model)
    state.update({f"uninterrupted.{k}": v for k, v in uninterrupted.items()})
    state["resumed_step"] = torch.tensor(resumed_step)
    return state


def distributed_checkpoint(ctx: Context) -> State:
    """torch.distributed.checkpoint: every rank saves model and optimizer (get_state_dict), a fresh
    model and optimizer load them (set_state_dict) and one more step runs on both. Returns the
    loaded model's state, the original's under ``original.*``, and after the extra step each
    one's under ``stepped.*`` / ``original_stepped.*``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = os.path.join(ctx.folder or ".", f"dcp-world{ctx.world}")

    def fresh(seed: int):
        torch.manual_seed(seed)
        model = _checkpointed_model()
        if seed != 51:      # a different start, so that loading is what makes the two equal
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
                model["lstm"].set_mask(0, "weight_hh_l0", torch.zeros_like(model["lstm"].get_mask(0, "weight_hh_l0")))
        net = ctx.wrap(_Both(model))
        return model, net, torch.optim.Adam(model.parameters(), lr=0.01)

    model, net, opt = fresh(51)
    _checkpoint_training(ctx, model, net, opt, range(2))
    msd, osd = get_state_dict(net, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=folder)
    original = _state(model)

    loaded, lnet, lopt = fresh(52)
    msd, osd = get_state_dict(lnet, lopt)
    both = {"model": msd, "optim": osd}
    dcp.load(both, checkpoint_id=folder)
    set_state_dict(lnet, lopt, model_state_dict=both["model"], optim_state_dict=both["optim"])
    state = _state(loaded)
    state.update({f"original.{k}": v for k, v in original.items()})
    torch.manual_seed(53)
    _checkpoint_training(ctx, model, net, opt, range(2, 3))
    torch.manual_seed(53)
    _checkpoint_training(ctx, loaded, lnet, lopt, range(2, 3))
    state.update({f"stepped.{k}": v for k, v in _state(loaded).items()})
    state.update({f"original_stepped.{k}": v for k, v in _state(model).items()})
    return state


# what each training scenario starts from (the tests check that training moved it)
INITIAL_MODELS: Dict[str, Callable[[], nn.Module]] = {
    "sparse_mixed": sparse_model,
    "sparse_all": sparse_model,
    "sluice": sluice_model,
    "gumbel_train": routed_model,
    "gumbel_eval": routed_model,
    "imp": lambda: sparse_model(num_tasks=2, hidden=4),
}

SCENARIOS: Dict[str, Callable[[Context], State]] = {
    "sparse_mixed": sparse_mixed,
    "sparse_all": sparse_all,
    "sluice": sluice,
    "gumbel_train": gumbel_train,
    "gumbel_eval": gumbel_eval,
    "gumbel_eval_without_unused": gumbel_eval_without_unused,
    "imp": imp,
    "checkpoint": checkpoint,
    "distributed_checkpoint": distributed_checkpoint,
}
