"""What every example shares: its command line, seeding, and writing its figures (JSON, with the
environment they were produced on) and its plot under ``examples/results/``."""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from mtlfast.info import environment

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description: str, steps: int, seed: int = 0) -> argparse.ArgumentParser:
    """``--device``, ``--steps`` (the full run's default), ``--seed`` and ``--out`` (a folder)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--steps", type=int, default=steps, help=f"training steps (default: {steps})")
    p.add_argument("--seed", type=int, default=seed, help=f"random seed (default: {seed})")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"output folder (default: {RESULTS})")
    return p


@contextlib.contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """torch on one intra-op thread for the block: the examples' models are tiny (their largest
    ops are 64 x 128 x 16 matmuls and single LSTM steps), where a second thread only adds a
    barrier per op, and on a busy machine a scheduling quantum (a 64 x 128 -> 16 Linear measured
    3.3 ms with two threads under load against 11 µs with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> torch.Generator:
    """Seeds Python's and torch's global generators; returns a fresh torch generator for data."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def write(name: str, figures: dict[str, Any], plot: Callable[[dict[str, Any]], Any], args: argparse.Namespace,
          seconds: float) -> tuple[Path, Path]:
    """``out/NAME.json`` (the figures, the arguments, the run time and the environment) and
    ``out/NAME.png`` (``plot(figures)`` returns a matplotlib Figure)."""
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"example": name, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "seconds": round(seconds, 2), "environment": environment(torch.device(args.device).type),
              "figures": figures}
    json_path, png_path = args.out / f"{name}.json", args.out / f"{name}.png"
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    figure = plot(figures)
    figure.savefig(png_path, dpi=110, bbox_inches="tight")
    return json_path, png_path


def main(name: str, description: str, steps: int, run: Callable[..., dict[str, Any]],
         summary: Callable[[dict[str, Any]], str], plot: Callable[[dict[str, Any]], Any],
         argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses the command line, runs ``run(steps=, seed=, device=)``, prints ``summary(figures)``
    and writes the JSON and the PNG."""
    args = parser(description, steps).parse_args(argv)
    start = time.perf_counter()
    figures = run(steps=args.steps, seed=args.seed, device=torch.device(args.device))
    seconds = time.perf_counter() - start
    print(summary(figures))
    json_path, png_path = write(name, figures, plot, args, seconds)
    print(f"{seconds:.0f} s; {json_path} and {png_path} written")
    return figures
