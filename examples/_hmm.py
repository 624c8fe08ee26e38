"""The hidden Markov model behind the tagging examples: its parameters and the forward-backward
posterior, whose argmax is the Bayes-optimal tagger (the accuracy ceiling the examples report).
Each example draws its own random HMM and sentences (their committed figures pin those streams)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HMM:
    start: torch.Tensor   # (K,): p(z_1)
    trans: torch.Tensor   # (K, K): row k is p(z_t | z_{t-1} = k)
    emit: torch.Tensor    # (K, V): row k is p(x_t | z_t = k)


def posterior(hmm: HMM, tokens: torch.Tensor) -> torch.Tensor:
    """p(z_t | x_1..x_L) by forward-backward, normalised at every step: tokens (n, L) -> (n, L, K)."""
    e = hmm.emit[:, tokens].permute(1, 2, 0)                    # (n, L, K): p(x_t | z_t = k)
    n, L, K = e.shape
    fwd, bwd = torch.empty(n, L, K, dtype=e.dtype), torch.ones(n, L, K, dtype=e.dtype)
    fwd[:, 0] = hmm.start * e[:, 0]
    fwd[:, 0] /= fwd[:, 0].sum(-1, keepdim=True)
    for t in range(1, L):
        fwd[:, t] = (fwd[:, t - 1] @ hmm.trans) * e[:, t]
        fwd[:, t] /= fwd[:, t].sum(-1, keepdim=True)
    for t in range(L - 2, -1, -1):
        bwd[:, t] = (bwd[:, t + 1] * e[:, t + 1]) @ hmm.trans.T
        bwd[:, t] /= bwd[:, t].sum(-1, keepdim=True)
    post = fwd * bwd
    return post / post.sum(-1, keepdim=True)
