"""Which backends exist, why one cannot run given inputs, and which one runs.

Backends: ``reference`` (pure PyTorch, any device, the test oracle), ``triton`` (CUDA tensors;
CPU tensors only under TRITON_INTERPRET=1, for tests), ``cuda`` (mtlfast._C on CUDA tensors),
``cpu`` (mtlfast._C on CPU tensors). As in xformers, every backend answers "why not?" for given
inputs (None = it can run them) and automatic dispatch takes the first, fastest-first, that can.
A forced backend (``MTLFAST_BACKEND`` or :func:`use_backend`) that cannot run raises with the
reasons instead of silently falling back.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("reference", "triton", "cuda", "cpu")
ENV_VAR = "MTLFAST_BACKEND"

Reason = Optional[str]


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the given inputs."""


# Environment facts that cannot change within a process, computed once. A plain dict rather than
# functools.lru_cache, which torch.compile warns about when tracing through it.
_memo: dict[str, Reason] = {}


def _memoized(fn: Callable[[], Reason]) -> Callable[[], Reason]:
    def wrapper() -> Reason:
        if fn.__name__ not in _memo:
            _memo[fn.__name__] = fn()
        return _memo[fn.__name__]
    wrapper.__name__ = fn.__name__
    return wrapper


def autotune_enabled() -> bool:
    """MTLFAST_AUTOTUNE: unset or anything but 0 / false / off / no: Triton kernels time their
    candidates for each new autotune key (the usual Triton autotuning); 0: no kernel times
    anything, each runs the first candidate its prune keeps for the launch (the first of its list
    wherever that fits). For test runs on a GPU, where every new shape would otherwise compile and
    time every candidate. The kernels read it once, at import."""
    return os.environ.get("MTLFAST_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@_memoized
def _triton_import_reason() -> Reason:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


@_memoized
def _native_import_reason() -> Reason:
    try:
        from mtlfast import _C  # noqa: F401
    except Exception as exc:
        return (f"mtlfast._C is not built ({type(exc).__name__}: {exc}); "
                "reinstall without MTLFAST_NATIVE=0 to build it")
    return None


@_memoized
def _cuda_kernels_reason() -> Reason:
    reason = _native_import_reason()
    if reason:
        return reason
    from mtlfast import _C
    if not _C.build_info()["cuda"]:
        return "mtlfast._C was built without CUDA kernels (nvcc was not found at build time)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    if _C.cuda_device_count() == 0:
        return "mtlfast._C sees no CUDA device"
    return None


def device_reason(backend: str, device: torch.device) -> Reason:
    """Why ``backend`` cannot run tensors on ``device`` at all, whatever the op."""
    if backend == "reference":
        return None
    if backend == "triton":
        reason = _triton_import_reason()
        if reason:
            return reason
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreter_enabled()):
            return None
        if device.type == "cpu":
            return "triton runs CPU tensors only under TRITON_INTERPRET=1 (for tests)"
        return f"triton does not run {device.type} tensors"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors, got {device.type} tensors"
        return _cuda_kernels_reason()
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs CPU tensors, got {device.type} tensors"
        return _native_import_reason()
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def available_backends() -> dict[str, Reason]:
    """``{name: None}`` for a backend usable on this machine, else ``{name: reason}``."""
    has_cuda = torch.cuda.is_available()
    out: dict[str, Reason] = {}
    for name in BACKENDS:
        if name == "reference":
            out[name] = None
        elif name == "triton":
            cuda_reason = device_reason(name, torch.device("cuda")) if has_cuda else "no CUDA device"
            cpu_reason = device_reason(name, torch.device("cpu"))
            out[name] = None if (cuda_reason is None or cpu_reason is None) else \
                f"{cuda_reason}; {cpu_reason}" if cuda_reason != cpu_reason else cuda_reason
        elif name == "cuda":
            out[name] = _cuda_kernels_reason()
        else:
            out[name] = _native_import_reason()
    return out


# ---------------------------------------------------------------------------------------------
# Forcing a backend

_forced: list[str] = []  # innermost use_backend() last


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def forced_backend() -> Optional[str]:
    """The backend forced by :func:`use_backend`, else by MTLFAST_BACKEND, else None (automatic)."""
    if _forced:
        return _forced[-1]
    env = os.environ.get(ENV_VAR, "")
    if env in ("", "auto"):
        return None
    return _check_name(env)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Forces backend ``name`` for mtlfast ops called inside the block ("auto" restores the
    automatic choice). Nested blocks stack."""
    if name != "auto":
        _check_name(name)
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


# ---------------------------------------------------------------------------------------------
# Per-op dispatch

# Fastest first, per device type; a backend without a kernel for an op says so as its reason.
# Other device types run the reference.
PREFERENCE: dict[str, tuple[str, ...]] = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


class Op:
    """An op's backends: for each, a check of the inputs (None = runs them); automatic selection
    takes the first in :data:`PREFERENCE` that can."""

    def __init__(self, name: str, device_of: Callable[..., torch.device],
                 checks: dict[str, Callable[..., Reason]],
                 selection_key: Optional[Callable[..., object]] = None) -> None:
        """``selection_key(*args)``, when given, is everything the checks depend on (say device and
        dtype): the choice is then computed once per key instead of on every call."""
        self.name = name
        self.device_of = device_of
        self.selection_key = selection_key
        self.checks = {_check_name(b): check for b, check in checks.items()}
        self._chosen: dict[object, str] = {}

    def reason(self, backend: str, *args) -> Reason:
        reason = device_reason(backend, self.device_of(*args))
        if reason:
            return reason
        check = self.checks.get(backend)
        if check is None:
            return f"{backend} has no {self.name} kernel"
        return check(*args)

    def reasons(self, *args) -> dict[str, Reason]:
        return {name: self.reason(name, *args) for name in BACKENDS}

    def select(self, *args) -> str:
        """The backend to run ``args``: the forced one (raises if it cannot), else the first in
        the device's preference order that can."""
        forced = forced_backend()
        if self.selection_key is None:
            return self._select(forced, *args)
        key = (forced, self.selection_key(*args))
        chosen = self._chosen.get(key)
        if chosen is None:
            chosen = self._chosen[key] = self._select(forced, *args)  # raises, uncached, if it cannot
        return chosen

    def _select(self, forced: Optional[str], *args) -> str:
        if forced is not None and forced != "auto":
            reason = self.reason(forced, *args)
            if reason:
                others = [n for n, r in self.reasons(*args).items() if r is None]
                raise BackendUnavailableError(
                    f"mtlfast: backend '{forced}' was forced but cannot run {self.name} on these "
                    f"inputs: {reason}. Backends that can: {', '.join(others) or 'none'}")
            return forced
        device_type = self.device_of(*args).type
        for name in PREFERENCE.get(device_type, ("reference",)):
            if self.reason(name, *args) is None:
                return name
        return "reference"


_OPS: dict[str, Op] = {}


def register_op(op: Op) -> Op:
    _OPS[op.name] = op
    return op


def reasons(op: str, *args) -> dict[str, Reason]:
    """For op ``op`` (e.g. "masked_linear") and its arguments: per backend, None if it can run
    them, else why not."""
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(sorted(_OPS))}")
    return _OPS[op].reasons(*args)
