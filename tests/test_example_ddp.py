"""examples/ddp_sparse_sharing.py under torchrun: 2 gloo ranks follow the 1-rank run of the same
command (the same batches, each rank on its share; the same averaged gradients), end with identical
masks and parameters on both ranks, and report accuracies of the whole test set."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIMIT_S = 300


def _torchrun(ranks: int, out: Path, *args: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           "-m", "examples.ddp_sparse_sharing", "--steps", "20", "--json", str(out), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LIMIT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "masks identical on every rank: True; parameters identical on every rank: True" in done.stdout
    return json.loads(out.read_text())


def test_two_ranks_follow_one(tmp_path):
    two = _torchrun(2, tmp_path / "two.json")
    one = _torchrun(1, tmp_path / "one.json")
    assert two["ranks"] == 2 and one["ranks"] == 1
    assert two["masks_identical_on_every_rank"] and two["parameters_identical_on_every_rank"]
    assert two["selected_rounds"] == one["selected_rounds"]
    for task in ("main", "aux"):
        assert two["density"][task] == pytest.approx(one["density"][task], abs=1e-12)
        assert 0.0 < two["density"][task] < 1.0 or two["selected_rounds"][task] == 0
    # accuracies over the whole test set (30,000 tokens): equal up to a few argmax flips of float rounding
    for key in ("main_accuracy", "aux_accuracy"):
        assert 0.0 <= two[key] <= 1.0
        assert two[key] == pytest.approx(one[key], abs=2e-3)
    assert two["overlap"] == pytest.approx(one["overlap"], abs=1e-12)


def test_without_torchrun_it_says_how_to_start():
    done = subprocess.run([sys.executable, "-m", "examples.ddp_sparse_sharing", "--steps", "20"], cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "torchrun --standalone --nproc-per-node 2 -m examples.ddp_sparse_sharing" in done.stderr
