"""Run settings and the list of cases (op x workload x mode x provider) they select."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from bench import providers, registry
from bench.registry import MODES, Workload

DTYPES = ("float32", "bfloat16", "float16")


def default_device() -> str:
    """"cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """bf16 on CUDA, fp32 on CPU."""
    return "bfloat16" if device == "cuda" else "float32"


def default_slices(device: str, quick: bool) -> int:
    """4 on a CPU (a shared host's speed drifts over seconds, by up to 2x); 1 on CUDA (kernel time
    by CUDA events does not drift so) and in quick runs."""
    return 4 if device == "cpu" and not quick else 1


@dataclass(frozen=True)
class Settings:
    """What one benchmark run covers and how long it measures."""

    device: str
    dtype: str
    quick: bool = False
    workloads: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()
    seed: int = 0
    skips: tuple[str, ...] = ()  # "WHAT/PROVIDER[=REASON]": see parse_skip
    # Each case measured in this many slices of its time budget, the providers of a workload and
    # mode taking turns slice by slice: a machine whose speed drifts over seconds (a shared CPU
    # host) then slows every provider of a row alike, instead of whichever ran during the slow spell.
    slices: int = 1

    @classmethod
    def make(cls, device: str | None = None, dtype: str | None = None, slices: int | None = None,
             **kwargs: object) -> "Settings":
        """Settings with the device, dtype and slices defaults filled in."""
        device = device or default_device()
        if slices is None:
            slices = default_slices(device, bool(kwargs.get("quick")))
        return cls(device=device, dtype=dtype or default_dtype(device), slices=slices, **kwargs)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class Case:
    """One benchmark: a workload of an op, in one mode, through one provider."""

    workload: Workload
    mode: str
    provider: str
    slice: int = 0      # which of ``slices`` turns of the provider this is
    slices: int = 1

    @property
    def id(self) -> str:
        turn = f"/slice{self.slice + 1}of{self.slices}" if self.slices > 1 else ""
        return f"{self.workload.key}/{self.mode}/{self.provider}{turn}"


def _pick(wanted: tuple[str, ...], valid: tuple[str, ...], what: str) -> tuple[str, ...]:
    unknown = [w for w in wanted if w not in valid]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; valid: {', '.join(valid)}")
    return tuple(v for v in valid if v in wanted) if wanted else valid


def parse_skip(spec: str) -> tuple[str, str, str]:
    """``WHAT/PROVIDER[=REASON]`` -> (what, provider, reason): leave ``provider`` out of the
    workloads ``what`` names (an op, a workload name or ``op/name``); the cases stay in the results
    and the table as skipped, with ``reason`` (default: that this run left them out)."""
    target, _, reason = spec.partition("=")
    what, _, provider = target.strip().rpartition("/")
    if not what or not provider:
        raise ValueError(f"--skip {spec!r}: expected WHAT/PROVIDER[=REASON] (WHAT an op, a workload or op/name)")
    return what, provider, reason.strip() or f"left out of this run (--skip {what}/{provider})"


def _apply_skips(workloads: list[Workload], settings: Settings) -> list[Workload]:
    """The workloads with each skip of ``settings`` added to their ``skip_on`` for its device (a
    reason the workload gives itself for the same provider and device stays)."""
    for spec in settings.skips:
        what, provider, reason = parse_skip(spec)
        _pick((provider,), providers.names(), "provider")
        if not any(what in (w.op, w.name, w.key) for w in registry.workloads()):
            raise ValueError(f"--skip {spec!r}: {what!r} is no op or workload")
        workloads = [replace(w, skip_on={f"{settings.device}/{provider}": reason, **w.skip_on})
                     if what in (w.op, w.name, w.key) else w for w in workloads]
    return workloads


def select(settings: Settings) -> list[Case]:
    """The cases of ``settings``, grouped by workload and mode, eager first; with ``slices`` > 1
    each group runs its providers in turn, ``slices`` times.

    Naming providers keeps the baselines (the op's eager, and dense where it has one) that the
    derived numbers divide by; each workload gets the providers its op has.
    Raises ValueError on an unknown workload, provider, mode, device or dtype, or a malformed skip.
    """
    if settings.device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {settings.device!r}; valid: cpu, cuda")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but torch sees no CUDA device")
    _pick((settings.dtype,), DTYPES, "dtype")
    workloads = _apply_skips(registry.find(settings.workloads), settings)
    _pick(tuple(settings.providers), providers.names(), "provider")
    modes = _pick(settings.modes, MODES, "mode")
    per_op: dict[str, tuple[str, ...]] = {}
    for w in workloads:
        if w.op not in per_op:
            spec = registry.op(w.op)
            wanted = set(settings.providers) | set(providers.always_run(spec))
            per_op[w.op] = tuple(p for p in providers.names(spec) if not settings.providers or p in wanted)
    if isinstance(settings.slices, bool) or not isinstance(settings.slices, int) or settings.slices < 1:
        raise ValueError(f"slices must be an int >= 1, got {settings.slices!r}")
    n = settings.slices
    return [Case(w, m, p, k, n) for w in workloads for m in modes for k in range(n) for p in per_op[w.op]]
