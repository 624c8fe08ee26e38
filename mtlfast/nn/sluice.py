"""Sluice networks (Ruder et al. 2019) and cross-stitch units as drop-in modules.

M task networks run side by side. After every layer the outputs are split into S subspaces and
the M·S chunks mixed by a learned α (SluiceMixer; S = 1 is a cross-stitch unit); a learned β per
task mixes the layer outputs into the representation its classifier sees (LayerMixture); an
orthogonality penalty pushes the subspaces of each layer's weights apart. SluiceLSTM runs every
task and both directions of a layer as groups of one grouped LSTM call (mtlfast.ops.masked_lstm,
one weight set per group, no masks), then one alpha_mix for both directions.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn

from mtlfast import _checks
from mtlfast.ops.masked_lstm import run_layer
from mtlfast.ops.sluice import alpha_mix, layer_mix, orthogonality_penalty

INITS = ("imbalanced", "balanced", "identity")
LAYER_MIX_MODES = ("stitch", "concat", "skip", "last")
# "imbalanced": the share of each row of α that stays with the row's own task (spread evenly over
# its S subspaces); the rest is spread evenly over the other tasks' subspaces.
OWN_TASK_SHARE = 0.9


def _positive_int(owner: str, name: str, value: object) -> int:
    return _checks.integer(owner, name, value, low=1)


def _time_major(h: torch.Tensor) -> torch.Tensor:
    """(M, D, T, B, H), the grouped LSTM's layout, -> (M, T, B, D*H), both directions side by side."""
    M, D, T, B, H = h.shape
    return h.permute(0, 2, 3, 1, 4).reshape(M, T, B, D * H)


def initial_alpha(num_tasks: int, num_subspaces: int, init: Union[str, torch.Tensor]) -> torch.Tensor:
    """The (M*S, M*S) α an init names: "imbalanced" (OWN_TASK_SHARE of each row on the task's own
    subspaces, the rest on the others'), "balanced" (1/(MS) everywhere: every task sees the same
    mix, as hard sharing), "identity" (no sharing), or a given tensor (copied)."""
    M, S = num_tasks, num_subspaces
    MS = M * S
    if isinstance(init, torch.Tensor):
        if tuple(init.shape) != (MS, MS):
            raise ValueError(f"SluiceMixer: argument 'init' must have shape {(MS, MS)} (M*S, M*S), "
                             f"got {tuple(init.shape)}")
        return init.detach().to(torch.float32).clone()
    if init == "balanced":
        return torch.full((MS, MS), 1.0 / MS)
    if init == "identity":
        return torch.eye(MS)
    if init == "imbalanced":
        task = torch.arange(MS) // S
        same = task[:, None] == task[None, :]
        if M == 1:
            return torch.full((MS, MS), 1.0 / S)
        return torch.where(same, OWN_TASK_SHARE / S, (1.0 - OWN_TASK_SHARE) / ((M - 1) * S))
    raise ValueError(f"SluiceMixer: argument 'init' must be one of {INITS} or a tensor, got {init!r}")


class SluiceMixer(nn.Module):
    """The α of one layer: ``forward(h)`` with h (M, ..., D), D divisible by S, returns
    ``MF.alpha_mix(h, alpha, S)``. ``alpha`` is a float32 parameter (M*S, M*S)."""

    def __init__(self, num_tasks: int, num_subspaces: int = 2,
                 init: Union[str, torch.Tensor] = "imbalanced") -> None:
        super().__init__()
        self.num_tasks = _positive_int("SluiceMixer", "num_tasks", num_tasks)
        self.num_subspaces = _positive_int("SluiceMixer", "num_subspaces", num_subspaces)
        self.alpha = nn.Parameter(initial_alpha(num_tasks, num_subspaces, init))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return alpha_mix(h, self.alpha, self.num_subspaces)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, num_subspaces={self.num_subspaces}"


class CrossStitch(SluiceMixer):
    """A cross-stitch unit (Misra et al. 2016): a SluiceMixer with one subspace per task."""

    def __init__(self, num_tasks: int, init: Union[str, torch.Tensor] = "imbalanced") -> None:
        super().__init__(num_tasks, 1, init)


class LayerMixture(nn.Module):
    """The β of a sluice network: combines K layer outputs per task.

    Modes: "stitch" (learned β (M, K), initialised to 1/K: out[m] = Σ_k β[m, k] · layers[k, m]),
    "concat" (the layer outputs side by side on the last dim), "skip" (their plain sum, as skip
    connections to the output), "last" (the last layer only). ``forward`` takes a list of K
    tensors (M, ..., D) or one stacked (K, M, ..., D) tensor."""

    def __init__(self, num_tasks: int, num_layers: int, mode: str = "stitch") -> None:
        super().__init__()
        self.num_tasks = _positive_int("LayerMixture", "num_tasks", num_tasks)
        self.num_layers = _positive_int("LayerMixture", "num_layers", num_layers)
        if mode not in LAYER_MIX_MODES:
            raise ValueError(f"LayerMixture: argument 'mode' must be one of {LAYER_MIX_MODES}, got {mode!r}")
        self.mode = mode
        self.beta = nn.Parameter(torch.full((num_tasks, num_layers), 1.0 / num_layers)) if mode == "stitch" else None

    def forward(self, layers: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        if not isinstance(layers, torch.Tensor):
            layers = torch.stack(list(layers))
        if layers.dim() < 3 or layers.shape[0] != self.num_layers or layers.shape[1] != self.num_tasks:
            raise ValueError(f"LayerMixture: argument 'layers' must be (layers={self.num_layers}, "
                             f"tasks={self.num_tasks}, ..., D), got shape {tuple(layers.shape)}")
        if self.mode == "stitch":
            return layer_mix(layers, self.beta)
        if self.mode == "concat":
            return torch.cat(layers.unbind(0), dim=-1)
        if self.mode == "skip":
            return layers.sum(0)
        return layers[-1]

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, num_layers={self.num_layers}, mode={self.mode!r}"


class SluiceLSTM(nn.Module):
    """A sluice network of M task LSTM stacks.

    Task t's layer k is ``lstms[t][k]``, a one-layer torch.nn.LSTM (its parameters, names and
    initialisation; its own forward is not used: under torch.compile set
    ``torch._dynamo.config.allow_rnn = True``, since dynamo refuses any module holding an
    nn.LSTM by default; the step then compiles with fullgraph=True). After every layer, ``mixers[k]`` (a
    SluiceMixer) mixes the tasks' outputs, each direction split into S subspaces of hidden/S
    units with the same α; ``layer_mixture`` combines the mixed layer outputs per task.

    forward(x, lengths=None): x shared (B, L, I) or per task (M, B, L, I) ((L, B, I) / (M, L, B, I)
    when not batch_first); lengths (B,) int, padded steps output zeros and leave the state alone
    (a reverse direction runs backwards within each length, like a packed sequence).
    Returns (M, B, L, D_out) ((M, L, B, D_out) when not batch_first), D_out = directions * hidden
    (times num_layers for layer_mix="concat").
    """

    def __init__(self, input_size: int, hidden_size: int, num_tasks: int, num_layers: int = 3,
                 num_subspaces: int = 2, bidirectional: bool = True, batch_first: bool = True,
                 layer_mix: str = "stitch", alpha_init: Union[str, torch.Tensor] = "imbalanced") -> None:
        super().__init__()
        owner = "SluiceLSTM"
        self.input_size = _positive_int(owner, "input_size", input_size)
        self.hidden_size = _positive_int(owner, "hidden_size", hidden_size)
        self.num_tasks = _positive_int(owner, "num_tasks", num_tasks)
        self.num_layers = _positive_int(owner, "num_layers", num_layers)
        self.num_subspaces = _positive_int(owner, "num_subspaces", num_subspaces)
        if hidden_size % num_subspaces:
            raise ValueError(f"{owner}: argument 'num_subspaces' ({num_subspaces}) must divide hidden_size "
                             f"({hidden_size})")
        if layer_mix not in LAYER_MIX_MODES:
            raise ValueError(f"{owner}: argument 'layer_mix' must be one of {LAYER_MIX_MODES}, got {layer_mix!r}")
        self.bidirectional, self.batch_first = bool(bidirectional), bool(batch_first)
        self.num_directions = 2 if bidirectional else 1
        width = self.num_directions * hidden_size
        self.lstms = nn.ModuleList(
            nn.ModuleList(nn.LSTM(input_size if k == 0 else width, hidden_size, 1, bidirectional=bidirectional)
                          for k in range(num_layers))
            for _ in range(num_tasks))
        self.mixers = nn.ModuleList(SluiceMixer(num_tasks, num_subspaces, alpha_init) for _ in range(num_layers))
        self.layer_mixture = LayerMixture(num_tasks, num_layers, layer_mix)

    # -----------------------------------------------------------------------------------------
    # Presets

    @classmethod
    def hard_sharing(cls, *args, **kwargs) -> "SluiceLSTM":
        """α fixed to 1/(MS): every task's next layer sees the same mix of all tasks."""
        return cls._frozen_alpha("balanced", *args, **kwargs)

    @classmethod
    def no_sharing(cls, *args, **kwargs) -> "SluiceLSTM":
        """α fixed to the identity: M independent LSTM stacks."""
        return cls._frozen_alpha("identity", *args, **kwargs)

    @classmethod
    def cross_stitch(cls, *args, **kwargs) -> "SluiceLSTM":
        """One subspace per task (cross-stitch units between layers), α learned."""
        kwargs["num_subspaces"] = 1
        return cls(*args, **kwargs)

    @classmethod
    def _frozen_alpha(cls, init: str, *args, **kwargs) -> "SluiceLSTM":
        kwargs["alpha_init"] = init
        model = cls(*args, **kwargs)
        for mixer in model.mixers:
            mixer.alpha.requires_grad_(False)
        return model

    # -----------------------------------------------------------------------------------------
    # Inspection and the penalty

    def alphas(self) -> List[torch.Tensor]:
        """Every layer's α (M*S, M*S), detached."""
        return [m.alpha.detach() for m in self.mixers]

    def betas(self) -> Optional[torch.Tensor]:
        """β (M, num_layers), detached; None unless layer_mix="stitch"."""
        beta = self.layer_mixture.beta
        return None if beta is None else beta.detach()

    def orthogonality_penalty(self) -> torch.Tensor:
        """Σ over tasks, layers and directions of MF.orthogonality_penalty of the input-to-hidden
        weight with its rows grouped by subspace: block s holds the rows (all four gates) that
        produce the hidden units of subspace s."""
        S, H = self.num_subspaces, self.hidden_size
        total = None
        for task in self.lstms:
            for layer in task:
                for name in self._weight_names("weight_ih"):
                    w = getattr(layer, name)
                    by_subspace = w.view(4, S, H // S, w.shape[1]).transpose(0, 1).reshape(w.shape)
                    term = orthogonality_penalty(by_subspace, S)
                    total = term if total is None else total + term
        return total

    def _weight_names(self, kind: str) -> List[str]:
        return [f"{kind}_l0", f"{kind}_l0_reverse"][:self.num_directions]

    # -----------------------------------------------------------------------------------------
    # Forward

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        M, D, H = self.num_tasks, self.num_directions, self.hidden_size
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SluiceLSTM: argument 'x' must be a Tensor, got {type(x).__name__}")
        if x.dim() == 4 and x.shape[0] != M:
            raise ValueError(f"SluiceLSTM: argument 'x' per task must have num_tasks={M} on dim 0, "
                             f"got shape {tuple(x.shape)}")
        if x.dim() not in (3, 4) or x.shape[-1] != self.input_size:
            raise ValueError(f"SluiceLSTM: argument 'x' must be (B, L, {self.input_size}) shared or "
                             f"({M}, B, L, {self.input_size}) per task (batch_first={self.batch_first}), "
                             f"got shape {tuple(x.shape)}")
        weight = self.lstms[0][0].weight_ih_l0
        if x.device != weight.device:
            raise ValueError(f"SluiceLSTM: argument 'x' must be on the parameters' device ({weight.device}), "
                             f"got {x.device}")
        if not x.is_floating_point() or (x.dtype != weight.dtype and not torch._C._is_any_autocast_enabled()):
            raise TypeError(f"SluiceLSTM: argument 'x' must have the parameters' dtype ({weight.dtype}), got "
                            f"{x.dtype}")
        per_task = x if x.dim() == 4 else x.unsqueeze(0).expand(M, *x.shape)
        if self.batch_first:
            per_task = per_task.transpose(1, 2)                                 # (M, T, B, I)
        T, B = per_task.shape[1], per_task.shape[2]
        lengths = self._lengths(lengths, T, B, x.device)
        G = M * D
        group_lengths = lengths.unsqueeze(0).expand(G, B)
        weight_index = torch.arange(G, device=x.device)                         # one weight set per group
        mask_index = torch.full((G,), -1, dtype=torch.int64, device=x.device)   # no masks
        reverse = (weight_index % D) == 1
        zeros = per_task.new_zeros((G, B, H))
        # Every layer's outputs stay in the grouped op's layout (M, D, T, B, H): α mixes each
        # direction's H units in place (alpha_mix of (M, D*T*B, H) is the per-direction mix), β
        # mixes the layers in the same layout, and the only copies are the next layer's grouped
        # input (each task's input read by both of its directions) and the output's layout.
        layer_in, outputs = per_task, []                                        # (M, T, B, I)
        for k in range(self.num_layers):
            params = [self._stacked(k, kind) for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            # one copy: layer_in (M, T, B, ...) may be a permuted view; both directions read it
            features = layer_in.shape[3:].numel()                              # explicit: -1 is ambiguous at B = 0
            xg = layer_in.unsqueeze(1).expand(M, D, *layer_in.shape[1:]).reshape(G, T, B, features)
            y, _, _ = run_layer(xg, zeros, zeros, *params, weight_index, None, None, mask_index, group_lengths,
                                reverse)                                       # (G, T, B, H)
            mixed = self.mixers[k](y.view(M, D, T, B, H))                       # (M, D, T, B, H)
            layer_in = mixed.permute(0, 2, 3, 1, 4)                             # (M, T, B, D, H), a view
            outputs.append(mixed)
        if self.layer_mixture.mode == "concat":     # features side by side: each layer in the output's layout
            out = self.layer_mixture([_time_major(o) for o in outputs])         # (M, T, B, K*D*H)
        else:
            out = _time_major(self.layer_mixture(outputs))                      # (M, T, B, D*H)
        return out.transpose(1, 2) if self.batch_first else out

    def _stacked(self, layer: int, kind: str) -> torch.Tensor:
        """(M*D, ...) of parameter ``kind`` of every task's layer, group g = task * D + direction."""
        return torch.stack([getattr(task[layer], name) for task in self.lstms for name in self._weight_names(kind)])

    def _lengths(self, lengths: Optional[torch.Tensor], T: int, B: int, device) -> torch.Tensor:
        if lengths is None:
            return torch.full((B,), T, dtype=torch.int64, device=device)
        if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.shape[0] != B:
            raise ValueError(f"SluiceLSTM: argument 'lengths' must be a 1-D tensor of {B} lengths, got "
                             f"{tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__}")
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(f"SluiceLSTM: argument 'lengths' must be an integer tensor, got {lengths.dtype} "
                            "(a fractional length has no meaning; lengths are never rounded)")
        lengths = lengths.to(device=device, dtype=torch.int64)
        _checks.values_in_range("SluiceLSTM", "lengths", lengths, 0, T, f"[0, {T}] (the sequence length)")
        return lengths
