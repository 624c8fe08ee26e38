"""Providers: the implementations a workload is timed with.

``eager`` is what a user writes (an op may name it differently and add more eager
formulations: ``OpBench.eager_name``, ``OpBench.variants``), ``compile`` is ``torch.compile`` of
it, ``dense`` the same shape without the op's extra work (the roofline; only for ops that have
one), and every mtlfast backend is forced with ``mtlfast.use_backend``.  A provider that cannot
run the inputs gives a reason instead.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ContextManager
from unittest import mock

import torch

from bench import registry
from mtlfast.backends import triton_interpreter_enabled
from bench.registry import OpBench

BASELINES: tuple[str, ...] = ("eager", "compile", "dense")
DEFAULT_BACKENDS: tuple[str, ...] = ("reference", "triton", "cuda", "cpu")
ALWAYS_RUN: tuple[str, ...] = ("eager", "dense")  # what speedup and fraction of dense divide by


@dataclass(frozen=True)
class Built:
    """A runnable provider (``fn`` called inside ``context()``) or the ``reason`` it cannot run."""

    fn: Callable[..., Any] | None = None
    reason: str | None = None
    context: Callable[[], ContextManager[Any]] = field(default=contextlib.nullcontext)
    checked: bool = True  # compare its results with eager's before timing


def _backends() -> tuple[str, ...]:
    try:
        import mtlfast

        extra = tuple(mtlfast.available_backends())
    except Exception:
        extra = ()
    return tuple(dict.fromkeys(DEFAULT_BACKENDS + extra))


def always_run(spec: OpBench) -> tuple[str, ...]:
    """The providers ``spec``'s derived numbers divide by: its eager, and dense if it has one."""
    return (spec.eager_name,) + ("dense",) * (spec.dense is not None)


def names(spec: OpBench | None = None) -> tuple[str, ...]:
    """The provider names of ``spec`` (eager, its variants, compile, dense where the op has one,
    then the mtlfast backends); of every registered op when ``spec`` is None."""
    if spec is not None:
        return ((spec.eager_name, *spec.variants, "compile") + ("dense",) * (spec.dense is not None)
                + _backends() + tuple(spec.backend_modes))
    return tuple(dict.fromkeys(BASELINES + tuple(n for s in registry.ops() for n in names(s))))


def _eager(spec: OpBench, args: tuple, device: torch.device) -> Built:
    return Built(spec.eager, checked=False)  # it is the oracle


def _dense(spec: OpBench, args: tuple, device: torch.device) -> Built:
    if spec.dense is None:
        return Built(reason=f"{spec.op} has no dense counterpart")
    return Built(spec.dense, checked=False)  # a different computation by design


def _compile(spec: OpBench, args: tuple, device: torch.device) -> Built:
    torch._dynamo.reset()  # fresh caches: no recompile limit across cases, no shape generalisation
    return Built(torch.compile(spec.eager, dynamic=False))


def _reasons(spec: OpBench, args: tuple) -> dict:
    """Per backend, why it cannot run the workload (None: it can): the first reason among the
    library ops it runs."""
    import mtlfast.backends

    if not spec.library_ops:
        return mtlfast.backends.reasons(spec.op, *args)
    first = next(a for a in args if isinstance(a, torch.Tensor))
    per_op = [mtlfast.backends.reasons(op, first) for op in spec.library_ops]
    return {b: next((r[b] for r in per_op if r[b]), None) for b in per_op[0]}


def _backend_mode(name: str) -> Callable[[OpBench, tuple, torch.device], Built]:
    """A backend run with environment settings (OpBench.backend_modes), e.g. the masked LSTM's
    Triton kernels forced to one launch per step."""
    def build(spec: OpBench, args: tuple, device: torch.device) -> Built:
        backend, settings = spec.backend_modes[name]
        built = _backend(backend)(spec, args, device)
        if built.fn is None:
            return built
        inner = built.context

        @contextlib.contextmanager
        def context():
            with mock.patch.dict(os.environ, settings), inner():
                yield

        return Built(built.fn, context=context, checked=built.checked)

    return build


def _backend(name: str) -> Callable[[OpBench, tuple, torch.device], Built]:
    def build(spec: OpBench, args: tuple, device: torch.device) -> Built:
        try:
            import mtlfast
            import mtlfast.backends

            if name == "triton" and mtlfast.backends.triton_interpreter_enabled():
                return Built(reason="TRITON_INTERPRET is set: interpreted Triton kernels are not timed")
            fn = spec.mtlfast()
            reasons = _reasons(spec, args)
        except Exception as exc:  # an op missing from this build: the other providers still run
            return Built(reason=f"mtlfast unavailable: {type(exc).__name__}: {exc}")
        if name not in reasons:
            return Built(reason=f"mtlfast has no backend {name!r} for {spec.op}")
        if reasons[name] is not None:
            return Built(reason=str(reasons[name]))
        return Built(fn, context=lambda: mtlfast.use_backend(name))

    return build


def _variant(name: str) -> Callable[[OpBench, tuple, torch.device], Built]:
    def build(spec: OpBench, args: tuple, device: torch.device) -> Built:
        # a variant that computes something else (e.g. a cheaper architecture) is timed, not checked
        return Built(spec.variants[name], checked=getattr(spec.variants[name], "checked", True))  # another eager formulation, checked against eager

    return build


def build(name: str, spec: OpBench, args: tuple, device: torch.device) -> Built:
    """Provider ``name`` for ``spec`` on these inputs."""
    builders = {spec.eager_name: _eager, "dense": _dense, "compile": _compile,
                **{v: _variant(v) for v in spec.variants}, **{m: _backend_mode(m) for m in spec.backend_modes}}
    return builders.get(name, _backend(name))(spec, args, device)
