"""examples/sparse_sharing_negative_transfer.py (Sun et al. 2020, sparse sharing against negative
transfer) at a reduced size: a 24-state HMM, sentences of 12 tokens, a BiLSTM of 24, 300 steps,
IMP in 3 rounds, no control run; five seeds, each a different random HMM.

What is asserted is what the experiment reproduces: hard sharing with the unrelated position task
lowers the main task's accuracy against single task, for every seed; sparse sharing (IMP masks
from mtlfast.pruning) removes most of that loss, and on most seeds comes within 3 points of single
task. The paper's statement, that sparse sharing loses nothing against single task, is not
reproduced (1-6 points below at this size and budget; examples/README.md says where the rest goes).

Measured per seed (main-task test accuracy single / hard / sparse; IMP's main-subnet density):

  seed  single  hard   sparse  single-hard  sparse-hard  single-sparse  recovered  main density
  0     0.653   0.550  0.639   0.103        0.089        0.014          0.87       1.00
  1     0.587   0.467  0.570   0.120        0.103        0.017          0.86       1.00
  2     0.547   0.399  0.483   0.147        0.084        0.064          0.57       0.46
  3     0.576   0.439  0.552   0.137        0.113        0.024          0.82       1.00
  4     0.593   0.489  0.566   0.104        0.077        0.027          0.74       1.00
  (5    not run here: 0.130, 0.108, 0.022, 0.83, 1.00)

identical to the third decimal with the default kernels (AVX-512 Xeon), ATEN_CPU_CAPABILITY=avx2
or =default (with MKL_ENABLE_INSTRUCTIONS=AVX2 / SSE4_2; seeds 0-5), the reference backend instead
of the native one (seeds 0-2) and 2 threads instead of 1 (seeds 0-1): these LSTM runs do not amplify summation-order differences. What
can flip is IMP's choice of the main subnet (dense, or pruned to 0.46), taken on dev accuracies 3-9
tokens apart (seeds 1, 2, 5); the residual single - sparse is 0.014-0.027 with the dense subnet
and 0.064 with the pruned one, so the assertions hold whichever IMP picks (RESIDUAL bounds every
seed, RECOVERED the mean: 0.77 here, ~0.57 if every main subnet were pruned; CLOSE a majority of
seeds within 0.03: 4 of 5 here, 3 if seed 1's main subnet were pruned too). Seeds 0-4 give the
figures above to the fourth decimal with ATEN_CPU_CAPABILITY=default and =avx2, each on 1 and 2
threads; seeds 5-7 (=default, 1 thread) give single - sparse 0.022, 0.064, 0.061 (5 of 8 seeds
within 0.03). The auxiliary subnet was 10-22% of the weights, nested in the main task's. The
fixture runs on one thread (the runs do not depend on it, and on a loaded 2-core machine a second
thread costs 3-10x).
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

SEEDS = (0, 1, 2, 3, 4)
STEPS = 300
SMALL = replace(E.Config(), states=24, vocab=60, length=12, embedding=16, hidden=24, dev_sentences=200,
                test_sentences=300, rounds=3, final_density=0.1, curve_points=1, control=False)

MARGIN = 0.05            # single - hard, every seed (measured 0.103-0.147, seeds 0-5)
SPARSE_ABOVE_HARD = 0.03  # sparse - hard, every seed (measured 0.077-0.113, seeds 0-5)
RECOVERED = 0.5          # mean fraction of hard sharing's loss that sparse sharing removes (0.77 here)
RESIDUAL = 0.08          # single - sparse, every seed (<= 0.027 dense main subnet, 0.064 pruned)
CLOSE = 0.03             # single - sparse, on most seeds (4 of 5 here; the paper's claim would be ~0.01)


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
    residual = {s: acc(f, "single") - acc(f, "sparse") for s, f in results.items()}
    assert all(r <= RESIDUAL for r in residual.values()), residual


def test_sparse_sharing_comes_close_to_single_task_on_most_seeds(results):
    # close where IMP keeps the main subnet dense; a pruned main subnet (seed 2) stays further below
    residual = {s: acc(f, "single") - acc(f, "sparse") for s, f in results.items()}
    assert sum(r <= CLOSE for r in residual.values()) > len(residual) / 2, residual


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
