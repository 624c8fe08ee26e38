"""Every op's reference (``mtlfast.ops.<family>.<op>_reference``, the oracle of every backend's
tests) against its independent oracle (tests/oracles.py) in float64: outputs and the gradient of
every floating-point input, on a few shapes (odd sizes, one row, empty where the op allows)."""
from __future__ import annotations

import pytest
import torch

from mtlfast.ops import gumbel, masked_linear, masked_lstm, sluice
from tests import oracles
from tests.conftest import DEVICE
from tests.helpers import compare_with_reference

F64 = torch.float64


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=F64).requires_grad_()


def _flat(outputs) -> torch.Tensor:
    """A tuple of outputs as one vector, so that compare_with_reference checks all of them."""
    return torch.cat([t.reshape(-1) for t in outputs])


# ---------------------------------------------------------------------------------------------
# sparse sharing

@pytest.mark.parametrize("shape", [(6, 13, 9), (1, 1, 1), (2, 3, 5, 4)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_masked_linear(shape, bias):
    *lead, K, N = shape
    mask = torch.rand(N, K, device=DEVICE) < 0.5
    inputs = (randn(*lead, K), randn(N, K), mask, randn(N) if bias else None)
    compare_with_reference(masked_linear.masked_linear_reference, oracles.masked_linear, inputs, F64)


def _lstm_case(G=4, T=6, B=3, I=5, H=7, S=2, P=3, bias=True, masks=True, full=False):
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: (torch.randn(*s, generator=g, dtype=F64) / 2).to(DEVICE).requires_grad_()  # noqa: E731
    lengths = torch.full((G, B), T) if full else torch.randint(0, T + 1, (G, B), generator=g)
    return (rnd(G, T, B, I), rnd(G, B, H), rnd(G, B, H), rnd(S, 4 * H, I), rnd(S, 4 * H, H),
            rnd(S, 4 * H) if bias else None, rnd(S, 4 * H) if bias else None,
            torch.tensor([i % S for i in range(G)], device=DEVICE),
            (torch.rand(P, 4 * H, I, generator=g) < 0.6).to(DEVICE) if masks else None,
            (torch.rand(P, 4 * H, H, generator=g) < 0.6).to(DEVICE) if masks else None,
            torch.tensor([(i % (P + 1)) - 1 for i in range(G)], device=DEVICE),   # -1: an unmasked group
            lengths.to(DEVICE),
            torch.tensor([i % 2 == 1 for i in range(G)], device=DEVICE))          # odd groups reversed


@pytest.mark.parametrize("case", [
    dict(),                                         # padded rows (lengths 0 .. T), reverse, unmasked groups
    dict(G=2, T=1, B=1, I=3, H=1, S=1, P=1),        # length 1, batch 1, hidden 1
    dict(bias=False, masks=False, full=True),       # no bias, no masks, full lengths
], ids=["padded", "tiny", "nobias-nomask-full"])
def test_masked_lstm_layer(case):
    compare_with_reference(lambda *a: _flat(masked_lstm.masked_lstm_layer_reference(*a)),
                           lambda *a: _flat(oracles.masked_lstm_layer(*a)), _lstm_case(**case), F64)


# ---------------------------------------------------------------------------------------------
# sluice networks

# (M, S, middle dims, d): one task, cross-stitch (S = 1), three subspaces, one row
@pytest.mark.parametrize("shape", [(2, 2, (3, 5), 4), (3, 1, (7,), 5), (1, 3, (2, 3), 3), (2, 3, (1,), 33)],
                         ids=lambda s: f"M{s[0]}S{s[1]}")
def test_alpha_mix(shape):
    M, S, mid, d = shape
    compare_with_reference(lambda h, a: sluice.alpha_mix_reference(h, a, S), lambda h, a: oracles.alpha_mix(h, a, S),
                           (randn(M, *mid, S * d), randn(M * S, M * S)), F64)


@pytest.mark.parametrize("shape", [(3, 2, (4, 5), 6), (1, 3, (7,), 33), (2, 1, (1,), 1)],
                         ids=lambda s: f"K{s[0]}M{s[1]}")
def test_layer_mix(shape):
    K, M, mid, D = shape
    compare_with_reference(sluice.layer_mix_reference, oracles.layer_mix, (randn(K, M, *mid, D), randn(M, K)), F64)


# (R, C, S): rows per block above and below C, four blocks
@pytest.mark.parametrize("shape", [(6, 5, 2), (9, 4, 3), (20, 7, 4), (3, 11, 3)], ids=lambda s: "x".join(map(str, s)))
def test_orthogonality_penalty(shape):
    R, C, S = shape
    compare_with_reference(lambda w: sluice.orthogonality_penalty_reference(w, S),
                           lambda w: oracles.orthogonality_penalty(w, S), (randn(R, C),), F64)


def test_orthogonality_penalty_one_subspace_is_zero():
    w = randn(4, 3)
    assert sluice.orthogonality_penalty_reference(w, 1).item() == oracles.orthogonality_penalty(w, 1).item() == 0


# ---------------------------------------------------------------------------------------------
# Gumbel-Matrix: the references draw their noise from ``seed``; the oracles get the same noise

SEEDS = [0, 2 ** 40 + 3]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
@pytest.mark.parametrize("shape", [(3, 37), (1,), (2, 3, 4)], ids=lambda s: "x".join(map(str, s)))
def test_gumbel_sigmoid(shape, hard, seed):
    tau = 0.7
    logits = (torch.randn(*shape, device=DEVICE, dtype=F64) * 2).requires_grad_()
    noise = gumbel.logistic_noise(seed, logits.numel(), DEVICE).view(shape)
    compare_with_reference(lambda x: gumbel.gumbel_sigmoid_reference(x, tau, hard, seed),
                           lambda x: oracles.gumbel_sigmoid(x, tau, hard, noise), (logits,), F64)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
@pytest.mark.parametrize("shape", [(4, 9), (1,), (3, 2, 5)], ids=lambda s: "x".join(map(str, s)))
def test_gumbel_pairs(shape, hard, seed):
    tau = 0.5
    logits = randn(*shape, 2)
    noise = gumbel.logistic_noise(seed, logits.numel() // 2, DEVICE).view(shape)
    compare_with_reference(lambda x: gumbel.gumbel_pairs_reference(x, tau, hard, seed),
                           lambda x: oracles.gumbel_pairs(x, tau, hard, noise), (logits,), F64)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
@pytest.mark.parametrize("shape,dim", [((5, 7, 6), 1), ((4, 3), -1), ((1, 1), 0), ((2, 33), 1)],
                         ids=["5x7x6-dim1", "4x3", "1x1", "2x33"])
def test_gumbel_softmax(shape, dim, hard, seed):
    tau = 0.8
    logits = randn(*shape)
    moved = logits.movedim(dim, -1).shape
    noise = gumbel.gumbel_noise(seed, logits.numel(), DEVICE).view(moved)
    compare_with_reference(lambda x: gumbel.gumbel_softmax_reference(x, tau, hard, dim, seed),
                           lambda x: oracles.gumbel_softmax(x, tau, hard, dim, noise), (logits,), F64)


# z: a hard sample, nothing allocated (Σz = 0: divided by 1), one component (Σz = 1: the bound of
# max(1, Σz), where the gradient reaches Σz), soft values summing below and above 1
@pytest.mark.parametrize("z", [[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0], [0.1, 0.2, 0.05, 0.3], [0.9, 0.2, 0.7, 0.3]],
                         ids=["hard", "none", "one", "soft-small", "soft"])
@pytest.mark.parametrize("shape", [(3, 5), (1,), (2, 3, 4)], ids=lambda s: "x".join(map(str, s)))
def test_allocation_combine(shape, z):
    zt = torch.tensor(z, device=DEVICE, dtype=F64).requires_grad_()
    compare_with_reference(gumbel.allocation_combine_reference, oracles.allocation_combine,
                           (randn(len(z), *shape), zt), F64)

