"""mtlfast.pruning: magnitude pruning counts and choice (ties included), the rate schedule,
rewinding, round selection, mask overlap, bad arguments, and IMP end to end on a fake masked
model (plus one run on mtlfast.nn.SparseSharingLSTM)."""
from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mtlfast import pruning as P


class FakeMasked(nn.Module):
    """The masked-model protocol over two Linear layers: l1 (8x10 = 80 weights, bias) and l2
    (4x5 = 20 weights, bias). Masks are buffers of shape (num_tasks, *weight.shape)."""

    def __init__(self, num_tasks: int = 2, shapes=((8, 10), (4, 5)), bias_masks: bool = False):
        super().__init__()
        self.num_tasks = num_tasks
        self.l1 = nn.Linear(shapes[0][1], shapes[0][0])
        self.l2 = nn.Linear(shapes[1][1], shapes[1][0])
        self._maskable = ["l1.weight", "l2.weight"] + (["l1.bias", "l2.bias"] if bias_masks else [])
        params = dict(self.named_parameters())
        for name in self._maskable:
            self.register_buffer(self._buffer(name), torch.ones(num_tasks, *params[name].shape, dtype=torch.bool))

    @staticmethod
    def _buffer(name: str) -> str:
        return "mask_" + name.replace(".", "_")

    def masked_parameter_names(self) -> list[str]:
        return ["l1.weight", "l2.weight"]

    def get_mask(self, task: int, name: str) -> torch.Tensor:
        if name not in self._maskable:
            raise KeyError(name)
        return getattr(self, self._buffer(name))[task].clone()

    def set_mask(self, task: int, name: str, mask: torch.Tensor) -> None:
        getattr(self, self._buffer(name))[task] = mask

    def density(self, task: int) -> float:
        masks = [self.get_mask(task, n) for n in self.masked_parameter_names()]
        return sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)


NAMES = ["l1.weight", "l2.weight"]


def noisy_train(log=None, scale: float = 0.5):
    """A train_fn that moves the kept weights (masked 'gradients'); logs the weights it started from."""
    gen = torch.Generator().manual_seed(1)

    def train_fn(model, task, steps):
        if log is not None:
            log.append((task, steps, {k: v.clone() for k, v in model.state_dict().items()}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                mask = model.get_mask(task, name) if name in model.masked_parameter_names() else True
                p.add_(scale * torch.randn(p.shape, generator=gen) * mask)
    return train_fn


def scripted(scores):
    """An eval_fn returning scores[task][call index] in turn."""
    calls = {}

    def eval_fn(model, task):
        i = calls.get(task, 0)
        calls[task] = i + 1
        return scores[task][i] if isinstance(scores, dict) else scores[i]
    return eval_fn


def constant(model, task):
    return 0.0


def kept_per_name(rounds):
    return [{n: int(m.sum()) for n, m in r.masks.items()} for r in rounds]


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("mask_")}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- counts

def test_global_imp_keeps_the_expected_counts():
    model = FakeMasked()
    rounds = P.iterative_magnitude_pruning(model, 0, noisy_train(), constant, rate=0.2, rounds=3)
    assert [r.round for r in rounds] == [0, 1, 2, 3]
    assert [r.kept for r in rounds] == [100, 80, 64, 51]   # 100·0.2 = 20, 80·0.2 = 16, 64·0.2 = 12.8 → 13
    assert [r.density for r in rounds] == [1.0, 0.8, 0.64, 0.51]


def test_layer_imp_keeps_the_expected_counts_per_matrix():
    model = FakeMasked()
    rounds = P.iterative_magnitude_pruning(model, 1, noisy_train(), constant, rate=0.2, rounds=3, scope="layer")
    # l1: 80 → 64 → 51 (12.8 → 13) → 41 (10.2 → 10); l2: 20 → 16 → 13 (3.2 → 3) → 10 (2.6 → 3)
    assert kept_per_name(rounds) == [{"l1.weight": a, "l2.weight": b}
                                     for a, b in [(80, 20), (64, 16), (51, 13), (41, 10)]]


def test_magnitude_masks_repeated_matches_hand_counts():
    params = {"w": torch.randn(10, 10)}
    masks = {"w": torch.ones(10, 10, dtype=torch.bool)}
    counts = []
    for _ in range(3):
        masks = P.magnitude_masks(params, masks, 0.2)
        counts.append(int(masks["w"].sum()))
    assert counts == [80, 64, 51]


def test_min_density_stops_imp():
    rounds = P.iterative_magnitude_pruning(FakeMasked(), 0, noisy_train(), constant, rate=0.5, min_density=0.2)
    assert [r.kept for r in rounds] == [100, 50, 25, 12]   # 25·0.5 = 12.5 rounds half up → 13 removed


def test_imp_stops_when_a_round_would_remove_nothing():
    rounds = P.iterative_magnitude_pruning(FakeMasked(), 0, noisy_train(), constant, rate=0.1, min_density=0.0)
    kept = [r.kept for r in rounds]
    assert kept[-1] <= 4 < kept[-2]                         # round(0.1 · k) == 0 exactly when k <= 4
    assert all(a > b for a, b in zip(kept, kept[1:]))


# --------------------------------------------------------------------------- which weights

A = torch.tensor([[0.5, -0.1, 0.3], [0.1, -0.2, 0.0]])
B = torch.tensor([[0.1, 0.05]])
MA = torch.tensor([[True, True, True], [True, True, False]])   # a[1, 2] = 0.0 is already pruned
MB = torch.ones(1, 2, dtype=torch.bool)


def test_global_removes_the_smallest_with_ties_by_position():
    out = P.magnitude_masks({"a": A, "b": B}, {"a": MA, "b": MB}, 0.4)   # 7 kept, round(2.8) = 3 removed
    # 0.05 goes first, then two of the three 0.1 ties: a[0, 1] and a[1, 0] come before b[0, 0].
    assert out["a"].tolist() == [[True, False, True], [False, True, False]]
    assert out["b"].tolist() == [[True, False]]
    assert list(out) == ["a", "b"]


def test_tie_order_follows_dict_order():
    out = P.magnitude_masks({"b": B, "a": A}, {"b": MB, "a": MA}, 0.4)
    assert list(out) == ["b", "a"]
    assert out["b"].tolist() == [[False, False]]                          # b[0, 0] now comes first
    assert out["a"].tolist() == [[True, False, True], [True, True, False]]


def test_layer_scope_prunes_each_matrix_by_its_own_fraction():
    out = P.magnitude_masks({"a": A, "b": B}, {"a": MA, "b": MB}, 0.5, scope="layer")
    # a: 5 kept, round(2.5) = 3 removed (-0.1, 0.1, -0.2); b: 2 kept, 1 removed (0.05)
    assert out["a"].tolist() == [[True, False, True], [False, False, False]]
    assert out["b"].tolist() == [[True, False]]


def test_inputs_untouched_and_zero_fraction_is_identity():
    ma = MA.clone()
    out = P.magnitude_masks({"a": A}, {"a": ma}, 0.0)
    assert torch.equal(out["a"], MA) and out["a"] is not ma
    P.magnitude_masks({"a": A}, {"a": ma}, 0.5)
    assert torch.equal(ma, MA)


def test_half_precision_and_exact_rounding_of_decimal_fractions():
    params = {"w": torch.arange(1, 11, dtype=torch.float16).reshape(2, 5)}
    out = P.magnitude_masks(params, {"w": torch.ones(2, 5, dtype=torch.bool)}, 0.15)   # 1.5 → 2
    assert out["w"].flatten().tolist() == [False, False] + [True] * 8


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 30), st.floats(0.0, 0.99), st.sampled_from(P.SCOPES),
       st.integers(0, 2**31 - 1), st.booleans())
def test_never_unprunes_and_removes_the_smallest(n1, n2, fraction, scope, seed, coarse):
    gen = torch.Generator().manual_seed(seed)
    params = {"x": torch.randn(n1, generator=gen), "y": torch.randn(n2, 1, generator=gen)}
    if coarse:                                                       # many ties
        params = {k: (v * 2).round() / 2 for k, v in params.items()}
    masks = {k: torch.rand(v.shape, generator=gen) < 0.7 for k, v in params.items()}
    out = P.magnitude_masks(params, masks, fraction, scope=scope)
    units = [["x", "y"]] if scope == "global" else [["x"], ["y"]]
    for unit in units:
        kept = sum(int(masks[k].sum()) for k in unit)
        assert sum(int(out[k].sum()) for k in unit) == kept - math.floor(fraction * kept + 0.5 + 1e-9)
        removed = torch.cat([params[k][masks[k] & ~out[k]].abs() for k in unit])
        remaining = torch.cat([params[k][out[k]].abs() for k in unit])
        if removed.numel() and remaining.numel():
            assert removed.max() <= remaining.min()
    for k in params:
        assert not bool((out[k] & ~masks[k]).any())                  # never un-prunes


def test_imp_masks_are_nested():
    rounds = P.iterative_magnitude_pruning(FakeMasked(), 0, noisy_train(), constant, rate=0.3, rounds=4)
    for prev, cur in zip(rounds, rounds[1:]):
        for n in NAMES:
            assert not bool((cur.masks[n] & ~prev.masks[n]).any())
        assert cur.density < prev.density


# --------------------------------------------------------------------------- rate schedule

def test_prune_rate_values():
    assert P.prune_rate(0.512, 3) == pytest.approx(0.2)
    assert P.prune_rate(1.0, 4) == 0.0
    assert P.prune_rate(0.1, 1) == pytest.approx(0.9)


# (0.72, 15) and (0.74, 12): compounding the rounded per-round rate would end 2 weights off (70, 76).
@pytest.mark.parametrize("final_density,n", [(0.1, 3), (0.05, 7), (0.33, 10), (0.512, 3), (0.72, 15), (0.74, 12)])
def test_final_density_is_reached_within_one_weight(final_density, n):
    rounds = P.iterative_magnitude_pruning(FakeMasked(), 0, noisy_train(), constant,
                                           final_density=final_density, rounds=n)
    assert len(rounds) == n + 1
    assert rounds[-1].kept == round(final_density * 100)             # anchored schedule: no drift
    layer = P.iterative_magnitude_pruning(FakeMasked(), 0, noisy_train(), constant,
                                          final_density=final_density, rounds=n, scope="layer")
    for name, size in [("l1.weight", 80), ("l2.weight", 20)]:
        assert abs(int(layer[-1].masks[name].sum()) - final_density * size) <= 1
    if final_density == 0.512:
        assert [r.kept for r in rounds] == [100, 80, 64, 51]


def test_final_density_is_absolute_from_a_partial_mask():
    model = FakeMasked()
    start = torch.ones(8, 10, dtype=torch.bool)
    start[:, :5] = False                                             # 40 + 20 = 60 kept
    model.set_mask(0, "l1.weight", start)
    rounds = P.iterative_magnitude_pruning(model, 0, noisy_train(), constant, final_density=0.3, rounds=2)
    assert [r.kept for r in rounds] == [60, 42, 30]                  # 60·√0.5 = 42.4 → 42
    assert not bool((rounds[-1].masks["l1.weight"] & ~start).any())


# --------------------------------------------------------------------------- rewinding

def test_rewind_to_init_is_bit_exact_and_keeps_masks():
    model = FakeMasked()
    other = torch.rand(4, 5) < 0.5
    model.set_mask(1, "l2.weight", other)
    theta0 = weights(model)
    log = []
    rounds = P.iterative_magnitude_pruning(model, 0, noisy_train(log), scripted([0.1, 0.2, 0.9, 0.3]),
                                           rate=0.25, rounds=3, steps_per_round=7)
    assert len(log) == 4 and all(t == 0 and s == 7 for t, s, _ in log)
    for _, _, state in log:                                           # every round starts from θ0
        assert_same({k: v for k, v in state.items() if not k.startswith("mask_")}, theta0)
    assert_same(weights(model), theta0)                               # left rewound
    for n in NAMES:                                                   # selected mask persists
        assert torch.equal(model.get_mask(0, n), rounds[2].masks[n])
    assert model.density(0) == rounds[2].density
    assert torch.equal(model.get_mask(1, "l2.weight"), other)         # other task untouched


def test_rewind_to_a_given_state_dict():
    model = FakeMasked()
    warm = {k: v + 1.0 if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    model.set_mask(1, "l1.weight", torch.zeros(8, 10, dtype=torch.bool))   # warm's mask buffers are all True
    log = []
    P.iterative_magnitude_pruning(model, 0, noisy_train(log), constant, rate=0.5, rounds=2, rewind_to=warm)
    expected = {k: v for k, v in warm.items() if not k.startswith("mask_")}
    for _, _, state in log:
        assert_same({k: v for k, v in state.items() if not k.startswith("mask_")}, expected)
    assert_same(weights(model), expected)
    assert not bool(model.get_mask(1, "l1.weight").any())             # masks are not rewound


def test_names_with_a_bias_mask():
    model = FakeMasked(bias_masks=True)
    names = ["l1.weight", "l2.bias"]
    rounds = P.iterative_magnitude_pruning(model, 0, noisy_train(), constant, rate=0.5, rounds=1, names=names)
    assert list(rounds[0].masks) == names
    assert rounds[1].kept == 42                                       # (80 + 4) · 0.5
    assert rounds[1].density == 0.5
    assert bool(model.get_mask(0, "l2.weight").all())                # not named, not pruned


# --------------------------------------------------------------------------- selection

def make_rounds(scores, densities):
    return [P.PruningRound(i, d, s, {}) for i, (s, d) in enumerate(zip(scores, densities))]


def test_select_best_score_then_lowest_density():
    densities = [1.0, 0.8, 0.64, 0.51]
    assert P.select_best(make_rounds([0.5, 0.9, 0.7, 0.6], densities)).round == 1
    assert P.select_best(make_rounds([0.5, 0.7, 0.7, 0.6], densities)).round == 2
    assert P.select_best(make_rounds([0.5, 0.7, 0.69, 0.6], densities), atol=0.02).round == 2
    assert P.select_best(make_rounds([0.5, math.nan, 0.7, 0.6], densities)).round == 2
    assert P.select_best(make_rounds([math.nan] * 4, densities)).round == 3
    assert P.select_best(make_rounds([0.3, 0.3], [0.5, 0.5])).round == 0


# --------------------------------------------------------------------------- overlap

def b(rows):
    return torch.tensor(rows, dtype=torch.bool)


OVERLAP_MASKS = [
    {"w": b([[1, 1, 0], [1, 0, 1]]), "v": b([1, 0])},
    {"w": b([[1, 0, 0], [1, 1, 1]]), "v": b([1, 1])},
    {"w": b([[1, 1, 1], [0, 0, 1]]), "v": b([0, 0])},
]


def test_overlap_ratio_hand_computed():
    # kept 5, 6, 4; intersection {w00, w12} = 2; union = all 8 positions
    assert P.mask_overlap_ratio(OVERLAP_MASKS) == 0.25
    assert P.mask_overlap_ratio(OVERLAP_MASKS[:2]) == 4 / 7
    assert P.mask_overlap_ratio(OVERLAP_MASKS[:1]) == 1.0


def test_pairwise_overlap_hand_computed():
    out = P.pairwise_overlap(OVERLAP_MASKS)
    expected = torch.tensor([[1, 4 / 7, 3 / 6], [4 / 7, 1, 2 / 8], [3 / 6, 2 / 8, 1]], dtype=torch.float64)
    assert out.dtype == torch.float64 and out.device.type == "cpu"
    assert torch.allclose(out, expected, rtol=0, atol=1e-15)


def test_overlap_of_empty_masks_is_one():
    empty = {"w": torch.zeros(2, 3, dtype=torch.bool)}
    assert P.mask_overlap_ratio([empty, empty]) == 1.0
    out = P.pairwise_overlap([empty, {"w": OVERLAP_MASKS[0]["w"]}, empty])
    assert out.diagonal().tolist() == [1.0, 1.0, 1.0]
    assert out[0, 2] == 1.0 and out[0, 1] == 0.0


# --------------------------------------------------------------------------- bad arguments

def _imp(**kw):
    args = dict(model=FakeMasked(), task=0, train_fn=noisy_train(), eval_fn=constant, rate=0.2, rounds=2)
    args.update(kw)
    return lambda: P.iterative_magnitude_pruning(**args)


_P, _M = {"a": A}, {"a": MA}

BAD = [
    (lambda: P.magnitude_masks(_P, _M, 1.0), ValueError, "'fraction'"),
    (lambda: P.magnitude_masks(_P, _M, -0.1), ValueError, "'fraction'"),
    (lambda: P.magnitude_masks(_P, _M, "0.1"), TypeError, "'fraction'"),
    (lambda: P.magnitude_masks(_P, _M, 0.1, scope="row"), ValueError, "'scope'"),
    (lambda: P.magnitude_masks(_P, {"b": MA}, 0.1), ValueError, "'masks'"),
    (lambda: P.magnitude_masks(_P, {"a": MA.float()}, 0.1), TypeError, "'masks'"),
    (lambda: P.magnitude_masks(_P, {"a": MA.T}, 0.1), ValueError, "'masks'"),
    (lambda: P.magnitude_masks({"a": A.long()}, _M, 0.1), TypeError, "'params'"),
    (lambda: P.magnitude_masks({"a": A.clone().fill_(math.nan)}, _M, 0.1), ValueError, "'params'"),
    (lambda: P.prune_rate(0.0, 3), ValueError, "'final_density'"),
    (lambda: P.prune_rate(0.5, 0), ValueError, "'rounds'"),
    (lambda: P.prune_rate(0.5, 1.5), TypeError, "'rounds'"),
    (_imp(final_density=0.5), ValueError, "'final_density'"),
    (_imp(rate=None), ValueError, "'rate'"),
    (_imp(rate=None, final_density=0.5, rounds=None), ValueError, "'rounds'"),
    (_imp(rounds=None), ValueError, "'min_density'"),
    (_imp(rate=1.0), ValueError, "'rate'"),
    (_imp(rate=0.0), ValueError, "'rate'"),
    (_imp(min_density=1.0), ValueError, "'min_density'"),
    (_imp(min_density=-0.1), ValueError, "'min_density'"),
    (_imp(scope="neuron"), ValueError, "'scope'"),
    (_imp(names=["l3.weight"]), ValueError, "'names'"),
    (_imp(names=["l1.bias"]), ValueError, "'names'"),
    (_imp(names="l1.weight"), TypeError, "'names'"),
    (_imp(names=[]), ValueError, "'names'"),
    (_imp(task=2), ValueError, "'task'"),
    (_imp(task=0.0), TypeError, "'task'"),
    (_imp(rewind_to="start"), ValueError, "'rewind_to'"),
    (_imp(rewind_to={"l9.weight": torch.zeros(1)}), ValueError, "'rewind_to'"),
    (_imp(rewind_to=[1]), TypeError, "'rewind_to'"),
    (_imp(steps_per_round=-1), ValueError, "'steps_per_round'"),
    (_imp(train_fn=None), TypeError, "'train_fn'"),
    (_imp(eval_fn=lambda m, t: "good"), TypeError, "'eval_fn'"),
    (_imp(model=nn.Linear(2, 2)), TypeError, "'model'"),
    (_imp(rate=None, final_density=1.0), ValueError, "'final_density'"),
    (lambda: P.mask_overlap_ratio([]), ValueError, "'masks'"),
    (lambda: P.mask_overlap_ratio({"w": MA}), TypeError, "'masks'"),
    (lambda: P.pairwise_overlap([{"w": MA}, {"v": MA}]), ValueError, "'masks[1]'"),
    (lambda: P.pairwise_overlap([{"w": MA}, {"w": MA[:1]}]), ValueError, "'masks[1]'"),
    (lambda: P.select_best([]), ValueError, "'rounds'"),
    (lambda: P.sparse_sharing_masks(FakeMasked(), noisy_train(), constant, rate=0.2, rounds=1, tasks=[0, 0]),
     ValueError, "'tasks'"),
    (lambda: P.sparse_sharing_masks(FakeMasked(), noisy_train(), constant, rate=0.2, rounds=1, warmup_fn=3),
     TypeError, "'warmup_fn'"),
]


@pytest.mark.parametrize("call,exc,name", BAD, ids=[f"{i}-{n}" for i, (_, _, n) in enumerate(BAD)])
def test_bad_arguments_name_the_argument(call, exc, name):
    with pytest.raises(exc, match=re.escape(name)):
        call()


def test_final_density_above_a_partial_start_is_rejected():
    model = FakeMasked()
    model.set_mask(0, "l1.weight", torch.zeros(8, 10, dtype=torch.bool))   # density 0.2
    with pytest.raises(ValueError, match="'final_density'"):
        P.iterative_magnitude_pruning(model, 0, noisy_train(), constant, final_density=0.3, rounds=2)


def test_arguments_are_checked_before_the_warmup():
    calls = []
    with pytest.raises(ValueError, match="'scope'"):
        P.sparse_sharing_masks(FakeMasked(), noisy_train(), constant, warmup_fn=calls.append,
                               rate=0.2, rounds=1, scope="x")
    assert calls == []


# --------------------------------------------------------------------------- end to end

def test_sparse_sharing_end_to_end():
    model = FakeMasked(num_tasks=3)
    model.set_mask(2, "l1.weight", torch.zeros(8, 10, dtype=torch.bool))   # reset to full before warm-up
    seen = {}

    def warmup(m):
        seen["density"] = [m.density(t) for t in range(m.num_tasks)]
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1.0)

    before = weights(model)
    scores = {0: [0.5, 0.6, 0.9, 0.7, 0.2], 1: [0.4, 0.4, 0.3, 0.1, 0.0]}
    result = P.sparse_sharing_masks(model, noisy_train(), scripted(scores), warmup_fn=warmup,
                                    tasks=[0, 1], rate=0.3, rounds=4)
    assert seen["density"] == [1.0, 1.0, 1.0]
    assert list(result) == [0, 1]
    for t, rounds in result.items():
        assert [r.round for r in rounds] == [0, 1, 2, 3, 4]
        assert [r.score for r in rounds] == scores[t]
        assert [r.kept for r in rounds] == [100, 70, 49, 34, 24]   # 14.7 → 15, 10.2 → 10
        assert all(a.density > b.density for a, b in zip(rounds, rounds[1:]))
    chosen = {0: result[0][2], 1: result[1][1]}                   # best; tie 0.4 → lower density
    for t, best in chosen.items():
        assert P.select_best(result[t]) is best
        for n in NAMES:
            assert torch.equal(model.get_mask(t, n), best.masks[n])
    assert model.density(2) == 1.0                                # not searched: left full
    assert_same(weights(model), {k: v + 1.0 for k, v in before.items()})   # warm-up weights
    masks = [P.get_task_masks(model, t) for t in range(2)]
    ratio = P.mask_overlap_ratio(masks)
    assert 0.0 < ratio <= 0.49 / 0.7                              # |∩| ≤ 49, |∪| ≥ 70
    assert P.pairwise_overlap(masks)[0, 1].item() == pytest.approx(ratio)


def test_sparse_sharing_lstm():
    mnn = pytest.importorskip("mtlfast.nn")
    model = mnn.SparseSharingLSTM(input_size=5, hidden_size=4, num_tasks=2, bidirectional=True)
    names = list(model.masked_parameter_names())
    params = dict(model.named_parameters())
    assert names and all("weight" in n for n in names)
    total = sum(params[n].numel() for n in names)                  # 2 directions · (16·5 + 16·4) = 288
    theta0 = {k: v.clone() for k, v in params.items()}
    rounds = P.iterative_magnitude_pruning(model, 0, noisy_train(), scripted([0.1, 0.5, 0.3]),
                                           rate=0.5, rounds=2)
    assert [r.kept for r in rounds] == [total, total // 2, total // 4]
    for n in names:
        assert torch.equal(model.get_mask(0, n).cpu(), rounds[1].masks[n])
        assert bool(model.get_mask(1, n).all())
    assert model.density(0) == pytest.approx(0.5)
    for k, v in model.named_parameters():
        assert torch.equal(v, theta0[k]), k
