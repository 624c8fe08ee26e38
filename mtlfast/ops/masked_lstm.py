"""Grouped masked LSTM layer: the op behind sparse sharing (and, later, sluice networks).

G groups run together in one call. Group g reads its own input x[g], uses the weight set
``weight_index[g]`` (one shared base set for sparse sharing, one per task for sluice networks)
with mask ``mask_index[g]`` (-1: unmasked), and runs forward or, when ``reverse[g]``, backward in
time within each sequence's length, like a packed sequence: padded steps leave the state alone and
output zeros. The directions of a bidirectional layer are groups too, so every task and both
directions of a layer run in the same launches.

- ``masked_lstm_layer_reference``: a per-group, per-step loop with autograd; the oracle.
- Fast paths: one orchestration (``_MaskedLSTMLayer``: project every step and group with one
  masked GEMM, recur, and in backward one masked GEMM each for dW_ih, dW_hh and dx) over a
  backend's kernels: ``masked_lstm_cpu`` (batched BLAS + a native fused recurrence; CPU) or
  Triton (GPU). Everything stays in time order: the recurrences walk reverse groups backwards
  within each length themselves, so no sequence is ever reversed in memory.
"""
from __future__ import annotations

import importlib
from typing import List, Optional, Tuple

import torch

from mtlfast import _checks, backends
from mtlfast.ops import common

OP = "masked_lstm"


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

_KERNEL_MODULES = {"cpu": "mtlfast.ops.masked_lstm_cpu", "triton": "mtlfast.ops.masked_lstm_triton"}


def _kernels(backend: str):
    return importlib.import_module(_KERNEL_MODULES[backend])


def _group_sum(grads: torch.Tensor, weight_index: torch.Tensor, num_sets: int) -> torch.Tensor:
    """Per-group gradients (G, ...) summed into their weight sets (S, ...): a shared weight's
    gradient is Σ_t M_t ⊙ grad_t."""
    out = grads.new_zeros((num_sets, *grads.shape[1:]))
    return out.index_add_(0, weight_index, grads)


def _layer_forward(backend, x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_index, masks_ih, masks_hh, mask_index,
                   lengths, reverse, save=True):
    """-> (y, h_n, c_n) and what backward needs: (h_prev, gates, cells, prepared ih, prepared hh);
    a backend may skip storing h_prev, gates and cells (None) when not ``save``."""
    k = _kernels(backend)
    G, T, B, _ = x.shape
    H = w_hh.shape[-1]
    ih = k.prepare(w_ih, weight_index, masks_ih, mask_index)
    hh = k.prepare(w_hh, weight_index, masks_hh, mask_index)
    acc = common.accumulation_dtype(x.dtype)  # state and accumulation
    bias = (b_ih + b_hh).to(acc).index_select(0, weight_index) if b_ih is not None else None
    xproj = k.project(x.reshape(G, T * B, x.shape[-1]), ih, bias).view(G, T, B, 4 * H)
    y, h_n, c_n, gates, cells, h_prev = k.forward_recurrence(xproj, h0.to(acc), c0.to(acc), hh, lengths, reverse,
                                                             save)
    return (y.to(x.dtype), h_n.to(x.dtype), c_n.to(x.dtype)), (h_prev, gates, cells, ih, hh)


def _layer_backward(backend, need, dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, weight_index, mask_index, lengths,
                    reverse, h_prev, gates, cells, ih, hh, has_bias):
    """need = (x, h0, c0, w_ih, w_hh, bias) flags -> (dx, dh0, dc0, dw_ih, dw_hh, dbias), None where
    not needed."""
    k = _kernels(backend)
    G, T, B, _ = x.shape
    H = w_hh.shape[-1]
    acc = gates.dtype
    dgates, dh0, dc0 = k.backward_recurrence(dy.to(acc), dh_n.to(acc), dc_n.to(acc), gates, cells, c0.to(acc), hh,
                                             lengths, reverse)
    dg = dgates.reshape(G, T * B, 4 * H)    # rows at padded steps are 0: they add nothing below
    dx = dw_ih = dw_hh = db = None
    if need[0]:
        dx = k.grad_input(dg, ih).view(G, T, B, -1).to(x.dtype)
    if need[3]:
        dw_ih = _group_sum(k.grad_weight(dg, x.reshape(G, T * B, x.shape[-1]), ih), weight_index,
                           w_ih.shape[0]).to(w_ih.dtype)
    if need[4]:
        dw_hh = _group_sum(k.grad_weight(dg, h_prev.reshape(G, T * B, H), hh), weight_index,
                           w_hh.shape[0]).to(w_hh.dtype)
    if has_bias and need[5]:
        db = _group_sum(dgates.sum(dim=(1, 2)), weight_index, w_ih.shape[0]).to(w_ih.dtype)
    return (dx, dh0.to(h0.dtype) if need[1] else None, dc0.to(c0.dtype) if need[2] else None, dw_ih, dw_hh, db)


def _two_bias_grads(db: Optional[torch.Tensor], need_ih: bool, need_hh: bool):
    """b_ih and b_hh get the same gradient, but never the same tensor: autograd may keep a
    returned gradient as ``.grad`` itself, and two parameters sharing one ``.grad`` would each
    add every later accumulation twice."""
    if db is None:
        return None, None
    return (db if need_ih else None), (db.clone() if need_ih and need_hh else db if need_hh else None)


class _MaskedLSTMLayer(torch.autograd.Function):
    """The eager path (a custom op costs ~60 µs more host time per call; see masked_linear)."""

    @staticmethod
    def forward(ctx, backend, x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_index, masks_ih, masks_hh,
                mask_index, lengths, reverse):
        out, (h_prev, gates, cells, ih, hh) = _layer_forward(backend, x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                             weight_index, masks_ih, masks_hh, mask_index,
                                                             lengths, reverse, save=any(ctx.needs_input_grad))
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_index, masks_ih, masks_hh, mask_index,
                              lengths, reverse, h_prev, gates, cells)
        ctx.backend, ctx.ih, ctx.hh, ctx.has_bias = backend, ih, hh, b_ih is not None
        return out

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        saved = ctx.saved_tensors
        n = ctx.needs_input_grad
        if common.differentiable_backward(dy, dh_n, dc_n):     # create_graph=True: differentiate the reference instead
            return (None, *common.reference_grads(masked_lstm_layer_reference, saved[:13], n[1:], (dy, dh_n, dc_n)))
        x, h0, c0, w_ih, w_hh, _, _, weight_index, _, _, mask_index, lengths, reverse, h_prev, gates, cells = saved
        dx, dh0, dc0, dw_ih, dw_hh, db = _layer_backward(
            ctx.backend, (n[1], n[2], n[3], n[4], n[5], n[6] or n[7]), dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh,
            weight_index, mask_index, lengths, reverse, h_prev, gates, cells, ctx.ih, ctx.hh, ctx.has_bias)
        db_ih, db_hh = _two_bias_grads(db, n[6], n[7])
        return (None, dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# The custom ops torch.compile sees (one opaque node each, fake kernels, autograd)

@torch.library.custom_op("mtlfast::masked_lstm_layer", mutates_args=())
def _layer_op(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
              b_ih: Optional[torch.Tensor], b_hh: Optional[torch.Tensor], weight_index: torch.Tensor,
              masks_ih: Optional[torch.Tensor], masks_hh: Optional[torch.Tensor], mask_index: torch.Tensor,
              lengths: torch.Tensor, reverse: torch.Tensor, backend: str
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (y, h_n, c_n) and, for backward, (h_prev, gates, cells); all fresh and contiguous. Masks are
    bool; a backend that reads them packed packs them inside, on every call."""
    out, (h_prev, gates, cells, _, _) = _layer_forward(backend, x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_index,
                                                       masks_ih, masks_hh, mask_index, lengths, reverse)
    return tuple(t.contiguous() for t in (*out, h_prev, gates, cells))


@_layer_op.register_fake
def _layer_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_index, masks_ih, masks_hh, mask_index, lengths,
                reverse, backend):
    G, T, B, _ = x.shape
    H = w_hh.shape[-1]
    acc = common.accumulation_dtype(x.dtype)
    return (x.new_empty((G, T, B, H)), x.new_empty((G, B, H)), x.new_empty((G, B, H)),
            x.new_empty((G, T, B, H), dtype=acc), x.new_empty((G, T, B, 4 * H), dtype=acc),
            x.new_empty((G, T, B, H), dtype=acc))


@torch.library.custom_op("mtlfast::masked_lstm_layer_backward", mutates_args=())
def _layer_backward_op(dy: torch.Tensor, dh_n: torch.Tensor, dc_n: torch.Tensor, x: torch.Tensor,
                       h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                       weight_index: torch.Tensor, masks_ih: Optional[torch.Tensor],
                       masks_hh: Optional[torch.Tensor], mask_index: torch.Tensor, lengths: torch.Tensor,
                       reverse: torch.Tensor, h_prev: torch.Tensor, gates: torch.Tensor, cells: torch.Tensor,
                       has_bias: bool, backend: str) -> List[torch.Tensor]:
    """-> [dx, dh0, dc0, dw_ih, dw_hh, dbias]; dbias is empty (0,) without biases."""
    k = _kernels(backend)
    ih = k.prepare(w_ih, weight_index, masks_ih, mask_index)
    hh = k.prepare(w_hh, weight_index, masks_hh, mask_index)
    grads = _layer_backward(backend, (True,) * 6, dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, weight_index, mask_index,
                            lengths, reverse, h_prev, gates, cells, ih, hh, has_bias)
    return [g.contiguous() if g is not None else w_ih.new_empty((0,)) for g in grads]


@_layer_backward_op.register_fake
def _layer_backward_fake(dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, weight_index, masks_ih, masks_hh, mask_index,
                         lengths, reverse, h_prev, gates, cells, has_bias, backend):
    return [x.new_empty(x.shape), h0.new_empty(h0.shape), c0.new_empty(c0.shape), w_ih.new_empty(w_ih.shape),
            w_hh.new_empty(w_hh.shape), w_ih.new_empty((w_ih.shape[0], w_ih.shape[1]) if has_bias else (0,))]


def _layer_setup_context(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_index, masks_ih, masks_hh, mask_index, lengths, reverse, backend = inputs
    _, _, _, h_prev, gates, cells = output
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, weight_index, masks_ih, masks_hh, mask_index, lengths, reverse,
                          h_prev, gates, cells)
    ctx.backend, ctx.has_bias = backend, b_ih is not None


def _layer_autograd(ctx, dy, dh_n, dc_n, *unused):
    x, h0, c0, w_ih, w_hh, weight_index, masks_ih, masks_hh, mask_index, lengths, reverse, h_prev, gates, cells = \
        ctx.saved_tensors
    dx, dh0, dc0, dw_ih, dw_hh, db = torch.ops.mtlfast.masked_lstm_layer_backward(
        dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, weight_index, masks_ih, masks_hh, mask_index, lengths, reverse,
        h_prev, gates, cells, ctx.has_bias, ctx.backend)
    db_ih, db_hh = _two_bias_grads(db if ctx.has_bias else None, ctx.needs_input_grad[5], ctx.needs_input_grad[6])
    return (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, None, None, None, None, None, None, None)


_layer_op.register_autograd(_layer_autograd, setup_context=_layer_setup_context)


# ---------------------------------------------------------------------------------------------
# Dispatch and the public entry point

DISPATCH = backends.register_op(backends.Op(
    OP, device_of=lambda x, *rest: x.device, selection_key=lambda x, *rest: (x.device, x.dtype),
    # The batched-PyTorch path wins on CPU over the reference's per-group loop.
    preference={"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}))

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@DISPATCH.supports("reference")
def _reference_supports(x, *rest) -> backends.Reason:
    return None


@DISPATCH.supports("cpu")
def _cpu_supports(x, *rest) -> backends.Reason:
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return f"the cpu masked_lstm takes floating point input, got {x.dtype}"
    return None


@DISPATCH.supports("triton")
def _triton_supports(x, *rest) -> backends.Reason:
    if x.dtype not in _TRITON_DTYPES:
        return f"triton masked_lstm takes float16, bfloat16 or float32, got {x.dtype}"
    try:
        _kernels("triton")
    except ImportError as exc:
        return f"the Triton masked_lstm kernels are not available ({exc})"
    return None


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
    """One LSTM layer for G groups at once; arguments and returns as
    :func:`masked_lstm_layer_reference`. Gradients of w_ih / w_hh are Σ over the groups using
    a weight set of mask ⊙ that group's gradient. Under torch.autocast the floating inputs (unless
    float64) are cast to the autocast dtype first, as torch.nn.LSTM's are."""
    _validate(x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_index, masks_ih, masks_hh, mask_index, lengths, reverse)
    return run_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_index, masks_ih, masks_hh, mask_index, lengths,
                     reverse)


@common.autocast("lower")
def run_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_index, masks_ih, masks_hh, mask_index, lengths, reverse):
    """:func:`masked_lstm_layer` without its validation, for callers whose arguments are valid by
    construction (SparseSharingLSTM, SluiceLSTM, which validate once per forward): validation reads
    index ranges on the host, a device sync per layer on a GPU."""
    backend = DISPATCH.select(x)
    if backend == "reference" or common.transforms_active() or not x.numel():
        return masked_lstm_layer_reference(x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_index, masks_ih,
                                           masks_hh, mask_index, lengths, reverse)
    if torch.compiler.is_compiling():
        return torch.ops.mtlfast.masked_lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_index, masks_ih,
                                                   masks_hh, mask_index, lengths, reverse, backend)[:3]
    return _MaskedLSTMLayer.apply(backend, x, h0, c0, w_ih, w_hh, b_ih, b_hh, weight_index, masks_ih,
                                  masks_hh, mask_index, lengths, reverse)
