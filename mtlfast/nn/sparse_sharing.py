"""SparseSharingLSTM: a drop-in torch.nn.LSTM whose tasks each run a binary-masked subnet of it.

Sparse sharing (Sun et al. 2020): task t uses weights M_t ⊙ θ of one shared base LSTM; the shared
weight's gradient is Σ_t M_t ⊙ grad_t. Every task, and both directions, of a layer run as groups of
one grouped masked LSTM call (mtlfast.ops.masked_lstm), so the base weights are read once per layer.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from mtlfast.ops.masked_lstm import run_layer

Input = Union[torch.Tensor, PackedSequence]


class SparseSharingLSTM(nn.Module):
    """torch.nn.LSTM with one bool mask per task per weight matrix.

    Parameters are named, shaped and initialised exactly as torch.nn.LSTM's (``weight_ih_l0``,
    ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``, ``..._reverse``), so the same seed gives the same
    weights and state dicts load both ways (an nn.LSTM loads ours with ``strict=False``: our extra
    keys are the masks). Masks are bool buffers ``mask_ih_l{k}`` / ``mask_hh_l{k}`` of shape
    (directions * num_tasks, 4*hidden, in): row ``d * num_tasks + t`` is task t's mask of direction d.
    All True at start (= hard sharing). Biases are not masked.
    """

    def __init__(self, input_size: int, hidden_size: int, num_tasks: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False) -> None:
        super().__init__()
        for name, value, low in (("input_size", input_size, 1), ("hidden_size", hidden_size, 1),
                                 ("num_tasks", num_tasks, 1), ("num_layers", num_layers, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"SparseSharingLSTM: argument '{name}' must be an int >= {low}, got {value!r}")
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"SparseSharingLSTM: argument 'dropout' must be in [0, 1], got {dropout}")
        self.input_size, self.hidden_size, self.num_tasks = input_size, hidden_size, num_tasks
        self.num_layers, self.bias, self.batch_first = num_layers, bias, batch_first
        self.dropout, self.bidirectional = float(dropout), bidirectional
        self.num_directions = 2 if bidirectional else 1
        H, D = hidden_size, self.num_directions
        # Registration order = torch.nn.LSTM's, so reset_parameters draws the same numbers.
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else H * D
            for suffix in self._suffixes():
                self.register_parameter(f"weight_ih_l{layer}{suffix}", nn.Parameter(torch.empty(4 * H, in_size)))
                self.register_parameter(f"weight_hh_l{layer}{suffix}", nn.Parameter(torch.empty(4 * H, H)))
                if bias:
                    self.register_parameter(f"bias_ih_l{layer}{suffix}", nn.Parameter(torch.empty(4 * H)))
                    self.register_parameter(f"bias_hh_l{layer}{suffix}", nn.Parameter(torch.empty(4 * H)))
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else H * D
            self.register_buffer(f"mask_ih_l{layer}", torch.ones(D * num_tasks, 4 * H, in_size, dtype=torch.bool))
            self.register_buffer(f"mask_hh_l{layer}", torch.ones(D * num_tasks, 4 * H, H, dtype=torch.bool))
        self.reset_parameters()

    def _suffixes(self):
        return ("", "_reverse") if self.bidirectional else ("",)

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    # -----------------------------------------------------------------------------------------
    # Masks

    def masked_parameter_names(self) -> list[str]:
        """The weight matrices that carry masks (biases do not)."""
        return [f"weight_{kind}_l{layer}{suffix}" for layer in range(self.num_layers)
                for suffix in self._suffixes() for kind in ("ih", "hh")]

    def _mask_slot(self, task: int, name: str) -> Tuple[torch.Tensor, int]:
        if not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise ValueError(f"SparseSharingLSTM: argument 'task' must be an int in [0, {self.num_tasks}), got {task!r}")
        if name not in self.masked_parameter_names():
            raise ValueError(f"SparseSharingLSTM: argument 'name' must be one of "
                             f"{self.masked_parameter_names()}, got {name!r}")
        kind, rest = name[len("weight_"):].split("_l", 1)
        layer = int(rest.split("_")[0])
        direction = 1 if name.endswith("_reverse") else 0
        return getattr(self, f"mask_{kind}_l{layer}"), direction * self.num_tasks + task

    def get_mask(self, task: int, name: str) -> torch.Tensor:
        """Task ``task``'s bool mask of weight matrix ``name`` (a view: writing into it changes it)."""
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

    # -----------------------------------------------------------------------------------------
    # Conversion

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, num_tasks: int) -> "SparseSharingLSTM":
        """A SparseSharingLSTM with ``lstm``'s configuration and weights, every mask all True."""
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"SparseSharingLSTM.from_lstm: argument 'lstm' must be a torch.nn.LSTM, got {type(lstm).__name__}")
        if lstm.proj_size:
            raise ValueError("SparseSharingLSTM.from_lstm: argument 'lstm' must have proj_size 0, got "
                             f"{lstm.proj_size}")
        ref = next(lstm.parameters())
        model = cls(lstm.input_size, lstm.hidden_size, num_tasks, lstm.num_layers, lstm.bias, lstm.batch_first,
                    lstm.dropout, lstm.bidirectional).to(device=ref.device, dtype=ref.dtype)
        model.load_state_dict(lstm.state_dict(), strict=False)
        return model

    def subnet(self, task: int) -> nn.LSTM:
        """A plain torch.nn.LSTM holding task ``task``'s masked weights (a copy)."""
        ref = self.weight_ih_l0
        lstm = nn.LSTM(self.input_size, self.hidden_size, self.num_layers, self.bias, self.batch_first,
                       self.dropout, self.bidirectional).to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for name, param in lstm.named_parameters():
                value = getattr(self, name)
                if name.startswith("weight_"):
                    value = value * self.get_mask(task, name)
                param.copy_(value)
        return lstm

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A torch.nn.LSTM state dict has no masks: keep ours (strict loading still passes).
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        missing_keys[:] = [k for k in missing_keys if not k[len(prefix):].startswith("mask_")]

    # -----------------------------------------------------------------------------------------
    # Forward

    def forward(self, input: Input, task: Union[int, torch.Tensor, None] = None,
                hx: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """Runs task ``task``'s subnet.

        Args:
            input: (T, B, input_size) ((B, T, ...) if batch_first), unbatched (T, input_size), or a
                PackedSequence, as torch.nn.LSTM.
            task: an int (that task's subnet for the whole batch); a LongTensor (B,) of per-sample
                task ids (mixed batch); or None (every task's subnet on the same input, in one call).
            hx: (h_0, c_0), each (num_layers * directions, B, hidden), as torch.nn.LSTM.
        Returns:
            (output, (h_n, c_n)) as torch.nn.LSTM; with task=None each is stacked on a new dim 0 of
            size num_tasks (for a PackedSequence input, output is a list of PackedSequences).
        """
        packed = isinstance(input, PackedSequence)
        if packed:
            x, lengths = torch.nn.utils.rnn.pad_packed_sequence(input)      # original batch order
            lengths = lengths.to(x.device)
        else:
            if not isinstance(input, torch.Tensor):
                raise TypeError(f"SparseSharingLSTM: argument 'input' must be a Tensor or PackedSequence, "
                                f"got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"SparseSharingLSTM: argument 'input' must be 2-D (unbatched) or 3-D, "
                                 f"got shape {tuple(input.shape)}")
            x = input
            if x.dim() == 3 and self.batch_first:
                x = x.transpose(0, 1)
            lengths = None
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
        if x.shape[-1] != self.input_size:
            raise ValueError(f"SparseSharingLSTM: argument 'input' must have {self.input_size} features "
                             f"(input_size), got shape {tuple(input.shape if not packed else x.shape)}")
        T, B, _ = x.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.int64, device=x.device)
        groups = self._groups(task, B, x.device)
        h0, c0 = self._initial_state(hx, B, x, unbatched)
        out, h_n, c_n = self._run(x, lengths, groups, h0, c0)
        return self._format(out, h_n, c_n, task, groups, packed, input, unbatched)

    def _groups(self, task, B: int, device) -> "_Groups":
        """Which batch rows each task group runs (see _Groups)."""
        if task is None:
            return _Groups("shared", self.num_tasks, B, torch.arange(self.num_tasks, device=device), None)
        if isinstance(task, int) and not isinstance(task, bool):
            if not 0 <= task < self.num_tasks:
                raise ValueError(f"SparseSharingLSTM: argument 'task' must be in [0, {self.num_tasks}), got {task}")
            return _Groups("blocks", 1, B, torch.full((1,), task, device=device), None)
        if isinstance(task, torch.Tensor) and task.dtype in (torch.int64, torch.int32) and task.dim() == 1:
            if task.shape[0] != B:
                raise ValueError(f"SparseSharingLSTM: argument 'task' must have one id per sample ({B}), "
                                 f"got shape {tuple(task.shape)}")
            task = task.to(device=device, dtype=torch.int64)
            if B and (int(task.min()) < 0 or int(task.max()) >= self.num_tasks):
                raise ValueError(f"SparseSharingLSTM: argument 'task' ids must be in [0, {self.num_tasks}), "
                                 f"got min {int(task.min())} and max {int(task.max())}")
            present, counts = torch.unique(task, return_counts=True)
            Gt, width = present.numel(), (int(counts.max()) if B else 0)
            # The common layout (each task's samples one after the other, as many per task) needs
            # no gather and no scatter: the batch is the groups' rows back to back.
            if Gt * width == B and bool((task[1:] >= task[:-1]).all()):
                return _Groups("blocks", Gt, width, present, None)
            order = torch.argsort(task, stable=True)
            starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
            slot = torch.arange(B, device=device) - starts                        # rank within its task
            group = torch.repeat_interleave(torch.arange(Gt, device=device), counts)
            rows = torch.full((Gt, width), -1, dtype=torch.int64, device=device)
            rows[group, slot] = order
            position = torch.empty(B, dtype=torch.int64, device=device)
            position[order] = group * width + slot
            return _Groups("scattered", Gt, width, present, rows, position)
        raise TypeError(f"SparseSharingLSTM: argument 'task' must be an int, a 1-D LongTensor of task ids or "
                        f"None, got {type(task).__name__}")

    def _initial_state(self, hx, B: int, x: torch.Tensor, unbatched: bool):
        L, D, H = self.num_layers, self.num_directions, self.hidden_size
        if hx is None:
            zeros = x.new_zeros((L * D, B, H))
            return zeros, zeros
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError("SparseSharingLSTM: argument 'hx' must be a tuple (h_0, c_0)")
        h0, c0 = hx
        if unbatched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        for name, value in (("h_0", h0), ("c_0", c0)):
            if tuple(value.shape) != (L * D, B, H):
                raise ValueError(f"SparseSharingLSTM: argument 'hx' {name} must have shape {(L * D, B, H)}, "
                                 f"got {tuple(value.shape)}")
        return h0, c0

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
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout, True)
            h_n.append(hl.view(Gt, D, R, H))
            c_n.append(cl.view(Gt, D, R, H))
        return layer_in, torch.cat(h_n, 1), torch.cat(c_n, 1)       # (Gt, T, R, D*H), (Gt, L*D, R, H) x2

    def _format(self, out, h_n, c_n, task, groups: "_Groups", packed, input, unbatched):
        if task is None:
            outputs, hs, cs = out, h_n, c_n                               # (N, T, B, DH), (N, LD, B, H)
        else:
            outputs, hs, cs = (groups.scatter(t.transpose(0, 1)) for t in (out, h_n, c_n))
        if packed:
            def repack(o):  # (T, B, F) in the caller's batch order -> the input's packing
                if input.sorted_indices is not None:
                    o = o.index_select(1, input.sorted_indices)
                return PackedSequence(o[_packed_index(input)], input.batch_sizes, input.sorted_indices,
                                      input.unsorted_indices)
            outputs = [repack(o) for o in outputs] if task is None else repack(outputs)
            return outputs, (hs, cs)
        if task is None:
            if unbatched:
                return outputs[:, :, 0], (hs[:, :, 0], cs[:, :, 0])
            return (outputs.transpose(1, 2) if self.batch_first else outputs), (hs, cs)
        if unbatched:
            return outputs[:, 0], (hs[:, 0], cs[:, 0])
        return (outputs.transpose(0, 1) if self.batch_first else outputs), (hs, cs)


def _packed_index(packed: PackedSequence) -> Tuple[torch.Tensor, torch.Tensor]:
    """(time, sorted batch) indices of a PackedSequence's data, in its order."""
    sizes = packed.batch_sizes
    t = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    b = torch.arange(int(sizes.sum())) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    return t.to(packed.data.device), b.to(packed.data.device)


class _Groups:
    """The task groups of one forward call: group j runs task ``tasks[j]`` on ``width`` batch rows.

    - ``shared`` (task=None): every group runs all B rows.
    - ``blocks``: group j runs rows j*width .. (j+1)*width - 1 (a task id, or per-sample ids
      sorted with as many samples per task): gathering and scattering are views and reshapes.
    - ``scattered``: any other per-sample ids: ``rows`` (groups, width) lists each group's batch
      rows (-1 pads a short group), ``position`` (B,) where each sample sits in the groups' rows
      laid end to end.
    """

    def __init__(self, kind: str, count: int, width: int, tasks: torch.Tensor,
                 rows: Optional[torch.Tensor], position: Optional[torch.Tensor] = None) -> None:
        self.kind, self.count, self.width, self.tasks = kind, count, width, tasks
        self.rows, self.position = rows, position

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
