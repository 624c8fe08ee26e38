"""Sluice networks, the Copy / Random experiment: Ruder, Bingel, Augenstein and Søgaard 2019,
"Latent Multi-task Architecture Learning" (AAAI; arXiv 1705.08142), with mtlfast's ``SluiceLSTM``.

Claim: a main task A and an auxiliary task B share a sluice network whose α starts at equal
weights. When B is a copy of A, A keeps taking from B as much as from itself; when B is a random
relabelling of the same sentences, A learns to ignore it: α_BA/α_AA drops quickly under Random and
stays level under Copy. Weighted, the subspace orthogonality penalty goes to (near) zero.

Setup: A tags the hidden states of a random HMM (5 tags, 20 tokens, sentences of 20; the
forward-backward accuracy is A's ceiling); B is A's tags (Copy) or a uniform tag per token drawn
once per dataset (Random), on the same 2000 training sentences. Model: a shared Embedding(20, 32)
-> ``SluiceLSTM(32, 32, num_tasks=2, num_layers=3, num_subspaces=2)`` (bidirectional, learned β,
``alpha_init="balanced"``: every α entry 1/4) -> a linear head per task. Loss CE_A + CE_B
(+ w · ``orthogonality_penalty()``), Adam lr 3e-3, batches of 32, 800 steps, at w = 0 and 0.01,
seeds seed .. seed + 2; within a seed every run shares the data, the initialisation and the batch
order. α_BA/α_AA is Σ alpha[0:S, S:2S] / Σ alpha[0:S, 0:S] per layer (rows receive, columns
send); the headline ratio is its mean over the layers, averaged over the seeds.

Run: ``python -m examples.sluice_copy_random [--steps N] [--seed S] [--device D]`` (writes
``examples/results/sluice_copy_random.{json,png}``). Findings, and why the setup is what it is:
``examples/README.md``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import mtlfast.nn as mnn

from examples._hmm import HMM, posterior
from examples._common import main, seed_everything

NAME = "sluice_copy_random"
STEPS = 800
SEEDS = 3
MAIN, AUX = 0, 1                 # task A (main) is task 0 of the SluiceLSTM, task B (auxiliary) task 1
AUX_TASKS = ("copy", "random")


@dataclass(frozen=True)
class Config:
    tags: int = 5                        # hidden states of the HMM = the main task's tags
    vocab: int = 20
    length: int = 20
    transition_concentration: float = 0.5
    emission_concentration: float = 0.3
    train_sentences: int = 2000
    heldout_sentences: int = 500
    embedding: int = 32
    hidden: int = 32
    layers: int = 3
    subspaces: int = 2
    batch: int = 32
    lr: float = 3e-3
    penalty_weight: float = 0.01         # the positive weight of the penalised runs
    log_every: int = 20
    # thresholds of the expected-result booleans (examples/README.md)
    ratio_margin: float = 0.05
    level_tolerance: float = 0.1
    penalty_fraction: float = 0.01


CONFIG = Config()


# ----------------------------------------------------------------------------------- data

def make_hmm(cfg: Config, gen: torch.Generator) -> HMM:
    """A random HMM: uniform start, Dirichlet rows (gamma draws, normalised) from ``gen``
    (torch.distributions takes no generator; torch._standard_gamma is what it samples with)."""
    def dirichlet(rows: int, cols: int, concentration: float) -> torch.Tensor:
        g = torch._standard_gamma(torch.full((rows, cols), concentration, dtype=torch.float64), generator=gen)
        return g / g.sum(-1, keepdim=True)

    K, V = cfg.tags, cfg.vocab
    return HMM(torch.full((K,), 1.0 / K, dtype=torch.float64),
               dirichlet(K, K, cfg.transition_concentration), dirichlet(K, V, cfg.emission_concentration))


def sample(hmm: HMM, n: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n sentences: tokens (n, length) and tags (n, length), int64."""
    tags = torch.empty(n, length, dtype=torch.int64)
    tags[:, 0] = torch.multinomial(hmm.start, n, replacement=True, generator=gen)
    for t in range(1, length):
        tags[:, t] = torch.multinomial(hmm.trans[tags[:, t - 1]], 1, generator=gen)[:, 0]
    tokens = torch.multinomial(hmm.emit[tags.reshape(-1)], 1, generator=gen).view(n, length)
    return tokens, tags


def make_data(cfg: Config, seed: int) -> Dict[str, Any]:
    """The data of one seed, from a fresh HMM: training sentences with their main tags and both auxiliary
    labellings (copy = the main tags; random = uniform tags per token, drawn once, independent of
    the input), held-out sentences, and the Bayes-optimal held-out accuracy of the main task."""
    gen = torch.Generator().manual_seed(seed)
    hmm = make_hmm(cfg, gen)
    tokens, tags = sample(hmm, cfg.train_sentences + cfg.heldout_sentences, cfg.length, gen)
    random_tags = torch.randint(cfg.tags, (cfg.train_sentences, cfg.length), generator=gen)
    n = cfg.train_sentences
    held_tokens, held_tags = tokens[n:], tags[n:]
    bayes = (posterior(hmm, held_tokens).argmax(-1) == held_tags).double().mean().item()
    return {"tokens": tokens[:n], "main": tags[:n], "aux": {"copy": tags[:n], "random": random_tags},
            "heldout_tokens": held_tokens, "heldout_tags": held_tags, "bayes_accuracy": bayes,
            "majority_accuracy": (held_tags == tags[:n].flatten().mode().values).double().mean().item()}


# ----------------------------------------------------------------------------------- model

class Tagger(nn.Module):
    """A shared token embedding, one SluiceLSTM with two tasks (α initialised "balanced": every
    entry 1/(M·S), so every row of every α is equal weights), a linear head per task."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab, cfg.embedding)
        self.sluice = mnn.SluiceLSTM(cfg.embedding, cfg.hidden, num_tasks=2, num_layers=cfg.layers,
                                     num_subspaces=cfg.subspaces, bidirectional=True, batch_first=True,
                                     layer_mix="stitch", alpha_init="balanced")
        self.heads = nn.ModuleList(nn.Linear(2 * cfg.hidden, cfg.tags) for _ in range(2))

    def forward(self, tokens: torch.Tensor) -> List[torch.Tensor]:
        out = self.sluice(self.embedding(tokens))               # (2, B, L, 2H)
        return [head(out[task]) for task, head in enumerate(self.heads)]


def block_ratio(alpha: torch.Tensor, subspaces: int, receiver: int = MAIN, source: int = AUX) -> float:
    """Σ alpha[receiver rows, source columns] / Σ alpha[receiver rows, receiver columns]: with
    ``receiver=MAIN, source=AUX`` the α_BA/α_AA of the docstring (what A takes from B relative to
    what it takes from itself; sums of the S×S blocks, equal to the ratio of their means)."""
    S = subspaces
    rows = slice(receiver * S, (receiver + 1) * S)
    taken = alpha[rows, source * S:(source + 1) * S].sum()
    own = alpha[rows, receiver * S:(receiver + 1) * S].sum()
    return (taken / own).item()


# ----------------------------------------------------------------------------------- training

def train(cfg: Config, data: Dict[str, Any], aux: str, penalty_weight: float, seed: int, steps: int,
          device: torch.device) -> Dict[str, Any]:
    """Trains one Tagger on the sum of both tasks' cross-entropies (+ penalty_weight × the
    orthogonality penalty) with Adam; logs every cfg.log_every steps (and at the last one)."""
    gen = seed_everything(seed)                                  # the same init and batches for every
    model = Tagger(cfg).to(device)                               # auxiliary task and penalty weight
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    tokens, main_tags = data["tokens"].to(device), data["main"].to(device)
    aux_tags = data["aux"][aux].to(device)
    n, K, S = tokens.shape[0], cfg.tags, cfg.subspaces
    log: Dict[str, List] = {"step": [], "ratio_by_layer": [], "aux_from_main_by_layer": [], "penalty": [],
                            "loss_main": [], "loss_aux": []}
    order, pos = torch.randperm(n, generator=gen), 0
    for step in range(steps + 1):
        if pos + cfg.batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + cfg.batch].to(device)
        pos += cfg.batch
        logits = model(tokens[idx])
        loss_main = F.cross_entropy(logits[MAIN].reshape(-1, K), main_tags[idx].reshape(-1))
        loss_aux = F.cross_entropy(logits[AUX].reshape(-1, K), aux_tags[idx].reshape(-1))
        loss = loss_main + loss_aux
        penalty = None
        if penalty_weight:
            penalty = model.sluice.orthogonality_penalty()
            loss = loss + penalty_weight * penalty
        if step % cfg.log_every == 0 or step == steps:
            if penalty is None:
                with torch.no_grad():
                    penalty = model.sluice.orthogonality_penalty()
            alphas = model.sluice.alphas()
            log["step"].append(step)
            log["ratio_by_layer"].append([block_ratio(a, S) for a in alphas])
            log["aux_from_main_by_layer"].append([block_ratio(a, S, AUX, MAIN) for a in alphas])
            log["penalty"].append(penalty.item())
            log["loss_main"].append(loss_main.item())
            log["loss_aux"].append(loss_aux.item())
        if step == steps:                                        # the last log is after `steps` updates
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = model(data["heldout_tokens"].to(device))[MAIN].argmax(-1).cpu()
    ratio = [sum(r) / len(r) for r in log["ratio_by_layer"]]
    return {"aux": aux, "penalty_weight": penalty_weight, "seed": seed, **log, "ratio": ratio,
            "final_ratio": ratio[-1], "final_ratio_by_layer": log["ratio_by_layer"][-1],
            "heldout_main_accuracy": (pred == data["heldout_tags"]).double().mean().item(),
            "final_alphas": [a.cpu().tolist() for a in model.sluice.alphas()],
            "final_betas": model.sluice.betas().cpu().tolist()}


# ----------------------------------------------------------------------------------- the experiment

def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def run(steps: int = STEPS, seed: int = 0, device: torch.device = torch.device("cpu"), seeds: int = SEEDS,
        cfg: Config = CONFIG, penalty_weights: Sequence[float] | None = None) -> Dict[str, Any]:
    """Copy and Random, at penalty weight 0 and cfg.penalty_weight, over seeds seed .. seed+seeds-1
    (paired: one dataset and one initialisation per seed). Returns JSON-serialisable figures."""
    weights = (0.0, cfg.penalty_weight) if penalty_weights is None else tuple(penalty_weights)
    runs, data_info = [], []
    for s in range(seed, seed + seeds):
        data = make_data(cfg, s)
        data_info.append({"seed": s, "bayes_accuracy": data["bayes_accuracy"],
                          "majority_accuracy": data["majority_accuracy"]})
        for w in weights:
            for aux in AUX_TASKS:
                runs.append(train(cfg, data, aux, w, s, steps, device))

    groups: Dict[str, Dict[str, Any]] = {}
    for w in weights:
        for aux in AUX_TASKS:
            rs = [r for r in runs if r["aux"] == aux and r["penalty_weight"] == w]
            L = len(rs[0]["final_ratio_by_layer"])
            groups[f"{aux} w={w:g}"] = {
                "aux": aux, "penalty_weight": w, "step": rs[0]["step"],
                "ratio": [_mean(v) for v in zip(*(r["ratio"] for r in rs))],
                "penalty": [_mean(v) for v in zip(*(r["penalty"] for r in rs))],
                "final_ratio": _mean([r["final_ratio"] for r in rs]),
                "final_ratio_by_seed": [r["final_ratio"] for r in rs],
                "final_ratio_by_layer": [_mean([r["final_ratio_by_layer"][k] for r in rs]) for k in range(L)],
                "initial_penalty": _mean([r["penalty"][0] for r in rs]),
                "final_penalty": _mean([r["penalty"][-1] for r in rs]),
                "heldout_main_accuracy": _mean([r["heldout_main_accuracy"] for r in rs]),
                "final_loss_aux": _mean([r["loss_aux"][-1] for r in rs]),
            }

    expected: Dict[str, Dict[str, bool]] = {}
    for w in weights:
        copy, rand = groups[f"copy w={w:g}"], groups[f"random w={w:g}"]
        paired = [c - r for c, r in zip(copy["final_ratio_by_seed"], rand["final_ratio_by_seed"])]
        expected[f"w={w:g}"] = {
            "random_below_copy": rand["final_ratio"] < copy["final_ratio"] - cfg.ratio_margin,
            "random_below_copy_every_seed": all(d > 0 for d in paired),
            "random_drops": rand["final_ratio"] < 1.0 - cfg.level_tolerance,
            "copy_level": abs(copy["final_ratio"] - 1.0) < cfg.level_tolerance,
        }
        # where the difference sits (not a check: layer 0 is symmetric, see examples/README.md)
        copy["gap_by_layer"] = [c - r for c, r in zip(copy["final_ratio_by_layer"], rand["final_ratio_by_layer"])]
    if any(weights) and 0.0 in weights:
        pos = [w for w in weights if w]
        pen = [r for r in runs if r["penalty_weight"] in pos]
        free = {(r["aux"], r["seed"]): r for r in runs if r["penalty_weight"] == 0.0}
        expected["penalty"] = {
            "near_zero_with_weight": all(r["penalty"][-1] < cfg.penalty_fraction * r["penalty"][0] for r in pen),
            "below_unpenalised": all(
                r["penalty"][-1] < cfg.penalty_fraction * free[(r["aux"], r["seed"])]["penalty"][-1] for r in pen),
        }
    return {"config": asdict(cfg), "steps": steps, "seeds": list(range(seed, seed + seeds)),
            "penalty_weights": list(weights), "data": data_info, "groups": groups, "expected": expected,
            "runs": runs}


# ----------------------------------------------------------------------------------- output

def summary(figures: Dict[str, Any]) -> str:
    cfg = figures["config"]
    lines = [f"Sluice networks, Copy vs Random auxiliary task: {figures['steps']} steps, seeds {figures['seeds']}, "
             f"{cfg['layers']} bi-LSTM layers of {cfg['hidden']}, S={cfg['subspaces']}, α init balanced",
             "ratio = α_BA/α_AA = Σα[A rows, B cols] / Σα[A rows, A cols] (1 at init), "
             "mean over layers, mean over seeds",
             f"{'run':<14}{'final ratio':>12}  {'per layer':<22}{'per seed':<24}{'penalty start -> end':>24}"
             f"{'A held-out':>11}{'B loss':>8}"]
    for name, g in figures["groups"].items():
        layers = " ".join(f"{v:.2f}" for v in g["final_ratio_by_layer"])
        per_seed = " ".join(f"{v:.2f}" for v in g["final_ratio_by_seed"])
        lines.append(f"{name:<14}{g['final_ratio']:>12.3f}  {layers:<22}{per_seed:<24}"
                     f"{g['initial_penalty']:>11.1f} -> {g['final_penalty']:<9.3g}"
                     f"{g['heldout_main_accuracy']:>11.3f}{g['final_loss_aux']:>8.3f}")
    for name, g in figures["groups"].items():
        if "gap_by_layer" in g:
            lines.append(f"Copy - Random final ratio by layer (w={g['penalty_weight']:g}): "
                         + " ".join(f"{v:+.2f}" for v in g["gap_by_layer"]))
    bayes = _mean([d["bayes_accuracy"] for d in figures["data"]])
    major = _mean([d["majority_accuracy"] for d in figures["data"]])
    lines.append(f"main task held-out accuracy ceiling (Bayes, forward-backward) {bayes:.3f}, majority tag "
                 f"{major:.3f}; B loss ln K = {math.log(cfg['tags']):.3f} is chance")
    for key, checks in figures["expected"].items():
        lines.append(f"expected [{key}]: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in checks.items()))
    return "\n".join(lines)


def plot(figures: Dict[str, Any]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colours = {"copy": "tab:blue", "random": "tab:red"}
    styles = {w: s for w, s in zip(figures["penalty_weights"], ("-", "--", ":", "-."))}
    for g in figures["groups"].values():
        label = f"{g['aux']} (penalty weight {g['penalty_weight']:g})"
        axes[0].plot(g["step"], g["ratio"], styles[g["penalty_weight"]], color=colours[g["aux"]], label=label)
        axes[2].plot(g["step"], g["penalty"], styles[g["penalty_weight"]], color=colours[g["aux"]], label=label)
    groups = list(figures["groups"].values())
    width = 0.8 / len(groups)
    for i, g in enumerate(groups):
        layers = range(len(g["final_ratio_by_layer"]))
        axes[1].bar([k - 0.4 + (i + 0.5) * width for k in layers], [v - 1.0 for v in g["final_ratio_by_layer"]],
                    width, bottom=1.0, color=colours[g["aux"]], alpha=1.0 if g["penalty_weight"] == 0 else 0.45,
                    label=f"{g['aux']} (weight {g['penalty_weight']:g})")
    axes[0].axhline(1.0, color="grey", lw=0.5)
    axes[0].set(title="α_BA/α_AA (mean over layers and seeds)", xlabel="step", ylabel="ratio")
    axes[1].axhline(1.0, color="grey", lw=0.5)
    axes[1].set(title="final α_BA/α_AA by layer (mean over seeds)", xlabel="layer",
                xticks=list(range(len(groups[0]["final_ratio_by_layer"]))))
    axes[1].legend(fontsize=8)
    axes[2].set(title="orthogonality penalty (mean over seeds)", xlabel="step", yscale="log")
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main(NAME, "Sluice networks (Ruder et al. 2019): α_BA/α_AA with a Copy vs a Random auxiliary task, and the "
               "orthogonality penalty", STEPS, run, summary, plot)
