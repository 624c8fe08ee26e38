"""masked_lstm: the sparse-sharing multi-task LSTM (Sun et al. 2020), every task in one benchmark call.

Each task t runs the subnet ``M_t ⊙ θ`` of one shared LSTM θ. Sizes are the paper's taggers:
CoNLL-03 (3 tasks, input 130, hidden 200, bidirectional, 1 layer, batches of 10 sentences of
32 tokens) and OntoNotes (the same with 2 layers), plus a scaled-up GPU size.

Arguments of every provider: ``(x, *params, *masks, config)``

- ``x``: ``(tasks, T, B, input)`` in ``fwd+bwd`` (each task its own batch) and ``(T, B, input)``
  in ``fwd`` (every task's subnet on the same input, ``task="all"`` of SparseSharingLSTM).
  ``make_inputs`` picks the layout from ``requires_grad``, which the harness sets for ``fwd+bwd``.
- ``params``: the shared LSTM's parameters in torch.nn.LSTM's order (``weight_ih_l0``,
  ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``, ``..._reverse``, next layer ...).
- ``masks``: bool ``mask_ih_l{k}``, ``mask_hh_l{k}`` per layer, each ``(directions * tasks, 4H, in)``;
  row ``d * tasks + t`` is task t's mask of direction d (SparseSharingLSTM's buffer layout).
  Random with the task's density, seeded: the same masks for every provider and device.
- ``config``: :class:`Config` (sizes; hashable, no tensors).

Every provider returns ``(output, h_n, c_n)`` stacked per task on dim 0: ``(tasks, T, B, D*H)``,
``(tasks, L*D, B, H)`` twice. The harness's seeded output gradients on all three are the loss
``Σ_t Σ (out_t ⊙ R)`` (every element gets a gradient); gradients go to x and every parameter.

Providers: ``eager-loop`` (the oracle: per task, per layer, per direction, a per-time-step Python
loop of the cell on ``W ⊙ M``, as the original sparse-sharing code), ``eager-lstm`` (per task the
masked weights materialised and ``torch.nn.LSTM`` run on them through ``functional_call``:
cuDNN on GPU, oneDNN on CPU), ``compile`` (``torch.compile`` of eager-loop) and the mtlfast
backends (``SparseSharingLSTM`` once on the concatenation of every task's batch with per-sample
task ids, or with ``task="all"`` in ``fwd``: every-task inference); ``triton-step`` and
``triton-sequence`` are the Triton backend with its recurrences forced to one launch per step or
one per sequence (``triton`` alone is the automatic choice).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bench import inputs
from bench.registry import OpBench, Workload, register

OP = "masked_lstm"


@dataclass(frozen=True)
class Config:
    """The multi-task LSTM's sizes (the last argument of every provider)."""

    input_size: int
    hidden_size: int
    num_tasks: int
    num_layers: int
    bidirectional: bool

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    def suffixes(self) -> tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    def param_names(self) -> list[str]:
        """torch.nn.LSTM's parameter names, in its order."""
        return [f"{kind}_l{layer}{suffix}" for layer in range(self.num_layers) for suffix in self.suffixes()
                for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]

    def mask_names(self) -> list[str]:
        return [f"mask_{kind}_l{layer}" for layer in range(self.num_layers) for kind in ("ih", "hh")]

    def layer_input(self, layer: int) -> int:
        return self.input_size if layer == 0 else self.hidden_size * self.directions


def config_of(params: Mapping[str, Any]) -> Config:
    return Config(params["input_size"], params["hidden_size"], len(params["densities"]),
                  params["num_layers"], params["bidirectional"])


def make_inputs(params: Mapping[str, Any], device: torch.device, dtype: torch.dtype,
                requires_grad: bool, seed: int) -> tuple:
    """(x, *params, *masks, config); x per task (fwd+bwd, ``requires_grad``) or shared (fwd)."""
    cfg = config_of(params)
    H, D, N, T, B = cfg.hidden_size, cfg.directions, cfg.num_tasks, params["length"], params["batch"]
    g = inputs.generator(seed)
    x = inputs.randn(g, *((N,) if requires_grad else ()), T, B, cfg.input_size)
    weights = []
    for name in cfg.param_names():  # uniform(-1/sqrt(H), 1/sqrt(H)) like torch.nn.LSTM
        cols = cfg.layer_input(int(name.split("_l")[1][0])) if "weight_ih" in name else H
        shape = (4 * H, cols) if name.startswith("weight") else (4 * H,)
        weights.append((torch.rand(*shape, generator=g) * 2 - 1) * H ** -0.5)
    masks = []
    for layer in range(cfg.num_layers):
        for cols in (cfg.layer_input(layer), H):
            rows = [inputs.random_mask(g, 4 * H, cols, density=params["densities"][t])
                    for _ in range(D) for t in range(N)]
            masks.append(torch.stack(rows))
    return (inputs.place(x, device, dtype, requires_grad),
            *(inputs.place(w, device, dtype, requires_grad) for w in weights),
            *(inputs.place(m, device) for m in masks), cfg)


def _unpack(args: Sequence[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], Config]:
    cfg = args[-1]
    names, mask_names = cfg.param_names(), cfg.mask_names()
    params = dict(zip(names, args[1:1 + len(names)]))
    masks = dict(zip(mask_names, args[1 + len(names):1 + len(names) + len(mask_names)]))
    return args[0], params, masks, cfg


def _task_inputs(x: torch.Tensor, cfg: Config) -> list[torch.Tensor]:
    """Each task's (T, B, I) input: its own batch (4-D x) or the shared one (3-D x)."""
    return list(x.unbind(0)) if x.dim() == 4 else [x] * cfg.num_tasks


def _masked(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], cfg: Config,
            task: int) -> dict[str, torch.Tensor]:
    """Task ``task``'s parameters: every weight times its mask, biases as they are."""
    out = {}
    for name, value in params.items():
        if name.startswith("weight"):
            kind, rest = name[len("weight_"):].split("_l", 1)
            direction = 1 if name.endswith("_reverse") else 0
            value = value * masks[f"mask_{kind}_l{rest.split('_')[0]}"][direction * cfg.num_tasks + task]
        out[name] = value
    return out


def _stack(results: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.stack(parts) for parts in zip(*results))


def eager_loop(*args: Any) -> tuple[torch.Tensor, ...]:
    """The original sparse-sharing formulation: per task, layer and direction, the LSTM cell in a
    Python loop over time steps on the masked weights ``W ⊙ M`` (gradients reach the shared W)."""
    x, params, masks, cfg = _unpack(args)
    H = cfg.hidden_size
    results = []
    for task, layer_in in enumerate(_task_inputs(x, cfg)):
        p = _masked(params, masks, cfg, task)
        T, B = layer_in.shape[:2]
        h_n, c_n = [], []
        for layer in range(cfg.num_layers):
            outs = []
            for suffix in cfg.suffixes():
                w_ih, w_hh = p[f"weight_ih_l{layer}{suffix}"], p[f"weight_hh_l{layer}{suffix}"]
                b_ih, b_hh = p[f"bias_ih_l{layer}{suffix}"], p[f"bias_hh_l{layer}{suffix}"]
                h = c = layer_in.new_zeros(B, H)
                steps = range(T - 1, -1, -1) if suffix else range(T)
                ys: list[torch.Tensor] = [layer_in] * T
                for t in steps:
                    gates = F.linear(layer_in[t], w_ih, b_ih) + F.linear(h, w_hh, b_hh)
                    i, f, g, o = gates.chunk(4, dim=1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                    ys[t] = h
                outs.append(torch.stack(ys))
                h_n.append(h)
                c_n.append(c)
            layer_in = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        results.append((layer_in, torch.stack(h_n), torch.stack(c_n)))
    return _stack(results)


_LSTMS: dict[tuple, torch.nn.LSTM] = {}


def _lstm(cfg: Config, device: torch.device, dtype: torch.dtype) -> torch.nn.LSTM:
    """A plain torch.nn.LSTM of ``cfg`` (its own weights are replaced by functional_call)."""
    key = (cfg, device, dtype)
    if key not in _LSTMS:
        _LSTMS[key] = torch.nn.LSTM(cfg.input_size, cfg.hidden_size, cfg.num_layers,
                                    bidirectional=cfg.bidirectional).to(device=device, dtype=dtype)
    return _LSTMS[key]


def eager_lstm(*args: Any) -> tuple[torch.Tensor, ...]:
    """Per task: masked weights materialised, then torch.nn.LSTM (cuDNN / oneDNN) on them."""
    x, params, masks, cfg = _unpack(args)
    lstm = _lstm(cfg, x.device, x.dtype)
    results = []
    for task, xt in enumerate(_task_inputs(x, cfg)):
        out, (h_n, c_n) = torch.func.functional_call(lstm, _masked(params, masks, cfg, task), (xt,))
        results.append((out, h_n, c_n))
    return _stack(results)


_MODELS: dict[tuple, torch.nn.Module] = {}


def _model(cfg: Config, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from mtlfast.nn import SparseSharingLSTM

    key = (cfg, device, dtype)
    if key not in _MODELS:
        _MODELS[key] = SparseSharingLSTM(cfg.input_size, cfg.hidden_size, cfg.num_layers, num_tasks=cfg.num_tasks,
                                         bidirectional=cfg.bidirectional).to(device=device, dtype=dtype)
    return _MODELS[key]


def sparse_sharing(*args: Any) -> tuple[torch.Tensor, ...]:
    """mtlfast: SparseSharingLSTM once for all tasks (its parameters and masks are the arguments).

    fwd+bwd: the tasks' batches concatenated, per-sample task ids; fwd: ``task="all"``."""
    x, params, masks, cfg = _unpack(args)
    model = _model(cfg, x.device, x.dtype)
    state = {**params, **masks}
    if x.dim() == 3:
        out, (h_n, c_n) = torch.func.functional_call(model, state, (x,), {"task": "all"})
        return out, h_n, c_n
    N, T, B, I = x.shape
    task = torch.arange(N, device=x.device).repeat_interleave(B)
    out, (h_n, c_n) = torch.func.functional_call(model, state, (x.transpose(0, 1).reshape(T, N * B, I),),
                                                 {"task": task})
    return (out.view(T, N, B, -1).transpose(0, 1), h_n.view(h_n.shape[0], N, B, -1).transpose(0, 1),
            c_n.view(c_n.shape[0], N, B, -1).transpose(0, 1))


def mtlfast_fn() -> Callable[..., tuple[torch.Tensor, ...]]:
    """The mtlfast provider (imports mtlfast.nn: fails here, not at registration, when it is absent)."""
    import mtlfast.nn  # noqa: F401

    return sparse_sharing


def _tokens(params: Mapping[str, Any]) -> int:
    return params["batch"] * params["length"]


def flops(params: Mapping[str, Any], mode: str) -> float:
    """Dense-equivalent LSTM FLOPs: per token, direction and layer, 8·H·(I_layer + H) forward (the
    two gate matmuls, 4H outputs each; masks, biases and the cell's elementwise work ignored),
    times every task's tokens; fwd+bwd is 3x that (dX and dW matmuls)."""
    cfg = config_of(params)
    H = cfg.hidden_size
    per_token = sum(8.0 * H * (cfg.layer_input(layer) + H) * cfg.directions for layer in range(cfg.num_layers))
    forward = per_token * _tokens(params) * cfg.num_tasks
    return forward if mode == "fwd" else 3.0 * forward


def _workload(name: str, densities: Sequence[float], input_size: int, hidden_size: int, num_layers: int,
              batch: int, length: int, source: str, bidirectional: bool = True, **kwargs: Any) -> Workload:
    params = {"densities": tuple(densities), "input_size": input_size, "hidden_size": hidden_size,
              "num_layers": num_layers, "bidirectional": bidirectional, "batch": batch, "length": length}
    return Workload(OP, name, params, source, **kwargs)


# Inductor compiles the fully unrolled loop (tasks x layers x directions x 32 steps): on a 2-core
# CPU conll03 took 58 s (fwd) and 190 s (fwd+bwd) to compile, ontonotes twice that.
_SLOW_COMPILE = {"cpu/compile": "torch.compile of the unrolled per-step loop takes minutes per case on a CPU "
                                "(conll03: 1 min fwd, 3 min fwd+bwd on 2 cores); timed on CUDA only"}

WORKLOADS = (
    _workload("conll03", (0.50, 0.56, 0.45), 130, 200, 1, 10, 32,
              "sparse-sharing LSTM, CoNLL-03: 3 tasks, bi-LSTM 130 -> 200, batch 10 x length 32 per task",
              skip_on=_SLOW_COMPILE),
    _workload("ontonotes", (0.32, 0.25, 0.40), 130, 200, 2, 10, 32,
              "sparse-sharing LSTM, OntoNotes: 3 tasks, 2-layer bi-LSTM 130 -> 200, batch 10 x length 32",
              skip_on=_SLOW_COMPILE),
    _workload("large", (0.5, 0.5, 0.5), 1024, 1024, 1, 64, 128,
              "scaled-up: 3 tasks, bi-LSTM 1024 -> 1024, batch 64 x length 128 per task",
              skip_on={"cpu": "GPU-only workload: 2.5e12 FLOP per fwd+bwd, tens of seconds per "
                              "call on a CPU",
                       "cuda/triton-sequence": "MTLFAST_LSTM_MODE=sequence refuses hidden 1024 (> 256: "
                                               "masked_lstm_sequence.sequence_unfit); the step kernels run it "
                                               "(triton-step, and triton's automatic choice)"}),
    _workload("lstm-tiny", (0.5, 0.7), 6, 5, 2, 3, 4, "smoke-test size for the harness tests", default=False),
)

SPEC = OpBench(op=OP, make_inputs=make_inputs, eager=eager_loop, dense=None, mtlfast=mtlfast_fn, flops=flops,
               eager_name="eager-loop", variants={"eager-lstm": eager_lstm}, library_ops=("masked_lstm_layer",),
               # the Triton recurrences forced to one launch per step or one per sequence (plain
               # "triton" is the library's automatic choice: sequence up to hidden 256)
               backend_modes={"triton-step": ("triton", {"MTLFAST_LSTM_MODE": "step"}),
                              "triton-sequence": ("triton", {"MTLFAST_LSTM_MODE": "sequence"})})

register(SPEC, WORKLOADS)
