"""The registry of benchmarked ops and their workloads.

An op family registers one :class:`OpBench` (how to build inputs, the eager formulation a user
would write, the dense roofline, the mtlfast entry point, the FLOP count) and its
:class:`Workload` list from a module in ``bench/workloads/``; everything else is shared.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

MODES: tuple[str, ...] = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Workload:
    """A named problem size of one op.

    ``params`` are passed to the op's ``make_inputs`` and ``flops``; ``skip_on`` maps a device
    type ("cpu", "cuda") to the reason the workload is not run there, or "device/provider" (e.g.
    "cpu/compile") to the reason one provider is not run there; non-``default`` workloads
    run only when named (e.g. the ``tiny`` smoke-test size).
    """

    op: str
    name: str
    params: Mapping[str, Any] = field(compare=False)
    source: str = field(default="", compare=False)
    skip_on: Mapping[str, str] = field(default_factory=dict, compare=False)
    default: bool = True

    @property
    def key(self) -> str:
        """``op/name``, unique over the registry."""
        return f"{self.op}/{self.name}"

    def unsupported_reason(self, device_type: str, provider: str | None = None) -> str | None:
        """Why this workload is not run on ``device_type`` (by ``provider``), or None."""
        return self.skip_on.get(device_type) or (provider and self.skip_on.get(f"{device_type}/{provider}"))


@dataclass(frozen=True)
class OpBench:
    """How to benchmark one op.

    make_inputs(params, device, dtype, requires_grad, seed) -> tuple of positional args; the
        float tensors that should get gradients in ``fwd+bwd`` have ``requires_grad`` set.
    eager(*args): what a user writes in plain PyTorch (also the correctness oracle).
    dense(*args) or None: the same shape without the op's extra work (roofline reference).
    mtlfast() -> the public mtlfast function (imported lazily, when the provider is built).
    flops(params, mode) -> floating point operations of one call in ``mode``.
    eager_name: the provider name of ``eager`` (e.g. "eager-loop" where several eager
        formulations are timed).
    variants: more eager formulations, each a provider of that name, checked against ``eager``.
    random: the op samples (e.g. Gumbel noise): every provider draws from its own random stream,
        so none is compared with eager sample by sample; all are timed, with a null ``rel_err``
        and a ``note`` saying why.
    backend_modes: more mtlfast providers, each a backend run with environment settings, e.g.
        ``{"triton-step": ("triton", {"MTLFAST_LSTM_MODE": "step"})}`` (the plain backend name
        runs the library's automatic choice).
    library_ops: the mtlfast ops (``mtlfast.backends.reasons`` names) the provider runs, when
        ``op`` names a whole model rather than one op (default: ``op`` itself); a backend runs
        the workload when it runs every one of them on the workload's first tensor.
    sample_check(args, outputs) -> str, or None: for a random op, a cheap statistic of each
        provider's sample checked instead (e.g. all 0/1, mean near the probability); raises
        ``bench.check.WrongResult`` when it fails (an error record, not a time) and returns what
        it checked (appended to the note).
    """

    op: str
    make_inputs: Callable[[Mapping[str, Any], torch.device, torch.dtype, bool, int], tuple]
    eager: Callable[..., Any]
    dense: Callable[..., Any] | None
    mtlfast: Callable[[], Callable[..., Any]]
    flops: Callable[[Mapping[str, Any], str], float]
    eager_name: str = "eager"
    variants: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    random: bool = False
    sample_check: Callable[[tuple, tuple[torch.Tensor, ...]], str] | None = None
    library_ops: tuple[str, ...] = ()
    backend_modes: Mapping[str, tuple[str, Mapping[str, str]]] = field(default_factory=dict)


_OPS: dict[str, OpBench] = {}
_WORKLOADS: dict[str, list[Workload]] = {}


def register(spec: OpBench, workloads: list[Workload] | tuple[Workload, ...]) -> None:
    """Add an op and its workloads (called by each ``bench/workloads`` module on import)."""
    if any(w.op != spec.op for w in workloads):
        raise ValueError(f"workloads of {spec.op!r} must all have op={spec.op!r}")
    names = [w.name for w in workloads]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate workload names for {spec.op!r}: {names}")
    _OPS[spec.op] = spec
    _WORKLOADS[spec.op] = list(workloads)


def load() -> None:
    """Import every module of ``bench.workloads`` so that all ops are registered."""
    from bench import workloads as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def op(name: str) -> OpBench:
    """The registered op ``name``."""
    load()
    return _OPS[name]


def ops() -> list[OpBench]:
    """Every registered op, in registration order."""
    load()
    return list(_OPS.values())


def workloads() -> list[Workload]:
    """Every registered workload, in registration order."""
    load()
    return [w for ws in _WORKLOADS.values() for w in ws]


def find(names: list[str] | tuple[str, ...]) -> list[Workload]:
    """Workloads by name (``name`` or ``op/name``); all default ones when ``names`` is empty.

    Raises ValueError naming the valid choices when a name matches nothing.
    """
    every = workloads()
    if not names:
        return [w for w in every if w.default]
    chosen: list[Workload] = []
    for name in names:
        hits = [w for w in every if name in (w.name, w.key)]
        if not hits:
            valid = ", ".join(w.key for w in every)
            raise ValueError(f"unknown workload {name!r}; valid: {valid}")
        chosen += [w for w in hits if w not in chosen]
    return chosen
