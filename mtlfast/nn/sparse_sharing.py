"""SparseSharingLSTM: a drop-in torch.nn.LSTM whose tasks each run a binary-masked subnet of it.

Sparse sharing (Sun et al. 2020): task t uses weights M_t ⊙ θ of one shared base LSTM; the shared
weight's gradient is Σ_t M_t ⊙ grad_t. Every task, and both directions, of a layer run as groups of
one grouped masked LSTM call (mtlfast.ops.masked_lstm), so the base weights are read once per layer.

Drop-in means: nn.LSTM's constructor (positional order, checks, exception types and messages),
parameters (names, shapes, registration order, so the same seed gives the same weights), state
dict keys (plus the masks), attributes, forward signature, return types and errors. With
``num_tasks=1`` and ``task`` left out, a model built on this class runs what nn.LSTM runs.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from mtlfast import _checks
from mtlfast._checks import ArgumentError, ArgumentTypeError, UnsupportedError
from mtlfast.ops.common import select
from mtlfast.ops.masked_lstm import run_layer

Input = Union[torch.Tensor, PackedSequence]
Task = Union[None, int, str, torch.Tensor]
ALL_TASKS = "all"


class SparseSharingLSTM(nn.Module):
    """torch.nn.LSTM with one bool mask per task per weight matrix.

    Args: those of torch.nn.LSTM, in its order (``proj_size > 0`` is not supported and raises),
    plus the keyword-only ``num_tasks``.

    Parameters are named, shaped and initialised exactly as torch.nn.LSTM's (``weight_ih_l0``,
    ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``, ``..._reverse``), so the same seed gives the same
    weights and state dicts load both ways (an nn.LSTM loads ours with ``strict=False``: our extra
    keys are the masks). Masks are bool buffers ``mask_ih_l{k}`` / ``mask_hh_l{k}`` of shape
    (directions * num_tasks, 4*hidden, in): row ``d * num_tasks + t`` is task t's mask of direction d.
    All True at start (= hard sharing), and again after :meth:`reset_parameters`, which resets the
    masks with the weights as BatchNorm's resets its running statistics. Biases are not masked.
    Masks loaded from a state dict as 0/1 numbers become bool; any other value is refused.
    """

    mode = "LSTM"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, *, num_tasks: int = 1) -> None:
        super().__init__()
        _check_constructor(input_size, hidden_size, num_layers, bias, batch_first, dropout, proj_size, num_tasks)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size, self.num_tasks = bidirectional, proj_size, num_tasks
        factory = {"device": device, "dtype": dtype}
        H, D = hidden_size, self.num_directions
        self._flat_weights_names: List[str] = []
        self._all_weights: List[List[str]] = []
        # Registration order = torch.nn.LSTM's, so reset_parameters draws the same numbers.
        for layer in range(num_layers):
            for suffix in self._suffixes():
                names = [f"weight_ih_l{layer}{suffix}", f"weight_hh_l{layer}{suffix}"]
                shapes = [(4 * H, self._layer_input_size(layer)), (4 * H, H)]
                if bias:
                    names += [f"bias_ih_l{layer}{suffix}", f"bias_hh_l{layer}{suffix}"]
                    shapes += [(4 * H,), (4 * H,)]
                for name, shape in zip(names, shapes):
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        for layer in range(num_layers):
            for kind, cols in (("ih", self._layer_input_size(layer)), ("hh", H)):
                self.register_buffer(f"mask_{kind}_l{layer}",
                                     torch.ones(D * num_tasks, 4 * H, cols, dtype=torch.bool, device=device))
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _suffixes(self) -> Tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    def _layer_input_size(self, layer: int) -> int:
        return self.input_size if layer == 0 else self.hidden_size * self.num_directions

    def reset_parameters(self) -> None:
        """nn.LSTM's initialisation (U(-1/√hidden, 1/√hidden), the same draws), and every mask all True."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)
        with torch.no_grad():
            for name, _ in self._mask_buffers():
                getattr(self, name).fill_(True)

    # -----------------------------------------------------------------------------------------
    # torch.nn.LSTM's attributes

    @property
    def _flat_weights(self) -> List[Optional[torch.Tensor]]:
        # computed, not stored: always what the attributes hold (weight_norm, functional_call, .to())
        return [getattr(self, name, None) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> List[List[torch.Tensor]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """A no-op: the masked kernels read the parameters where they are (cuDNN's flat buffer is
        not used)."""

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        return s + f", num_tasks={self.num_tasks}"

    # -----------------------------------------------------------------------------------------
    # Masks

    def masked_parameter_names(self) -> List[str]:
        """The weight matrices that carry masks (biases do not)."""
        return [f"weight_{kind}_l{layer}{suffix}" for layer in range(self.num_layers)
                for suffix in self._suffixes() for kind in ("ih", "hh")]

    def _mask_buffers(self) -> List[Tuple[str, Tuple[int, int, int]]]:
        """(buffer name, expected shape) of every mask buffer."""
        rows, H4 = self.num_directions * self.num_tasks, 4 * self.hidden_size
        return [(f"mask_{kind}_l{layer}", (rows, H4, cols)) for layer in range(self.num_layers)
                for kind, cols in (("ih", self._layer_input_size(layer)), ("hh", self.hidden_size))]

    def _mask_slot(self, task: int, name: str) -> Tuple[torch.Tensor, int]:
        _checks.integer("SparseSharingLSTM", "task", task, 0, self.num_tasks)
        if name not in self.masked_parameter_names():
            raise ValueError(f"SparseSharingLSTM: argument 'name' must be one of "
                             f"{self.masked_parameter_names()}, got {name!r}")
        kind, rest = name[len("weight_"):].split("_l", 1)
        layer = int(rest.split("_")[0])
        direction = 1 if name.endswith("_reverse") else 0
        return getattr(self, f"mask_{kind}_l{layer}"), direction * self.num_tasks + task

    def get_mask(self, task: int, name: str) -> torch.Tensor:
        """Task ``task``'s bool mask of weight matrix ``name`` (a view: writing into it changes it,
        and the next call uses what was written)."""
        buffer, row = self._mask_slot(task, name)
        return buffer[row]

    def set_mask(self, task: int, name: str, mask: torch.Tensor) -> None:
        buffer, row = self._mask_slot(task, name)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"SparseSharingLSTM.set_mask: argument 'mask' must be a bool tensor, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != tuple(buffer.shape[1:]):
            raise ValueError(f"SparseSharingLSTM.set_mask: argument 'mask' must have shape "
                             f"{tuple(buffer.shape[1:])} (that of {name}), got {tuple(mask.shape)}")
        with torch.no_grad():
            buffer[row].copy_(mask)

    def density(self, task: int) -> float:
        """Kept / total over task ``task``'s masked weight matrices."""
        kept = total = 0
        for name in self.masked_parameter_names():
            mask = self.get_mask(task, name)
            kept += int(mask.sum())
            total += mask.numel()
        return kept / total

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Masks keep one meaning: bool. 0/1 numbers (a mask saved as float) become bool, before
        # torch copies or (assign=True) adopts them; anything else is an error, never a silent cast.
        for name, _ in self._mask_buffers():
            key = prefix + name
            if key not in state_dict:
                continue
            problem, value = _mask_from_state(state_dict[key])
            if problem:
                error_msgs.append(f"mask '{key}' {problem}")
                del state_dict[key]       # not loaded (a local copy of the caller's dict)
            else:
                state_dict[key] = value
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # A torch.nn.LSTM state dict has no masks: keep ours (strict loading still passes).
        missing_keys[:] = [k for k in missing_keys if not k[len(prefix):].startswith("mask_")]

    # -----------------------------------------------------------------------------------------
    # Conversion

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, num_tasks: int) -> "SparseSharingLSTM":
        """A SparseSharingLSTM with ``lstm``'s configuration, weights and train/eval mode, every
        mask all True."""
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"SparseSharingLSTM.from_lstm: argument 'lstm' must be a torch.nn.LSTM, got {type(lstm).__name__}")
        if lstm.proj_size:
            raise UnsupportedError("SparseSharingLSTM.from_lstm: argument 'lstm' must have proj_size 0, got "
                                   f"{lstm.proj_size} (projections are not supported)")
        ref = lstm.weight_ih_l0
        model = cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias, lstm.batch_first, lstm.dropout,
                    bool(lstm.bidirectional), device=ref.device, dtype=ref.dtype, num_tasks=num_tasks)
        model.load_state_dict(lstm.state_dict(), strict=False)
        return model.train(lstm.training)

    def subnet(self, task: int) -> nn.LSTM:
        """A plain torch.nn.LSTM holding task ``task``'s masked weights (a copy), in this model's
        train/eval mode."""
        ref = self.weight_ih_l0
        lstm = nn.LSTM(self.input_size, self.hidden_size, self.num_layers, self.bias, self.batch_first,
                       self.dropout, self.bidirectional, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for name, param in lstm.named_parameters():
                value = getattr(self, name)
                if name.startswith("weight_"):
                    value = select(value, self.get_mask(task, name))
                param.copy_(value)
        return lstm.train(self.training)

    # -----------------------------------------------------------------------------------------
    # Forward

    def forward(self, input: Input, hx: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, *,
                task: Task = None):
        """Runs task ``task``'s subnet, as torch.nn.LSTM runs.

        Args:
            input: (T, B, input_size) ((B, T, ...) if batch_first), unbatched (T, input_size), or a
                PackedSequence, as torch.nn.LSTM.
            hx: (h_0, c_0), each (num_layers * directions, B, hidden) ((…, hidden) unbatched), as
                torch.nn.LSTM; in the caller's batch order for a PackedSequence.
            task: None (task 0; an error when num_tasks > 1), an int (that task's subnet for the
                whole batch), a LongTensor (B,) of per-sample task ids (mixed batch), or "all"
                (every task's subnet on the same input, in one call).
        Returns:
            (output, (h_n, c_n)) as torch.nn.LSTM; with task="all" each is stacked on a new dim 0
            of size num_tasks (for a PackedSequence input, output is a list of PackedSequences).
        """
        packed = isinstance(input, PackedSequence)
        if packed:
            self._check_input(input.data, 2)
            x, lengths = torch.nn.utils.rnn.pad_packed_sequence(input)       # the caller's batch order
            lengths = lengths.to(x.device)
            unbatched = False
        else:
            if not isinstance(input, torch.Tensor):
                raise TypeError(f"SparseSharingLSTM: argument 'input' must be a Tensor or a PackedSequence, "
                                f"got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"SparseSharingLSTM: argument 'input': LSTM: Expected input to be 2D or 3D, got "
                                 f"{input.dim()}D instead")
            unbatched = input.dim() == 2
            x = input.unsqueeze(1) if unbatched else input.transpose(0, 1) if self.batch_first else input
            self._check_input(x, 3)
            lengths = None
        T, B = x.shape[:2]
        if T == 0:
            raise ArgumentError("SparseSharingLSTM: Expected sequence length to be larger than 0 in RNN "
                                f"(argument 'input' has shape {tuple(input.data.shape if packed else input.shape)})")
        h0, c0 = self._initial_state(hx, x, unbatched)
        self._check_masks(x.device)
        groups = _Groups.of(task, B, self.num_tasks, x.device)
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.int64, device=x.device)
        out, h_n, c_n = self._run(x, lengths, groups, h0, c0)
        return self._format(out, h_n, c_n, groups, input if packed else None, unbatched)

    def _check_input(self, x: torch.Tensor, ndim: int) -> None:
        """torch.nn.LSTM's checks of the input (RNNBase.check_input), same types and messages,
        plus agreement of the parameters' dtypes and devices with it."""
        weight = self.weight_ih_l0
        if x.dtype != weight.dtype and not torch._C._is_any_autocast_enabled():
            raise ValueError(f"SparseSharingLSTM: argument 'input': RNN input dtype ({x.dtype}) does not match weight dtype ({weight.dtype}). "
                             f"Convert input: input.to({weight.dtype}), or convert model: model.to({x.dtype})")
        if not x.is_floating_point():
            raise TypeError(f"SparseSharingLSTM: argument 'input' must be floating point, got {x.dtype}")
        if x.dim() != ndim:
            raise ArgumentError(f"SparseSharingLSTM: argument 'input': input must have {ndim} dimensions, got {x.dim()}")
        if x.shape[-1] != self.input_size:
            raise ArgumentError(f"SparseSharingLSTM: argument 'input': input.size(-1) must be equal to input_size. "
                                f"Expected {self.input_size}, got {x.shape[-1]}")
        for name, param in zip(self._flat_weights_names, self._flat_weights):
            if not isinstance(param, torch.Tensor):
                raise TypeError(f"SparseSharingLSTM: parameter '{name}' must be a tensor, got {type(param).__name__}")
            if param.device != x.device:
                raise ArgumentError(f"SparseSharingLSTM: argument 'input': Input and parameter tensors are not at the "
                                    f"same device, found input tensor at "
                                    f"{x.device} and parameter tensor '{name}' at {param.device}")
            if param.dtype != weight.dtype:
                raise ArgumentError(f"SparseSharingLSTM: parameter '{name}' must have the dtype of weight_ih_l0 "
                                    f"({weight.dtype}), got {param.dtype}")

    def _initial_state(self, hx, x: torch.Tensor, unbatched: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """(h_0, c_0) as (layers * directions, B, hidden): zeros, or ``hx`` checked as nn.LSTM checks it."""
        expected = (self.num_layers * self.num_directions, x.shape[1], self.hidden_size)
        if hx is None:
            zeros = x.new_zeros(expected)
            return zeros, zeros
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2
                and all(isinstance(t, torch.Tensor) for t in hx)):
            raise ArgumentTypeError("SparseSharingLSTM: argument 'hx' must be a tuple (h_0, c_0) of two tensors, got "
                            f"{type(hx).__name__}")
        h0, c0 = hx
        want = 2 if unbatched else 3
        if h0.dim() != want or c0.dim() != want:
            kind = "unbatched 2-D" if unbatched else "batched 3-D"
            raise ArgumentError(f"SparseSharingLSTM: argument 'hx': For {kind} input, hx and cx should also be {want}-D "
                                f"but got "
                                f"({h0.dim()}-D, {c0.dim()}-D) tensors")
        if unbatched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        for i, value in enumerate((h0, c0)):
            if tuple(value.shape) != expected:
                raise ArgumentError(f"SparseSharingLSTM: argument 'hx': Expected hidden[{i}] size {expected}, "
                                    f"got {list(value.shape)}")
            if value.device != x.device:
                raise ArgumentError(f"SparseSharingLSTM: argument 'hx': Input and hidden tensors are not at the same "
                                    f"device, found input tensor at {x.device} and hidden tensor at {value.device}")
            autocast_ok = torch._C._is_any_autocast_enabled() and value.is_floating_point()
            if value.dtype != x.dtype and not autocast_ok:
                raise ArgumentError(f"SparseSharingLSTM: argument 'hx' hidden[{i}] must have the input's dtype "
                                    f"({x.dtype}), got {value.dtype}")
        return h0, c0

    def _check_masks(self, device: torch.device) -> None:
        # metadata only: a buffer replaced by assignment must still be what the kernels read
        for name, shape in self._mask_buffers():
            mask = getattr(self, name)
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape \
                    or mask.device != device:
                got = (f"{mask.dtype} {tuple(mask.shape)} on {mask.device}" if isinstance(mask, torch.Tensor)
                       else type(mask).__name__)
                raise ArgumentError(f"SparseSharingLSTM: mask buffer '{name}' must be a bool tensor of shape {shape} "
                                    f"on {device}, got {got}")

    def _run(self, x, lengths, groups: "_Groups", h0, c0):
        """All layers; each layer is one grouped call over (task group, direction)."""
        Gt, R = groups.count, groups.width
        D, H, N = self.num_directions, self.hidden_size, self.num_tasks
        layer_in = groups.gather(x, dim=1)                                      # (Gt, T, R, I)
        group_lengths = groups.gather(lengths, dim=0)                           # (Gt, R)
        if groups.rows is not None:
            group_lengths = torch.where(groups.valid(), group_lengths, 0)       # padding rows: length 0
        lengths_g = group_lengths.repeat_interleave(D, dim=0)                   # (Gt*D, R)
        weight_index = torch.arange(D, device=x.device).repeat(Gt)      # direction d uses weight set d
        reverse = weight_index == 1                                      # built on the device: no copy
        mask_index = (torch.arange(D, device=x.device).repeat(Gt) * N + groups.tasks.repeat_interleave(D))
        dropout = self.training and self.dropout > 0       # `training` read on every call, as nn.LSTM
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            suffixes = self._suffixes()
            w_ih = torch.stack([getattr(self, f"weight_ih_l{layer}{s}") for s in suffixes])
            w_hh = torch.stack([getattr(self, f"weight_hh_l{layer}{s}") for s in suffixes])
            b_ih = torch.stack([getattr(self, f"bias_ih_l{layer}{s}") for s in suffixes]) if self.bias else None
            b_hh = torch.stack([getattr(self, f"bias_hh_l{layer}{s}") for s in suffixes]) if self.bias else None
            states = [s[layer * D:(layer + 1) * D] for s in (h0, c0)]                 # (D, B, H) each
            h_init, c_init = (groups.gather(s, dim=1).reshape(Gt * D, R, H) for s in states)
            xg = layer_in.unsqueeze(1).expand(Gt, D, *layer_in.shape[1:]).reshape(Gt * D, *layer_in.shape[1:])
            # indices, lengths and shapes are built here, valid by construction: no re-validation
            y, hl, cl = run_layer(xg, h_init, c_init, w_ih, w_hh, b_ih, b_hh, weight_index,
                                  getattr(self, f"mask_ih_l{layer}"), getattr(self, f"mask_hh_l{layer}"),
                                  mask_index, lengths_g, reverse)
            layer_in = y.view(Gt, D, *y.shape[1:]).permute(0, 2, 3, 1, 4).reshape(Gt, y.shape[1], R, D * H)
            if dropout and layer < self.num_layers - 1:
                layer_in = groups.dropout(layer_in, self.dropout)
            h_n.append(hl.view(Gt, D, R, H))
            c_n.append(cl.view(Gt, D, R, H))
        return layer_in, torch.cat(h_n, 1), torch.cat(c_n, 1)       # (Gt, T, R, D*H), (Gt, L*D, R, H) x2

    def _format(self, out, h_n, c_n, groups: "_Groups", packed: Optional[PackedSequence], unbatched: bool):
        if groups.kind == "shared":
            outputs, hs, cs = out, h_n, c_n                               # (N, T, B, DH), (N, LD, B, H)
        else:
            outputs, hs, cs = (groups.scatter(t.transpose(0, 1)) for t in (out, h_n, c_n))
        if packed is not None:
            def repack(o):  # (T, B, F) in the caller's batch order -> the input's packing
                if packed.sorted_indices is not None:
                    o = o.index_select(1, packed.sorted_indices)
                return PackedSequence(o[_packed_index(packed)], packed.batch_sizes, packed.sorted_indices,
                                      packed.unsorted_indices)
            outputs = [repack(o) for o in outputs] if groups.kind == "shared" else repack(outputs)
            return outputs, (hs, cs)
        if groups.kind == "shared":
            if unbatched:
                return outputs[:, :, 0], (hs[:, :, 0], cs[:, :, 0])
            return (outputs.transpose(1, 2) if self.batch_first else outputs), (hs, cs)
        if unbatched:
            return outputs[:, 0], (hs[:, 0], cs[:, 0])
        return (outputs.transpose(0, 1) if self.batch_first else outputs), (hs, cs)


def _check_constructor(input_size, hidden_size, num_layers, bias, batch_first, dropout, proj_size,
                       num_tasks) -> None:
    """torch.nn.LSTM's constructor checks (RNNBase.__init__): the same exception types and
    messages, so code and tests written against nn.LSTM see the same errors; then ours."""
    if not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1 or isinstance(dropout, bool):
        raise ValueError("dropout should be a number in range [0, 1] representing the probability of an element "
                         "being zeroed")
    if dropout > 0 and num_layers == 1:
        warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
                      f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                      stacklevel=3)
    if not isinstance(bias, bool):
        raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
    if not isinstance(batch_first, bool):
        raise TypeError(f"batch_first should be of type bool, got: {type(batch_first).__name__}")
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
        if not isinstance(value, int):
            raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{name} must be greater than zero")
    if not isinstance(num_layers, int):
        raise TypeError(f"num_layers should be of type int, got: {type(num_layers).__name__}")
    if num_layers <= 0:
        raise ValueError("num_layers must be greater than zero")
    if not isinstance(proj_size, int):
        raise TypeError(f"proj_size should be of type int, got: {type(proj_size).__name__}")
    if proj_size < 0:
        raise ValueError("proj_size should be a positive integer or zero to disable projections")
    if proj_size >= hidden_size:
        raise ValueError("proj_size has to be smaller than hidden_size")
    if proj_size > 0:
        raise UnsupportedError(f"SparseSharingLSTM: argument 'proj_size' must be 0, got {proj_size}: LSTMs with "
                               "projections are not supported (use torch.nn.LSTM)")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int):
        raise TypeError(f"SparseSharingLSTM: argument 'num_tasks' must be an int, got {type(num_tasks).__name__}")
    if num_tasks < 1:
        raise ValueError(f"SparseSharingLSTM: argument 'num_tasks' must be >= 1, got {num_tasks}")


def _mask_from_state(value: object) -> Tuple[Optional[str], Optional[torch.Tensor]]:
    """(problem, None) or (None, the bool mask) for a mask entry of a state dict."""
    if not isinstance(value, torch.Tensor):
        return f"must be a tensor, got {type(value).__name__}", None
    if value.dtype == torch.bool:
        return (("is on the meta device: it has no values to load", None) if value.is_meta else (None, value))
    if value.is_meta:
        return "is on the meta device: it has no values to load", None
    if value.is_complex() or not ((value == 0) | (value == 1)).all():
        return f"must be bool or hold only 0 and 1, got {value.dtype} with other values", None
    return None, value != 0


def _packed_index(packed: PackedSequence) -> Tuple[torch.Tensor, torch.Tensor]:
    """(time, sorted batch) indices of a PackedSequence's data, in its order."""
    sizes = packed.batch_sizes
    t = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    b = torch.arange(int(sizes.sum())) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    return t.to(packed.data.device), b.to(packed.data.device)


class _Groups:
    """The task groups of one forward call: group j runs task ``tasks[j]`` on ``width`` batch rows.

    - ``shared`` (task="all"): every group runs all B rows.
    - ``blocks``: group j runs rows j*width .. (j+1)*width - 1 (a task id, or per-sample ids
      sorted with as many samples per task): gathering and scattering are views and reshapes.
    - ``scattered``: any other per-sample ids: ``rows`` (groups, width) lists each group's batch
      rows (-1 pads a short group), ``position`` (B,) where each sample sits in the groups' rows
      laid end to end.
    """

    def __init__(self, kind: str, count: int, width: int, tasks: torch.Tensor,
                 rows: Optional[torch.Tensor] = None, position: Optional[torch.Tensor] = None) -> None:
        self.kind, self.count, self.width, self.tasks = kind, count, width, tasks
        self.rows, self.position = rows, position

    @classmethod
    def of(cls, task: Task, B: int, num_tasks: int, device: torch.device) -> "_Groups":
        """The groups that run ``task`` (see SparseSharingLSTM.forward) on a batch of B rows."""
        if isinstance(task, str):
            if task != ALL_TASKS:
                raise ValueError(f"SparseSharingLSTM: argument 'task' must be an int, a LongTensor of task ids or "
                                 f"'{ALL_TASKS}', got {task!r}")
            return cls("shared", num_tasks, B, torch.arange(num_tasks, device=device))
        if task is None:
            if num_tasks != 1:
                raise ValueError(f"SparseSharingLSTM: argument 'task' is required with num_tasks={num_tasks}: an int, "
                                 f"a LongTensor (B,) of per-sample task ids, or '{ALL_TASKS}'")
            task = 0
        if isinstance(task, torch.Tensor) and task.dim() == 0 and not task.is_floating_point() \
                and task.dtype != torch.bool:
            task = int(task)
        if isinstance(task, int) and not isinstance(task, bool):
            if not 0 <= task < num_tasks:
                raise ValueError(f"SparseSharingLSTM: argument 'task' must be in [0, {num_tasks}), got {task}")
            return cls("blocks", 1, B, torch.full((1,), task, device=device))
        if isinstance(task, torch.Tensor) and task.dtype in (torch.int64, torch.int32) and task.dim() == 1:
            return cls._per_sample(task, B, num_tasks, device)
        what = f"{task.dtype} tensor of shape {tuple(task.shape)}" if isinstance(task, torch.Tensor) \
            else type(task).__name__
        raise TypeError(f"SparseSharingLSTM: argument 'task' must be an int, a 1-D LongTensor of task ids or "
                        f"'{ALL_TASKS}', got {what}")

    @classmethod
    def _per_sample(cls, task: torch.Tensor, B: int, num_tasks: int, device: torch.device) -> "_Groups":
        if task.shape[0] != B:
            raise ValueError(f"SparseSharingLSTM: argument 'task' must have one id per sample ({B}), "
                             f"got shape {tuple(task.shape)}")
        if B == 0:
            return cls("blocks", 1, 0, torch.zeros(1, dtype=torch.int64, device=device))
        task = task.to(device=device, dtype=torch.int64)
        _checks.values_in_range("SparseSharingLSTM", "task", task, 0, num_tasks - 1, f"[0, {num_tasks})")
        if not _checks.host_check_is_free(task):
            return cls._padded(task, B, num_tasks, device)
        present, counts = torch.unique(task, return_counts=True)
        Gt, width = present.numel(), int(counts.max())
        # The common layout (each task's samples one after the other, as many per task) needs
        # no gather and no scatter: the batch is the groups' rows back to back.
        if Gt * width == B and bool((task[1:] >= task[:-1]).all()):
            return cls("blocks", Gt, width, present)
        order = torch.argsort(task, stable=True)
        starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        slot = torch.arange(B, device=device) - starts                        # rank within its task
        group = torch.repeat_interleave(torch.arange(Gt, device=device), counts)
        rows = torch.full((Gt, width), -1, dtype=torch.int64, device=device)
        rows[group, slot] = order
        position = torch.empty(B, dtype=torch.int64, device=device)
        position[order] = group * width + slot
        return cls("scattered", Gt, width, present, rows, position)

    @classmethod
    def _padded(cls, task: torch.Tensor, B: int, num_tasks: int, device: torch.device) -> "_Groups":
        """Per-sample ids without reading them on the host (a GPU, where that read is a sync, or a
        torch.compile trace): every task is a group of B rows, its samples first and -1 padding
        after (padding rows run with length 0). Shapes do not depend on the ids, so a training step
        needs no sync and can be captured in a CUDA graph; it computes num_tasks x B rows instead of
        B, which on a GPU at these sizes costs little next to a sync per step."""
        tasks = torch.arange(num_tasks, device=device)
        counts = (task.unsqueeze(0) == tasks.unsqueeze(1)).sum(1)             # (num_tasks,)
        order = torch.argsort(task, stable=True)
        group = task.index_select(0, order)                                    # each sorted sample's task
        slot = torch.arange(B, device=device) - (torch.cumsum(counts, 0) - counts).index_select(0, group)
        rows = torch.full((num_tasks, B), -1, dtype=torch.int64, device=device)
        rows.index_put_((group, slot), order)
        position = torch.empty(B, dtype=torch.int64, device=device)
        position.index_put_((order,), group * B + slot)
        return cls("scattered", num_tasks, B, tasks, rows, position)

    def valid(self) -> torch.Tensor:
        return self.rows >= 0

    def gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """t with B rows on ``dim`` -> (groups, ..., width, ...): each group's rows on a new dim 0,
        taken from ``dim`` (which keeps its place, now of size width)."""
        moved = t.movedim(dim, 0)
        if self.kind == "shared":
            out = moved.unsqueeze(0).expand(self.count, *moved.shape)
        elif self.kind == "blocks":
            out = moved.reshape(self.count, self.width, *moved.shape[1:])
        else:
            out = moved.index_select(0, self.rows.clamp(min=0).reshape(-1)).view(self.count, self.width,
                                                                               *moved.shape[1:])
        return out.movedim(1, dim + 1)

    def scatter(self, t: torch.Tensor) -> torch.Tensor:
        """(X, groups, width, F) -> (X, B, F): every sample's row back in the caller's batch order."""
        flat = t.reshape(t.shape[0], self.count * self.width, t.shape[-1])
        return flat if self.kind == "blocks" else flat.index_select(1, self.position)

    def dropout(self, layer_out: torch.Tensor, p: float) -> torch.Tensor:
        """F.dropout of a layer's output (groups, T, width, F), drawn in the caller's batch order
        (T, B, F) as torch.nn.LSTM draws it: the same seed drops the same units as nn.LSTM, and a
        sample's draw does not depend on how the batch was grouped. Every task of "all" draws its own."""
        if self.kind == "shared":
            return F.dropout(layer_out, p, True)
        return self.gather(F.dropout(self.scatter(layer_out.transpose(0, 1)), p, True), dim=1)
