"""One rank of tests/test_distributed.py: ``python tests/distributed_worker.py RANK WORLD ENGINE FOLDER
DEVICE SCENARIO...`` joins a process group (gloo on ``cpu``, nccl on ``cuda``, one GPU per rank)
through a file store in FOLDER, runs each scenario of
tests/distributed_scenarios.py under ENGINE (``ddp``: DistributedDataParallel; ``fsdp``: FSDP2's
``fully_shard``) and writes ``FOLDER/ENGINE.DEVICE.SCENARIO.rankRANK.pt``: ``{"state": ...}`` (full, unsharded
tensors) or ``{"error": traceback}``, so one failing scenario fails its own test only."""
from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import distributed_scenarios as S  # noqa: E402


def _ddp(module: nn.Module, **kwargs) -> nn.Module:
    return nn.parallel.DistributedDataParallel(module, **kwargs)


def _fsdp(module: nn.Module, **kwargs) -> nn.Module:
    """FSDP2 on the model's root only (DDP's options mean nothing here): mtlfast's modules use
    their submodules' parameters outside those submodules' forward (GumbelMatrix.sample_all,
    SluiceLSTM's LSTMs, the penalties), and FSDP2 gathers a module's parameters only around its
    own forward. reshard_after_forward=False keeps them gathered until the backward, for the
    penalties computed between forward and backward."""
    from torch.distributed.fsdp import fully_shard

    return fully_shard(module, reshard_after_forward=False)


def main() -> None:
    rank, world, engine, folder, device = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
    store = dist.FileStore(os.path.join(folder, f"store-{engine}-{device}"), world)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=rank, world_size=world)
    try:
        ctx = S.Context(rank, world, _ddp if engine == "ddp" else _fsdp, folder=os.path.join(folder, engine),
                        device=device)
        os.makedirs(ctx.folder, exist_ok=True)
        for name in sys.argv[6:]:
            try:
                result = {"state": S.SCENARIOS[name](ctx)}
            except Exception:   # noqa: BLE001 - reported by the scenario's own test
                result = {"error": traceback.format_exc()}
            torch.save(result, os.path.join(folder, f"{engine}.{device}.{name}.rank{rank}.pt"))
            # the ranks stay in step: a rank that failed early must not leave the other waiting in a
            # collective of the next scenario (a failed scenario may still have left one pending;
            # the test's time limit covers that)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
