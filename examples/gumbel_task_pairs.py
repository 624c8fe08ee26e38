"""Gumbel-Matrix routing on synthetic pairs of tasks: Maziarz et al., "Flexible Multi-task
Networks by Learning Parameter Allocation" (arXiv 1910.04915), the synthetic experiment, with
mtlfast's ``GumbelMatrix`` and ``ModularLayer``.

Claim: the tasks of a pair end with the same allocation and tasks of different pairs with
different ones, the learned allocation's held-out loss ends below no sharing, and the learned task
similarity grows with the tasks' correlation ρ.

Setup: the generator of Ma et al. (2018, MMoE): x ~ N(0, I) in R^128, y = wᵀx +
Σ_{i=1..6} sin(i·wᵀx + (i-1)²) + ε, Var(ε) = 0.01, fresh batches every step. Four tasks in two
pairs: tasks 0, 1 use w_A, tasks 2, 3 use w_B, cos(w_A, w_B) = 0. One ``ModularLayer`` of 4
components (Linear(128, 16)-ReLU-Linear(16, 16)-ReLU-Linear(16, 1)), no task heads;
``GumbelMatrix(4, [4])`` (p_init 0.5, τ = 1, no budget) samples every task's allocation each step,
evaluation takes the greedy one. Loss: the mean of the tasks' MSEs on 64 examples each; Adam,
lr 0.01 (the logits through ``optimizer_param_group``), gradient norm clipped to 1; 3000 steps.
Fixed-allocation baselines: ``no_sharing`` (8 components, two per task), ``one_each``, ``pairs``,
``full``. The ρ sweep trains two tasks at ρ = 0, 0.5, 1, three seeds each, and reads
``GumbelMatrix.task_similarity()``. A seed fixes the task vectors, the initialisation, the data and
the Gumbel noise.

Run: ``python -m examples.gumbel_task_pairs [--steps N] [--seed S] [--device D]`` (writes
``examples/results/gumbel_task_pairs.{json,png}``). Findings, and why the setup is what it is:
``examples/README.md``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import mtlfast.nn as mnn
from examples._common import main, one_intra_op_thread, seed_everything

NAME = "gumbel_task_pairs"
STEPS = 3000                    # the full run's default (--steps)
FEATURES, HIDDEN, COMPONENTS = 128, 16, 4
BATCH, LR, CLIP = 64, 0.01, 1.0
SINES, NOISE_VAR = 6, 0.01      # m, Var(ε)
P_INIT, TAU = 0.5, 1.0          # GumbelMatrix's defaults: no temperature schedule, no budget
HELD_OUT = 2048                 # held-out examples per task
RHOS = (0.0, 0.5, 1.0)
RHO_SEEDS = 3                   # runs per ρ (seeds seed .. seed + 2)
PAIR_OF_TASK = (0, 0, 1, 1)     # tasks 0, 1 use w_A; tasks 2, 3 use w_B
BASELINES = ("no_sharing", "one_each", "pairs", "full")
PRIMARY = "no_sharing"          # the baseline of the expected result

# ---------------------------------------------------------------------------------------------
# Data: the synthetic generator of Ma et al. (2018, MMoE) that the paper uses

def task_vectors(rho: float, generator: torch.Generator, features: int = FEATURES, c: float = 1.0) -> torch.Tensor:
    """(2, features): w1 = c·u1, w2 = c(ρ u1 + √(1-ρ²) u2) with u1, u2 orthonormal (cos(w1, w2) = ρ)."""
    q, _ = torch.linalg.qr(torch.randn(features, 2, generator=generator, dtype=torch.float64))
    u1, u2 = q[:, 0], q[:, 1]
    return torch.stack([c * u1, c * (rho * u1 + math.sqrt(max(0.0, 1.0 - rho * rho)) * u2)]).float()


def sample(weights: torch.Tensor, n: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """n examples per task, drawn independently for every task: x (T, n, d) ~ N(0, I),
    y (T, n) = wᵀx + Σ_{i=1..m} sin(α_i wᵀx + β_i) + ε, α_i = i, β_i = (i-1)², ε ~ N(0, NOISE_VAR)."""
    x = torch.randn(weights.shape[0], n, weights.shape[1], generator=generator)
    s = torch.einsum("tnd,td->tn", x, weights)
    y = s + sum(torch.sin(i * s + (i - 1) ** 2) for i in range(1, SINES + 1))
    return x, y + math.sqrt(NOISE_VAR) * torch.randn(s.shape, generator=generator)


# ---------------------------------------------------------------------------------------------
# Model and training

def component(features: int) -> nn.Module:
    """One component: 3 fully connected layers (two hidden of 16 units with ReLU, one output unit)."""
    return nn.Sequential(nn.Linear(features, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, 1))


def fixed_allocation(pattern: str, num_tasks: int = 4) -> torch.Tensor:
    """The fixed (T, C) allocations compared with the learned one (4 tasks; examples/README.md
    says why ``no_sharing`` has 8 components)."""
    if pattern == "no_sharing":          # two components of its own per task: an 8-component layer
        return torch.eye(num_tasks).repeat_interleave(2, dim=1)
    if pattern == "one_each":            # the 4-component layer, one component of its own per task
        return torch.eye(num_tasks)
    if pattern == "pairs":               # the pattern the pairs call for: {0, 1} for w_A, {2, 3} for w_B
        return torch.tensor([[1.0 if c // 2 == PAIR_OF_TASK[t] else 0.0 for c in range(COMPONENTS)]
                             for t in range(num_tasks)])
    if pattern == "full":                # every task every component (hard sharing)
        return torch.ones(num_tasks, COMPONENTS)
    raise ValueError(f"unknown pattern {pattern!r}")


def train(weights: torch.Tensor, steps: int, seed: int, device: torch.device,
          fixed: Optional[torch.Tensor] = None, eval_points: int = 0,
          skip_unused: bool = True) -> Dict[str, Any]:
    """:func:`_train` with one intra-op thread."""
    with one_intra_op_thread():
        return _train(weights, steps, seed, device, fixed, eval_points, skip_unused)


def _train(weights: torch.Tensor, steps: int, seed: int, device: torch.device,
           fixed: Optional[torch.Tensor], eval_points: int, skip_unused: bool) -> Dict[str, Any]:
    """Trains one modular layer on the tasks whose vectors are the rows of ``weights``: with a
    learned GumbelMatrix when ``fixed`` is None, else with the fixed (T, C) allocation ``fixed``
    (C components). The same seed gives the same component initialisation and data stream.
    Returns the held-out losses (greedy allocation), the held-out curve at ``eval_points`` points
    and, when learned, the final allocation, probabilities and task similarity (also at the
    ``eval_points``)."""
    num_tasks, features = weights.shape
    data = seed_everything(seed)
    num_components = COMPONENTS if fixed is None else fixed.shape[1]
    layer = mnn.ModularLayer([component(features) for _ in range(num_components)]).to(device)
    held_x, held_y = (v.to(device) for v in sample(weights, HELD_OUT, torch.Generator().manual_seed(seed + 7919)))
    groups: List[dict] = [{"params": list(layer.parameters())}]
    gm = None
    if fixed is None:
        gm = mnn.GumbelMatrix(num_tasks, [COMPONENTS], p_init=P_INIT, tau=TAU).to(device)
        groups.append(gm.optimizer_param_group(LR))
    else:
        fixed = fixed.to(device=device, dtype=torch.float32)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.Adam(groups, lr=LR, foreach=True)
    modules = [m for m in (layer, gm) if m is not None]

    def allocations() -> torch.Tensor:
        return gm.sample_all()[0] if gm is not None else fixed

    def task_losses(x: torch.Tensor, y: torch.Tensor, alloc: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.mean((layer(x[t], alloc[t]).squeeze(-1) - y[t]) ** 2) for t in range(num_tasks)])

    def train_mode() -> None:
        # a fixed allocation trains the layer in eval mode, which skips its 0-allocated components:
        # in train mode they get exactly zero gradient, which Adam turns into no update at all
        layer.train(gm is not None or not skip_unused)
        if gm is not None:
            gm.train()

    def evaluate() -> List[float]:
        for m in modules:
            m.eval()
        with torch.no_grad():
            losses = task_losses(held_x, held_y, allocations()).tolist()
        train_mode()
        return losses

    train_mode()
    marks = {max(1, round(steps * (k + 1) / eval_points)) for k in range(eval_points)} if eval_points else set()
    curve: List[List[float]] = []
    similarity_curve: List[list] = []
    for step in range(1, steps + 1):
        x, y = (v.to(device) for v in sample(weights, BATCH, data))
        loss = task_losses(x, y, allocations()).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        if gm is not None:
            gm.advance()
        if step in marks:
            curve.append([step, sum(evaluate()) / num_tasks])
            if gm is not None:
                similarity_curve.append([step, gm.task_similarity().tolist()])
    final = evaluate()
    out: Dict[str, Any] = {"held_out_losses": [round(v, 5) for v in final],
                           "held_out_loss": round(sum(final) / num_tasks, 5),
                           "curve": [[s, round(v, 5)] for s, v in curve]}
    if gm is not None:
        gm.eval()
        with torch.no_grad():
            probabilities = gm.probabilities()[0]
        out["allocation"] = gm.sample_all()[0].int().tolist()
        out["probabilities"] = [[round(float(p), 4) for p in row] for row in probabilities]
        out["similarity"] = [[round(float(s), 4) for s in row] for row in gm.task_similarity()]
        out["similarity_curve"] = [[s, [[round(v, 4) for v in row] for row in m]] for s, m in similarity_curve]
    else:
        out["allocation"] = fixed.int().tolist()
    return out


# ---------------------------------------------------------------------------------------------
# The experiment

def label_correlation(rho: float, seed: int, features: int = FEATURES, n: int = 100_000) -> float:
    """corr(y1, y2) of the two tasks of a ρ pair on the same x (ε included): how related the
    labels are, which the sines make far less than ρ."""
    with one_intra_op_thread():
        g = torch.Generator().manual_seed(seed)
        w = task_vectors(rho, g, features)
        x = torch.randn(n, features, generator=g)
        s = x @ w.t()
        y = s + sum(torch.sin(i * s + (i - 1) ** 2) for i in range(1, SINES + 1))
        y = y + math.sqrt(NOISE_VAR) * torch.randn(s.shape, generator=g)
        return round(float(torch.corrcoef(y.t())[0, 1]), 4)


def _pair_results(allocation: List[List[int]]) -> Dict[str, Any]:
    pairs = [[t for t, p in enumerate(PAIR_OF_TASK) if p == k] for k in (0, 1)]
    same = all(allocation[t] == allocation[group[0]] for group in pairs for t in group)
    different = all(allocation[a] != allocation[b] for a in pairs[0] for b in pairs[1])
    used = [{c for t in group for c, z in enumerate(allocation[t]) if z} for group in pairs]
    return {"pairs_share_allocation": same, "pairs_differ_across": different,
            "components_shared_across_pairs": len(used[0] & used[1])}


def pairs_experiment(steps: int, seed: int, device: torch.device, features: int = FEATURES,
                     baselines: Sequence[str] = BASELINES, eval_points: int = 20) -> Dict[str, Any]:
    """Four tasks in two pairs: the learned allocation and the fixed ``baselines``, every run from
    the same initialisation and data stream. ``expected``: one boolean per expected result."""
    w = task_vectors(0.0, torch.Generator().manual_seed(seed), features)[list(PAIR_OF_TASK)]
    learned = train(w, steps, seed, device, eval_points=eval_points)
    fixed = {name: train(w, steps, seed, device, fixed_allocation(name), eval_points=eval_points)
             for name in baselines}
    observed = _pair_results(learned["allocation"])
    expected = {k: observed.pop(k) for k in ("pairs_share_allocation", "pairs_differ_across")}
    if PRIMARY in fixed:
        expected["learned_below_no_sharing"] = learned["held_out_loss"] < fixed[PRIMARY]["held_out_loss"]
    for name, result in fixed.items():
        observed[f"learned_below_{name}"] = learned["held_out_loss"] < result["held_out_loss"]
    return {"learned": learned, "baselines": fixed, "expected": expected, "observed": observed}


def rho_sweep(steps: int, seeds: Sequence[int], device: torch.device, features: int = FEATURES,
              rhos: Sequence[float] = RHOS, eval_points: int = 0) -> Dict[str, Any]:
    """Two tasks with cos(w1, w2) = ρ, one run per ρ and seed (a seed gives the same u1, u2,
    initialisation and data stream at every ρ): the learned task similarity
    (GumbelMatrix.task_similarity between the two tasks) against ρ, at the end and (mean over
    the seeds) at ``eval_points`` points of the training."""
    sweep: Dict[str, Any] = {"rhos": list(rhos), "seeds": list(seeds), "label_correlation": [], "similarity": [],
                             "allocations": [], "held_out_loss": [], "similarity_curve": []}
    for rho in rhos:
        runs = [train(task_vectors(rho, torch.Generator().manual_seed(s), features), steps, s, device,
                      eval_points=eval_points) for s in seeds]
        if eval_points:
            sweep["similarity_curve"].append(
                [[step, round(sum(r["similarity_curve"][k][1][0][1] for r in runs) / len(runs), 4)]
                 for k, (step, _) in enumerate(runs[0]["similarity_curve"])])
        sweep["label_correlation"].append(label_correlation(rho, seeds[0], features))
        sweep["similarity"].append([r["similarity"][0][1] for r in runs])
        sweep["allocations"].append([r["allocation"] for r in runs])
        sweep["held_out_loss"].append([r["held_out_loss"] for r in runs])
    means = [round(sum(v) / len(v), 4) for v in sweep["similarity"]]
    sweep["mean_similarity"] = means
    expected = {"similarity_grows_with_rho": all(a < b for a, b in zip(means, means[1:]))}
    by_rho = dict(zip(rhos, means))
    if 0.0 in by_rho and 1.0 in by_rho:
        expected["similarity_rho1_above_rho0"] = by_rho[1.0] > by_rho[0.0]
    sweep["expected"] = expected
    return sweep


def run(steps: int, seed: int, device: torch.device, features: int = FEATURES,
        baselines: Sequence[str] = BASELINES, rhos: Sequence[float] = RHOS, rho_seeds: int = RHO_SEEDS,
        eval_points: int = 20) -> Dict[str, Any]:
    """The whole experiment: :func:`pairs_experiment` with ``seed`` and :func:`rho_sweep` with the
    seeds ``seed .. seed + rho_seeds - 1`` (skipped when ``rhos`` is empty). JSON-serialisable
    figures; ``expected`` holds one boolean per expected result, ``observed`` further facts."""
    device = torch.device(device)
    pairs = pairs_experiment(steps, seed, device, features, baselines, eval_points)
    expected, observed = pairs.pop("expected"), pairs.pop("observed")
    figures: Dict[str, Any] = {
        "config": {"steps": steps, "seed": seed, "features": features, "hidden": HIDDEN, "components": COMPONENTS,
                   "batch_per_task": BATCH, "lr": LR, "logits_lr": "lr x number of tasks", "clip": CLIP,
                   "tau": TAU, "p_init": P_INIT, "sines": SINES, "noise_var": NOISE_VAR,
                   "held_out_per_task": HELD_OUT, "pair_of_task": list(PAIR_OF_TASK)},
        "pairs": pairs,
    }
    if rhos:
        sweep = rho_sweep(steps, [seed + k for k in range(rho_seeds)], device, features, rhos, eval_points)
        expected.update(sweep.pop("expected"))
        figures["rho_sweep"] = sweep
    figures["expected"], figures["observed"] = expected, observed
    return figures


# ---------------------------------------------------------------------------------------------
# Report

def summary(figures: Dict[str, Any]) -> str:
    cfg, learned = figures["config"], figures["pairs"]["learned"]
    names = ["w_A" if p == 0 else "w_B" for p in cfg["pair_of_task"]]
    lines = [f"Gumbel-Matrix on two pairs of tasks (tasks 0, 1: w_A; 2, 3: w_B; cos(w_A, w_B) = 0), "
             f"{cfg['components']} components, {cfg['steps']} steps, seed {cfg['seed']}",
             "learned allocation (greedy)   P(component used)"]
    for t, (row, probs) in enumerate(zip(learned["allocation"], learned["probabilities"])):
        lines.append(f"  task {t} ({names[t]}): {' '.join(map(str, row))}    {' '.join(f'{p:.2f}' for p in probs)}")
    lines.append(f"held-out MSE per task, greedy allocation (noise floor {cfg['noise_var']}):")
    rows = [("learned", learned)] + list(figures["pairs"]["baselines"].items())
    for name, r in rows:
        lines.append(f"  {name:<11} {r['held_out_loss']:.4f}   [{', '.join(f'{v:.3f}' for v in r['held_out_losses'])}]")
    sweep = figures.get("rho_sweep")
    if sweep:
        lines.append(f"rho sweep (2 tasks, seeds {sweep['seeds']}): learned task similarity (cosine of allocations)")
        lines.append("  rho   corr(y1,y2)   final similarity per seed   mean    mean during training (step: sim)")
        traces = sweep["similarity_curve"] or [[] for _ in sweep["rhos"]]
        for rho, corr, sims, mean, trace in zip(sweep["rhos"], sweep["label_correlation"], sweep["similarity"],
                                                sweep["mean_similarity"], traces):
            picked = [trace[k] for k in sorted({max(0, round(len(trace) * f) - 1) for f in (0.1, 0.25, 0.5)})]
            during = ", ".join(f"{step}: {v:.2f}" for step, v in picked)
            lines.append(f"  {rho:<5} {corr:>10.3f}    {', '.join(f'{v:.3f}' for v in sims):<27} {mean:.3f}   {during}")
    lines.append("expected results:")
    labels = {"pairs_share_allocation": "tasks of a pair end with the same allocation",
              "pairs_differ_across": "tasks of different pairs end with different allocations",
              "learned_below_no_sharing": "learned held-out loss below no sharing (two own components per task)",
              "similarity_grows_with_rho": "mean similarity grows with rho (strictly, every step of the sweep)",
              "similarity_rho1_above_rho0": "similarity at rho = 1 above similarity at rho = 0"}
    for key, ok in figures["expected"].items():
        lines.append(f"  [{'yes' if ok else 'NO '}] {labels[key]}")
    lines.append(f"  (components used by both pairs: {figures['observed']['components_shared_across_pairs']})")
    return "\n".join(lines)


def plot(figures: Dict[str, Any]):
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    learned, baselines = figures["pairs"]["learned"], figures["pairs"]["baselines"]
    sweep = figures.get("rho_sweep")
    fig, axes = plt.subplots(2 if sweep else 1, 2, figsize=(12, 8.4 if sweep else 4.2))
    axes = list(axes.flat)
    ax = axes[0]
    for name, r in [("learned", learned)] + list(baselines.items()):
        if r["curve"]:
            steps, losses = zip(*r["curve"])
            ax.plot(steps, losses, label=f"{name} ({r['held_out_loss']:.3f})", lw=2.2 if name == "learned" else 1.2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.2g"))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.2g}" if f"{v:.2g}"[-1] in "235" else ""))
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out MSE (mean over tasks)")
    ax.set_title("four tasks, two pairs: learned vs fixed allocations")
    ax.legend(fontsize=8)
    ax = axes[1]
    probs = learned["probabilities"]
    ax.imshow(probs, vmin=0, vmax=1, cmap="Blues")
    for t, row in enumerate(probs):
        for c, p in enumerate(row):
            ax.text(c, t, f"{learned['allocation'][t][c]}\n{p:.2f}", ha="center", va="center",
                    color="white" if p > 0.5 else "black", fontsize=9)
    pair = figures["config"]["pair_of_task"]
    ax.set_yticks(range(len(probs)), [f"task {t} ({'w_A' if p == 0 else 'w_B'})" for t, p in enumerate(pair)])
    ax.set_xticks(range(len(probs[0])), [f"comp {c}" for c in range(len(probs[0]))])
    ax.set_title("final allocation (greedy) and P(used)")
    if sweep:
        ax = axes[2]
        for rho, sims in zip(sweep["rhos"], sweep["similarity"]):
            ax.scatter([rho] * len(sims), sims, color="gray", alpha=0.6, s=18)
        ax.plot(sweep["rhos"], sweep["mean_similarity"], "o-", label="task similarity (mean over seeds)")
        ax.plot(sweep["rhos"], sweep["label_correlation"], "s--", label="corr(y1, y2) of the labels")
        ax.set_xlabel("rho = cos(w1, w2)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title("two tasks: learned similarity vs rho (end of training)")
        ax.legend(fontsize=8)
        ax = axes[3]
        for rho, trace in zip(sweep["rhos"], sweep["similarity_curve"]):
            if trace:
                ax.plot(*zip(*trace), "o-", ms=3, label=f"rho = {rho}")
        ax.set_xlabel("training step")
        ax.set_ylabel("task similarity (mean over seeds)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title("two tasks: learned similarity during training")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main(NAME, "Gumbel-Matrix on the synthetic task pairs of Maziarz et al.: learned allocation vs no sharing, "
               "and task similarity against rho", STEPS, run, summary, plot)
