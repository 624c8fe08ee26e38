"""Sparse sharing against negative transfer: Sun et al. 2020, "Learning Sparse Sharing
Architectures for Multiple Tasks" (AAAI), the synthetic experiment with an unrelated auxiliary task.

Claim: trained together with an unrelated auxiliary task, hard sharing (one dense network for both
tasks) lowers the main task's accuracy against single task (negative transfer); sparse sharing
(each task on its own binary-masked subnet of the base network, masks from iterative magnitude
pruning) does not.

Setup: the main task tags sentences of 30 tokens from a random 40-state, 100-word HMM with their
hidden states (the forward-backward accuracy is the Bayes ceiling); the auxiliary task predicts
each token's position. Frozen random 50-d embeddings -> ``mtlfast.nn.SparseSharingLSTM`` (1 layer,
bidirectional, hidden 50, 2 tasks) -> a linear head per task. Settings: single task; hard sharing
(every mask True, both tasks in one ``task="all"`` call, summed loss); sparse sharing
(``mtlfast.pruning.sparse_sharing_masks``: a hard-shared warm-up of a quarter of the steps, then per
task 5 IMP rounds to density 0.1 with rewind to the warm-up weights, the best dev round kept, then
both tasks trained jointly on their subnets); a control, the main task alone on its sparse subnet.
Each setting's final architecture trains ``steps`` steps (Adam, lr 3e-3, batches of 32 fresh
sentences); accuracies are on 1000 held-out sentences. ``--seed`` fixes the HMM, the data and the
initial weights; ``Config`` holds every size.

Run: ``python -m examples.sparse_sharing_negative_transfer [--steps N] [--seed S] [--device D]``
(writes ``examples/results/sparse_sharing_negative_transfer.{json,png}``). Findings, and why the
setup is what it is: ``examples/README.md``.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import mtlfast.nn as mnn
from mtlfast import pruning as P

from examples._hmm import HMM, posterior
from examples._common import main, seed_everything

NAME = "sparse_sharing_negative_transfer"
DESCRIPTION = "Sun et al. 2020: sparse sharing vs hard sharing with an unrelated auxiliary task"
STEPS = 2000
MAIN, AUX = 0, 1
SETTINGS = ("single", "hard", "sparse")
LABELS = {"single": "single task", "hard": "hard sharing", "sparse": "sparse sharing",
          "subnet_alone": "main alone on its\nsparse subnet (control)"}


@dataclass(frozen=True)
class Config:
    """Everything the experiment is made of; ``run(config=...)`` takes a modified copy."""

    states: int = 40                      # HMM hidden states = main-task classes
    vocab: int = 100
    length: int = 30                      # tokens per sentence
    transition_concentration: float = 0.1
    emission_concentration: float = 0.1
    position_cap: Optional[int] = None    # auxiliary labels min(position, cap - 1); None: length
    dev_sentences: int = 500
    test_sentences: int = 1000
    embedding: int = 50
    hidden: int = 50
    batch: int = 32
    lr: float = 3e-3
    warmup_fraction: float = 0.25         # of steps, multi-task warm-up (0: none, rewind to init)
    round_fraction: float = 0.2           # of steps, training per IMP round
    rounds: int = 5
    final_density: float = 0.1
    curve_points: int = 10                # test evaluations per learning curve
    control: bool = True                  # also train the main task alone on its sparse subnet
    margin: float = 0.01                  # "hard sharing hurts": single - hard >= margin
    tolerance: float = 0.01               # "sparse does not hurt": sparse >= single - tolerance


# ----------------------------------------------------------------------------------------- data

def make_hmm(cfg: Config) -> HMM:
    """A random HMM from torch's global generator (seeded by the caller)."""
    dirichlet = torch.distributions.Dirichlet
    S, V = cfg.states, cfg.vocab
    start = dirichlet(torch.ones(S, dtype=torch.float64)).sample()
    trans = dirichlet(torch.full((S,), cfg.transition_concentration, dtype=torch.float64)).sample((S,))
    emit = dirichlet(torch.full((V,), cfg.emission_concentration, dtype=torch.float64)).sample((S,))
    return HMM(start, trans, emit)


def sample(hmm: HMM, n: int, cfg: Config, gen: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """n sentences: words (n, L) and the labels [hidden states (n, L), positions (n, L)]."""
    L = cfg.length
    z = torch.empty(n, L, dtype=torch.long)
    x = torch.empty(n, L, dtype=torch.long)
    z[:, 0] = torch.multinomial(hmm.start.expand(n, -1), 1, generator=gen).squeeze(1)
    for t in range(L):
        if t:
            z[:, t] = torch.multinomial(hmm.trans[z[:, t - 1]], 1, generator=gen).squeeze(1)
        x[:, t] = torch.multinomial(hmm.emit[z[:, t]], 1, generator=gen).squeeze(1)
    cap = cfg.position_cap or L
    positions = torch.arange(L).clamp(max=cap - 1).expand(n, L).contiguous()
    return x, [z, positions]


def posterior_decode(hmm: HMM, x: torch.Tensor) -> torch.Tensor:
    """argmax_z p(z_t | x_1..L): the Bayes-optimal tags, (n, L)."""
    return posterior(hmm, x).argmax(-1)


def stream(hmm: HMM, cfg: Config, seed: int, chunk: int = 64) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Endless training batches of fresh sentences (sampled ``chunk`` batches at a time)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        x, ys = sample(hmm, chunk * cfg.batch, cfg, gen)
        for i in range(0, chunk * cfg.batch, cfg.batch):
            yield x[i:i + cfg.batch], [y[i:i + cfg.batch] for y in ys]


# ---------------------------------------------------------------------------------------- model

class Tagger(nn.Module):
    """Fixed random embeddings -> shared SparseSharingLSTM (1 layer, bi) -> one linear head per task."""

    def __init__(self, cfg: Config, classes: Sequence[int]):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.embedding)
        self.embed.weight.requires_grad_(False)
        self.lstm = mnn.SparseSharingLSTM(cfg.embedding, cfg.hidden, num_tasks=len(classes),
                                          bidirectional=True, batch_first=True)
        self.heads = nn.ModuleList(nn.Linear(2 * cfg.hidden, c) for c in classes)

    def forward(self, x: torch.Tensor, tasks: Sequence[int]) -> list[torch.Tensor]:
        """Logits (B, L, classes) of each task in ``tasks``: one task runs its subnet; both run
        in one call (``task="all"``: every task's subnet on the same input)."""
        if len(tasks) == 1:
            out, _ = self.lstm(self.embed(x), task=tasks[0])
            return [self.heads[tasks[0]](out)]
        out, _ = self.lstm(self.embed(x), task="all")              # (tasks, B, L, 2H)
        return [self.heads[t](out[t]) for t in tasks]


class Experiment:
    """The data of one seed and the training and evaluation every setting uses."""

    def __init__(self, cfg: Config, seed: int, device: torch.device):
        self.cfg, self.seed, self.device = cfg, seed, device
        gen = seed_everything(seed)
        self.hmm = make_hmm(cfg)
        self.dev = sample(self.hmm, cfg.dev_sentences, cfg, gen)
        self.test = sample(self.hmm, cfg.test_sentences, cfg, gen)
        x, (z, _) = self.test
        self.bayes = float((posterior_decode(self.hmm, x) == z).double().mean())
        self.classes = (cfg.states, cfg.position_cap or cfg.length)

    def model(self) -> Tagger:
        """The same initial weights (and embeddings) for every setting."""
        torch.manual_seed(self.seed + 1)
        return Tagger(self.cfg, self.classes).to(self.device)

    def train(self, model: Tagger, tasks: Sequence[int], steps: int, data_seed: int,
              params: Optional[list[nn.Parameter]] = None, curve: Optional[list] = None,
              offset: int = 0, marks: Sequence[int] = ()) -> None:
        """``steps`` Adam steps on the summed loss of ``tasks``; appends (offset + step, main
        test accuracy) to ``curve`` ``cfg.curve_points`` times and at every step of ``marks``."""
        params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.cfg.lr)
        batches = stream(self.hmm, self.cfg, data_seed)
        every = max(1, steps // self.cfg.curve_points)
        model.train()
        for step in range(1, steps + 1):
            x, ys = next(batches)
            x = x.to(self.device)
            logits = model(x, tasks)
            loss = sum(F.cross_entropy(lg.flatten(0, 1), ys[t].to(self.device).flatten())
                       for lg, t in zip(logits, tasks))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if curve is not None and (step % every == 0 or step == steps or step in marks):
                curve.append((offset + step, self.accuracy(model, MAIN, "test")))

    def accuracy(self, model: Tagger, task: int, split: str, chunk: int = 500) -> float:
        x, ys = getattr(self, split)
        right = 0
        model.eval()
        with torch.no_grad():
            for i in range(0, x.shape[0], chunk):
                logits = model(x[i:i + chunk].to(self.device), (task,))[0]
                right += int((logits.argmax(-1).cpu() == ys[task][i:i + chunk]).sum())
        model.train()
        return right / ys[task].numel()


# ------------------------------------------------------------------------------------------ run

def run(steps: int = STEPS, seed: int = 0, device: torch.device = torch.device("cpu"),
        config: Optional[Config] = None) -> dict[str, Any]:
    """The three settings (and the control) on one random HMM; JSON-serialisable figures."""
    cfg = config or Config()
    if steps < 10:
        raise ValueError(f"run: argument 'steps' must be >= 10, got {steps}")
    ex = Experiment(cfg, seed, device)
    seconds: dict[str, float] = {}
    curves: dict[str, list] = {}
    main_acc: dict[str, float] = {}
    aux_acc: dict[str, Optional[float]] = {}
    data_seed = 1000 * seed + 7            # one batch stream for every setting's final training

    for setting, tasks in (("single", (MAIN,)), ("hard", (MAIN, AUX))):
        start = time.perf_counter()
        model = ex.model()
        curves[setting] = []
        ex.train(model, tasks, steps, data_seed, curve=curves[setting])
        main_acc[setting] = ex.accuracy(model, MAIN, "test")
        aux_acc[setting] = ex.accuracy(model, AUX, "test") if AUX in tasks else None
        seconds[setting] = time.perf_counter() - start

    # sparse sharing: warm-up + IMP (mtlfast.pruning), then both tasks on their subnets
    start = time.perf_counter()
    model = ex.model()
    warm_steps = int(cfg.warmup_fraction * steps)
    round_steps = max(1, int(cfg.round_fraction * steps))
    heads: dict[str, Any] = {"state": copy.deepcopy(model.heads.state_dict())}

    def warmup_fn(lstm: nn.Module) -> None:
        ex.train(model, (MAIN, AUX), warm_steps, data_seed + 1)
        heads["state"] = copy.deepcopy(model.heads.state_dict())

    calls = {MAIN: 0, AUX: 0}

    def train_fn(lstm: nn.Module, task: int, k: Optional[int]) -> None:
        # IMP rewinds the LSTM; the task's head restarts from the warm-up head with it
        model.heads.load_state_dict(heads["state"])
        calls[task] += 1
        ex.train(model, (task,), k, data_seed + 10 * calls[task] + task,
                 params=list(model.lstm.parameters()) + list(model.heads[task].parameters()))

    def eval_fn(lstm: nn.Module, task: int) -> float:
        return ex.accuracy(model, task, "dev")

    history = P.sparse_sharing_masks(model.lstm, train_fn, eval_fn,
                                     warmup_fn=warmup_fn if warm_steps else None,
                                     final_density=cfg.final_density, rounds=cfg.rounds,
                                     steps_per_round=round_steps)
    model.heads.load_state_dict(heads["state"])
    seconds["mask search"] = time.perf_counter() - start
    density = [model.lstm.density(t) for t in (MAIN, AUX)]
    masks = [P.get_task_masks(model.lstm, t) for t in (MAIN, AUX)]
    overlap = P.mask_overlap_ratio(masks)
    start_state = copy.deepcopy(model.state_dict())
    warm_main = ex.accuracy(model, MAIN, "test")

    # Budget: the subnets train for ``steps`` steps, as the baselines; the warm-up is part of the
    # mask search. The main weights' accuracy after ``steps`` updates in all (warm-up included) is
    # recorded on the way (``*_equal_updates``).
    equal = steps - warm_steps
    start = time.perf_counter()
    curves["sparse"] = [(warm_steps, warm_main)]
    ex.train(model, (MAIN, AUX), steps, data_seed, curve=curves["sparse"], offset=warm_steps, marks=(equal,))
    main_acc["sparse"] = ex.accuracy(model, MAIN, "test")
    aux_acc["sparse"] = ex.accuracy(model, AUX, "test")
    equal_updates = {"sparse": dict(curves["sparse"])[steps]}
    seconds["sparse"] = time.perf_counter() - start

    if cfg.control:
        start = time.perf_counter()
        model.load_state_dict(start_state)
        curves["subnet_alone"] = [(warm_steps, warm_main)]
        ex.train(model, (MAIN,), steps, data_seed, curve=curves["subnet_alone"], offset=warm_steps, marks=(equal,),
                 params=list(model.lstm.parameters()) + list(model.heads[MAIN].parameters()))
        main_acc["subnet_alone"] = ex.accuracy(model, MAIN, "test")
        equal_updates["subnet_alone"] = dict(curves["subnet_alone"])[steps]
        seconds["control"] = time.perf_counter() - start

    d0, d1 = density
    shared = overlap * (d0 + d1) / (1 + overlap)           # |M_main ∩ M_aux| / weights, from the ratio
    single, hard, sparse = (main_acc[s] for s in SETTINGS)
    figures: dict[str, Any] = {
        "paper": "Sun et al. 2020, Learning Sparse Sharing Architectures for Multiple Tasks (AAAI)",
        "config": asdict(cfg),
        "steps": steps,
        "seed": seed,
        "bayes_accuracy": ex.bayes,
        "main_accuracy": main_acc,
        "aux_accuracy": aux_acc,
        "negative_transfer": {"hard": single - hard, "sparse": single - sparse},
        "recovered_fraction": (sparse - hard) / (single - hard) if single != hard else None,
        "main_accuracy_equal_updates": equal_updates,
        "density": {"main": d0, "aux": d1},
        "overlap": overlap,
        "chance_overlap": d0 * d1 / (d0 + d1 - d0 * d1),
        "aux_inside_main": shared / d1 if d1 else None,
        "warmup_steps": warm_steps,
        "warmup_main_accuracy": warm_main,
        "imp": {name: [{"round": r.round, "density": r.density, "dev_accuracy": r.score} for r in history[t]]
                for name, t in (("main", MAIN), ("aux", AUX))},
        "curves": curves,
        "seconds": seconds,
        "expected": {
            "hard_below_single": single - hard >= cfg.margin,
            "sparse_not_below_single": sparse >= single - cfg.tolerance,
            "sparse_not_below_single_equal_updates": equal_updates["sparse"] >= single - cfg.tolerance,
            "sparse_above_hard": sparse - hard >= cfg.margin,
            "overlap_in_open_unit_interval": 0.0 < overlap < 1.0,
        },
    }
    if cfg.control:
        figures["overlap_transfer"] = main_acc["subnet_alone"] - sparse
    return figures


# ------------------------------------------------------------------------------ summary and plot

def summary(f: dict[str, Any]) -> str:
    cfg = f["config"]
    acc, aux = f["main_accuracy"], f["aux_accuracy"]
    lines = [
        f"Sparse sharing vs negative transfer (Sun et al. 2020), seed {f['seed']}, {f['steps']} steps",
        f"main: HMM tagging, {cfg['states']} states, {cfg['vocab']} words, length {cfg['length']}; "
        f"aux: token position; BiLSTM {cfg['hidden']} (SparseSharingLSTM)",
        f"Bayes ceiling (forward-backward) on the test sentences: {f['bayes_accuracy']:.3f}",
        "",
        f"{'setting':<30}{'main acc':>10}{'vs single':>11}{'aux acc':>9}",
    ]
    for key in (*SETTINGS, "subnet_alone"):
        if key not in acc:
            continue
        a = aux.get(key)
        label = "main alone on sparse subnet" if key == "subnet_alone" else LABELS[key]
        lines.append(f"{label:<30}{acc[key]:>10.3f}{acc[key] - acc['single']:>+11.3f}"
                     f"{'' if a is None else f'{a:.3f}':>9}")
    d = f["density"]
    lines += [
        "",
        f"subnets: density main {d['main']:.3f}, aux {d['aux']:.3f}; overlap ratio {f['overlap']:.3f} "
        f"(independent masks: {f['chance_overlap']:.3f}); aux subnet inside main's: {f['aux_inside_main']:.0%}",
        f"IMP dev accuracy by density, main: "
        + ", ".join(f"{r['density']:.2f}:{r['dev_accuracy']:.3f}" for r in f["imp"]["main"]),
        f"negative transfer (single - setting): hard {f['negative_transfer']['hard']:+.3f}, "
        f"sparse {f['negative_transfer']['sparse']:+.3f}; sparse recovers "
        + (f"{f['recovered_fraction']:.0%}" if f["recovered_fraction"] is not None else "n/a")
        + " of hard sharing's loss",
    ]
    eq = f["main_accuracy_equal_updates"]
    lines.append(f"after {f['steps']} updates in all (warm-up included): sparse {eq['sparse']:.3f} "
                 f"({eq['sparse'] - acc['single']:+.3f} vs single)"
                 + (f", control {eq['subnet_alone']:.3f}" if "subnet_alone" in eq else ""))
    if "overlap_transfer" in f:
        lines.append(f"through the shared weights (control - sparse): {f['overlap_transfer']:+.3f}")
    lines.append("expected: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in f["expected"].items()))
    lines.append("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in f["seconds"].items()))
    return "\n".join(lines)


def plot(f: dict[str, Any]):
    import matplotlib.pyplot as plt

    colors = {"single": "tab:blue", "hard": "tab:red", "sparse": "tab:green", "subnet_alone": "tab:gray"}
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.6))
    for key, curve in f["curves"].items():
        steps, accs = zip(*curve)
        ax1.plot(steps, accs, marker="o", ms=3, color=colors[key], ls="--" if key == "subnet_alone" else "-",
                 label=LABELS[key].replace("\n", " "))
    if f["warmup_steps"]:
        ax1.axvspan(0, f["warmup_steps"], color="tab:green", alpha=0.08, label="sparse: warm-up (hard sharing)")
    ax1.axhline(f["bayes_accuracy"], color="k", lw=0.8, ls=":", label="Bayes ceiling")
    if f["warmup_steps"]:
        ax1.axvline(f["steps"], color="k", lw=0.6, ls="-.", label="equal updates in all")
    ax1.set(xlabel="training step", ylabel="main-task test accuracy", title="learning curves (main task)")
    ax1.legend(fontsize=7, loc="lower right")

    keys = [k for k in (*SETTINGS, "subnet_alone") if k in f["main_accuracy"]]
    values = [f["main_accuracy"][k] for k in keys]
    bars = ax2.bar(range(len(keys)), values, color=[colors[k] for k in keys])
    for bar, v in zip(bars, values):
        ax2.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax2.axhline(f["bayes_accuracy"], color="k", lw=0.8, ls=":")
    low = min(values) - 0.05
    ax2.set_ylim(max(0.0, low), max(f["bayes_accuracy"], max(values)) + 0.02)
    ax2.set_xticks(range(len(keys)), [LABELS[k] for k in keys], fontsize=8)
    ax2.set(ylabel="main-task test accuracy", title=f"after {f['steps']} training steps on the final architecture")

    for name, color in (("main", "tab:purple"), ("aux", "tab:orange")):
        rounds = f["imp"][name]
        ax3.plot([r["density"] for r in rounds], [r["dev_accuracy"] for r in rounds], marker="o", color=color,
                 label=f"{name} (chosen density {f['density'][name]:.2f})")
        ax3.axvline(f["density"][name], color=color, lw=0.8, ls=":")
    ax3.invert_xaxis()
    ax3.set(xlabel="subnet density (IMP round)", ylabel="dev accuracy after the round's training",
            title=f"IMP masks: overlap {f['overlap']:.2f} (chance {f['chance_overlap']:.2f})")
    ax3.legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main(NAME, DESCRIPTION, STEPS, run, summary, plot)
