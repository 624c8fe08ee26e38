"""examples/sparse_sharing_negative_transfer.py (Sun et al. 2020, sparse sharing against negative
transfer) at a reduced size: a 24-state HMM, sentences of 12 tokens, a BiLSTM of 24, 300 steps,
IMP in 3 rounds, no control run; three seeds, each a different random HMM.

What is asserted is what the experiment reproduces: hard sharing with the unrelated position task
lowers the main task's accuracy against single task, for every seed; sparse sharing (IMP masks
from mtlfast.pruning) removes most of that loss. The paper's stronger statement, that sparse
sharing loses nothing against single task, is not reproduced here (2-6 points below at this size
and budget; see the example's docstring): it is an expected failure, kept visible.

At this size (9 seeds checked while writing it): single - hard was 0.10-0.15 for every seed;
single - sparse 0.014-0.029 where IMP kept the main task's network dense and 0.061-0.064 where it
pruned it to 0.46 (seed 2 here); the auxiliary subnet was 10-21% of the weights, nested in the
main task's.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from examples import sparse_sharing_negative_transfer as E
from examples._common import one_intra_op_thread
from tests.conftest import DEVICE

SEEDS = (0, 1, 2)
STEPS = 300
SMALL = replace(E.Config(), states=24, vocab=60, length=12, embedding=16, hidden=24, dev_sentences=200,
                test_sentences=300, rounds=3, final_density=0.1, curve_points=1, control=False)

MARGIN = 0.05            # single - hard, every seed (measured 0.10-0.15)
SPARSE_ABOVE_HARD = 0.03  # sparse - hard, every seed (measured 0.04-0.11 over 9 seeds)
RECOVERED = 0.5          # mean fraction of hard sharing's loss that sparse sharing removes (0.77 here)
RESIDUAL = 0.05          # mean single - sparse (0.032 here); the paper's claim would be ~0.01


@pytest.fixture(scope="module")
def results():
    with one_intra_op_thread():   # tiny LSTM steps: threads only add synchronisation
        return {seed: E.run(steps=STEPS, seed=seed, device=DEVICE, config=SMALL) for seed in SEEDS}


def acc(f, setting):
    return f["main_accuracy"][setting]


def test_hard_sharing_lowers_the_main_task(results):
    gaps = {s: acc(f, "single") - acc(f, "hard") for s, f in results.items()}
    assert all(g >= MARGIN for g in gaps.values()), gaps
    assert all(f["expected"]["hard_below_single"] for f in results.values())


def test_the_auxiliary_task_is_learned(results):
    # the negative transfer is not an artefact of a task that was not trained
    for f in results.values():
        assert f["aux_accuracy"]["hard"] >= 0.95 and f["aux_accuracy"]["sparse"] >= 0.95, f["aux_accuracy"]
        assert f["aux_accuracy"]["single"] is None


def test_sparse_sharing_removes_most_of_the_negative_transfer(results):
    above = {s: acc(f, "sparse") - acc(f, "hard") for s, f in results.items()}
    assert all(a >= SPARSE_ABOVE_HARD for a in above.values()), above
    recovered = [f["recovered_fraction"] for f in results.values()]
    assert sum(recovered) / len(recovered) >= RECOVERED, recovered
    residual = [acc(f, "single") - acc(f, "sparse") for f in results.values()]
    assert sum(residual) / len(residual) <= RESIDUAL, residual


@pytest.mark.xfail(reason="not reproduced at this size and budget: sparse sharing stays 1-6 points below "
                          "single task (warm-up on the hard-shared network, pruning the main subnet, and "
                          "the weights the nested subnets share); see the example's docstring",
                   strict=False)
def test_sparse_sharing_matches_single_task(results):
    assert all(f["expected"]["sparse_not_below_single"] for f in results.values())


def test_densities_follow_the_imp_schedule(results):
    for f in results.values():
        for name in ("main", "aux"):
            rounds = f["imp"][name]
            assert [r["round"] for r in rounds] == list(range(SMALL.rounds + 1))
            assert rounds[0]["density"] == 1.0
            assert all(a["density"] > b["density"] for a, b in zip(rounds, rounds[1:]))
            assert rounds[-1]["density"] == pytest.approx(SMALL.final_density, abs=1e-3)
            # the chosen subnet is the best dev score, ties to the sparser (mtlfast.pruning.select_best)
            best = max(r["dev_accuracy"] for r in rounds)
            chosen = min(r["density"] for r in rounds if r["dev_accuracy"] == best)
            assert f["density"][name] == pytest.approx(chosen)
        assert f["density"]["aux"] < 1.0          # the position task never needs the whole network


def test_overlap(results):
    for f in results.values():
        d0, d1 = f["density"]["main"], f["density"]["aux"]
        assert 0.0 < f["overlap"] < 1.0
        assert f["overlap"] <= min(d0, d1) / max(d0, d1) + 1e-9       # |∩| <= the smaller subnet
        assert f["chance_overlap"] == pytest.approx(d0 * d1 / (d0 + d1 - d0 * d1))
        assert 0.0 < f["aux_inside_main"] <= 1.0 + 1e-9


def test_no_setting_beats_the_bayes_ceiling(results):
    # the forward-backward tags are the best any tagger can do (up to test-set noise)
    for f in results.values():
        assert 0.3 < f["bayes_accuracy"] <= 1.0
        for setting, a in f["main_accuracy"].items():
            assert a <= f["bayes_accuracy"] + 0.01, (setting, a, f["bayes_accuracy"])


def test_figures_summary_and_plot(results):
    f = results[SEEDS[0]]
    json.dumps(f)                                                     # JSON-serialisable
    assert all(isinstance(v, bool) for v in f["expected"].values())
    assert all(math.isfinite(a) for a in f["main_accuracy"].values())
    text = E.summary(f)
    for word in ("single task", "hard sharing", "sparse sharing", "overlap ratio", "density"):
        assert word in text
    assert len(text.splitlines()) <= 25                               # one screen
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = E.plot(f)
    assert len(figure.axes) == 3
    plt.close(figure)


def test_data_and_bayes_decoder():
    cfg = replace(SMALL, states=5, vocab=7, length=6)
    torch.manual_seed(0)
    hmm = E.make_hmm(cfg)
    assert torch.allclose(hmm.trans.sum(1), torch.ones(5, dtype=torch.float64))
    x, (z, pos) = E.sample(hmm, 200, cfg, torch.Generator().manual_seed(0))
    assert x.shape == z.shape == pos.shape == (200, 6)
    assert int(x.max()) < 7 and int(z.max()) < 5
    assert torch.equal(pos[3], torch.arange(6))
    capped = E.sample(hmm, 2, replace(cfg, position_cap=4), torch.Generator().manual_seed(0))[1][1]
    assert capped[0].tolist() == [0, 1, 2, 3, 3, 3]
    # forward-backward beats decoding each word alone (argmax_z p(z) p(x | z) with the marginal prior)
    bayes = (E.posterior_decode(hmm, x) == z).double().mean()
    prior = torch.bincount(z.flatten(), minlength=5).double()
    word_only = ((hmm.emit.T * prior).argmax(-1)[x] == z).double().mean()
    assert bayes >= word_only
