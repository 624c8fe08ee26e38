"""The Gumbel-Matrix task-pairs example (examples/gumbel_task_pairs.py), reduced to run in a
minute or two: the generator and the fixed allocations as specified, and the paper's qualitative
result on shorter training (1200 steps instead of 3000 for the pairs, 150 steps and two ρ instead
of three for the similarity). Nothing is hard-coded: every assertion is about what the training
runs produce.

Training outcomes are asserted over three seeds, in forms that hold across machines: the run of
one seed depends on the CPU's float summation order (one seed's greedy allocation differs between
an AVX-512 and an AVX2 kernel set), so no assertion rests on one trajectory or on a router
decision taken near P = 0.5. Measured per seed, pairs at 1200 steps, ``python -m pytest`` kernels
(AVX-512 Xeon) / ``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2`` /
``ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2`` (the example trains on one thread,
so the thread count does not enter):

  seed  learned / no_sharing held-out MSE            pairs share the greedy row  within / across
  0     0.838/0.900  0.679/0.915  0.775/0.806        no / yes / no                0.19 0.08 0.15 / >= 2.36
  1     0.635/0.926  0.411/0.904  0.496/0.928        yes (all three)              <= 0.01 / 3.00
  2     0.517/0.699  0.533/0.712  0.567/0.753        yes (all three)              <= 0.01 / 3.97
  3-5   learned below no sharing by 0.20-0.38 in all nine runs; pairs share the row in all nine

("within": the larger L1 distance between the P(used) rows of the two tasks of a pair;
"across": the smallest between tasks of different pairs.) Where the pairs' greedy rows differ, one
component sits at P ~ 0.5 (0.47 against 0.64 for seed 0). ρ sweep at 150 steps, similarity at
ρ = 0 for seeds 0-5: 0.41, 0.00, 0.67, 0.67, 1.00, 0.41, at ρ = 1: 1.00 for all, the same under all
three kernel sets.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # examples/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from examples import gumbel_task_pairs as ex  # noqa: E402
from tests.conftest import DEVICE  # noqa: E402

# Steps at which the learned allocation has overtaken no sharing for every seed tried (0 to 5, three
# kernel sets): the Gumbel sampling makes the learned model start slower (seed 0 is still behind at
# step 1000). A seed costs ~15 s on one idle core (learned + no sharing).
PAIR_SEEDS = (0, 1, 2)
PAIR_STEPS = 1200
MAJORITY = 2               # of the three seeds
WITHIN_ACROSS = 0.25       # a pair's rows at most this fraction of the distance across pairs (measured <= 0.08)
ACROSS = 1.0               # L1 between the rows of tasks of different pairs (measured >= 2.0)
GAIN = 0.1                 # mean over seeds of (no_sharing - learned) / no_sharing (measured 0.21-0.35)
RHO_SEEDS = (0, 1, 2)
RHO_STEPS = 150
RHO_GAP = 0.2              # mean similarity at ρ = 1 minus at ρ = 0 (measured 0.64)


@pytest.fixture(scope="module")
def pairs():
    return {seed: ex.pairs_experiment(PAIR_STEPS, seed, DEVICE, baselines=("no_sharing",), eval_points=0)
            for seed in PAIR_SEEDS}


def l1(a, b) -> float:
    return sum(abs(x - y) for x, y in zip(a, b))


def test_generator_matches_the_paper() -> None:
    g = torch.Generator().manual_seed(3)
    for rho in (0.0, 0.5, 1.0):
        w = ex.task_vectors(rho, torch.Generator().manual_seed(3))
        assert w.shape == (2, ex.FEATURES)
        assert torch.allclose(w.norm(dim=1), torch.ones(2), atol=1e-5)                  # c = 1
        assert math.isclose(float(w[0] @ w[1]), rho, abs_tol=1e-5)                      # cos = ρ
    w = ex.task_vectors(0.3, g)
    x, y = ex.sample(w, 4000, torch.Generator().manual_seed(0))
    assert x.shape == (2, 4000, ex.FEATURES) and y.shape == (2, 4000)
    s = torch.einsum("tnd,td->tn", x, w)
    clean = s + sum(torch.sin(i * s + (i - 1) ** 2) for i in range(1, 7))
    noise = y - clean
    assert abs(float(noise.var()) - 0.01) < 0.0015 and abs(float(noise.mean())) < 0.01
    assert not torch.equal(x[0], x[1])                                                  # each task its own x


def test_fixed_allocations() -> None:
    no_sharing = ex.fixed_allocation("no_sharing")
    assert no_sharing.shape == (4, 8) and torch.equal(no_sharing.sum(1), torch.full((4,), 2.0))
    assert torch.equal(no_sharing.sum(0), torch.ones(8))                                 # nothing shared
    assert torch.equal(ex.fixed_allocation("one_each"), torch.eye(4))
    pairs = ex.fixed_allocation("pairs")
    assert torch.equal(pairs[0], pairs[1]) and torch.equal(pairs[2], pairs[3]) and float(pairs[0] @ pairs[2]) == 0
    assert torch.equal(ex.fixed_allocation("full"), torch.ones(4, 4))


def test_fixed_allocation_trains_the_same_when_unused_components_are_skipped() -> None:
    """The baselines train the ModularLayer in eval mode (0-allocated components not run): the
    same run as in train mode, where those components get zero gradient and no Adam update."""
    w = ex.task_vectors(0.0, torch.Generator().manual_seed(0), 16)[list(ex.PAIR_OF_TASK)]
    runs = [ex.train(w, 30, 0, DEVICE, ex.fixed_allocation("no_sharing"), eval_points=3, skip_unused=skip)
            for skip in (True, False)]
    for a, b in zip(runs[0]["curve"], runs[1]["curve"]):
        assert a[0] == b[0] and math.isclose(a[1], b[1], rel_tol=1e-4)


def test_tasks_of_a_pair_share_their_allocation(pairs):
    """Every seed: the two tasks of a pair end with nearly the same P(used) row and the pairs with
    clearly different ones, every task uses a component; the greedy rows of a pair are identical
    for a majority of the seeds (a component left near P = 0.5 can split them)."""
    for seed, result in pairs.items():
        learned = result["learned"]
        P, alloc = learned["probabilities"], learned["allocation"]
        within = max(l1(P[0], P[1]), l1(P[2], P[3]))
        across = min(l1(P[a], P[b]) for a in (0, 1) for b in (2, 3))
        assert across >= ACROSS and within <= WITHIN_ACROSS * across, (seed, P)
        assert all(alloc[a] != alloc[b] for a in (0, 1) for b in (2, 3)), (seed, alloc)
        assert result["expected"]["pairs_differ_across"]
        assert all(sum(row) > 0 for row in alloc), (seed, alloc)
    same = [seed for seed, r in pairs.items() if r["expected"]["pairs_share_allocation"]]
    assert len(same) >= MAJORITY, {seed: r["learned"]["allocation"] for seed, r in pairs.items()}


def test_learned_allocation_beats_no_sharing(pairs):
    losses = {seed: (r["learned"]["held_out_loss"], r["baselines"]["no_sharing"]["held_out_loss"])
              for seed, r in pairs.items()}
    assert sum(learned < no_sharing for learned, no_sharing in losses.values()) >= MAJORITY, losses
    gains = [(no_sharing - learned) / no_sharing for learned, no_sharing in losses.values()]
    assert sum(gains) / len(gains) >= GAIN, losses
    for r in pairs.values():
        assert r["expected"]["learned_below_no_sharing"] == (r["learned"]["held_out_loss"]
                                                              < r["baselines"]["no_sharing"]["held_out_loss"])


def test_similarity_higher_at_rho_1_than_at_rho_0() -> None:
    sweep = ex.rho_sweep(RHO_STEPS, RHO_SEEDS, DEVICE, rhos=(0.0, 1.0))
    at0, at1 = sweep["similarity"]
    assert sum(b > a for a, b in zip(at0, at1)) >= MAJORITY, sweep["similarity"]
    assert sum(at1) / len(at1) - sum(at0) / len(at0) >= RHO_GAP, sweep["similarity"]
    assert sweep["expected"] == {"similarity_grows_with_rho": True, "similarity_rho1_above_rho0": True}
    assert sweep["label_correlation"][0] < 0.05 < 0.95 < sweep["label_correlation"][1]


def test_run_summary_plot() -> None:
    """The full pipeline on a few steps: JSON-serialisable figures, a summary, a figure."""
    figures = ex.run(steps=4, seed=0, device=DEVICE, features=16, rhos=(0.0, 1.0), rho_seeds=1, eval_points=2)
    assert json.loads(json.dumps(figures)) == figures
    assert set(figures["expected"]) == {"pairs_share_allocation", "pairs_differ_across", "learned_below_no_sharing",
                                        "similarity_grows_with_rho", "similarity_rho1_above_rho0"}
    assert all(isinstance(v, bool) for v in figures["expected"].values())
    assert set(figures["pairs"]["baselines"]) == set(ex.BASELINES)
    text = ex.summary(figures)
    assert "learned" in text and "no_sharing" in text and "rho" in text
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = ex.plot(figures)
    assert len(fig.axes) == 4
    plt.close(fig)
