"""Tests of the benchmark harness in bench/ (runs on CPU in seconds; on a GPU unchanged).

The harness is exercised for real (``python -m bench`` on the ``tiny`` workload, quick rounds);
the arithmetic is checked on hand-computed cases.  No timing is compared with a threshold.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import cases, compare, peaks, providers, records, report  # noqa: E402
from bench.__main__ import main as bench_main  # noqa: E402
from bench.runner import Runner, io_bytes, make_step  # noqa: E402
from bench.workloads import masked_linear as ml  # noqa: E402

REVISION = re.compile(r"^([0-9a-f]{7,40}(-dirty)?|unknown)$")
TINY = {"tokens": 8, "in_features": 12, "out_features": 16}
PROVIDERS = ["eager", "dense", "reference", "triton"]  # requested: reference, triton


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``python -m bench`` on the tiny workload: its output folder, stdout and records."""
    out = tmp_path_factory.mktemp("bench-out")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--workload", "tiny", "--quick", "--provider", "reference",
         "--provider", "triton", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"out": out, "stdout": proc.stdout, "records": records.read_jsonl(out / "results.jsonl")}


def _by(recs: list[dict], mode: str, provider: str) -> dict:
    (hit,) = [r for r in recs if r["mode"] == mode and r["provider"] == provider]
    return hit


def test_every_line_is_a_record_with_every_field(run: dict) -> None:
    lines = (run["out"] / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 * len(PROVIDERS)
    for line in lines:
        rec = json.loads(line)
        assert set(records.FIELDS) <= set(rec), set(records.FIELDS) - set(rec)
        assert rec["schema"] == records.SCHEMA
        assert rec["status"] in records.STATUSES
        assert (rec["op"], rec["workload"]) == ("masked_linear", "tiny")
        assert rec["torch"] == torch.__version__
        assert rec["device"] == cases.default_device()
        assert rec["dtype"] == cases.default_dtype(rec["device"])
        assert REVISION.match(rec["git"])
    assert sorted({r["provider"] for r in run["records"]}) == sorted(PROVIDERS)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_measured_records_are_sane(run: dict, mode: str) -> None:
    recs = [r for r in run["records"] if r["mode"] == mode]
    eager, dense = _by(recs, mode, "eager"), _by(recs, mode, "dense")
    for name in ("eager", "dense", "reference"):
        r = _by(recs, mode, name)
        assert r["status"] == "ok", r["reason"]
        q = r["quantiles_s"]
        assert r["median_s"] > 0
        assert 0 < q["p10"] <= q["p25"] <= q["p50"] <= q["p75"] <= q["p90"]
        assert q["p50"] == r["median_s"]
        assert r["rounds"] >= 3 and r["rounds"] == r["times"][r["clock"]]["rounds"]
        assert r["clock"] == ("cuda_event" if r["device"] == "cuda" else "wall")
        assert "wall" in r["times"]
        assert r["speedup_vs_eager"] == pytest.approx(eager["median_s"] / r["median_s"], rel=1e-12)
        assert r["frac_dense"] == pytest.approx(dense["median_s"] / r["median_s"], rel=1e-12)
        assert r["tflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e12, rel=1e-12)
        assert r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9, rel=1e-12)
    assert eager["speedup_vs_eager"] == 1.0 and dense["frac_dense"] == 1.0
    assert _by(recs, mode, "reference")["rel_err"] < 1e-2
    # launches per call: eager is weight * mask, then F.linear (one more operator than dense);
    # backward adds work. On a GPU each of these is at least one kernel.
    kind = "kernel launches" if eager["device"] == "cuda" else "operator calls"
    assert {eager["launch_kind"], dense["launch_kind"]} == {kind}
    if kind == "operator calls" and mode == "fwd":
        assert (eager["launches"], dense["launches"]) == (2, 1)
    assert eager["launches"] >= 2 and dense["launches"] >= 1
    if mode == "fwd+bwd":
        fwd_eager = _by([r for r in run["records"] if r["mode"] == "fwd"], "fwd", "eager")
        assert eager["launches"] > fwd_eager["launches"]
    m, k, n = TINY["tokens"], TINY["in_features"], TINY["out_features"]
    e = torch.finfo(getattr(torch, eager["dtype"])).bits // 8
    fwd_bytes = (m * k + n * k + n + m * n) * e + n * k  # x, weight, bias, y; bool mask
    grad_bytes = (m * n + m * k + n * k + n) * e  # dy in; dx, dweight, dbias out
    assert eager["flops"] == 2 * m * k * n * (1 if mode == "fwd" else 3)
    assert eager["bytes"] == fwd_bytes + (grad_bytes if mode == "fwd+bwd" else 0)


def test_provider_that_cannot_run_has_a_reason(run: dict) -> None:
    for mode in ("fwd", "fwd+bwd"):
        triton = _by(run["records"], mode, "triton")
        if triton["device"] == "cpu":
            assert triton["status"] == "skipped"
            assert triton["reason"] and triton["median_s"] is None and triton["speedup_vs_eager"] is None


def test_report_table_and_png(run: dict, tmp_path: Path) -> None:
    text = (run["out"] / "report.md").read_text()
    assert text.strip() in run["stdout"]
    for mode in ("fwd", "fwd+bwd"):
        for name in PROVIDERS:
            rows = [line for line in text.splitlines() if line.startswith(f"| masked_linear | tiny | {mode} | {name} |")]
            assert len(rows) == 1, (mode, name)
            triton = _by(run["records"], mode, "triton")
            if name == "triton" and triton["status"] == "skipped":
                assert f"skipped: {triton['reason']}" in rows[0]
    import matplotlib.image

    again = tmp_path / "again.png"
    assert report.main([str(run["out"] / "results.jsonl"), "--png", str(again)]) == 0
    for png in (run["out"] / "report.png", again):
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_hand_computed_bytes_flops_and_fractions() -> None:
    # masked_linear, 2 tokens, 3 -> 4, fp32 with bias: x 24 B, weight 48, mask 12, bias 16, y 32
    params = {"tokens": 2, "in_features": 3, "out_features": 4, "density": 0.5}
    args = ml.make_inputs(params, torch.device("cpu"), torch.float32, False, 0)
    assert io_bytes(args, make_step(ml.eager, args, "fwd", 0)()) == 132
    assert ml.flops(params, "fwd") == 48 and ml.flops(params, "fwd+bwd") == 144
    assert records.throughput(48, 132, 1e-6) == pytest.approx((4.8e-5, 0.132))

    # gemm 4096^3 in bf16 on an H100 SXM at a median of 200 us
    h100 = peaks.lookup("NVIDIA H100 80GB HBM3")
    assert h100 is not None and h100.name == "H100 SXM"
    flops, nbytes = 2 * 4096 ** 3, (2 + 2 + 1 + 2) * 4096 ** 2  # x, weight, bool mask, y
    base = records.base(op="masked_linear", workload="gemm-4096", mode="fwd", provider="triton",
                        params={}, dtype="bfloat16", env={"device_name": "NVIDIA H100 80GB HBM3"})
    rec = records.measured(base, samples={"wall": [3e-4, 4e-4, 5e-4], "cuda_event": [1e-4, 2e-4, 3e-4]},
                           clock="cuda_event", flops=flops, nbytes=nbytes, peak=h100, rel_err=0.0)
    assert rec["median_s"] == 2e-4 and rec["times"]["wall"]["median_s"] == 4e-4
    assert rec["tflops"] == pytest.approx(687.19476736)
    assert rec["gbps"] == pytest.approx(587.202560)
    assert rec["frac_peak_flops"] == pytest.approx(687.19476736 / 989)
    assert rec["frac_peak_bw"] == pytest.approx(587.202560 / 3350)
    assert peaks.lookup("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert peaks.lookup("AMD EPYC 7B13") is None
    assert records.fractions(1.0, 1.0, "float32", None) == (None, None)


def test_summary_quantiles_and_speedups() -> None:
    s = records.summarize([float(i) for i in range(10, 0, -1)])
    assert s["median_s"] == 5.5 and s["min_s"] == 1 and s["max_s"] == 10 and s["rounds"] == 10
    assert s["quantiles_s"] == pytest.approx({"p10": 1.9, "p25": 3.25, "p50": 5.5, "p75": 7.75, "p90": 9.1})
    env = {"device_name": "cpu"}
    recs = [{**records.base(op="o", workload="w", mode="fwd", provider=p, params={}, dtype="float32", env=env),
             "status": "ok", "median_s": t} for p, t in (("eager", 4.0), ("dense", 1.0), ("triton", 2.0))]
    out = {r["provider"]: r for r in records.finalize(recs)}
    assert out["triton"]["speedup_vs_eager"] == 2.0 and out["triton"]["frac_dense"] == 0.5
    assert out["eager"]["frac_dense"] == 0.25


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps({"op": "masked_linear", "workload": "w", "mode": "fwd",
                                        "device_name": "dev", "dtype": "float32", **r}) + "\n"
                            for r in rows))
    return path


def test_compare_two_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _write(tmp_path / "a.jsonl", [
        {"provider": "eager", "status": "ok", "median_s": 2e-3},
        {"provider": "triton", "status": "ok", "median_s": 1e-3},
        {"provider": "cuda", "status": "skipped", "reason": "no GPU", "median_s": None}])
    b = _write(tmp_path / "b.jsonl", [
        {"provider": "eager", "status": "ok", "median_s": 1e-3},
        {"provider": "triton", "status": "ok", "median_s": 4e-4},
        {"provider": "cuda", "status": "ok", "median_s": 3e-4}])
    ratios = {p.key[-1]: p.ratio for p in compare.pairs(records.read_jsonl(a), records.read_jsonl(b))}
    assert ratios["eager"] == pytest.approx(0.5) and ratios["triton"] == pytest.approx(0.4)
    assert ratios["cuda"] is None
    assert report.main(["--compare", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"\| masked_linear \| w \| fwd \| triton \| 1 ms \| 400 µs \| 0\.40× \|", text)
    assert "| cuda | skipped: no GPU | 300 µs |" in text


def test_wrong_result_is_an_error_not_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    def unmasked(name: str, spec: object, args: tuple, device: torch.device) -> providers.Built:
        return providers.Built(ml.dense)  # forgets the mask, and is checked

    monkeypatch.setattr(providers, "build", unmasked)
    settings = cases.Settings.make(device="cpu", workloads=("tiny",), quick=True)
    (case,) = [c for c in cases.select(settings) if c.provider == "reference" and c.mode == "fwd"]
    rec = Runner(settings).run(case, types.SimpleNamespace(group=None, extra_info={}))
    assert rec["status"] == "error" and "relative error" in rec["reason"]
    assert rec["median_s"] is None


class _Pedantic(types.SimpleNamespace):
    """The pytest-benchmark fixture's part the timer uses: pedantic calls, their samples."""

    def pedantic(self, call, rounds, iterations, warmup_rounds):
        self.stats = types.SimpleNamespace(stats=types.SimpleNamespace(data=[]))
        for _ in range(rounds):
            call()
            self.stats.stats.data.append(1e-3)


def test_slices_take_turns_and_join_into_one_record() -> None:
    """With slices, a row's providers take turns slice by slice (the ids say which), and a case's
    slices end as one record holding every slice's samples; a provider that cannot run is reported
    once. CPU default: 4 slices; quick runs and CUDA: 1."""
    assert cases.Settings.make(device="cpu").slices == 4
    assert cases.Settings.make(device="cpu", quick=True).slices == 1
    with pytest.raises(ValueError, match="slices"):
        cases.select(cases.Settings.make(device="cpu", workloads=("tiny",), slices=0))
    settings = cases.Settings.make(device="cpu", workloads=("tiny",), quick=True, slices=3, modes=("fwd",),
                                   providers=("reference", "cuda"))
    selected = cases.select(settings)
    order = [(c.provider, c.slice) for c in selected]
    per_slice = ["eager", "dense", "reference", "cuda"]
    assert order == [(p, k) for k in range(3) for p in per_slice]
    assert selected[0].id.endswith("/eager/slice1of3")
    runner = Runner(settings)
    timed: dict = {}
    for case in selected:
        fixture = _Pedantic(group=None, extra_info={})
        runner.run(case, fixture)
        if hasattr(fixture, "stats"):
            timed.setdefault(case.provider, []).append(len(fixture.stats.stats.data))
    assert [(r["provider"], r["status"]) for r in runner.records] == [
        ("eager", "ok"), ("dense", "ok"), ("reference", "ok"), ("cuda", "skipped")]
    assert sorted(timed) == ["dense", "eager", "reference"]
    for r in runner.records[:3]:
        assert len(timed[r["provider"]]) == 3 and min(timed[r["provider"]]) >= 1
        assert r["rounds"] == sum(timed[r["provider"]])        # every slice's samples in the one record
        assert r["median_s"] == pytest.approx(1e-3)            # the fake fixture's 1 ms


def test_selection_keeps_baselines_and_rejects_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    settings = cases.Settings.make(device="cpu", workloads=("tiny",), providers=("triton",), slices=1)
    assert [c.provider for c in cases.select(settings) if c.mode == "fwd"] == ["eager", "dense", "triton"]
    gemm = [w for w in cases.registry.workloads() if w.name == "gemm-4096"][0]
    assert gemm.unsupported_reason("cpu") and gemm.unsupported_reason("cuda") is None
    assert bench_main(["--workload", "no-such-workload"]) == 2
    assert "no-such-workload" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# masked_lstm (bench/workloads/masked_lstm.py): the sparse-sharing LSTM, every task in one call

LSTM_PROVIDERS = ["eager-loop", "eager-lstm", "reference", "triton", "cpu"]  # requested: all but compile


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """``python -m bench`` on the tiny masked_lstm workload (compile left out: it takes a minute)."""
    out = tmp_path_factory.mktemp("bench-lstm")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Busy-waiting OpenMP threads can make tiny CPU matmuls ~100x slower on a loaded 2-core machine.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = [sys.executable, "-m", "bench", "--workload", "lstm-tiny", "--quick", "--out", str(out)]
    cmd += [f"--provider={p}" for p in LSTM_PROVIDERS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return records.read_jsonl(out / "results.jsonl")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_masked_lstm_records(lstm_run: list[dict], mode: str) -> None:
    recs = [r for r in lstm_run if r["mode"] == mode]
    assert all((r["op"], r["workload"]) == ("masked_lstm", "lstm-tiny") for r in recs)
    assert sorted(r["provider"] for r in recs) == sorted(LSTM_PROVIDERS)  # no dense: the op has none
    oracle = _by(recs, mode, "eager-loop")
    for name in ("eager-loop", "eager-lstm", "reference", "cpu"):
        r = _by(recs, mode, name)
        assert r["status"] == "ok", r["reason"]
        assert r["median_s"] > 0 and r["rounds"] >= 3
        assert r["speedup_vs_eager"] == pytest.approx(oracle["median_s"] / r["median_s"], rel=1e-12)
        assert r["frac_dense"] is None
        assert r["rel_err"] is None if name == "eager-loop" else r["rel_err"] < 1e-4
        # 2 tasks x 3 x 4 tokens; per token 8H(I+H) per direction: layer 0 (6 -> 5), layer 1 (10 -> 5)
        assert r["flops"] == 2 * 12 * (8 * 5 * (6 + 5) * 2 + 8 * 5 * (10 + 5) * 2) * (1 if mode == "fwd" else 3)
    assert oracle["speedup_vs_eager"] == 1.0
    # the per-step loop runs operators per task, layer, direction and step (4 steps here: 507
    # forward); mtlfast's count does not grow with steps or tasks (118 forward)
    assert oracle["launches"] > 3 * _by(recs, mode, "cpu")["launches"] > 0
    triton = _by(recs, mode, "triton")
    if triton["device"] == "cpu":
        assert triton["status"] == "skipped" and triton["reason"] and triton["median_s"] is None


def test_masked_lstm_providers_agree_and_share_the_weights() -> None:
    from bench.workloads import masked_lstm as ls

    import mtlfast

    params = next(w.params for w in ls.WORKLOADS if w.name == "lstm-tiny")
    for mode in ("fwd", "fwd+bwd"):
        args = ls.make_inputs(params, torch.device("cpu"), torch.float64, mode != "fwd", 0)
        cfg = args[-1]
        assert args[0].shape == ((2,) if mode != "fwd" else ()) + (4, 3, 6)
        expected = make_step(ls.eager_loop, args, mode, 0)()
        for fn, backend in ((ls.eager_lstm, None), (ls.sparse_sharing, "reference"), (ls.sparse_sharing, "cpu")):
            with mtlfast.use_backend(backend) if backend else contextlib.nullcontext():
                got = make_step(fn, args, mode, 0)()
            for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
                torch.testing.assert_close(a, b)
        if mode == "fwd+bwd":  # gradients reach every shared parameter and are zero where all masks are
            names = cfg.param_names()
            grads = dict(zip(names, expected[1][1:]))
            masks = dict(zip(cfg.mask_names(), args[1 + len(names):-1]))
            w = "weight_hh_l1_reverse"
            unused = ~masks["mask_hh_l1"][cfg.num_tasks:].any(0)
            assert unused.any() and (grads[w][unused] == 0).all() and grads[w].abs().sum() > 0


def test_masked_lstm_selection_and_skips() -> None:
    settings = cases.Settings.make(device="cpu", workloads=("tiny", "lstm-tiny"), providers=("eager-lstm",),
                                   modes=("fwd",), slices=1)
    assert [(c.workload.op, c.provider) for c in cases.select(settings)] == [
        ("masked_linear", "eager"), ("masked_linear", "dense"),
        ("masked_lstm", "eager-loop"), ("masked_lstm", "eager-lstm")]
    every = cases.select(cases.Settings.make(device="cpu", workloads=("lstm-tiny",), modes=("fwd",), slices=1))
    assert [c.provider for c in every][:3] == ["eager-loop", "eager-lstm", "compile"]
    assert "dense" not in [c.provider for c in every]
    by_name = {w.name: w for w in cases.registry.workloads() if w.op == "masked_lstm"}
    assert by_name["large"].unsupported_reason("cpu") and by_name["large"].unsupported_reason("cuda") is None
    assert by_name["conll03"].unsupported_reason("cpu", "compile")
    assert by_name["conll03"].unsupported_reason("cpu", "cpu") is None
    assert by_name["conll03"].unsupported_reason("cuda", "compile") is None
    assert not by_name["lstm-tiny"].default and by_name["ontonotes"].default


def test_low_precision_is_checked_against_a_float32_oracle():
    """In bfloat16 the expected results are eager's on float32 copies of the inputs (a bf16 eager
    loop accumulates its own rounding), with the same output gradients in every dtype."""
    from bench import registry
    from bench.runner import Runner

    settings = cases.Settings.make(device="cpu", dtype="bfloat16", quick=True, workloads=("alpha-mix-tiny",),
                                   modes=("fwd+bwd",))
    case = next(c for c in cases.select(settings) if c.provider == "cpu")
    spec = registry.op(case.workload.op)
    args = spec.make_inputs(case.workload.params, torch.device("cpu"), torch.bfloat16, True, settings.seed)
    outs, grads = Runner(settings)._expected(case, spec, args)
    assert all(t.dtype == torch.float32 for t in (*outs, *grads))
    exact = spec.make_inputs(case.workload.params, torch.device("cpu"), torch.float32, True, settings.seed)
    ref_out = spec.eager(*exact)
    torch.testing.assert_close(outs[0], ref_out.detach(), rtol=0, atol=0)


def test_cpu_records_carry_fractions_of_the_measured_machine(run: dict) -> None:
    """Every measured CPU record divides its TFLOP/s and GB/s by this machine's GEMM rate and copy
    bandwidth, measured once in the same run; the report shows both and a best-provider summary."""
    ok = [r for r in run["records"] if r["status"] == "ok"]
    if ok[0]["device"] != "cpu":
        assert all(r["machine"] is None and r["frac_machine_flops"] is None for r in ok)
        return
    limits = {json.dumps(r["machine"], sort_keys=True) for r in ok}
    assert len(limits) == 1, "one measurement per run"
    machine = ok[0]["machine"]
    assert machine["gemm_flops_per_s"] > 1e8 and machine["copy_bytes_per_s"] > 1e7 and "torch.mm" in machine["how"]
    for r in ok:
        assert r["frac_machine_flops"] == pytest.approx(r["tflops"] * 1e12 / machine["gemm_flops_per_s"], rel=1e-12)
        assert r["frac_machine_bw"] == pytest.approx(r["gbps"] * 1e9 / machine["copy_bytes_per_s"], rel=1e-12)
    text = (run["out"] / "report.md").read_text()
    assert "% GEMM rate" in text and "copy" in text and "measured in the run" in text
    summary = [line for line in text.splitlines() if line.startswith("| masked_linear | tiny | fwd |")][-1]
    cells = [c.strip() for c in summary.strip("|").split("|")]
    mine, other, ratio = cells[3], cells[4], cells[5]
    assert mine.split()[0] in ("reference", "cpu", "triton", "cuda") and other.split()[0] in ("eager", "compile")
    assert ratio.endswith("×")


def test_machine_limits_are_measured_not_assumed() -> None:
    from bench import machine
    limits = machine.measure(torch.float64, quick=True)
    assert limits.gemm_flops_per_s > 0 and limits.copy_bytes_per_s > 0
    assert "torch.mm 256x256 float64" in limits.how and "4 MiB" in limits.how


def test_backend_modes_run_their_backend_with_their_settings(monkeypatch) -> None:
    """triton-step / triton-sequence (OpBench.backend_modes): the backend's own provider, called
    with the mode's environment set, and the environment restored after; counted as mtlfast in
    the best-provider summary."""
    from bench import registry, table

    registry.load()
    spec = registry.op("masked_lstm")
    assert spec.backend_modes["triton-sequence"] == ("triton", {"MTLFAST_LSTM_MODE": "sequence"})
    assert {"triton-step", "triton-sequence"} <= set(providers.names(spec))
    seen = []

    def fake_backend(name):
        def build(spec_, args, device):
            assert name == "triton"
            return providers.Built(lambda: seen.append(os.environ.get("MTLFAST_LSTM_MODE")))
        return build

    monkeypatch.setattr(providers, "_backend", fake_backend)
    monkeypatch.setenv("MTLFAST_LSTM_MODE", "auto")
    for mode in ("step", "sequence"):
        built = providers.build(f"triton-{mode}", spec, (), torch.device("cpu"))
        with built.context():
            built.fn()
        assert os.environ["MTLFAST_LSTM_MODE"] == "auto"
    assert seen == ["step", "sequence"]
    assert table._is_mtlfast("triton-step") and not table._is_mtlfast("eager-lstm")
