"""Sparse sharing trained on several processes with DistributedDataParallel.

The tagger of ``examples/sparse_sharing_negative_transfer.py`` (frozen embeddings ->
``mtlfast.nn.SparseSharingLSTM``, 1 layer, bidirectional, 2 tasks -> a linear head per task) goes
through the whole sparse-sharing recipe under DDP: a hard-shared multi-task warm-up, IMP per task
(``mtlfast.pruning.sparse_sharing_masks``: 5 rounds to density 0.1, rewind to the warm-up weights),
then both tasks trained jointly on their subnets. Every rank trains on its contiguous share of each
batch of 32 sentences (the same batches one process would see), so the run follows the
one-process run up to float rounding.

What makes it work under DDP (and what a user's own script needs too):
- the same seed on every rank: the same HMM, dev and test sets, initial weights (DDP also
  broadcasts rank 0's at construction) and random numbers;
- ``find_unused_parameters=True``: a step that trains one task leaves the other task's head
  without a gradient;
- the IMP dev score is the accuracy over every rank's share of the dev set (an all-reduce of the
  counts), so every rank selects the same round and so the same masks (the masks depend only on
  the weights, which DDP keeps identical).

Run (CPU, gloo; on GPUs with ``--device cuda``, nccl, one GPU per rank)::

    torchrun --standalone --nproc-per-node 2 -m examples.ddp_sparse_sharing [--steps N] [--seed S]

Rank 0 prints the accuracies, densities and mask overlap, and checks that the masks and the
parameters are identical on every rank.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):       # run as a file: the repository root on the path, for `examples`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from mtlfast import pruning as P

from examples.sparse_sharing_negative_transfer import AUX, MAIN, Config, Experiment, Tagger, stream

STEPS = 2000              # as the one-process experiment


class Distributed:
    """This rank's share of batches and of evaluation sets, and sums over ranks."""

    def __init__(self, device: torch.device) -> None:
        self.rank, self.world, self.device = dist.get_rank(), dist.get_world_size(), device

    def share(self, t: torch.Tensor) -> torch.Tensor:
        return t.chunk(self.world)[self.rank].to(self.device)

    def total(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def identical(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether every rank holds exactly these values (rank 0's, broadcast, compared on each)."""
        same = True
        for t in tensors:
            mine = t.detach().clone()
            theirs = mine.clone()
            dist.broadcast(theirs, 0)
            same &= bool(torch.equal(mine, theirs))
        return self.total(float(same))[0] == self.world


def train(d: Distributed, ex: Experiment, net: torch.nn.Module, model: Tagger, tasks: Sequence[int], steps: int,
          data_seed: int, params: Optional[list] = None) -> None:
    """``steps`` Adam steps on the summed loss of ``tasks``, each rank on its share of every batch
    (the mean loss of equal shares: DDP's averaged gradient is the whole batch's)."""
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=ex.cfg.lr)
    batches = stream(ex.hmm, ex.cfg, data_seed)
    model.train()
    for _ in range(steps):
        x, ys = next(batches)
        logits = net(d.share(x), tasks)
        loss = sum(F.cross_entropy(lg.flatten(0, 1), d.share(ys[t]).flatten()) for lg, t in zip(logits, tasks))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def accuracy(d: Distributed, ex: Experiment, model: Tagger, task: int, split: str) -> float:
    """Token accuracy over the whole split: each rank scores its share, the counts are summed."""
    x, ys = getattr(ex, split)
    model.eval()
    labels = d.share(ys[task])
    with torch.no_grad():
        logits = model(d.share(x), (task,))[0]
        right = float((logits.argmax(-1) == labels).sum())
    model.train()
    right, total = d.total(right, float(labels.numel()))
    return right / total


def run(steps: int, seed: int, device: torch.device) -> dict:
    d = Distributed(device)
    cfg = Config()
    ex = Experiment(cfg, seed, device)                  # seeded: the same HMM and sets on every rank
    model = ex.model()
    net = DistributedDataParallel(model, find_unused_parameters=True)
    data_seed = 1000 * seed + 7
    warm_steps, round_steps = int(cfg.warmup_fraction * steps), max(1, int(cfg.round_fraction * steps))
    heads = {"state": None}

    def warmup_fn(_lstm) -> None:
        train(d, ex, net, model, (MAIN, AUX), warm_steps, data_seed + 1)
        heads["state"] = {k: v.clone() for k, v in model.heads.state_dict().items()}

    calls = {MAIN: 0, AUX: 0}

    def train_fn(_lstm, task: int, k: Optional[int]) -> None:
        model.heads.load_state_dict(heads["state"])     # the head rewinds with the LSTM
        calls[task] += 1
        train(d, ex, net, model, (task,), k, data_seed + 10 * calls[task] + task,
              params=list(model.lstm.parameters()) + list(model.heads[task].parameters()))

    def eval_fn(_lstm, task: int) -> float:
        return accuracy(d, ex, model, task, "dev")     # the same number on every rank

    start = time.perf_counter()
    history = P.sparse_sharing_masks(model.lstm, train_fn, eval_fn, warmup_fn=warmup_fn,
                                     final_density=cfg.final_density, rounds=cfg.rounds, steps_per_round=round_steps)
    model.heads.load_state_dict(heads["state"])
    search = time.perf_counter() - start
    start = time.perf_counter()
    train(d, ex, net, model, (MAIN, AUX), steps, data_seed)
    masks = [P.get_task_masks(model.lstm, t) for t in (MAIN, AUX)]
    return {
        "ranks": d.world,
        "main_accuracy": accuracy(d, ex, model, MAIN, "test"),
        "aux_accuracy": accuracy(d, ex, model, AUX, "test"),
        "bayes_accuracy": ex.bayes,
        "density": {"main": model.lstm.density(MAIN), "aux": model.lstm.density(AUX)},
        "overlap": P.mask_overlap_ratio(masks),
        "selected_rounds": {name: P.select_best(history[t]).round for name, t in (("main", MAIN), ("aux", AUX))},
        "masks_identical_on_every_rank": d.identical([m for task in masks for m in task.values()]),
        "parameters_identical_on_every_rank": d.identical(list(model.parameters())),
        "seconds": {"mask search": search, "training": time.perf_counter() - start},
    }


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description="Sparse sharing (Sun et al. 2020) trained under DDP; run with torchrun")
    p.add_argument("--steps", type=int, default=STEPS, help=f"training steps of the final phase (default: {STEPS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu (gloo) or cuda (nccl)")
    p.add_argument("--json", type=Path, default=None, help="rank 0 also writes the figures to this JSON file")
    args = p.parse_args(argv)
    if args.steps < 10:
        p.error(f"--steps must be >= 10, got {args.steps}")
    if "RANK" not in os.environ:
        p.error("start it with torchrun, e.g. torchrun --standalone --nproc-per-node 2 -m examples.ddp_sparse_sharing")
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.set_num_threads(1)          # one core per rank: the ranks share the machine's cores
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        figures = run(args.steps, args.seed, torch.device("cuda", torch.cuda.current_device()) if cuda
                      else torch.device("cpu"))
        if dist.get_rank() == 0:
            f = figures
            print(f"{f['ranks']} ranks ({'nccl' if cuda else 'gloo'}), {args.steps} steps after the mask search")
            print(f"main task accuracy {f['main_accuracy']:.3f} (Bayes {f['bayes_accuracy']:.3f}), "
                  f"auxiliary {f['aux_accuracy']:.3f}")
            print(f"densities main {f['density']['main']:.3f}, aux {f['density']['aux']:.3f}; mask overlap "
                  f"{f['overlap']:.3f}; IMP rounds selected {f['selected_rounds']}")
            print(f"masks identical on every rank: {f['masks_identical_on_every_rank']}; "
                  f"parameters identical on every rank: {f['parameters_identical_on_every_rank']}")
            print(f"{f['seconds']['mask search']:.0f} s mask search, {f['seconds']['training']:.0f} s training")
            if args.json is not None:
                args.json.write_text(json.dumps(f, indent=1) + "\n")
        return figures
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
