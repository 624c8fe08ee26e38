"""Tests of the Gumbel-Matrix benchmark workloads (bench/workloads/gumbel.py) and of the harness's
handling of random ops (``OpBench.random``: timed, not compared with eager, a statistic checked).

They need none of mtlfast's Gumbel ops: the registration, the inputs, the eager formulations and
the sample statistic are checked on their own; the mtlfast providers only where they import.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import cases, check, providers, records, registry, table  # noqa: E402
from bench.runner import Runner, io_bytes, make_step  # noqa: E402
from bench.workloads import gumbel as gb  # noqa: E402
from tests import oracles  # noqa: E402
from tests.helpers import FakeBenchmark  # noqa: E402

CPU = torch.device("cpu")


def _params(name: str) -> dict:
    (w,) = [w for w in registry.workloads() if w.name == name]
    return dict(w.params)


# ---------------------------------------------------------------------------------------------
# registration and inputs


def test_workloads_are_registered_with_their_sizes() -> None:
    by_key = {w.key: w for w in registry.workloads()}
    omniglot, clusters = by_key["gumbel_matrix/omniglot"], by_key["gumbel_matrix/clusters"]
    assert dict(omniglot.params) == {"num_tasks": 20, "components": (7,) * 8, "tau": 1.0}
    assert dict(clusters.params) == {"num_tasks": 40, "components": (16,) * 3, "tau": 1.0}
    large = by_key["gumbel_sigmoid/gumbel-large"]
    assert large.params["n"] == 2 ** 24
    assert large.unsupported_reason("cpu") and large.unsupported_reason("cuda") is None
    combine = by_key["allocation_combine/combine"]
    assert combine.params["shape"] == (16, 48, 26, 26) and len(combine.params["allocation"]) == 7
    for w in (omniglot, clusters, combine):
        assert w.default and w.unsupported_reason("cpu") is None and w.unsupported_reason("cpu", "compile") is None
    for key in ("gumbel_matrix/gumbel-matrix-tiny", "gumbel_sigmoid/gumbel-sigmoid-tiny",
                "allocation_combine/combine-tiny"):
        assert not by_key[key].default
    assert registry.op("gumbel_matrix").random and registry.op("gumbel_sigmoid").random
    assert not registry.op("allocation_combine").random
    for op in ("gumbel_matrix", "gumbel_sigmoid", "allocation_combine"):
        spec = registry.op(op)
        assert spec.dense is None and spec.eager_name == "eager"
        assert providers.names(spec)[:2] == ("eager", "compile")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matrix_inputs(dtype: torch.dtype) -> None:
    for name in ("omniglot", "clusters", "gumbel-matrix-tiny"):
        params = _params(name)
        for requires_grad in (False, True):
            logits, cfg = gb.matrix_inputs(params, CPU, dtype, requires_grad, 0)
            assert isinstance(cfg, gb.Config) and cfg == gb.config_of(params)
            assert hash(cfg) == hash(gb.config_of(params))  # hashable: torch.compile guards on it
            assert logits.shape == (params["num_tasks"], sum(params["components"]), 2)
            assert logits.dtype == dtype and logits.requires_grad == requires_grad and logits.is_leaf
            # two complementary logits log[p, 1 - p]
            p = logits.detach().double().exp()
            torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1], dtype=torch.float64),
                                       atol=2e-2 if dtype == torch.bfloat16 else 1e-6, rtol=0)
            assert (p[..., 0] > 0.04).all() and (p[..., 0] < 0.96).all()
        again, _ = gb.matrix_inputs(params, CPU, dtype, False, 0)
        assert torch.equal(again, logits.detach())  # seeded


def test_sigmoid_and_combine_inputs() -> None:
    for requires_grad in (False, True):
        x, tau = gb.sigmoid_inputs(_params("gumbel-sigmoid-tiny"), CPU, torch.bfloat16, requires_grad, 0)
        assert x.shape == (1000,) and x.dtype == torch.bfloat16 and x.requires_grad == requires_grad
        assert tau == 1.0
        outputs, z = gb.combine_inputs(_params("combine"), CPU, torch.float32, requires_grad, 0)
        assert outputs.shape == (7, 16, 48, 26, 26) and z.shape == (7,)
        assert outputs.dtype == z.dtype == torch.float32
        assert outputs.requires_grad == z.requires_grad == requires_grad
        assert z.tolist() == [1, 0, 1, 1, 0, 0, 1]


# ---------------------------------------------------------------------------------------------
# eager formulations


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_matrix_eager_samples_binary_allocations_with_straight_through_gradients(mode: str) -> None:
    args = gb.matrix_inputs(_params("gumbel-matrix-tiny"), CPU, torch.float32, mode != "fwd", 0)
    logits, cfg = args
    outs, grads = make_step(gb.matrix_eager, args, mode, 0)()
    (z,) = outs
    assert z.shape == (3, 9) and set(z.detach().unique().tolist()) <= {0.0, 1.0}
    if mode == "fwd":
        assert grads == ()
        return
    (dlogits,) = grads
    assert dlogits.shape == logits.shape and torch.isfinite(dlogits).all() and dlogits.abs().sum() > 0
    # the gradient of a two-way softmax: the pair's gradients cancel
    torch.testing.assert_close(dlogits.sum(-1), torch.zeros(3, 9), atol=1e-6, rtol=0)


def test_matrix_eager_is_per_layer_gumbel_softmax() -> None:
    logits, cfg = gb.matrix_inputs(_params("gumbel-matrix-tiny"), CPU, torch.float64, True, 0)
    torch.manual_seed(3)
    z = gb.matrix_eager(logits, cfg)
    torch.manual_seed(3)
    expected = torch.cat([torch.nn.functional.gumbel_softmax(logits[:, a:b], tau=cfg.tau, hard=True)[..., 0]
                          for a, b in ((0, 2), (2, 6), (6, 9))], dim=1)
    assert torch.equal(z, expected)


def test_matrix_sample_follows_the_probabilities() -> None:
    params = {"num_tasks": 50, "components": (30, 40), "tau": 0.5}
    logits, cfg = gb.matrix_inputs(params, CPU, torch.float32, False, 1)
    torch.manual_seed(0)
    note = gb.matrix_check((logits, cfg), (gb.matrix_eager(logits, cfg),))
    assert note.startswith("sample checked: all 0/1") and "where p > 0.5" in note
    # z = 1 when component 0 wins: swapping the pair (an inverted sampler) fails
    with pytest.raises(check.WrongResult, match="fraction of ones"):
        gb.matrix_check((logits, cfg), (gb.matrix_eager(logits.flip(-1), cfg),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sigmoid_eager_is_straight_through_logistic_noise(dtype: torch.dtype) -> None:
    params = {"n": 20000, "tau": 0.7}
    x, tau = gb.sigmoid_inputs(params, CPU, dtype, True, 0)
    torch.manual_seed(5)
    y = gb.gumbel_sigmoid_eager(x, tau)
    assert y.shape == x.shape and y.dtype == dtype
    gb.sigmoid_check((x, tau), (y,))  # all 0/1, fraction of ones near sigmoid(x) on both sides of 0.5
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    # the same noise again: the gradient is that of sigmoid((x + L) / tau)
    torch.manual_seed(5)
    eps = torch.finfo(dtype).eps
    u = torch.rand_like(x).clamp(eps, 1 - eps)
    soft = torch.sigmoid((x.detach() + (u.log() - (1 - u).log())) / tau)
    torch.testing.assert_close(y, (soft > 0.5).to(dtype))
    torch.testing.assert_close(dx, dy * soft * (1 - soft) / tau)
    with pytest.raises(check.WrongResult, match="fraction of ones"):
        gb.sigmoid_check((x, tau), (1 - y,))


@pytest.mark.parametrize("seed", [0, 1])
def test_inputs_are_not_drawn_from_the_global_stream(seed: int) -> None:
    # torch.manual_seed(seed) (as tests/conftest.py does) with inputs seeded ``seed``: drawn from the same
    # Mersenne-Twister stream, gumbel_sigmoid's logits and eager's noise were correlated (fraction of
    # ones 0.41 where the mean probability is 0.33)
    x, tau = gb.sigmoid_inputs({"n": 2 ** 20, "tau": 1.0}, CPU, torch.float32, False, seed)
    torch.manual_seed(seed)
    gb.sigmoid_check((x, tau), (gb.gumbel_sigmoid_eager(x, tau),))
    logits, cfg = gb.matrix_inputs({"num_tasks": 1024, "components": (512,), "tau": 1.0}, CPU, torch.float32,
                                   False, seed)
    torch.manual_seed(seed)
    gb.matrix_check((logits, cfg), (gb.matrix_eager(logits, cfg),))


def test_binary_sample_check_rejects_soft_outputs() -> None:
    p = torch.full((100,), 0.3, dtype=torch.float64)
    with pytest.raises(check.WrongResult, match="not all 0 or 1"):
        gb.check_binary_sample((p,), p)
    with pytest.raises(check.WrongResult, match="shape"):
        gb.check_binary_sample((p[:10],), p)
    z = (torch.arange(100) % 10 < 3).double()
    assert "0.300 vs 0.300" in gb.check_binary_sample((z,), p)
    with pytest.raises(check.WrongResult, match="fraction of ones 0.0000"):
        gb.check_binary_sample((torch.zeros(10000, dtype=torch.float64),), p.repeat(100))


def test_combine_eager_is_the_definition_with_gradients() -> None:
    outputs, z = gb.combine_inputs(_params("combine-tiny"), CPU, torch.float64, True, 0)
    out = gb.combine_eager(outputs, z)
    assert out.shape == (2, 3, 4)
    torch.testing.assert_close(out, oracles.allocation_combine(outputs, z))
    assert torch.autograd.gradcheck(gb.combine_eager, (outputs, z))
    none = torch.zeros_like(z)
    assert torch.equal(gb.combine_eager(outputs, none), torch.zeros_like(out))  # max(1, Σz): no division by 0


def test_flops_and_bytes() -> None:
    tiny = _params("gumbel-matrix-tiny")  # 3 tasks, 2 + 4 + 3 components
    assert gb.matrix_flops(tiny, "fwd") == 20 * 27 and gb.matrix_flops(tiny, "fwd+bwd") == 40 * 27
    assert gb.matrix_flops(_params("omniglot"), "fwd") == 20 * 20 * 56
    assert gb.sigmoid_flops(_params("gumbel-large"), "fwd+bwd") == 40 * 2 ** 24
    for mode, nbytes in (("fwd", 4 * (54 + 27)), ("fwd+bwd", 4 * 2 * (54 + 27))):  # logits, z (+ dz, dlogits)
        args = gb.matrix_inputs(tiny, CPU, torch.float32, mode != "fwd", 0)
        assert io_bytes(args, make_step(gb.matrix_eager, args, mode, 0)()) == nbytes
    for mode, nbytes in (("fwd", 2 * 2000), ("fwd+bwd", 4 * 2000)):  # logits, y (+ dy, dlogits) in bf16
        args = gb.sigmoid_inputs(_params("gumbel-sigmoid-tiny"), CPU, torch.bfloat16, mode != "fwd", 0)
        assert io_bytes(args, make_step(gb.gumbel_sigmoid_eager, args, mode, 0)()) == nbytes
    n = 3 * 24  # combine-tiny: 3 components of 2 x 3 x 4
    assert gb.combine_flops(_params("combine-tiny"), "fwd") == 2 * n
    assert gb.combine_flops(_params("combine-tiny"), "fwd+bwd") == 6 * n
    for mode, nbytes in (("fwd", 4 * (n + 3 + 24)), ("fwd+bwd", 4 * 2 * (n + 3 + 24))):
        args = gb.combine_inputs(_params("combine-tiny"), CPU, torch.float32, mode != "fwd", 0)
        assert io_bytes(args, make_step(gb.combine_eager, args, mode, 0)()) == nbytes


# ---------------------------------------------------------------------------------------------
# the harness: random ops are timed, not compared with eager


def _another_draw(spec: registry.OpBench) -> object:
    """A provider builder whose every provider is the op's eager again (checked): a second random
    draw, which differs from eager's sample."""
    def build(name: str, s: registry.OpBench, args: tuple, device: torch.device) -> providers.Built:
        return providers.Built(s.eager, checked=name != s.eager_name)
    return build


def _run(settings: cases.Settings, **only: str) -> list[dict]:
    runner = Runner(settings)
    return [runner.run(c, FakeBenchmark()) for c in cases.select(settings)
            if all(getattr(c, k) == v for k, v in only.items())]


def test_random_op_providers_are_timed_not_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(providers, "build", _another_draw(gb.MATRIX_SPEC))
    settings = cases.Settings.make(device="cpu", workloads=("gumbel-matrix-tiny", "gumbel-sigmoid-tiny"),
                                   quick=True)
    recs = _run(settings)
    assert {r["provider"] for r in recs} >= {"eager", "compile", "reference", "cpu"}
    for rec in recs:
        assert rec["status"] == "ok", rec["reason"]
        assert rec["rel_err"] is None and rec["median_s"] > 0
        assert rec["note"].startswith(check.RANDOM_NOTE) and "sample checked: all 0/1" in rec["note"]
    text = table.markdown(records.finalize(recs))
    assert f"gumbel_matrix: {check.RANDOM_NOTE}" in text and f"gumbel_sigmoid: {check.RANDOM_NOTE}" in text

    # without the flag the same second draw is compared with eager's sample, and is wrong
    plain = dataclasses.replace(gb.MATRIX_SPEC, random=False)
    monkeypatch.setitem(registry._OPS, gb.MATRIX_OP, plain)
    settings = cases.Settings.make(device="cpu", workloads=("gumbel-matrix-tiny",), quick=True, modes=("fwd",))
    rec, = _run(settings, provider="reference")
    assert rec["status"] == "error" and "relative error" in rec["reason"] and rec["note"] is None


def test_random_op_without_a_statistic_and_a_failing_statistic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(providers, "build", _another_draw(gb.SIGMOID_SPEC))
    settings = cases.Settings.make(device="cpu", workloads=("gumbel-sigmoid-tiny",), quick=True, modes=("fwd",))
    monkeypatch.setitem(registry._OPS, gb.SIGMOID_OP, dataclasses.replace(gb.SIGMOID_SPEC, sample_check=None))
    rec, = _run(settings, provider="reference")
    assert rec["status"] == "ok" and rec["rel_err"] is None and rec["note"] == check.RANDOM_NOTE

    def inverted(name: str, s: registry.OpBench, args: tuple, device: torch.device) -> providers.Built:
        return providers.Built(lambda x, tau: gb.gumbel_sigmoid_eager(-x, tau))  # Bernoulli(1 - sigmoid(x))

    monkeypatch.setattr(providers, "build", inverted)
    monkeypatch.setitem(registry._OPS, gb.SIGMOID_OP, gb.SIGMOID_SPEC)
    rec, = _run(settings, provider="reference")
    assert rec["status"] == "error" and "fraction of ones" in rec["reason"] and rec["median_s"] is None


def test_deterministic_combine_is_still_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    def by_definition(name: str, s: registry.OpBench, args: tuple, device: torch.device) -> providers.Built:
        if name == s.eager_name:
            return providers.Built(s.eager, checked=False)
        return providers.Built(oracles.allocation_combine)

    monkeypatch.setattr(providers, "build", by_definition)
    settings = cases.Settings.make(device="cpu", workloads=("combine-tiny",), quick=True)
    for rec in _run(settings):
        assert rec["status"] == "ok", rec["reason"]
        assert rec["note"] is None
        assert rec["rel_err"] is None if rec["provider"] == "eager" else rec["rel_err"] < 1e-6


def test_runner_times_the_eager_providers() -> None:
    settings = cases.Settings.make(device="cpu", quick=True,
                                   workloads=("gumbel-matrix-tiny", "gumbel-sigmoid-tiny", "combine-tiny"))
    for rec in _run(settings, provider="eager"):
        assert rec["status"] == "ok", rec["reason"]
        assert rec["median_s"] > 0 and rec["bytes"] > 0 and rec["rel_err"] is None
        assert (rec["note"] is not None) == (rec["op"] != "allocation_combine")


# ---------------------------------------------------------------------------------------------
# mtlfast providers, where they exist


def test_mtlfast_gumbel_matrix_where_it_exists() -> None:
    try:
        import mtlfast
        from mtlfast.nn import GumbelMatrix  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"mtlfast.nn.GumbelMatrix is not importable yet: {exc}")
    params = {"num_tasks": 40, "components": (16, 8, 24), "tau": 1.0}
    logits, cfg = gb.matrix_inputs(params, CPU, torch.float32, True, 0)
    with mtlfast.use_backend("reference"):
        outs, (dlogits,) = make_step(gb.gumbel_matrix, (logits, cfg), "fwd+bwd", 0)()
    assert gb.matrix_check((logits, cfg), outs).startswith("sample checked")
    assert dlogits.shape == logits.shape and torch.isfinite(dlogits).all() and dlogits.abs().sum() > 0


def test_mtlfast_combine_matches_eager_where_it_exists() -> None:
    try:
        import mtlfast
        from mtlfast.functional import allocation_combine  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"mtlfast.functional.allocation_combine is not importable yet: {exc}")
    args = gb.combine_inputs(_params("combine-tiny"), CPU, torch.float64, True, 0)
    expected = make_step(gb.combine_eager, args, "fwd+bwd", 0)()
    with mtlfast.use_backend("reference"):
        got = make_step(gb.combine_fn(), args, "fwd+bwd", 0)()
    for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
        torch.testing.assert_close(a, b)


def test_mtlfast_gumbel_sigmoid_where_it_exists() -> None:
    try:
        import mtlfast
        from mtlfast.functional import gumbel_sigmoid  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"mtlfast.functional.gumbel_sigmoid is not importable yet: {exc}")
    args = gb.sigmoid_inputs({"n": 2 ** 16, "tau": 0.5}, CPU, torch.float32, True, 0)
    with mtlfast.use_backend("reference"):
        outs, (dx,) = make_step(gb.gumbel_sigmoid_fn(), args, "fwd+bwd", 0)()
    assert gb.sigmoid_check(args, outs).startswith("sample checked")
    assert torch.isfinite(dx).all() and dx.abs().sum() > 0
