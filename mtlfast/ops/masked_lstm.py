"""Grouped masked LSTM layer: the op behind sparse sharing and sluice networks.

G groups run together in one call. Group g reads its own input x[g], uses the weight set
``weight_index[g]`` (one shared base set for sparse sharing, one per task for sluice networks)
with mask ``mask_index[g]`` (-1: unmasked), and runs forward or, when ``reverse[g]``, backward in
time within each sequence's length, like a packed sequence: padded steps leave the state alone and
output zeros. The directions of a bidirectional layer are groups too, so every task and both
directions of a layer run in the same launches.

- ``masked_lstm_layer_reference``: a per-group, per-step loop with autograd; the oracle.
- ``MASKED_LSTM_LAYER``: the op's one definition (definition.py): one orchestration (project every
  step and group with one masked GEMM, recur, and in backward one masked GEMM each for dW_ih,
  dW_hh and dx) over a backend's kernels (``MaskedLSTMKernels``): ``masked_lstm_cpu`` (batched
  BLAS + a native fused recurrence) or ``masked_lstm_triton`` (GPU). Everything stays in time order: the recurrences walk reverse groups backwards
  within each length themselves, so no sequence is ever reversed in memory.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, Tuple

import torch

from mtlfast import _checks
from mtlfast.ops import common
from mtlfast.ops.definition import FLOAT_DTYPES, TRITON_DTYPES, OpDefinition

OP = "masked_lstm_layer"


# ---------------------------------------------------------------------------------------------
# Shared pieces

def reverse_within_lengths(seq: torch.Tensor, lengths: torch.Tensor, reverse: torch.Tensor) -> torch.Tensor:
    """seq (G, T, B, ...) -> for groups with reverse[g], each row's first lengths[g, b] steps in
    reverse order (the rest left in place); other groups unchanged. Its own inverse."""
    G, T, B = seq.shape[:3]
    # Full rows: a plain flip instead of a gather. The check reads a value on the host, so it is
    # made only where that costs no device sync (CPU tensors) and not while torch.compile traces.
    if (lengths.device.type == "cpu" and not torch.compiler.is_compiling() and lengths.numel()
            and bool((lengths == T).all())):
        flipped = seq.flip(1)
        return torch.where(reverse.view(G, *([1] * (seq.dim() - 1))), flipped, seq)
    t = torch.arange(T, device=seq.device).view(1, T, 1)
    lens = lengths.view(G, 1, B)
    flip = reverse.view(G, 1, 1) & (t < lens)
    index = torch.where(flip, lens - 1 - t, t)
    index = index.view(G, T, B, *([1] * (seq.dim() - 3))).expand_as(seq)
    return torch.gather(seq, 1, index)


def _gate_step(pre: torch.Tensor, c: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    i, f, g, o = pre.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def masked_lstm_layer_reference(x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_index, masks_ih, masks_hh,
                                mask_index, lengths, reverse):
    """One LSTM layer for G groups, plain PyTorch (any device, autograd).

    Args:
        x: (G, T, B, I). h0, c0: (G, B, H). w_ih: (S, 4H, I); w_hh: (S, 4H, H); b_ih, b_hh: (S, 4H) or None.
        weight_index: (G,) int64 into S. masks_ih: (P, 4H, I) bool or None; masks_hh: (P, 4H, H) bool
        or None; mask_index: (G,) int64 into P, -1 for an unmasked group. lengths: (G, B) int64 (≤ T).
        reverse: (G,) bool.
    Returns:
        y (G, T, B, H) in x's dtype (zeros at padded steps), h_n and c_n (G, B, H). A weight outside
        its group's mask is selected away (never multiplied: an inf or NaN there changes nothing).
    """
    G, T, B = x.shape[:3]
    if G == 0 or T == 0:
        return x.new_zeros((G, T, B, h0.shape[-1])), h0.clone(), c0.clone()
    xs = reverse_within_lengths(x, lengths, reverse)
    outs, h_n, c_n = [], [], []
    for g in range(x.shape[0]):
        # tensor indexing, not host ints: the oracle also traces under torch.compile
        wi, mi = weight_index[g:g + 1], mask_index[g:g + 1]
        w_x, w_h = w_ih.index_select(0, wi)[0], w_hh.index_select(0, wi)[0]
        if masks_ih is not None:
            w_x = common.select(w_x, masks_ih.index_select(0, mi.clamp(min=0))[0] | (mi < 0))
        if masks_hh is not None:
            w_h = common.select(w_h, masks_hh.index_select(0, mi.clamp(min=0))[0] | (mi < 0))
        bias = 0
        if b_ih is not None:
            bias = b_ih.index_select(0, wi)[0] + b_hh.index_select(0, wi)[0]
        h, c = h0[g], c0[g]
        ys = []
        for s in range(x.shape[1]):
            h_new, c_new = _gate_step(xs[g, s] @ w_x.t() + h @ w_h.t() + bias, c)
            active = (lengths[g] > s).unsqueeze(-1)
            h, c = torch.where(active, h_new, h), torch.where(active, c_new, c)
            ys.append(torch.where(active, h_new, torch.zeros_like(h_new)))
        outs.append(torch.stack(ys))
        h_n.append(h)
        c_n.append(c)
    y = reverse_within_lengths(torch.stack(outs), lengths, reverse)
    return y, torch.stack(h_n), torch.stack(c_n)


# ---------------------------------------------------------------------------------------------
# The fast path: one orchestration over a backend's kernels

class Weights(Protocol):
    """A backend's prepared weight set for a layer's groups (what ``prepare`` returns): opaque to
    the orchestration, read by the backend's own kernels."""


class MaskedLSTMKernels(Protocol):
    """The kernel interface a backend's adapter (``ops/masked_lstm_<backend>.py``) implements.
    Shapes: G groups, S weight sets, T steps (every array in time order; reverse groups run
    backwards within each row's length), B batch rows, H hidden, R = T*B rows, gates in
    torch.nn.LSTM order (i, f, g, o); activations, state and gradients in the accumulation dtype
    (fp32; fp64 for fp64 inputs). What leaves the layer (y, h_n, c_n, and the gradients of x, h0,
    c0 and the parameters) may come back in the model's dtype instead, where a kernel writes it so
    (Triton: no conversion launch); whatever a kernel returns, the op definition hands autograd
    the inputs' dtypes."""

    def prepare(self, weight: torch.Tensor, weight_index: torch.Tensor, masks: Optional[torch.Tensor],
                mask_index: torch.Tensor) -> Weights:
        """weight (S, N, K), masks (P, N, K) bool or None, indices (G,) -> each group's masked weight."""

    def project(self, x: torch.Tensor, weights: Weights, b_ih: Optional[torch.Tensor],
                b_hh: Optional[torch.Tensor]) -> torch.Tensor:
        """x (G, R, K) -> (G, R, N) in the accumulation dtype: x @ W_mᵀ (+ b_ih + b_hh, each (S, N),
        the row of each group's weight set, summed in the accumulation dtype)."""

    def grad_input(self, dy: torch.Tensor, weights: Weights) -> torch.Tensor:
        """dy (G, R, N) -> (G, R, K) = dy @ W_m."""

    def grad_weight(self, dy: torch.Tensor, x: torch.Tensor, weights: Weights,
                    with_bias: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """-> ((G, N, K) = M ⊙ (dyᵀ @ x), exactly 0 outside each group's mask, in the accumulation
        dtype; (G, N) = Σ_r dy when with_bias, else None)."""

    def forward_recurrence(self, xproj: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, weights: Weights,
                           lengths: torch.Tensor, reverse: torch.Tensor, save: bool = True,
                           out_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, ...]:
        """xproj (G, T, B, 4H), h0 / c0 (G, B, H) in any float dtype -> hs (G, T, B, H) (0 at padded
        steps), h_n, c_n (G, B, H), in out_dtype; and for backward gates (G, T, B, 4H) activated,
        cells (G, T, B, H), h_prev (G, T, B, H) (the h that entered each step), in the accumulation
        dtype; a backend may return None for the last three when not ``save``."""

    def backward_recurrence(self, dhs: torch.Tensor, dh_n: torch.Tensor, dc_n: torch.Tensor, gates: torch.Tensor,
                            cells: torch.Tensor, c0: torch.Tensor, weights: Weights, lengths: torch.Tensor,
                            reverse: torch.Tensor,
                            out_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dhs, dh_n, dc_n, c0 in any float dtype -> dgates (G, T, B, 4H) w.r.t. the pre-activations
        (0 at padded steps) in the accumulation dtype, dh0, dc0 in out_dtype."""

    def sum_into_sets(self, grads: torch.Tensor, weight_index: torch.Tensor, num_sets: int,
                      out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """grads (G, ...) -> (S, ...) in out_dtype: out[s] = Σ_{g: weight_index[g] = s} grads[g],
        deterministic, a NaN in one set's groups kept out of the others."""


class _Args(NamedTuple):
    """The op's arguments by name (schema order)."""
    x: torch.Tensor
    h0: torch.Tensor
    c0: torch.Tensor
    w_ih: torch.Tensor
    w_hh: torch.Tensor
    b_ih: Optional[torch.Tensor]
    b_hh: Optional[torch.Tensor]
    weight_index: torch.Tensor
    masks_ih: Optional[torch.Tensor]
    masks_hh: Optional[torch.Tensor]
    mask_index: torch.Tensor
    lengths: torch.Tensor
    reverse: torch.Tensor


def _group_sum(k: "MaskedLSTMKernels", grads: torch.Tensor, weight_index: torch.Tensor, num_sets: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Per-group gradients (G, ...) summed into their weight sets (S, ...) in the parameters' dtype:
    a shared weight's gradient is Σ_t M_t ⊙ grad_t. Deterministic on every backend (no atomics)."""
    if common.is_identity_index(weight_index, num_sets):     # one set per group (sluice networks, CPU)
        return grads
    return k.sum_into_sets(grads, weight_index, num_sets, dtype)


def _prepare(k: MaskedLSTMKernels, a: _Args) -> Tuple[Weights, Weights]:
    return (k.prepare(a.w_ih, a.weight_index, a.masks_ih, a.mask_index),
            k.prepare(a.w_hh, a.weight_index, a.masks_hh, a.mask_index))


def _forward(k: MaskedLSTMKernels, args: tuple, save: bool):
    """-> (y, h_n, c_n), saved (h_prev, gates, cells), cache (prepared ih, hh): project every step and
    group with one masked GEMM (biases included), then one recurrence call that writes the outputs
    in x's dtype."""
    a = _Args(*args)
    G, T, B, _ = a.x.shape
    H = a.w_hh.shape[-1]
    ih, hh = _prepare(k, a)
    xproj = k.project(a.x.reshape(G, T * B, a.x.shape[-1]), ih, a.b_ih, a.b_hh).view(G, T, B, 4 * H)
    y, h_n, c_n, gates, cells, h_prev = k.forward_recurrence(xproj, a.h0, a.c0, hh, a.lengths, a.reverse, save,
                                                             out_dtype=a.x.dtype)
    return (y, h_n, c_n), (h_prev, gates, cells), (ih, hh)


def _backward(k: MaskedLSTMKernels, args: tuple, saved: tuple, cache, needs: tuple, grads: tuple):
    """One backward recurrence, then one masked GEMM each for dx, dW_ih (with the bias gradient)
    and dW_hh over every group, and the groups' sums into their weight sets."""
    a, need = _Args(*args), _Args(*needs)
    dy, dh_n, dc_n = grads
    h_prev, gates, cells = saved
    ih, hh = cache if cache is not None else _prepare(k, a)
    G, T, B, _ = a.x.shape
    H = a.w_hh.shape[-1]
    dgates, dh0, dc0 = k.backward_recurrence(dy, dh_n, dc_n, gates, cells, a.c0, hh, a.lengths, a.reverse,
                                             out_dtype=a.x.dtype)
    dg = dgates.reshape(G, T * B, 4 * H)    # rows at padded steps are 0: they add nothing below
    num_sets = a.w_ih.shape[0]
    dtype = a.w_ih.dtype
    need_bias = a.b_ih is not None and (need.b_ih or need.b_hh)
    dx = k.grad_input(dg, ih).view(G, T, B, -1) if need.x else None
    dw_ih = db = None
    if need.w_ih:
        dw_ih, db = k.grad_weight(dg, a.x.reshape(G, T * B, a.x.shape[-1]), ih, need_bias)
        dw_ih = _group_sum(k, dw_ih, a.weight_index, num_sets, dtype)
    elif need_bias:
        db = dgates.sum(dim=(1, 2))
    dw_hh = (_group_sum(k, k.grad_weight(dg, h_prev.reshape(G, T * B, H), hh)[0], a.weight_index, num_sets, dtype)
             if need.w_hh else None)
    db = _group_sum(k, db, a.weight_index, num_sets, dtype) if need_bias else None
    # b_ih and b_hh get the same gradient (the definition gives the second its own tensor)
    return (dx, dh0, dc0, dw_ih, dw_hh, db, db) + (None,) * 6


def _fake(args: tuple):
    a = _Args(*args)
    G, T, B, _ = a.x.shape
    H = a.w_hh.shape[-1]
    acc = common.accumulation_dtype(a.x.dtype)
    x = a.x
    return ((x.new_empty((G, T, B, H)), x.new_empty((G, B, H)), x.new_empty((G, B, H))),
            (x.new_empty((G, T, B, H), dtype=acc), x.new_empty((G, T, B, 4 * H), dtype=acc),
             x.new_empty((G, T, B, H), dtype=acc)))


MASKED_LSTM_LAYER = OpDefinition(
    OP, "(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
        "Tensor weight_index, Tensor? masks_ih, Tensor? masks_hh, Tensor mask_index, Tensor lengths, "
        "Tensor reverse)",
    reference=masked_lstm_layer_reference,
    adapters={"cpu": "mtlfast.ops.masked_lstm_cpu", "triton": "mtlfast.ops.masked_lstm_triton"},
    dtypes={"cpu": FLOAT_DTYPES, "triton": TRITON_DTYPES},
    forward=_forward, backward=_backward, fake=_fake, num_outputs=3, num_saved=3,
    no_kernel={"cuda": "no CUDA C++ kernel for masked_lstm_layer; the triton backend runs it on GPUs"})


# ---------------------------------------------------------------------------------------------
# Validation and the public entry point

def _validate(x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_index, masks_ih, masks_hh, mask_index, lengths, reverse):
    x = _checks.tensor(OP, "x", x, ndim=4, dtypes=_checks.FLOAT_DTYPES)
    G, T, B, I = x.shape
    w_ih = _checks.tensor(OP, "w_ih", w_ih, ndim=3, dtypes=(x.dtype,))
    S, H4 = w_ih.shape[:2]
    if H4 % 4:
        raise ValueError(f"{OP}: argument 'w_ih' must have 4*hidden rows, got shape {tuple(w_ih.shape)}")
    H = H4 // 4
    _checks.shape(OP, "w_ih", w_ih, (S, 4 * H, I), "(weight sets, 4*hidden, input size of x)")
    _checks.tensor(OP, "w_hh", w_hh, ndim=3, dtypes=(x.dtype,))
    _checks.shape(OP, "w_hh", w_hh, (S, 4 * H, H), "(weight sets, 4*hidden, hidden)")
    for name, value in (("h0", h0), ("c0", c0)):
        _checks.tensor(OP, name, value, ndim=3, dtypes=(x.dtype,))
        _checks.shape(OP, name, value, (G, B, H), "(groups, batch, hidden)")
    if (b_ih is None) != (b_hh is None):
        # one bias alone would be added by some paths and dropped by others, its gradient lost
        given, missing = ("b_ih", "b_hh") if b_hh is None else ("b_hh", "b_ih")
        raise ValueError(f"{OP}: argument '{missing}' must be given with '{given}' (both biases or neither, "
                         f"as torch.nn.LSTM's bias=True / False); got '{given}' alone")
    for name, value in (("b_ih", b_ih), ("b_hh", b_hh)):
        if value is not None:
            _checks.tensor(OP, name, value, dtypes=(x.dtype,))
            _checks.shape(OP, name, value, (S, 4 * H), "(weight sets, 4*hidden)")
    _checks.tensor(OP, "weight_index", weight_index, dtypes=(torch.int64,))
    _checks.shape(OP, "weight_index", weight_index, (G,), "one weight set per group")
    _checks.tensor(OP, "mask_index", mask_index, dtypes=(torch.int64,))
    _checks.shape(OP, "mask_index", mask_index, (G,), "one mask per group, -1 for none")
    for name, value, cols in (("masks_ih", masks_ih, I), ("masks_hh", masks_hh, H)):
        if value is not None:
            _checks.tensor(OP, name, value, ndim=3, dtypes=(torch.bool,))
            _checks.shape(OP, name, value, (value.shape[0], 4 * H, cols), "(masks, 4*hidden, columns)")
    _checks.tensor(OP, "lengths", lengths, dtypes=(torch.int64,))
    _checks.shape(OP, "lengths", lengths, (G, B), "(groups, batch)")
    _checks.tensor(OP, "reverse", reverse, dtypes=(torch.bool,))
    _checks.shape(OP, "reverse", reverse, (G,), "one direction flag per group")
    for name, value in (("h0", h0), ("c0", c0), ("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih),
                        ("b_hh", b_hh), ("weight_index", weight_index), ("masks_ih", masks_ih),
                        ("masks_hh", masks_hh), ("mask_index", mask_index), ("lengths", lengths),
                        ("reverse", reverse)):
        if value is not None:
            _checks.same_device(OP, "x", x, name, value)
    # Index ranges need host values: one read for all of them (a single device sync on a GPU),
    # and the detailed message only when something is out of range. Not while torch.compile
    # traces: the values are data, and reading them would break the graph.
    if torch.compiler.is_compiling():
        return
    num_masks = max((m.shape[0] for m in (masks_ih, masks_hh) if m is not None), default=0)
    ranges = [(name, t, low, high, text) for name, t, low, high, text in (
        ("weight_index", weight_index, 0, S - 1, f"[0, {S})"),
        ("mask_index", mask_index, -1, num_masks - 1, f"[-1, {num_masks})"),
        ("lengths", lengths, 0, T, f"[0, {T}] (T = x.shape[1])")) if t.numel()]
    if not ranges:
        return
    out_of_range = torch.stack([(t.min() < low) | (t.max() > high) for _, t, low, high, _ in ranges])
    if not bool(out_of_range.any()):
        return
    for (name, t, _, _, text), bad in zip(ranges, out_of_range.tolist()):
        if bad:
            raise ValueError(f"{OP}: argument '{name}' must be in {text}, got min {int(t.min())} "
                             f"and max {int(t.max())}")


@common.autocast("lower")
def masked_lstm_layer(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor,
                      w_hh: torch.Tensor, b_ih: Optional[torch.Tensor], b_hh: Optional[torch.Tensor],
                      weight_index: torch.Tensor, masks_ih: Optional[torch.Tensor],
                      masks_hh: Optional[torch.Tensor], mask_index: torch.Tensor, lengths: torch.Tensor,
                      reverse: torch.Tensor):
    """One LSTM layer for G groups (task x direction) at once: the op under SparseSharingLSTM and
    SluiceLSTM. Group g reads x[g], uses weight set ``weight_index[g]`` with mask ``mask_index[g]``
    (-1: unmasked) and, when ``reverse[g]``, runs backwards in time within each row's length (as a
    packed sequence: padded steps leave the state alone and output zeros). Gate order (i, f, g, o).

    Args:
        x: (G, T, B, I), float16/bfloat16/float32/float64.
        h0, c0: (G, B, H), x's dtype.
        w_ih: (S, 4H, I); w_hh: (S, 4H, H): S weight sets (1 shared set for sparse sharing, one per
            task for sluice networks), x's dtype.
        b_ih, b_hh: (S, 4H) or both None.
        weight_index: (G,) int64 in [0, S).
        masks_ih: (P, 4H, I) bool or None; masks_hh: (P, 4H, H) bool or None.
        mask_index: (G,) int64 in [-1, P).
        lengths: (G, B) int64 in [0, T].
        reverse: (G,) bool.
    Returns:
        y (G, T, B, H) (zeros at padded steps), h_n and c_n (G, B, H), in x's dtype; state and
        accumulation in fp32 (fp64 for fp64). Gradients of w_ih / w_hh are Σ over the groups using a
        weight set of mask ⊙ that group's gradient: exactly 0 outside every mask that uses it. A
        weight outside its group's mask never influences anything (not even an inf or NaN one).
        Under torch.autocast the floating inputs (unless float64) are cast to the autocast dtype
        first, as torch.nn.LSTM's are.
    """
    _validate(x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_index, masks_ih, masks_hh, mask_index, lengths, reverse)
    return run_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_index, masks_ih, masks_hh, mask_index, lengths,
                     reverse)


@common.autocast("lower")
def run_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_index, masks_ih, masks_hh, mask_index, lengths, reverse):
    """:func:`masked_lstm_layer` without its validation, for callers whose arguments are valid by
    construction (SparseSharingLSTM, SluiceLSTM, which validate once per forward): validation reads
    index ranges on the host, a device sync per layer on a GPU."""
    backend = MASKED_LSTM_LAYER.select(x)
    if backend == "reference" or not x.numel():
        return masked_lstm_layer_reference(x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_index, masks_ih,
                                           masks_hh, mask_index, lengths, reverse)
    return MASKED_LSTM_LAYER(backend, x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_index, masks_ih, masks_hh,
                             mask_index, lengths, reverse)
