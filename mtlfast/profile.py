"""Profile a user's code eager against mtlfast, side by side (built on ``torch.profiler``).

``compare(fn_a, fn_b, *inputs)`` calls both functions on the same inputs and reports, per call:
the median wall time (with p10 and p90), the device kernel time on a GPU, the kernel launches on
a GPU (PyTorch operator calls on a CPU, where nothing is launched), the peak memory a call
allocates, and the top kernels (operators on a CPU) by time; ``.table()`` sets them side by side
with ratios and ``.save(dir)`` writes the figures as JSON and a Chrome trace per side.
``count_launches(fn, *inputs)`` is the launch count alone, for tests and the benchmark report.

What is counted, exactly:

- kernel launches (GPU): every device activity the profiler sees in the call (kernels, memcpy,
  memset), divided by the calls profiled;
- operator calls (CPU): PyTorch operators (``aten::``, custom ops) called from outside any other
  operator, so ``F.linear`` counts once, not also its ``addmm``. mtlfast's native CPU kernels run
  inside an autograd Function, not as operators: their time shows under the Function's name in
  the top list, and the operators around them are counted;
- peak memory: the highest total of the call's own allocations minus its frees on the inputs'
  device (allocator events, so the caching allocator's reuse does not hide it), above what was
  allocated when the call began.
"""
from __future__ import annotations

import json
import math
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile as torch_profile
from torch.utils._pytree import tree_leaves

from mtlfast._timing import sync as _sync, wall_times as _wall_times

_WHERE = "mtlfast.profile"
_KERNELS = "kernel launches"
_OPERATORS = "operator calls"


# ---------------------------------------------------------------------------------------------
# Arguments

def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in ``value`` (nested tuples, lists and dicts), in order."""
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _device_of(inputs: Sequence[Any]) -> torch.device:
    """The one device of every tensor in ``inputs`` (CPU when there is none)."""
    seen: dict[torch.device, int] = {}
    for index, value in enumerate(inputs):
        for t in _tensors(value):
            seen.setdefault(t.device, index)
    if len(seen) > 1:
        where = ", ".join(f"{d} (inputs[{i}])" for d, i in seen.items())
        raise ValueError(f"{_WHERE}: the inputs must all be on one device, got {where}")
    return next(iter(seen), torch.device("cpu"))


def _check_callable(name: str, fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"{_WHERE}: argument '{name}' must be callable, got {type(fn).__name__}")


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{_WHERE}: argument '{name}' must be an int >= {minimum}, got {value!r}")
    return value


def _check_labels(labels: object) -> tuple[str, str]:
    if (not isinstance(labels, (tuple, list)) or len(labels) != 2 or not all(isinstance(x, str) and x for x in labels)
            or labels[0] == labels[1]):
        raise ValueError(f"{_WHERE}: argument 'labels' must be two different non-empty strings, got {labels!r}")
    return labels[0], labels[1]


# ---------------------------------------------------------------------------------------------
# One call

def _differentiable(name: str, out: Any) -> list[torch.Tensor]:
    """Every floating-point output that requires grad: backward=True differentiates their sum."""
    parts = [t for t in _tensors(out) if t.is_floating_point() and t.requires_grad]
    if not parts:
        found = ", ".join(f"{tuple(t.shape)} {t.dtype} requires_grad={t.requires_grad}" for t in _tensors(out))
        raise ValueError(f"{_WHERE}: backward=True needs '{name}' to return floating-point tensors that require "
                         f"grad (nested in tuples, lists or dicts) to sum into a scalar; it returned "
                         f"{type(out).__name__}" + (f" holding {found}" if found else " with no tensor"))
    return parts


def _call(name: str, fn: Callable[..., Any], inputs: Sequence[Any], backward: bool) -> Callable[[], None]:
    """One call of ``fn`` (and the backward of the sum of its outputs) that keeps nothing alive
    after it returns. The sum's gradient, ones, is made once and fed to backward directly, so
    neither side's counts include reduction ops of the profiler's own."""
    ones: list[torch.Tensor] = []

    def call() -> None:
        out = fn(*inputs)
        if backward:
            parts = _differentiable(name, out)
            if [o.shape for o in ones] != [p.shape for p in parts]:
                ones[:] = [torch.ones_like(p) for p in parts]
            torch.autograd.backward(parts, ones)
            del parts
        del out
    return call


# ---------------------------------------------------------------------------------------------
# What the profiler saw

def _is_operator(name: str) -> bool:
    return "::" in name and not name.startswith(("autograd::", "profiler::", "cuda", "mtlfast.profile"))


def _is_device_event(event: Any) -> bool:
    return event.device_type == DeviceType.CUDA and event.name != "[memory]"


def _top_level_operators(events: Sequence[Any]) -> list[Any]:
    """Operator events with no operator above them."""
    out = []
    for e in events:
        if e.device_type != DeviceType.CPU or not _is_operator(e.name):
            continue
        parent = e.cpu_parent
        while parent is not None and not _is_operator(parent.name):
            parent = parent.cpu_parent
        if parent is None:
            out.append(e)
    return out


def _peak_bytes(prof: Any, device: torch.device) -> int:
    """The highest running total of the allocator events on ``device`` over the profiled calls."""
    wanted = DeviceType.CUDA if device.type == "cuda" else DeviceType.CPU
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == wanted)
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak


@dataclass
class Top:
    """One kernel (on a GPU) or operator / autograd Function (on a CPU) and its share of a call."""

    name: str
    ms_per_call: float   # device time of the kernel (GPU), self CPU time (CPU)
    calls_per_call: float


def _top(events: Sequence[Any], device: torch.device, calls: int, n: int) -> list[Top]:
    totals: dict[str, list[float]] = {}
    for e in events:
        if device.type == "cuda":
            if not _is_device_event(e):
                continue
            us = e.device_time_total
        else:
            if e.device_type != DeviceType.CPU or e.name.startswith(("mtlfast.profile", "[memory]")):
                continue
            us = e.self_cpu_time_total
        entry = totals.setdefault(e.name, [0.0, 0])
        entry[0] += us
        entry[1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:n]
    return [Top(name, us / 1e3 / calls, count / calls) for name, (us, count) in ranked]


class LaunchCount(NamedTuple):
    """Launches per call: ``kind`` is "kernel launches" on a GPU, "operator calls" on a CPU."""

    per_call: float
    kind: str


def _profiled(call: Callable[[], None], device: torch.device, calls: int, trace: Optional[Path] = None):
    """Run ``call`` ``calls`` times under the profiler (after a synchronisation) -> the profiler."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with torch_profile(activities=activities, profile_memory=True) as prof:
        for _ in range(calls):
            call()
        _sync(device)
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    return prof


def _launches(events: Sequence[Any], device: torch.device, calls: int) -> LaunchCount:
    if device.type == "cuda":
        return LaunchCount(sum(1 for e in events if _is_device_event(e)) / calls, _KERNELS)
    return LaunchCount(len(_top_level_operators(events)) / calls, _OPERATORS)


def count_launches(fn: Callable[..., Any], *inputs: Any, backward: bool = False, calls: int = 1,
                   warmup: int = 1, device: Optional[torch.device] = None) -> LaunchCount:
    """Kernel launches per call of ``fn(*inputs)`` on a GPU (operator calls on a CPU), after
    ``warmup`` calls (first calls may compile or autotune); ``backward=True`` includes the
    backward of the sum of its outputs. ``device``: where ``fn`` runs, when no input says it
    (default: the inputs' device)."""
    _check_callable("fn", fn)
    _check_count("calls", calls, 1)
    _check_count("warmup", warmup, 0)
    device = _device_of(inputs) if device is None else torch.device(device)
    call = _call("fn", fn, inputs, backward)
    for _ in range(warmup):
        call()
    prof = _profiled(call, device, calls)
    return _launches(prof.events(), device, calls)


# ---------------------------------------------------------------------------------------------
# The comparison

@dataclass
class SideProfile:
    """The figures of one side, per call. ``device_ms`` is None on a CPU."""

    label: str
    device: str
    wall_ms: float
    wall_ms_p10: float
    wall_ms_p90: float
    device_ms: Optional[float]
    launches: float
    launch_kind: str
    peak_memory_bytes: int
    top: list[Top]
    iters: int
    profiled_calls: int
    trace: str = field(repr=False, default="")   # the Chrome trace (JSON text)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("trace")
        return d


def _profile_side(label: str, name: str, fn: Callable[..., Any], inputs: Sequence[Any], device: torch.device,
                  backward: bool, warmup: int, iters: int, profiled: int, top: int) -> SideProfile:
    call = _call(name, fn, inputs, backward)
    times = _wall_times(call, device, warmup, iters)
    with tempfile.TemporaryDirectory() as tmp:
        trace_path = Path(tmp) / "trace.json"
        prof = _profiled(call, device, profiled, trace_path)
        trace = trace_path.read_text()
    events = prof.events()
    device_ms = None
    if device.type == "cuda":
        device_ms = sum(e.device_time_total for e in events if _is_device_event(e)) / 1e3 / profiled
    ms = sorted(t * 1e3 for t in times)
    q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
    launches = _launches(events, device, profiled)
    return SideProfile(label=label, device=str(device), wall_ms=statistics.median(ms), wall_ms_p10=q[0],
                       wall_ms_p90=q[-1], device_ms=device_ms, launches=launches.per_call, launch_kind=launches.kind,
                       peak_memory_bytes=_peak_bytes(prof, device), top=_top(events, device, profiled, top), iters=iters,
                       profiled_calls=profiled, trace=trace)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0 or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return a / b


def _ms(x: Optional[float]) -> str:
    if x is None:
        return "–"
    return f"{x * 1e3:.1f} µs" if x < 1 else f"{x:.2f} ms" if x < 100 else f"{x:.0f} ms"


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _times(r: Optional[float]) -> str:
    return "–" if r is None else f"{r:.2f}×"


@dataclass
class Comparison:
    """Two :class:`SideProfile` of the same inputs; ratios are a / b (above 1: b is faster,
    launches fewer kernels, needs less memory)."""

    a: SideProfile
    b: SideProfile
    backward: bool

    def ratios(self) -> dict[str, Optional[float]]:
        return {"wall_ms": _ratio(self.a.wall_ms, self.b.wall_ms),
                "device_ms": _ratio(self.a.device_ms, self.b.device_ms),
                "launches": _ratio(self.a.launches, self.b.launches),
                "peak_memory_bytes": _ratio(self.a.peak_memory_bytes, self.b.peak_memory_bytes)}

    def table(self) -> str:
        """The side-by-side markdown table, then each side's top kernels."""
        a, b, r = self.a, self.b, self.ratios()
        what = "forward + backward" if self.backward else "forward"
        rows = [("wall time per call (median)", _ms(a.wall_ms), _ms(b.wall_ms), _times(r["wall_ms"])),
                ("wall time p10 – p90", f"{_ms(a.wall_ms_p10)} – {_ms(a.wall_ms_p90)}",
                 f"{_ms(b.wall_ms_p10)} – {_ms(b.wall_ms_p90)}", ""),
                ("device kernel time per call", _ms(a.device_ms), _ms(b.device_ms), _times(r["device_ms"])),
                (f"{a.launch_kind} per call", f"{a.launches:g}", f"{b.launches:g}", _times(r["launches"])),
                ("peak memory of a call", _bytes(a.peak_memory_bytes), _bytes(b.peak_memory_bytes),
                 _times(r["peak_memory_bytes"]))]
        lines = [f"{what} on {a.device}, {a.iters} timed calls per side",
                 "", f"| | {a.label} | {b.label} | {a.label} / {b.label} |", "|---|---|---|---|"]
        lines += [f"| {m} | {x} | {y} | {z} |" for m, x, y, z in rows]
        for side in (a, b):
            unit = "device time" if side.device_ms is not None else "self CPU time"
            lines += ["", f"top of {side.label} ({unit} per call, calls per call):"]
            lines += [f"  {t.ms_per_call:9.3f} ms  {t.calls_per_call:6g}×  {t.name[:90]}" for t in side.top]
        return "\n".join(lines)

    __str__ = table

    def to_dict(self) -> dict[str, Any]:
        return {"backward": self.backward, "a": self.a.to_dict(), "b": self.b.to_dict(), "ratios": self.ratios()}

    def save(self, directory: str | Path) -> dict[str, Path]:
        """``comparison.json`` (every figure), ``trace_<label>.json`` per side (open in
        chrome://tracing or Perfetto) -> their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"comparison": directory / "comparison.json"}
        paths["comparison"].write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        for side in (self.a, self.b):
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in side.label)
            paths[side.label] = directory / f"trace_{safe}.json"
            paths[side.label].write_text(side.trace)
        return paths


def compare(fn_a: Callable[..., Any], fn_b: Callable[..., Any], *inputs: Any,
            labels: Sequence[str] = ("eager", "mtlfast"), backward: bool = False, warmup: int = 3, iters: int = 10,
            profiled_calls: int = 1, top: int = 8) -> Comparison:
    """Profile ``fn_a(*inputs)`` against ``fn_b(*inputs)``.

    Args:
        fn_a, fn_b: the two implementations (e.g. eager and mtlfast), called with ``inputs``.
        inputs: positional arguments of both; every tensor among them on one device.
        labels: the two sides' names.
        backward: also run backward of the sum of every floating-point output that requires
            grad (gradients accumulate into ``.grad`` as in a training step).
        warmup: untimed calls first (compilation, autotuning, caches).
        iters: timed calls (median, p10, p90 of the wall time, synchronised on a GPU).
        profiled_calls: calls under the profiler (launches, kernel time, memory, trace).
        top: how many kernels (operators on a CPU) to list per side.
    Returns:
        a :class:`Comparison`; print it, or ``.save(dir)``.
    """
    _check_callable("fn_a", fn_a)
    _check_callable("fn_b", fn_b)
    label_a, label_b = _check_labels(labels)
    _check_count("warmup", warmup, 0)
    _check_count("iters", iters, 1)
    _check_count("profiled_calls", profiled_calls, 1)
    _check_count("top", top, 0)
    device = _device_of(inputs)
    sides = [_profile_side(label, name, fn, inputs, device, bool(backward), warmup, iters, profiled_calls, top)
             for label, name, fn in ((label_a, "fn_a", fn_a), (label_b, "fn_b", fn_b))]
    return Comparison(sides[0], sides[1], bool(backward))
