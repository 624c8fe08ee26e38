"""How one case runs: inputs, provider, correctness check, timing, record."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from mtlfast import info

from bench import check, machine, peaks, providers, records, registry, timer
from bench.cases import Case, Settings

# dtypes whose eager run is no oracle: the expected results come from float32 inputs (see _expected)
LOW_PRECISION = (torch.float16, torch.bfloat16)

Result = tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]  # (outputs, gradients)


def _tensors(value: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(value, torch.Tensor):
        return (value,)
    return tuple(t for t in tree_leaves(value) if isinstance(t, torch.Tensor))


def make_step(fn: Callable[..., Any], args: Sequence[Any], mode: str, seed: int) -> Callable[[], Result]:
    """A zero-argument call of ``fn(*args)``; in ``fwd+bwd`` also the gradients of every input
    that requires them, for fixed seeded output gradients (``torch.autograd.grad``: no
    accumulation into ``.grad``)."""
    if mode == "fwd":
        return lambda: (_tensors(fn(*args)), ())
    wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads_out: list[torch.Tensor] = []

    def step() -> Result:
        outs = tuple(t for t in _tensors(fn(*args)) if t.requires_grad)
        if not grads_out:
            g = torch.Generator(device=outs[0].device).manual_seed(seed + 1)
            # float16 / bfloat16 ones drawn in float32 and rounded: the float32 oracle's gradients
            grads_out.extend(torch.randn(t.shape, generator=g, device=t.device,
                                         dtype=torch.promote_types(t.dtype, torch.float32)).to(t.dtype)
                             for t in outs)
        return outs, tuple(torch.autograd.grad(outs, wrt, grads_out))

    return step


def launches(step: Callable[[], Result], device: torch.device) -> tuple[float | None, str | None]:
    """(launches per call, their kind) of one step, through mtlfast.profile; (None, None) when
    mtlfast cannot be imported (the baselines are still timed)."""
    try:
        from mtlfast.profile import count_launches
    except Exception:
        return None, None
    count = count_launches(step, warmup=0, device=device)  # the step ran warm already
    return count.per_call, count.kind


def io_bytes(args: Sequence[Any], result: Result) -> int:
    """Ideal traffic: inputs, outputs, and in ``fwd+bwd`` the output gradients and the gradients."""
    outs, grads = result
    incoming = outs if grads else ()
    return sum(t.numel() * t.element_size()
               for t in (*_tensors(tuple(args)), *outs, *incoming, *grads))


class Runner:
    """Runs the cases of one session and keeps their records."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = settings.torch_device
        self.timer = timer.Timer(self.device, timer.QUICK if settings.quick else timer.DEFAULT)
        self.env = info.environment(self.device.type)
        self.peak = peaks.lookup(self.env["device_name"]) if self.device.type == "cuda" else None
        # a CPU has no datasheet peak here: its GEMM rate and copy bandwidth, measured once per run
        self.machine = machine.measure(settings.torch_dtype, settings.quick) if self.device.type == "cpu" else None
        self.records: list[dict[str, Any]] = []
        self._eager: tuple[tuple, Result] | None = None  # one slot: cases come grouped
        # a sliced case's record so far (its place in records) and its samples per clock
        self._sliced: dict[tuple, tuple[int, dict[str, list[float]]]] = {}

    def _expected(self, case: Case, spec: registry.OpBench, args: tuple) -> Result:
        """Eager's result on the same inputs (computed once per workload and mode). In float16 /
        bfloat16 eager is run on float32 copies of the inputs instead: a low-precision eager loop
        accumulates its own rounding (an LSTM over many steps), so it is no oracle."""
        key = (case.workload.key, case.mode)
        if self._eager is None or self._eager[0] != key:
            self._eager = None  # free the previous one first
            if self.settings.torch_dtype in LOW_PRECISION:
                w, mode = case.workload, case.mode
                args = spec.make_inputs(w.params, self.device, torch.float32, mode != "fwd", self.settings.seed)
            result, _ = self.timer.timed_call(make_step(spec.eager, args, case.mode, self.settings.seed))
            self._eager = (key, result)
        return self._eager[1]

    def run(self, case: Case, benchmark: Any) -> dict[str, Any]:
        """Measure ``case`` (timing through the pytest-benchmark ``benchmark`` fixture). The slices
        of a case after its first add their samples to the first one's record."""
        key = (case.workload.key, case.mode, case.provider)
        if case.slice == 0:
            record, samples = self._run(case, benchmark)
            self.records.append(record)
            self._sliced[key] = (len(self.records) - 1, samples)
            return record
        place, samples = self._sliced[key]
        first = self.records[place]
        if first["status"] != "ok":   # reported once, by the first slice
            return records.not_run(dict(first), "skipped", f"its first slice: {first['status']}")
        record, _ = self._run(case, benchmark, earlier=(first, samples))
        self.records[place] = record
        return record

    def _run(self, case: Case, benchmark: Any, earlier: tuple[dict[str, Any], dict[str, list[float]]] | None = None
             ) -> tuple[dict[str, Any], dict[str, list[float]]]:
        """(record, samples per clock) of one slice of ``case``. ``earlier``: the first slice's record
        and every slice's samples so far, for a later slice: the provider was checked, warmed up and
        its launches counted then, so this slice only calls it a few times before adding its samples."""
        s, w = self.settings, case.workload
        record = records.base(op=w.op, workload=w.name, mode=case.mode, provider=case.provider,
                              params=w.params, dtype=s.dtype, env=self.env)
        reason = w.unsupported_reason(self.device.type, case.provider)
        if reason:
            return records.not_run(record, "skipped", reason), {}
        spec = registry.op(w.op)
        args = spec.make_inputs(w.params, self.device, s.torch_dtype, case.mode != "fwd", s.seed)
        built = providers.build(case.provider, spec, args, self.device)
        if built.reason:
            return records.not_run(record, "skipped", built.reason), {}
        step = make_step(built.fn, args, case.mode, s.seed)
        benchmark.group = f"{w.key}/{case.mode}"
        benchmark.extra_info.update(op=w.op, workload=w.name, mode=case.mode, provider=case.provider,
                                    dtype=s.dtype, device=s.device, slice=case.slice)
        own_oracle = case.provider == spec.eager_name and s.torch_dtype not in LOW_PRECISION
        expected = None if own_oracle or earlier else self._expected(case, spec, args)
        try:
            with built.context():
                result, first_s = self.timer.timed_call(step)
                if earlier:
                    first, samples = earlier
                    rel_err, note = first["rel_err"], first["note"]
                    launch_count, launch_kind = first["launches"], first["launch_kind"]
                    spent_s = self.timer.plan.warmup_s     # warm already: only the plan's fewest calls
                else:
                    samples, spent_s = {}, first_s
                    if expected is None:
                        expected, self._eager = result, ((w.key, case.mode), result)
                    rel_err, note = None, None
                    if spec.random:  # different random streams: a statistic of the sample, if any
                        note = check.sample_note(spec.sample_check, args, result[0])
                    elif built.checked:
                        rel_err = check.verify(result[0] + result[1], expected[0] + expected[1], s.torch_dtype)
                per_call = self.timer.warm_up(step, spent_s=spent_s, last_s=first_s)
                for clock, values in self.timer.measure(step, benchmark, per_call, share=1 / case.slices).items():
                    samples.setdefault(clock, []).extend(values)
                if not earlier:
                    launch_count, launch_kind = launches(step, self.device)
        except Exception as exc:  # a failing provider is an error record, the run goes on
            where = f"slice {case.slice + 1}: " if earlier else ""
            return records.not_run(record, "error", f"{where}{type(exc).__name__}: {exc}"), {}
        return records.measured(record, samples=samples, clock=self.timer.primary_clock,
                                flops=spec.flops(w.params, case.mode), nbytes=io_bytes(args, result),
                                peak=self.peak, rel_err=rel_err, note=note,
                                launches=launch_count, launch_kind=launch_kind, machine=self.machine), samples
