"""Tests of the sluice-network benchmark workloads (bench/workloads/sluice.py): alpha_mix and sluice_lstm.

They need neither mtlfast's sluice ops nor SluiceLSTM: the registration, the inputs and the eager
formulations are checked on their own (the eager sluice network against independent
torch.nn.LSTM stacks); the mtlfast provider is compared with eager only where SluiceLSTM imports.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import cases, providers, registry  # noqa: E402
from bench.runner import Runner, io_bytes, make_step  # noqa: E402
from bench.workloads import sluice as sl  # noqa: E402
from tests import oracles  # noqa: E402
from tests.helpers import FakeBenchmark  # noqa: E402

CPU = torch.device("cpu")


def _params(name: str) -> dict:
    (w,) = [w for w in registry.workloads() if w.name == name]
    return dict(w.params)


def _tiny_args(requires_grad: bool, dtype: torch.dtype = torch.float64, **overrides) -> tuple:
    return sl.sluice_inputs({**_params("sluice-tiny"), **overrides}, CPU, dtype, requires_grad, 0)


def _with(args: tuple, **values: torch.Tensor) -> tuple:
    """``args`` with the named parameters replaced (``alpha_l0=...``, ``beta=...``)."""
    names = args[-1].param_names()
    new = [values.get(n, a) for n, a in zip(names, args[1:-1])]
    return (args[0], *new, args[-1])


# ---------------------------------------------------------------------------------------------
# registration


def test_workloads_are_registered_with_the_papers_sizes() -> None:
    by_key = {w.key: w for w in registry.workloads()}
    large, paper = by_key["alpha_mix/alpha-mix-large"], by_key["alpha_mix/alpha-mix-paper"]
    assert dict(large.params) == {"num_tasks": 4, "num_subspaces": 2, "rows": (262144,), "features": 512}
    assert dict(paper.params) == {"num_tasks": 2, "num_subspaces": 2, "rows": (32, 32), "features": 200}
    step = by_key["sluice_lstm/sluice-step"]
    assert dict(step.params) == {"num_tasks": 2, "num_subspaces": 2, "input_size": 164, "hidden_size": 100,
                                 "num_layers": 3, "bidirectional": True, "batch": 32, "length": 32}
    assert large.default and paper.default and step.default
    assert not by_key["alpha_mix/alpha-mix-tiny"].default and not by_key["sluice_lstm/sluice-tiny"].default
    assert large.unsupported_reason("cpu") and large.unsupported_reason("cuda") is None
    assert paper.unsupported_reason("cpu", "compile") is None and step.unsupported_reason("cpu", "compile") is None
    # the tiny names are unique: "tiny" still selects masked_linear's only
    assert [w.key for w in registry.find(["tiny"])] == ["masked_linear/tiny"]


def test_providers_of_each_op() -> None:
    alpha = cases.select(cases.Settings.make(device="cpu", workloads=("alpha-mix-tiny",), modes=("fwd",)))
    assert [c.provider for c in alpha][:3] == ["eager", "mtlfast-custom-op", "compile"]
    assert {"reference", "triton", "cuda", "cpu"} <= {c.provider for c in alpha}
    assert "dense" not in {c.provider for c in alpha}
    lstm = cases.select(cases.Settings.make(device="cpu", workloads=("sluice-tiny",), modes=("fwd",)))
    assert [c.provider for c in lstm][:3] == ["eager", "eager-hard-sharing", "compile"]
    assert {"reference", "triton", "cuda", "cpu"} <= {c.provider for c in lstm}
    assert sl.LSTM_SPEC.eager_name == "eager" and sl.LSTM_SPEC.dense is None
    assert registry.op("alpha_mix") is sl.ALPHA_SPEC and registry.op("sluice_lstm") is sl.LSTM_SPEC


# ---------------------------------------------------------------------------------------------
# alpha_mix


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_alpha_mix_inputs(dtype: torch.dtype) -> None:
    for name, shape in (("alpha-mix-paper", (2, 32, 32, 200)), ("alpha-mix-tiny", (3, 5, 3, 8))):
        params = _params(name)
        MS = params["num_tasks"] * params["num_subspaces"]
        for requires_grad in (False, True):
            h, alpha, S = sl.alpha_mix_inputs(params, CPU, dtype, requires_grad, 0)
            assert h.shape == shape and alpha.shape == (MS, MS) and S == params["num_subspaces"]
            assert h.dtype == alpha.dtype == dtype
            assert h.requires_grad == alpha.requires_grad == requires_grad
        again = sl.alpha_mix_inputs(params, CPU, dtype, False, 0)
        assert torch.equal(again[0], h.detach()) and torch.equal(again[1], alpha.detach())  # seeded
    large = _params("alpha-mix-large")
    assert large["num_tasks"] * large["rows"][0] * large["features"] * 2 == 2 ** 30  # 1 GiB of h in bf16


def test_alpha_mix_eager_is_the_definition_with_gradients() -> None:
    h, alpha, S = sl.alpha_mix_inputs(_params("alpha-mix-tiny"), CPU, torch.float64, True, 0)
    out = sl.alpha_mix_eager(h, alpha, S)
    expected = oracles.alpha_mix(h, alpha, S)
    torch.testing.assert_close(out, expected)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (h, alpha), dout)
    torch.testing.assert_close(grads, torch.autograd.grad(expected, (h, alpha), dout))
    assert torch.autograd.gradcheck(lambda a, b: sl.alpha_mix_eager(a, b, S), (h, alpha))


def test_alpha_mix_flops_and_bytes() -> None:
    params = _params("alpha-mix-tiny")  # M=3, S=2, rows 5 x 3, D=8
    n = 3 * 5 * 3 * 8
    assert sl.alpha_mix_flops(params, "fwd") == 2 * 6 * n
    assert sl.alpha_mix_flops(params, "fwd+bwd") == 3 * 2 * 6 * n
    assert sl.alpha_mix_flops(_params("alpha-mix-large"), "fwd") == 2 * 8 * 4 * 262144 * 512
    for mode, tensors in (("fwd", 2 * n + 36), ("fwd+bwd", 4 * n + 2 * 36)):  # h, out (+ dout, dh), alpha (+ dalpha)
        args = sl.alpha_mix_inputs(params, CPU, torch.float32, mode != "fwd", 0)
        assert io_bytes(args, make_step(sl.alpha_mix_eager, args, mode, 0)()) == 4 * tensors


# ---------------------------------------------------------------------------------------------
# sluice_lstm


def test_sluice_inputs() -> None:
    for name, dtype in (("sluice-step", torch.float32), ("sluice-tiny", torch.bfloat16)):
        params = _params(name)
        for requires_grad in (False, True):
            args = sl.sluice_inputs(params, CPU, dtype, requires_grad, 0)
            x, cfg = args[0], args[-1]
            assert isinstance(cfg, sl.Config) and cfg == sl.config_of(params)
            assert x.shape == (params["batch"], params["length"], params["input_size"])
            names = cfg.param_names()
            M, K = params["num_tasks"], params["num_layers"]
            assert len(names) == len(args) - 2 == M * K * 2 * 4 + K + 1
            for t in args[:-1]:
                assert t.dtype == dtype and t.requires_grad == requires_grad
            p = dict(zip(names, args[1:-1]))
            H, I, MS = params["hidden_size"], params["input_size"], M * params["num_subspaces"]
            assert p["task1.weight_ih_l0"].shape == (4 * H, I)
            assert p["task0.weight_ih_l2_reverse"].shape == (4 * H, 2 * H)
            assert p["task1.weight_hh_l1"].shape == (4 * H, H) and p["task0.bias_hh_l2"].shape == (4 * H,)
            assert p["alpha_l2"].shape == (MS, MS) and p["beta"].shape == (M, K)
            for t in [p[f"alpha_l{k}"] for k in range(K)] + [p["beta"]]:
                torch.testing.assert_close(t.detach().float().sum(1), torch.ones(t.shape[0]), atol=1e-2, rtol=0)
    step = _params("sluice-step")
    assert sl.sluice_flops(step, "fwd") == 2 * 32 * 32 * 2 * 8 * 100 * ((164 + 100) + 2 * (200 + 100))
    assert sl.sluice_flops(step, "fwd+bwd") == 3 * sl.sluice_flops(step, "fwd")


def _lstm_stack(args: tuple, task: int, num_layers: int, first_layer: int = 0) -> torch.nn.LSTM:
    """Task ``task``'s layers as an independent torch.nn.LSTM (the benchmark's weights loaded)."""
    cfg = args[-1]
    p = dict(zip(cfg.param_names(), args[1:-1]))
    lstm = torch.nn.LSTM(cfg.layer_input(first_layer), cfg.hidden_size, num_layers, bidirectional=cfg.bidirectional,
                         batch_first=True).double()
    names = cfg.lstm_names(range(first_layer, first_layer + num_layers))
    own = cfg.lstm_names(range(num_layers))
    lstm.load_state_dict({o: p[f"task{task}.{n}"].detach() for o, n in zip(own, names)})
    return lstm


def test_sluice_eager_without_sharing_is_independent_lstm_stacks() -> None:
    args = _tiny_args(False)
    cfg = args[-1]
    M, K, MS = cfg.num_tasks, cfg.num_layers, cfg.num_tasks * cfg.num_subspaces
    eye = torch.eye(MS, dtype=torch.float64)
    last = torch.zeros(M, K, dtype=torch.float64)
    last[:, -1] = 1
    args = _with(args, **{f"alpha_l{k}": eye for k in range(K)}, beta=last)
    out = sl.sluice_eager(*args)
    assert out.shape == (M, 3, 5, 2 * cfg.hidden_size)
    with torch.no_grad():
        expected = torch.stack([_lstm_stack(args, t, K)(args[0])[0] for t in range(M)])
    torch.testing.assert_close(out, expected)

    # β mixes the layer outputs: with identity α, Σ_k β[m, k] · (layer k of task m's stack)
    beta = torch.rand(M, K, dtype=torch.float64)
    with torch.no_grad():
        layers = []
        for t in range(M):
            h, per_layer = args[0], []
            for k in range(K):
                h = _lstm_stack(args, t, 1, first_layer=k)(h)[0]
                per_layer.append(h)
            layers.append(torch.stack(per_layer))
        expected = oracles.layer_mix(torch.stack(layers, dim=1), beta)                # layers (K, M, ...)
    torch.testing.assert_close(sl.sluice_eager(*_with(args, beta=beta)), expected)


def test_sluice_eager_mixes_each_direction_with_the_same_alpha() -> None:
    args = _tiny_args(False, num_layers=1)
    cfg = args[-1]
    M, S, H = cfg.num_tasks, cfg.num_subspaces, cfg.hidden_size
    alpha = torch.randn(M * S, M * S, dtype=torch.float64)
    args = _with(args, alpha_l0=alpha, beta=torch.ones(M, 1, dtype=torch.float64))
    with torch.no_grad():
        outs = torch.stack([_lstm_stack(args, t, 1)(args[0])[0] for t in range(M)])  # (M, B, L, 2H)
    forward, backward = outs[..., :H], outs[..., H:]
    expected = torch.cat([oracles.alpha_mix(forward, alpha, S), oracles.alpha_mix(backward, alpha, S)], -1)
    torch.testing.assert_close(sl.sluice_eager(*args), expected)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_eager_providers_run(mode: str) -> None:
    args = _tiny_args(mode != "fwd")
    cfg = args[-1]
    outs, grads = make_step(sl.sluice_eager, args, mode, 0)()
    assert [o.shape for o in outs] == [(2, 3, 5, 8)]
    assert len(grads) == (len(args) - 1 if mode != "fwd" else 0)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)  # every parameter is used

    hard_outs, hard_grads = make_step(sl.sluice_hard_sharing, args, mode, 0)()
    assert hard_outs[0].shape == (2, 3, 5, 8)
    torch.testing.assert_close(hard_outs[0][1], hard_outs[0][0])
    with torch.no_grad():
        torch.testing.assert_close(hard_outs[0][0], _lstm_stack(args, 0, cfg.num_layers)(args[0])[0])
    assert len(hard_grads) == len(grads)
    if mode != "fwd":  # task 0's LSTM gets gradients; the other parameters are passed through
        named = dict(zip(["x", *cfg.param_names()], hard_grads))
        assert named["task0.weight_hh_l2_reverse"].abs().sum() > 0 and named["x"].abs().sum() > 0
        unused = [g for n, g in named.items() if n != "x" and not n.startswith("task0.")]
        assert len(unused) == len(hard_outs) - 1
        assert all(torch.equal(g, o) for g, o in zip(unused, _incoming(args)[1:]))


def _incoming(args: tuple) -> list[torch.Tensor]:
    """The harness's seeded output gradients of the hard-sharing variant's outputs."""
    outs = [t for t in sl.sluice_hard_sharing(*args) if t.requires_grad]
    g = torch.Generator().manual_seed(1)
    return [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in outs]


def test_module_state_names() -> None:
    cfg = _tiny_args(False)[-1]
    names = {n: cfg.shape(n) for n in cfg.param_names()}
    state = sl.module_state(names, cfg)  # type: ignore[arg-type]
    assert len(state) == len(names)
    assert state["lstms.1.2.weight_ih_l0_reverse"] == names["task1.weight_ih_l2_reverse"] == (16, 8)
    assert state["lstms.0.0.bias_hh_l0"] == (16,)
    assert state["mixers.2.alpha"] == (4, 4) and state["layer_mixture.beta"] == (2, 3)


def test_mtlfast_provider_matches_eager_where_sluice_lstm_exists() -> None:
    try:
        import mtlfast
        from mtlfast.nn import SluiceLSTM  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"mtlfast.nn.SluiceLSTM is not importable yet: {exc}")
    for mode in ("fwd", "fwd+bwd"):
        args = _tiny_args(mode != "fwd")
        expected = make_step(sl.sluice_eager, args, mode, 0)()
        with mtlfast.use_backend("reference"):
            got = make_step(sl.sluice_lstm, args, mode, 0)()
        assert len(got[1]) == len(expected[1])
        for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
            torch.testing.assert_close(a, b)


def test_runner_times_the_eager_providers() -> None:
    settings = cases.Settings.make(device="cpu", workloads=("alpha-mix-tiny", "sluice-tiny"), quick=True,
                                   providers=("eager-hard-sharing",))
    runner = Runner(settings)
    for case in cases.select(settings):
        rec = runner.run(case, FakeBenchmark())
        if case.provider == "eager":
            assert rec["status"] == "ok", rec["reason"]
            assert rec["median_s"] > 0 and rec["bytes"] > 0 and rec["rel_err"] is None
            assert rec["flops"] == registry.op(case.workload.op).flops(case.workload.params, case.mode)


def test_hard_sharing_is_timed_not_checked() -> None:
    args = _tiny_args(False)
    if providers.build("eager-hard-sharing", sl.LSTM_SPEC, args, CPU).checked:
        pytest.skip("bench/providers.py does not yet read a variant's `checked` attribute: "
                    "eager-hard-sharing is a different network and its check against eager fails")
    settings = cases.Settings.make(device="cpu", workloads=("sluice-tiny",), quick=True,
                                   providers=("eager-hard-sharing",))
    runner = Runner(settings)
    for case in cases.select(settings):
        rec = runner.run(case, FakeBenchmark())
        assert rec["status"] == "ok", rec["reason"]
        assert rec["rel_err"] is None
