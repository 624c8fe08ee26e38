"""One independent oracle per op reference (``mtlfast.ops.<family>.<op>_reference``), each written
differently from the reference it checks, so that a bug in a reference cannot hide behind the
kernels that are compared with it. tests/test_oracles.py compares every reference with its oracle
in float64 (outputs and every gradient); the other tests compare kernels with the references.

Plain PyTorch only, no mtlfast import: the benchmark tests (tests/test_bench_*.py), which check
bench/'s eager formulations without mtlfast's ops, use these too. The Gumbel oracles take the
noise the references draw (``mtlfast.ops.gumbel.logistic_noise`` / ``gumbel_noise`` for a seed)
as an argument: the noise stream itself is checked against Philox and ``tl.randint`` in
tests/test_triton_gumbel.py.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


# ---------------------------------------------------------------------------------------------
# sparse sharing

def masked_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A dense matmul on a copy of ``weight`` whose entries outside ``mask`` are set to 0 by
    indexing (the reference selects with a custom autograd Function and calls F.linear)."""
    dense = weight.clone()
    dense[~mask] = 0
    out = x @ dense.t()
    return out if bias is None else out + bias


def _flip_prefixes(seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """seq (T, B, ...): each column b's first lengths[b] steps in reverse order, one column at a time."""
    out = seq.clone()
    for b, n in enumerate(lengths.tolist()):
        out[:n, b] = seq[:n, b].flip(0)
    return out


def masked_lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_index, masks_ih, masks_hh, mask_index,
                      lengths, reverse):
    """``torch.nn.LSTM`` per group, its weights replaced (``torch.func.functional_call``, so gradients
    reach w_ih ... b_hh) by the group's weight set multiplied by its mask, padded rows through
    ``pack_padded_sequence``, a reversed group run on its rows flipped within their lengths. Same
    arguments and returns as ``masked_lstm_layer_reference``: (y (G, T, B, H), h_n, c_n)."""
    G, T, B, I = x.shape
    H = h0.shape[-1]
    bias = b_ih is not None
    lstm = torch.nn.LSTM(I, H, bias=bias).to(device=x.device, dtype=x.dtype)
    ys, hs, cs = [], [], []
    for g in range(G):
        wi, mi = int(weight_index[g]), int(mask_index[g])
        params = {"weight_ih_l0": w_ih[wi], "weight_hh_l0": w_hh[wi]}
        if mi >= 0 and masks_ih is not None:
            params["weight_ih_l0"] = params["weight_ih_l0"] * masks_ih[mi]
        if mi >= 0 and masks_hh is not None:
            params["weight_hh_l0"] = params["weight_hh_l0"] * masks_hh[mi]
        if bias:
            params.update(bias_ih_l0=b_ih[wi], bias_hh_l0=b_hh[wi])
        lens = lengths[g].cpu()
        backwards = bool(reverse[g])
        seq = _flip_prefixes(x[g], lens) if backwards else x[g]
        y = x.new_zeros(T, B, H)
        h_n, c_n = h0[g], c0[g]
        rows = torch.nonzero(lens > 0).flatten()
        if len(rows):
            packed = pack_padded_sequence(seq[:, rows], lens[rows], enforce_sorted=False)
            state = (h0[g][rows].unsqueeze(0), c0[g][rows].unsqueeze(0))
            out, (hh, cc) = functional_call(lstm, params, (packed, state))
            y = y.index_copy(1, rows.to(x.device), pad_packed_sequence(out, total_length=T)[0])
            h_n = h_n.index_copy(0, rows.to(x.device), hh[0])
            c_n = c_n.index_copy(0, rows.to(x.device), cc[0])
        ys.append(_flip_prefixes(y, lens) if backwards else y)
        hs.append(h_n)
        cs.append(c_n)
    if G == 0:
        return x.new_zeros(0, T, B, H), h0.clone(), c0.clone()
    return torch.stack(ys), torch.stack(hs), torch.stack(cs)


# ---------------------------------------------------------------------------------------------
# sluice networks

def alpha_mix(h: torch.Tensor, alpha: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    """The definition, chunk by chunk in a Python loop: out chunk m*S+s = Σ_j alpha[m*S+s, j] · chunk_j
    (the reference is one einsum over a reshaped view)."""
    S = num_subspaces
    M, d = h.shape[0], h.shape[-1] // S
    chunk = [h[m, ..., s * d:(s + 1) * d] for m in range(M) for s in range(S)]
    out = torch.zeros_like(h)
    for i in range(M * S):
        mixed = torch.zeros_like(chunk[i])
        for j in range(M * S):
            mixed = mixed + alpha[i, j] * chunk[j]
        out[i // S, ..., (i % S) * d:(i % S + 1) * d] = mixed
    return out


def layer_mix(layers: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """out[m] = Σ_k beta[m, k] · layers[k, m], a loop over the K layers (the reference is an einsum)."""
    K, M = layers.shape[:2]
    out = torch.zeros_like(layers[0]) if K else layers.new_zeros(layers.shape[1:])
    for k in range(K):
        out = out + beta[:, k].reshape(M, *([1] * (layers.dim() - 2))) * layers[k]
    return out


def orthogonality_penalty(weight: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    """Σ_{s<s'} ‖G_sᵀ G_s'‖²_F through the full Gram matrix P = W Wᵀ: ‖G_sᵀ G_s'‖²_F =
    trace(G_s G_sᵀ G_s' G_s'ᵀ) = ⟨P_ss, P_s's'⟩_F with P_ss the diagonal blocks of P (the reference
    multiplies the C x C products G_sᵀ G_s' block pair by block pair)."""
    S = num_subspaces
    r = weight.shape[0] // S
    gram = weight @ weight.t()
    diag = [gram[s * r:(s + 1) * r, s * r:(s + 1) * r] for s in range(S)]
    total = (weight * 0).sum()
    for s in range(S):
        for t in range(s + 1, S):
            total = total + (diag[s] * diag[t]).sum()
    return total


# ---------------------------------------------------------------------------------------------
# Gumbel-Matrix (noise: the float32 stream the references draw, for the same seed)

def _straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """hard's value exactly (soft - soft is 0), soft's gradient."""
    return hard + (soft - soft.detach())


def gumbel_sigmoid(logits: torch.Tensor, tau: float, hard: bool, logistic: torch.Tensor) -> torch.Tensor:
    """From the uniform u behind the logistic noise L = log u - log(1 - u) (u = sigmoid(L)): the hard
    sample is u > sigmoid(-logits) (the reference: logits + L > 0); the soft one is
    1 / (1 + exp(-(logits + L) / tau)); ``logistic`` is L, shaped like ``logits``."""
    noise = logistic.to(logits.dtype)
    soft = 1.0 / (1.0 + torch.exp(-(logits + noise) / tau))
    if not hard:
        return soft
    u = torch.sigmoid(noise)
    return _straight_through((u > torch.sigmoid(-logits)).to(logits.dtype), soft)


def gumbel_pairs(logits: torch.Tensor, tau: float, hard: bool, logistic: torch.Tensor) -> torch.Tensor:
    """Complementary pairs (..., 2) -> (...): a two-way softmax of (l0 + L, l1) / tau, component 0's
    share (the reference: the sigmoid of the difference); hard: component 0 wins, u > sigmoid(l1 - l0)."""
    noise = logistic.to(logits.dtype)
    both = torch.stack([logits[..., 0] + noise, logits[..., 1]], dim=-1)
    soft = torch.softmax(both / tau, dim=-1)[..., 0]
    if not hard:
        return soft
    u = torch.sigmoid(noise)
    return _straight_through((u > torch.sigmoid(logits[..., 1] - logits[..., 0])).to(logits.dtype), soft)


def gumbel_softmax(logits: torch.Tensor, tau: float, hard: bool, dim: int, gumbel: torch.Tensor) -> torch.Tensor:
    """torch.softmax((logits + g) / tau) along ``dim`` in place (no max subtracted, no movedim);
    hard: the one-hot of the argmax. ``gumbel`` is the noise in the layout the reference draws it,
    ``dim`` moved last."""
    g = gumbel.to(logits.dtype).movedim(-1, dim)
    soft = torch.softmax((logits + g) / tau, dim=dim)
    if not hard:
        return soft
    one_hot = torch.nn.functional.one_hot(soft.argmax(dim), soft.shape[dim]).movedim(-1, dim)
    return _straight_through(one_hot.to(logits.dtype), soft)


def allocation_combine(outputs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Σ_c z_c · outputs_c / max(1, Σ_c z_c), a loop over the components (the reference is a
    tensordot); at Σz = 1 the gradient reaches Σz, as through clamp(min=1)."""
    total = torch.zeros_like(outputs[0]) if len(z) else outputs.new_zeros(outputs.shape[1:])
    for c in range(len(z)):
        total = total + z[c] * outputs[c]
    s = z.sum()
    return total / (s if float(s.detach()) >= 1 else torch.ones_like(s))
