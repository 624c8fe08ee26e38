"""alpha_mix and sluice_lstm: sluice networks (Ruder et al. 2019), the subspace mixing alone and a
whole training step of the paper's network.

After layer k the outputs of the M task networks, each split in S subspaces, are mixed by a learned
``(MS, MS)`` matrix α (``mtlfast.functional.alpha_mix``); a learned β ``(M, layers)`` mixes each
task's layer outputs. Sizes are the paper's taggers: 2 tasks, 2 subspaces, 3 bidirectional LSTM
layers of hidden 100 on a 164-wide input (word embeddings + character features), batches of 32
sentences of 32 tokens; plus a bandwidth-bound GPU size of the mixing.

**alpha_mix**: arguments ``(h, alpha, num_subspaces)``, ``h`` ``(M, *rows, D)`` with ``D = S*d``,
chunk ``i = m*S + s`` is ``h[m, ..., s*d:(s+1)*d]``, ``out_i = Σ_j alpha[i, j] · chunk_j``; returns
``(M, *rows, D)``. Providers: ``eager`` (what sluice code does: every task's output split in its
S chunks, the MS chunks stacked, one matmul with α, split and concatenated back: several launches
and copies), ``compile`` and the mtlfast backends. Bytes (the harness's count): h, α and the output
once; fwd+bwd adds the output gradient, dh and dα.

**sluice_lstm**: arguments ``(x, *params, config)``, ``x`` ``(B, L, input)`` shared by every task
(batch_first), ``params`` in :meth:`Config.param_names` order: per task t the parameters of a
``num_layers``-deep torch.nn.LSTM named ``task{t}.weight_ih_l{k}`` ... ``task{t}.bias_hh_l{k}_reverse``
(torch.nn.LSTM's names and order behind a ``task{t}.`` prefix), then ``alpha_l{k}`` ``(MS, MS)`` per
layer, then ``beta`` ``(M, layers)``. Every provider returns ``(M, B, L, D*H)``: per task
``Σ_k beta[m, k] · mixed_k[m]`` where ``mixed_k`` is the α-mix of the M layer-k outputs (each
direction's H units split in S subspaces of H/S, both directions mixed with the same α, as
SluiceLSTM does), and layer k + 1 of task m reads ``mixed_k[m]``.
Providers: ``eager`` (the oracle: per task and layer a one-layer bidirectional LSTM through
``torch._VF.lstm``, what torch.nn.LSTM runs: cuDNN / oneDNN; the mixing as stack / matmul / split /
cat, β as stack and weighted sum), ``eager-hard-sharing`` (timed only, a different network: the
paper's hard-sharing baseline, one 3-layer bidirectional LSTM shared by every task, its output
repeated per task), ``compile`` (torch.compile of eager: the LSTM calls stay graph breaks, as
torch.compile leaves torch.nn.LSTM by default, the mixing between them is compiled) and the mtlfast
backends (``mtlfast.nn.SluiceLSTM`` through ``functional_call`` with the benchmark's parameters:
:func:`module_state` is the one place that knows its parameter names).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bench import inputs
from bench.registry import OpBench, Workload, register

ALPHA_OP = "alpha_mix"
LSTM_OP = "sluice_lstm"

# ---------------------------------------------------------------------------------------------
# alpha_mix: the subspace mixing alone


def _mix(tasks: Sequence[torch.Tensor], alpha: torch.Tensor, num_subspaces: int) -> list[torch.Tensor]:
    """Sluice code's α mixing of the M task outputs ``(..., D)``: every task's output split in its
    S chunks, the MS chunks stacked ``(MS, ..., d)`` (a copy), one matmul with α (contraction over
    MS), the result split back into chunks and each task's S chunks concatenated (another copy)."""
    S = num_subspaces
    d = tasks[0].shape[-1] // S
    stacked = torch.stack([chunk for task in tasks for chunk in task.split(d, dim=-1)])
    mixed = (alpha @ stacked.flatten(1)).view_as(stacked).unbind(0)
    return [torch.cat(mixed[m * S:(m + 1) * S], dim=-1) for m in range(len(tasks))]


def alpha_mix_eager(h: torch.Tensor, alpha: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    """What a user writes: :func:`_mix` of the M task outputs ``h.unbind(0)``, stacked back."""
    return torch.stack(_mix(h.unbind(0), alpha, num_subspaces))


def alpha_mix_inputs(params: Mapping[str, Any], device: torch.device, dtype: torch.dtype,
                     requires_grad: bool, seed: int) -> tuple:
    """h ``(M, *rows, D)`` standard normal, alpha ``(MS, MS)`` normal with std ``1/sqrt(MS)``, S."""
    M, S = params["num_tasks"], params["num_subspaces"]
    g = inputs.generator(seed)
    h = inputs.randn(g, M, *params["rows"], params["features"])
    alpha = inputs.randn(g, M * S, M * S, scale=(M * S) ** -0.5)
    return (inputs.place(h, device, dtype, requires_grad), inputs.place(alpha, device, dtype, requires_grad), S)


def alpha_mix_fn() -> Callable[..., torch.Tensor]:
    """``mtlfast.functional.alpha_mix`` (imported lazily)."""
    from mtlfast.functional import alpha_mix

    return alpha_mix


def alpha_mix_custom_op(h: torch.Tensor, alpha: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    """mtlfast's kernels through the registered custom op ``mtlfast::alpha_mix`` and its registered
    autograd (what torch.compile runs), instead of the eager autograd.Function that
    ``MF.alpha_mix`` uses: the same kernels, so the difference is host time per call."""
    import mtlfast.ops.sluice as ops

    backend = ops.ALPHA_MIX.select(h, alpha)
    if backend == "reference":
        return ops.alpha_mix_reference(h, alpha, num_subspaces)
    h3 = h.reshape(h.shape[0], -1, h.shape[-1]).contiguous()
    return torch.ops.mtlfast.alpha_mix(h3, alpha, num_subspaces, backend).view(h.shape)


def alpha_mix_flops(params: Mapping[str, Any], mode: str) -> float:
    """Each of the M·rows·D outputs is a sum of MS products: 2·MS FLOPs; fwd+bwd 3x (dh, dα)."""
    M, S = params["num_tasks"], params["num_subspaces"]
    rows = 1
    for n in params["rows"]:
        rows *= n
    forward = 2.0 * M * S * M * rows * params["features"]
    return forward if mode == "fwd" else 3.0 * forward


def _alpha_workload(name: str, num_tasks: int, num_subspaces: int, rows: Sequence[int], features: int,
                    source: str, **kwargs: Any) -> Workload:
    params = {"num_tasks": num_tasks, "num_subspaces": num_subspaces, "rows": tuple(rows), "features": features}
    return Workload(ALPHA_OP, name, params, source, **kwargs)


ALPHA_WORKLOADS = (
    _alpha_workload("alpha-mix-large", 4, 2, (262144,), 512,
                    "bandwidth-bound GPU size: 4 tasks x 2 subspaces, 262144 rows of 512 (1 GiB of h in bf16)",
                    skip_on={"cpu": "GPU-only workload: h alone is 2 GiB in fp32; eager takes ~12 s per fwd "
                                    "and ~20 s per fwd+bwd call on a 2-core CPU (measured at 1/4 size)"}),
    _alpha_workload("alpha-mix-paper", 2, 2, (32, 32), 200,
                    "sluice network, the paper's taggers: 2 tasks x 2 subspaces of a 2 x 100 bi-LSTM "
                    "output, batch 32 x length 32"),
    _alpha_workload("alpha-mix-step", 2, 2, (32,), 200,
                    "one time step of the paper's taggers (batch 32): host time per call dominates"),
    _alpha_workload("alpha-mix-tiny", 3, 2, (5, 3), 8, "smoke-test size for the harness tests", default=False),
)

ALPHA_SPEC = OpBench(op=ALPHA_OP, make_inputs=alpha_mix_inputs, eager=alpha_mix_eager, dense=None,
                     mtlfast=alpha_mix_fn, flops=alpha_mix_flops, variants={"mtlfast-custom-op": alpha_mix_custom_op})

register(ALPHA_SPEC, ALPHA_WORKLOADS)

# ---------------------------------------------------------------------------------------------
# sluice_lstm: a training step of the whole network

KINDS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


@dataclass(frozen=True)
class Config:
    """The sluice network's sizes (the last argument of every provider)."""

    input_size: int
    hidden_size: int
    num_tasks: int
    num_layers: int
    num_subspaces: int
    bidirectional: bool

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        return self.hidden_size * self.directions

    def suffixes(self) -> tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    def lstm_names(self, layers: Sequence[int] | None = None) -> list[str]:
        """torch.nn.LSTM's parameter names of ``layers`` (default all), in its order."""
        layers = range(self.num_layers) if layers is None else layers
        return [f"{kind}_l{layer}{suffix}" for layer in layers for suffix in self.suffixes() for kind in KINDS]

    def param_names(self) -> list[str]:
        """The benchmark's parameter names, in argument order."""
        return ([f"task{t}.{name}" for t in range(self.num_tasks) for name in self.lstm_names()]
                + [f"alpha_l{k}" for k in range(self.num_layers)] + ["beta"])

    def layer_input(self, layer: int) -> int:
        return self.input_size if layer == 0 else self.output_size

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of parameter ``name`` (one of :meth:`param_names`)."""
        H, MS = self.hidden_size, self.num_tasks * self.num_subspaces
        if name.startswith("alpha"):
            return (MS, MS)
        if name == "beta":
            return (self.num_tasks, self.num_layers)
        lstm_name = name.split(".", 1)[1]
        if lstm_name.startswith("bias"):
            return (4 * H,)
        layer = int(lstm_name.split("_l")[1].split("_")[0])
        return (4 * H, self.layer_input(layer) if lstm_name.startswith("weight_ih") else H)


def config_of(params: Mapping[str, Any]) -> Config:
    return Config(params["input_size"], params["hidden_size"], params["num_tasks"], params["num_layers"],
                  params["num_subspaces"], params["bidirectional"])


def sluice_inputs(params: Mapping[str, Any], device: torch.device, dtype: torch.dtype,
                  requires_grad: bool, seed: int) -> tuple:
    """(x, *params, config): x ``(B, L, input)`` standard normal; LSTM weights uniform(±1/sqrt(H)) like
    torch.nn.LSTM; α rows positive, mostly on the diagonal, summing to 1; β rows positive summing to 1."""
    cfg = config_of(params)
    H, MS = cfg.hidden_size, cfg.num_tasks * cfg.num_subspaces
    g = inputs.generator(seed)
    x = inputs.randn(g, params["batch"], params["length"], cfg.input_size)
    values = []
    for name in cfg.param_names():
        shape = cfg.shape(name)
        if name.startswith("task"):
            values.append((torch.rand(*shape, generator=g) * 2 - 1) * H ** -0.5)
        elif name.startswith("alpha"):
            a = torch.rand(*shape, generator=g) + MS * torch.eye(MS)
            values.append(a / a.sum(1, keepdim=True))
        else:
            b = torch.rand(*shape, generator=g) + 0.5
            values.append(b / b.sum(1, keepdim=True))
    return (inputs.place(x, device, dtype, requires_grad),
            *(inputs.place(v, device, dtype, requires_grad) for v in values), cfg)


def _unpack(args: Sequence[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], Config]:
    cfg = args[-1]
    return args[0], dict(zip(cfg.param_names(), args[1:-1])), cfg


@torch.compiler.disable  # torch.compile leaves torch.nn.LSTM to eager too (allow_rnn is off by default)
def _lstm(x: torch.Tensor, weights: list[torch.Tensor], cfg: Config, num_layers: int) -> torch.Tensor:
    """torch.nn.LSTM's forward (batch_first, zero initial state): ``_VF.lstm``, cuDNN / oneDNN."""
    zeros = x.new_zeros(num_layers * cfg.directions, x.shape[0], cfg.hidden_size)
    return torch._VF.lstm(x, (zeros, zeros), weights, True, num_layers, 0.0, True, cfg.bidirectional, True)[0]


def sluice_eager(*args: Any) -> torch.Tensor:
    """The sluice network in plain PyTorch: per layer, every task's one-layer (bi)LSTM on its input,
    then the α mixing of the M outputs (:func:`_mix`; each direction's H units split in S subspaces,
    both directions mixed with the same α), which is the next layer's input; at the end each task's
    β-weighted sum of its mixed layer outputs (stack, then weighted sum)."""
    x, p, cfg = _unpack(args)
    M, K, D, H = cfg.num_tasks, cfg.num_layers, cfg.directions, cfg.hidden_size
    layer_in = [x] * M
    mixed = []
    for k in range(K):
        # (B, L, D, H): each direction's output split in S subspaces, mixed with the same α
        outs = [_lstm(layer_in[t], [p[f"task{t}.{n}"] for n in cfg.lstm_names([k])], cfg, 1).unflatten(-1, (D, H))
                for t in range(M)]
        layer_in = [out.flatten(-2) for out in _mix(outs, p[f"alpha_l{k}"], cfg.num_subspaces)]
        mixed.append(layer_in)
    layers = torch.stack([out for per_task in mixed for out in per_task]).unflatten(0, (K, M))  # (K, M, B, L, DH)
    beta = p["beta"].t().reshape(K, M, *(1,) * (layers.dim() - 2))
    return (beta * layers).sum(0)


def sluice_hard_sharing(*args: Any) -> tuple[torch.Tensor, ...]:
    """The paper's hard-sharing baseline (timed only, not checked: a different network): one
    ``num_layers``-deep (bi)LSTM shared by every task (task 0's weights), its output repeated per
    task ``(M, B, L, D*H)``. The parameters it does not have (other tasks' LSTMs, α, β) are
    returned as they are, so that the harness's gradients of every input exist (free: the
    gradient of a returned leaf is its output gradient)."""
    x, p, cfg = _unpack(args)
    out = _lstm(x, [p[f"task0.{n}"] for n in cfg.lstm_names()], cfg, cfg.num_layers)
    unused = tuple(v for name, v in p.items() if not name.startswith("task0."))
    return (out.expand(cfg.num_tasks, *out.shape), *unused)


sluice_hard_sharing.checked = False  # type: ignore[attr-defined]  # read by bench/providers.py


def module_state(params: Mapping[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """The benchmark's parameters under ``mtlfast.nn.SluiceLSTM``'s names: the one place that knows
    them. ``lstms.{t}.{k}``: task t's layer k, a one-layer torch.nn.LSTM-shaped parameter set;
    ``mixers.{k}.alpha`` ``(MS, MS)`` after layer k; ``layer_mixture.beta`` ``(M, layers)``."""
    state = {}
    for t in range(cfg.num_tasks):
        for k in range(cfg.num_layers):
            for suffix in cfg.suffixes():
                for kind in KINDS:
                    state[f"lstms.{t}.{k}.{kind}_l0{suffix}"] = params[f"task{t}.{kind}_l{k}{suffix}"]
    for k in range(cfg.num_layers):
        state[f"mixers.{k}.alpha"] = params[f"alpha_l{k}"]
    state["layer_mixture.beta"] = params["beta"]
    return state


def check_names(model: torch.nn.Module, cfg: Config) -> None:
    """Raises ValueError when :func:`module_state` does not name and shape every parameter of
    ``model`` (a SluiceLSTM of ``cfg``)."""
    own = {name: tuple(p.shape) for name, p in model.named_parameters()}
    ours = module_state({name: cfg.shape(name) for name in cfg.param_names()}, cfg)  # type: ignore[arg-type]
    missing, unexpected = sorted(set(own) - set(ours)), sorted(set(ours) - set(own))
    shapes = [f"{n}: {own[n]} vs {ours[n]}" for n in own if n in ours and own[n] != ours[n]]
    if missing or unexpected or shapes:
        raise ValueError(f"SluiceLSTM's parameters differ from bench/workloads/sluice.py module_state: "
                         f"missing {missing}, unexpected {unexpected}, shapes (module vs bench) {shapes}")


_MODELS: dict[tuple, torch.nn.Module] = {}


def _model(cfg: Config, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from mtlfast.nn import SluiceLSTM

    key = (cfg, device, dtype)
    if key not in _MODELS:
        model = SluiceLSTM(input_size=cfg.input_size, hidden_size=cfg.hidden_size, num_tasks=cfg.num_tasks,
                           num_layers=cfg.num_layers, num_subspaces=cfg.num_subspaces,
                           bidirectional=cfg.bidirectional, batch_first=True, layer_mix="stitch")
        model = model.to(device=device, dtype=dtype)
        check_names(model, cfg)
        _MODELS[key] = model
    return _MODELS[key]


def sluice_lstm(*args: Any) -> torch.Tensor:
    """mtlfast: ``SluiceLSTM(x)`` with the benchmark's parameters (``functional_call``)."""
    x, params, cfg = _unpack(args)
    model = _model(cfg, x.device, x.dtype)
    return torch.func.functional_call(model, module_state(params, cfg), (x,))


def sluice_lstm_fn() -> Callable[..., torch.Tensor]:
    """The mtlfast provider (imports mtlfast.nn.SluiceLSTM: fails here, not at registration, when it
    is absent)."""
    from mtlfast.nn import SluiceLSTM  # noqa: F401

    return sluice_lstm


def sluice_flops(params: Mapping[str, Any], mode: str) -> float:
    """Dense-equivalent LSTM FLOPs: per token, task, direction and layer, 8·H·(I_layer + H) forward
    (the two gate matmuls; the cell's elementwise work, α and β mixing ignored: the mixing is
    2·MS FLOPs per output element per layer, ~0.3 % here); fwd+bwd is 3x that. The same count for
    every provider, eager-hard-sharing included (it does 1/M of this work)."""
    cfg = config_of(params)
    H = cfg.hidden_size
    per_token = sum(8.0 * H * (cfg.layer_input(k) + H) * cfg.directions for k in range(cfg.num_layers))
    forward = per_token * params["batch"] * params["length"] * cfg.num_tasks
    return forward if mode == "fwd" else 3.0 * forward


def _sluice_workload(name: str, num_tasks: int, num_subspaces: int, input_size: int, hidden_size: int,
                     num_layers: int, batch: int, length: int, source: str, bidirectional: bool = True,
                     **kwargs: Any) -> Workload:
    params = {"num_tasks": num_tasks, "num_subspaces": num_subspaces, "input_size": input_size,
              "hidden_size": hidden_size, "num_layers": num_layers, "bidirectional": bidirectional,
              "batch": batch, "length": length}
    return Workload(LSTM_OP, name, params, source, **kwargs)


LSTM_WORKLOADS = (
    _sluice_workload("sluice-step", 2, 2, 164, 100, 3, 32, 32,
                     "sluice network (Ruder et al. 2019): 2 tasks, 2 subspaces, 3 bi-LSTM layers 164 -> 100, "
                     "alpha after every layer, beta layer mix, batch 32 x length 32"),
    _sluice_workload("sluice-tiny", 2, 2, 6, 4, 3, 3, 5, "smoke-test size for the harness tests", default=False),
)

LSTM_SPEC = OpBench(op=LSTM_OP, make_inputs=sluice_inputs, eager=sluice_eager, dense=None, mtlfast=sluice_lstm_fn,
                    flops=sluice_flops, variants={"eager-hard-sharing": sluice_hard_sharing},
                    library_ops=("masked_lstm_layer", "alpha_mix"))

register(LSTM_SPEC, LSTM_WORKLOADS)
