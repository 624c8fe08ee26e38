"""Training on more than one process: DistributedDataParallel and FSDP2 (``fully_shard``), 2 ranks
on the CPU with gloo (and on GPUs with nccl, where there are any).

Every scenario of tests/distributed_scenarios.py runs once per engine on 2 worker processes
(tests/distributed_worker.py, one launch per engine for all scenarios, under a time limit after
which both workers are killed) and once here on one process with the whole batch. A test checks
that the ranks end with identical parameters and buffers (masks, the Gumbel schedule's step) and
that they equal the single process's within 1e-5 (float32 sums in another order).
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import pytest
import torch

import distributed_scenarios as S
import mtlfast.functional as MF

HERE = Path(__file__).resolve().parent
LIMIT_S = 420          # one engine's launch, every scenario (about 40 s on 2 CPU cores)
ATOL = 1e-5
ENGINES = ("ddp", "fsdp")
# the scenarios each engine runs (gumbel_eval_without_unused shows a DDP option's necessity)
ENGINE_SCENARIOS = {
    "ddp": tuple(S.SCENARIOS),
    "fsdp": tuple(n for n in S.SCENARIOS if n != "gumbel_eval_without_unused"),
}
TRAINED = ("sparse_mixed", "sparse_all", "sluice", "gumbel_train", "gumbel_eval", "imp")


def _unavailable(engine: str, device: str) -> Optional[str]:
    import torch.distributed as dist

    if not dist.is_available():
        return "this torch is built without torch.distributed"
    if device == "cpu" and not dist.is_gloo_available():
        return "this torch has no gloo backend"
    if device == "cuda" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        return "no CUDA device or no nccl backend"
    if engine == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError as exc:
            return f"this torch has no FSDP2 (torch.distributed.fsdp.fully_shard): {exc}"
    return None


@functools.lru_cache(maxsize=None)
def _launch(engine: str, device: str, world: int, folder: str, scenarios: tuple) -> str:
    """Runs the workers of one engine; returns what they printed (for failure messages)."""
    os.makedirs(folder, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(HERE / "distributed_worker.py"), str(rank), str(world), engine,
                               folder, device, *scenarios], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=LIMIT_S)
            logs.append(out)
    except subprocess.TimeoutExpired:
        logs.append(f"timed out after {LIMIT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return "\n".join(log[-3000:] for log in logs)


def _results(engine: str, name: str, folder: Path, device: str = "cpu", world: int = S.WORLD) -> list:
    reason = _unavailable(engine, device)
    if reason:
        pytest.skip(reason)
    log = _launch(engine, device, world, str(folder), ENGINE_SCENARIOS[engine])
    ranks = []
    for rank in range(world):
        path = folder / f"{engine}.{device}.{name}.rank{rank}.pt"
        assert path.exists(), f"rank {rank} wrote no result for {name} under {engine}; the workers said:\n{log}"
        ranks.append(torch.load(path, weights_only=True))
    return ranks


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@functools.lru_cache(maxsize=None)
def _single(name: str, folder: str) -> Dict[str, torch.Tensor]:
    os.makedirs(folder, exist_ok=True)
    return S.SCENARIOS[name](S.Context(folder=folder))


def _states(ranks: list) -> list:
    for rank, result in enumerate(ranks):
        assert "error" not in result, f"rank {rank} failed:\n{result['error']}"
    return [r["state"] for r in ranks]


def _assert_ranks_identical(states: list) -> None:
    first = states[0]
    for rank, state in enumerate(states[1:], 1):
        assert state.keys() == first.keys()
        for key, value in first.items():
            assert torch.equal(state[key], value), f"{key} differs between rank 0 and rank {rank}"


def _assert_matches(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[key].cpu(), value.cpu(), atol=ATOL, rtol=0, msg=lambda m: f"{what} {key}: {m}")
        else:            # masks, the schedule's step: exactly
            assert torch.equal(got[key].cpu(), value.cpu()), f"{what} {key} differs"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", TRAINED)
def test_ranks_agree_with_one_process(engine, name, folder):
    """Parameters and buffers identical across ranks, equal to one process on the whole batch, and
    moved by training (a run that trained nothing would agree trivially)."""
    states = _states(_results(engine, name, folder))
    _assert_ranks_identical(states)
    single = _single(name, str(folder / "single"))
    _assert_matches(states[0], single, f"{engine} rank 0 against one process:")
    initial = S.INITIAL_MODELS[name]()
    before = initial.state_dict()
    moved = max(float((states[0][k] - v).abs().max()) for k, v in before.items() if v.is_floating_point())
    assert moved > 1e-3, f"{name}: training changed no parameter by more than {moved}"


@pytest.mark.parametrize("engine", ENGINES)
def test_masks_stay_as_set(engine, folder):
    """Training with per-sample tasks leaves every task's masks as they were set, on every rank."""
    states = _states(_results(engine, "sparse_mixed", folder))
    model = S.sparse_model()
    masks = {k: v for k, v in model.state_dict().items() if k.startswith("mask_")}
    assert masks and not all(bool(m.all()) for m in masks.values())
    for state in states:
        for key, mask in masks.items():
            assert torch.equal(state[key], mask), key


@pytest.mark.parametrize("engine", ENGINES)
def test_gumbel_eval_leaves_unallocated_components_alone(engine, folder):
    """In eval mode the greedy allocation leaves components out: their parameters and the logits do
    not change (they get no gradient, which is why DDP needs find_unused_parameters=True there),
    the allocated ones do."""
    state = _states(_results(engine, "gumbel_eval", folder))[0]
    before = S.routed_model().state_dict()
    unchanged = [k for k, v in before.items() if v.is_floating_point() and torch.equal(state[k], v)]
    changed = [k for k, v in before.items() if v.is_floating_point() and not torch.equal(state[k], v)]
    assert "gm.logits" in unchanged
    assert any(k.startswith("layers.") for k in unchanged) and any(k.startswith("layers.") for k in changed)


def test_ddp_eval_mode_needs_find_unused_parameters(folder):
    """Without find_unused_parameters=True, eval-mode routing under DDP fails with DDP's error (at
    the second step: the first step's reduction never finished), on every rank."""
    for rank, result in enumerate(_results("ddp", "gumbel_eval_without_unused", folder)):
        assert "error" in result, f"rank {rank} trained without the option"
        assert "find_unused_parameters" in result["error"], result["error"][-2000:]


@pytest.mark.parametrize("engine", ENGINES)
def test_imp_selects_the_same_masks_on_every_rank(engine, folder):
    """sparse_sharing_masks (warm-up, then IMP per task) through the wrapped model: every round's
    masks (full, then density 1/2 and 1/4 of the remaining weights) and scores, and the selected
    masks, are the same on every rank and as one process finds them; the rounds' masks differ
    between tasks."""
    states = _states(_results(engine, "imp", folder))
    _assert_ranks_identical(states)
    single = _single("imp", str(folder / "single"))
    state = states[0]
    for key, value in single.items():
        if key.startswith("mask_") or key.startswith("round.") and not key.endswith(".score"):
            assert torch.equal(state[key], value), key
        elif key.endswith(".score"):
            torch.testing.assert_close(state[key], value, atol=ATOL, rtol=0)
    names = S.sparse_model(num_tasks=2, hidden=4).masked_parameter_names()
    for task in range(2):
        for z, density in ((0, 1.0), (1, 0.5), (2, 0.25)):
            kept = sum(int(state[f"round.{task}.{z}.{n}"].sum()) for n in names)
            total = sum(state[f"round.{task}.{z}.{n}"].numel() for n in names)
            assert abs(kept / total - density) < 0.01, (task, z, kept / total)
    assert any(not torch.equal(state[f"round.0.2.{n}"], state[f"round.1.2.{n}"]) for n in names)


@pytest.mark.parametrize("engine", ENGINES)
def test_checkpoint_resumes_identically(engine, folder):
    """Rank 0's checkpoint after 2 of 4 steps (model with masks, Gumbel logits and schedule step;
    Adam's state; torch's RNG state), loaded by every rank, continues to the parameters of the
    uninterrupted run; the schedule resumes at step 2."""
    states = _states(_results(engine, "checkpoint", folder))
    _assert_ranks_identical(states)
    for state in states:
        assert int(state["resumed_step"]) == 2
        resumed = {k: v for k, v in state.items() if not k.startswith("uninterrupted.") and k != "resumed_step"}
        uninterrupted = {k[len("uninterrupted."):]: v for k, v in state.items() if k.startswith("uninterrupted.")}
        _assert_matches(resumed, uninterrupted, "resumed against uninterrupted:")
        assert int(state["routed.gm.step"]) == 4
    saved = torch.load(folder / engine / "checkpoint.pt", weights_only=True)
    assert {"lstm.mask_ih_l0", "lstm.mask_hh_l1", "routed.gm.logits", "routed.gm.step"} <= set(
        saved["model"])
    assert saved["model"]["lstm.mask_ih_l0"].dtype == torch.bool


@pytest.mark.parametrize("engine", ENGINES)
def test_distributed_checkpoint_round_trip(engine, folder):
    """torch.distributed.checkpoint save / load of model and optimizer (get_state_dict /
    set_state_dict) into a model that started elsewhere: the loaded state equals the saved one
    exactly (masks included), and one more step moves both alike."""
    states = _states(_results(engine, "distributed_checkpoint", folder))
    _assert_ranks_identical(states)
    state = states[0]
    loaded = {k: v for k, v in state.items() if not k.startswith(("original.", "stepped.", "original_stepped."))}
    original = {k[len("original."):]: v for k, v in state.items() if k.startswith("original.")}
    assert loaded.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(loaded[key], value), key
    stepped = {k[len("stepped."):]: v for k, v in state.items() if k.startswith("stepped.")}
    original_stepped = {k[len("original_stepped."):]: v for k, v in state.items() if k.startswith("original_stepped.")}
    _assert_matches(stepped, original_stepped, "stepped after loading against the original:")


@pytest.mark.parametrize("engine", ENGINES)
def test_on_gpus(engine, folder):
    """On a GPU machine: the sparse-sharing and routing scenarios under nccl, one rank per GPU (one
    rank where there is one GPU: the engine's machinery on mtlfast's GPU kernels), against one
    process on the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the nccl runs need GPUs")
    reason = _unavailable(engine, "cuda")
    if reason:
        pytest.skip(reason)
    world = min(2, torch.cuda.device_count())
    names = ("sparse_mixed", "sparse_all", "gumbel_train")
    log = _launch(engine, "cuda", world, str(folder / "gpu"), names)
    for name in names:
        ranks = []
        for rank in range(world):
            path = folder / "gpu" / f"{engine}.cuda.{name}.rank{rank}.pt"
            assert path.exists(), f"rank {rank} wrote no result for {name}; the workers said:\n{log}"
            ranks.append(torch.load(path, weights_only=True))
        states = _states(ranks)
        _assert_ranks_identical(states)
        os.makedirs(folder / "gpu-single", exist_ok=True)
        single = S.SCENARIOS[name](S.Context(folder=str(folder / "gpu-single"), device="cuda"))
        _assert_matches(states[0], single, f"{engine} on GPUs against one process:")


def test_dtensor_arguments_are_refused_with_the_reason():
    """A DTensor (what FSDP2 leaves in a module outside its forward) reaching an op is a TypeError
    naming the argument and the fix, not a crash or a wrong number; plain tensors still run."""
    import torch.distributed as dist

    if _unavailable("fsdp", "cpu"):
        pytest.skip(_unavailable("fsdp", "cpu"))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        x, w = torch.randn(3, 4), torch.randn(5, 4)
        mask = torch.rand(5, 4) > 0.5
        dx, dw = (distribute_tensor(t, mesh, [Replicate()]) for t in (x, w))
        calls = {
            "x": lambda: MF.masked_linear(dx, w, mask),
            "weight": lambda: MF.masked_linear(x, dw, mask),
            "logits": lambda: MF.gumbel_sigmoid(dw),
            "outputs": lambda: MF.allocation_combine(dw, torch.ones(5)),
        }
        for name, call in calls.items():
            with pytest.raises(TypeError, match=f"argument '{name}' must be a local tensor, got a DTensor"):
                call()
        torch.testing.assert_close(MF.masked_linear(x, w, mask), x @ (w * mask).t())
    finally:
        dist.destroy_process_group()
