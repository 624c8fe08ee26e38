"""Autotuning of the Triton kernels (triton_kernels/masked_gemm.py: `autotune`, `autotune_configs`,
`size_bucket`, MTLFAST_AUTOTUNE):

- every GPU autotune candidate of every kernel computes the right numbers: each is forced in turn
  and run through the interpreter on small shapes (mostly-masked tiles: the tails) against the
  kernel tests' oracles and the ops' references, skipped only where the kernel's prune rejects it
  for every shape (as the autotuner would);
- sizes that vary between calls (rows = length x batch, batch, element count) enter the autotune
  keys bucketed, so 20 distinct lengths or batches time candidates once per bucket;
- MTLFAST_AUTOTUNE=0 runs the first candidate the prune keeps, without timing anything.

Under the interpreter the autotuners hold one config and never time it; these tests give them the
GPU's lists, so they run the same on a GPU (where the interpreter is off)."""
from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

from mtlfast.bitmask import pack_mask  # noqa: E402
from mtlfast.ops.gumbel import (allocation_combine_reference, gumbel_pairs_reference,  # noqa: E402
                                gumbel_sigmoid_reference, gumbel_softmax_reference)
from mtlfast.ops.sluice import (alpha_mix_reference, layer_mix_reference,  # noqa: E402
                                orthogonality_penalty_reference)
from mtlfast.triton_kernels import gumbel, masked_gemm, masked_lstm, masked_lstm_sequence, sluice  # noqa: E402
from tests.conftest import DEVICE  # noqa: E402
from tests.helpers import assert_close, round_as_triton  # noqa: E402
from tests.test_triton_masked_lstm import (backward_recurrence_case, gemm_inputs, masked_weights,  # noqa: E402
                                           oracle_forward, recurrence_inputs)

MODULES = (masked_gemm, masked_lstm, masked_lstm_sequence, sluice, gumbel)


def tuners() -> dict:
    """{kernel name: Autotuner} of every autotuned kernel of mtlfast.triton_kernels."""
    found = {}
    for module in MODULES:
        for name, value in vars(module).items():
            if isinstance(value, Autotuner) and value.base_fn.__module__ == module.__name__:
                found[name] = value
    return found


TUNERS = tuners()


def test_every_kernel_is_autotuned_through_the_one_decorator():
    assert len(TUNERS) == 20, sorted(TUNERS)
    for name, tuner in TUNERS.items():
        assert len(tuner.candidates) >= 2 and all(isinstance(c, triton.Config) for c in tuner.candidates), name
        assert len(set(tuner.candidates)) == len(tuner.candidates), f"{name}: a candidate listed twice"


# ---------------------------------------------------------------------------------------------
# Forcing one candidate

class _Forced:
    def __init__(self):
        self.ran = 0        # launches that ran the forced candidate
        self.pruned = 0     # launches whose prune rejected it (they ran the kernel's usual config)


@contextlib.contextmanager
def forcing(tuner: Autotuner, config: triton.Config):
    """Every launch of `tuner` runs `config` (no timing), unless the kernel's prune, given the GPU's
    whole candidate list and the launch's arguments, does not keep it: then, as the autotuner
    would never run it there, the launch runs the first candidate the prune keeps (what
    MTLFAST_AUTOTUNE=0 runs). Meanwhile the autotuner holds the GPU's list, so launchers that size
    persistent grids from it see it."""
    held = tuner.configs
    record = _Forced()

    def run(*args, **kwargs):
        named = dict(zip(tuner.arg_names, args))
        prune = tuner.candidate_prune
        kept = prune(list(tuner.candidates), named, **kwargs) if prune is not None else tuner.candidates
        chosen = config if config in kept else kept[0]
        if chosen is config:
            record.ran += 1
        else:
            record.pruned += 1
        return tuner.fn.run(*args, **kwargs, **chosen.all_kwargs())

    tuner.configs = list(tuner.candidates)
    tuner.run = run
    try:
        yield record
    finally:
        del tuner.run
        tuner.configs = held


def close(actual, expected, dtype, what="kernel result"):
    assert_close(actual, expected, dtype, what)


def with_grads(fn, inputs, dout):
    """fn on float64 copies of inputs -> (output, gradients of Σ output ⊙ dout w.r.t. each input)."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, dout.double())


# ---------------------------------------------------------------------------------------------
# One case per kernel: small shapes with tails on every tile edge, in the dtype whose prune keeps
# the most candidates (bf16 for the GEMMs, the steps and the alpha mixing: fp32 tiles of the big
# candidates exceed the shared-memory or register budget and are never run in fp32).

BF16 = torch.bfloat16
F32 = torch.float32
GEMM = (3, 37, 70, 45, 2, 2)        # (G, R, K, N, S, P): three mask words, K and N tails


def case_grouped_forward():
    G, R, Kdim, N, S, P = GEMM
    x, weight, m, wi, mi = gemm_inputs(*GEMM, BF16)
    # as the masked LSTM projects: an fp32 result plus b_ih and b_hh, a row per weight set
    b_ih, b_hh = torch.randn(S, N, device=DEVICE).to(BF16), torch.randn(S, N, device=DEVICE).to(BF16)
    out = masked_gemm.grouped_masked_matmul(x, weight, wi, pack_mask(m), mi, biases=(b_ih, b_hh), out_dtype=F32)
    for g, w in enumerate(masked_weights(weight, wi, m, mi)):
        close(out[g], x[g].double() @ w.T + b_ih[wi[g]].double() + b_hh[wi[g]].double(), BF16)


def case_grouped_grad_input():
    """Two launches: masked_linear's (dy in the weights' bf16) and the masked LSTM's (fp32 dgates,
    rounded to bf16 in registers; staged in fp32, so the prune keeps fewer candidates for it)."""
    G, R, Kdim, N, S, P = GEMM
    _, weight, m, wi, mi = gemm_inputs(*GEMM, BF16)
    for dy_dtype in (BF16, F32):
        dy = torch.randn(G, R, N, device=DEVICE).to(dy_dtype)
        dx = masked_gemm.grouped_masked_matmul_grad_input(dy, weight, wi, pack_mask(m), mi)
        assert dx.dtype == BF16
        for g, w in enumerate(masked_weights(weight, wi, m, mi)):
            close(dx[g], round_as_triton(dy[g], BF16).double() @ w, BF16)


def case_grouped_grad_weight():
    """Two launches: masked_linear's (bf16 dy and x) and the masked LSTM's dW_hh (fp32 dgates and
    h, both rounded to bf16 in registers)."""
    G, R, Kdim, N, S, P = GEMM
    x_bf16, _, m, _, mi = gemm_inputs(*GEMM, BF16, shared_x=True)
    for dtype in (BF16, F32):
        x = x_bf16.to(dtype)
        dy = torch.randn(G, R, N, device=DEVICE).to(dtype)
        dw, dbias = masked_gemm.grouped_masked_matmul_grad_weight(dy, x, pack_mask(m), mi, with_bias=True,
                                                                  dot_dtype=BF16)
        for g in range(G):
            full = round_as_triton(dy[g], BF16).double().T @ round_as_triton(x[g], BF16).double()
            if mi[g] >= 0:
                assert torch.all(dw[g][~m[mi[g]]] == 0)
                full = full * m[mi[g]]
            close(dw[g], full, BF16)
            close(dbias[g], dy[g].double().sum(0), BF16)


REC = (2, 2, 5, 40)                 # (G, T, B, H): 4H = 160, two mask words per row, group 1 reverse


def _forward_recurrence_case(mode):
    args = recurrence_inputs(*REC, BF16)
    for name, got, want in zip(("hs", "h_n", "c_n", "gates", "cells", "h_prev"),
                               masked_lstm.forward_recurrence(*args, mode=mode), oracle_forward(*args), strict=True):
        close(got, want, BF16, name)


def _backward_recurrence_case(mode):
    got, want, _ = backward_recurrence_case(REC, BF16, mode)
    for name, a, b in zip(("dgates", "dh0", "dc0"), got, want, strict=True):
        close(a, b, BF16, name)


# (M, N, S, d): MS = 4 (every candidate passes the prune in bf16), a d tail, rows not a tile multiple
ALPHA = (2, 19, 2, 40)


def _alpha_inputs():
    M, N, S, d = ALPHA
    h = torch.randn(M, N, S * d, device=DEVICE).to(BF16)
    alpha = torch.randn(M * S, M * S, device=DEVICE)
    dout = torch.randn(M, N, S * d, device=DEVICE).to(BF16)
    return h, alpha, dout


def case_alpha_forward():
    h, alpha, _ = _alpha_inputs()
    S = ALPHA[2]
    close(sluice.alpha_mix_forward(h, alpha, S), alpha_mix_reference(h.double(), alpha.double(), S), BF16)


def case_alpha_backward():
    h, alpha, dout = _alpha_inputs()
    S = ALPHA[2]
    _, (dh_want, dalpha_want) = with_grads(lambda h_, a_: alpha_mix_reference(h_, a_, S), (h, alpha), dout)
    dh, dalpha = sluice.alpha_mix_backward(dout, h, alpha, S)
    close(dh, dh_want, BF16, "dh")
    close(dalpha, dalpha_want, BF16, "dalpha")


# (K, M, N, D): K = 3 (a pad layer) and K = 2 (the backward's larger tiles pass its prune)
LAYERS = [(3, 2, 7, 45), (2, 2, 5, 37)]


def _layer_inputs(shape):
    Kl, M, N, D = shape
    return (torch.randn(Kl, M, N, D, device=DEVICE).to(BF16), torch.randn(M, Kl, device=DEVICE),
            torch.randn(M, N, D, device=DEVICE).to(BF16))


def case_layer_forward():
    for shape in LAYERS:
        layers, beta, _ = _layer_inputs(shape)
        close(sluice.layer_mix_forward(layers, beta), layer_mix_reference(layers.double(), beta.double()), BF16)


def case_layer_backward():
    for shape in LAYERS:
        layers, beta, dout = _layer_inputs(shape)
        _, (dlayers_want, dbeta_want) = with_grads(layer_mix_reference, (layers, beta), dout)
        dlayers, dbeta = sluice.layer_mix_backward(dout, layers, beta)
        close(dlayers, dlayers_want, BF16, "dlayers")
        close(dbeta, dbeta_want, BF16, "dbeta")


def case_orthogonality():
    for R, C, S in [(9, 70, 3), (8, 33, 2)]:      # C tails, pair decoding with S = 3
        weight = (torch.randn(R, C, device=DEVICE) / C ** 0.5).to(F32)
        close(sluice.orthogonality_penalty_forward(weight, S), orthogonality_penalty_reference(weight.double(), S), F32)


SEED, TAU = 2**40 + 3, 0.7


def _tau():
    return torch.tensor(TAU, device=DEVICE)


def _sigmoid_case(pairs: bool, backward: bool):
    n = 1000
    x = torch.randn(n, 2, device=DEVICE) * 2 if pairs else torch.randn(n, device=DEVICE) * 2
    reference = gumbel_pairs_reference if pairs else gumbel_sigmoid_reference
    if not backward:
        # hard in fp32 as the kernel decides it (x + L > 0 in fp32): equal; soft against float64
        fwd = gumbel.gumbel_pairs_forward if pairs else gumbel.gumbel_sigmoid_forward
        assert torch.equal(fwd(x, _tau(), SEED, True), reference(x, TAU, True, SEED))
        close(fwd(x, _tau(), SEED, False), reference(x.double(), TAU, False, SEED), F32)
        return
    grad = torch.randn(n, device=DEVICE)
    _, (want,) = with_grads(lambda x_: reference(x_, TAU, False, SEED), (x,), grad)
    bwd = gumbel.gumbel_pairs_backward if pairs else gumbel.gumbel_sigmoid_backward
    close(bwd(grad, x, _tau(), SEED), want, F32)


# (R, C): BLOCK_C 8 (many rows per program), 128 and 2048 (one row per program for the small tiles)
SOFTMAX = [(300, 5), (9, 100), (3, 1500)]


def case_softmax_forward():
    for R, C in SOFTMAX:
        x = torch.randn(R, C, device=DEVICE)
        assert torch.equal(gumbel.gumbel_softmax_forward(x, _tau(), SEED, True),
                           gumbel_softmax_reference(x, TAU, True, -1, SEED))
        close(gumbel.gumbel_softmax_forward(x, _tau(), SEED, False),
              gumbel_softmax_reference(x.double(), TAU, False, -1, SEED), F32)


def case_softmax_backward():
    for R, C in SOFTMAX:
        x = torch.randn(R, C, device=DEVICE)
        grad = torch.randn(R, C, device=DEVICE)
        _, (want,) = with_grads(lambda x_: gumbel_softmax_reference(x_, TAU, False, -1, SEED), (x,), grad)
        close(gumbel.gumbel_softmax_backward(grad, x, _tau(), SEED), want, F32)


COMBINE = (5, (3, 7, 61))           # 5 components (3 pad rows), N = 1281 (a tail)


def _combine_inputs():
    C, shape = COMBINE
    return torch.randn(C, *shape, device=DEVICE), torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5], device=DEVICE)


def case_combine_forward():
    outputs, z = _combine_inputs()
    want = allocation_combine_reference(outputs.double(), z.double())
    close(gumbel.allocation_combine_forward(outputs, z), want, F32)


def case_combine_backward():
    outputs, z = _combine_inputs()
    grad = torch.randn(outputs.shape[1:], device=DEVICE)
    _, (doutputs_want, dz_want) = with_grads(allocation_combine_reference, (outputs, z), grad)
    doutputs, dz = gumbel.allocation_combine_backward(grad, outputs, z)
    close(doutputs, doutputs_want, F32, "doutputs")
    close(dz, dz_want, F32, "dz")


CASES = {
    "_grouped_forward_kernel": case_grouped_forward,
    "_grouped_grad_input_kernel": case_grouped_grad_input,
    "_grouped_grad_weight_kernel": case_grouped_grad_weight,
    "_forward_step_kernel": lambda: _forward_recurrence_case("step"),
    "_backward_step_kernel": lambda: _backward_recurrence_case("step"),
    "_forward_sequence_kernel": lambda: _forward_recurrence_case("sequence"),
    "_backward_sequence_kernel": lambda: _backward_recurrence_case("sequence"),
    "_alpha_mix_forward_kernel": case_alpha_forward,
    "_alpha_mix_backward_kernel": case_alpha_backward,
    "_layer_mix_forward_kernel": case_layer_forward,
    "_layer_mix_backward_kernel": case_layer_backward,
    "_orthogonality_forward_kernel": case_orthogonality,
    "_sigmoid_forward_kernel": lambda: _sigmoid_case(False, False),
    "_sigmoid_backward_kernel": lambda: _sigmoid_case(False, True),
    "_pairs_forward_kernel": lambda: _sigmoid_case(True, False),
    "_pairs_backward_kernel": lambda: _sigmoid_case(True, True),
    "_softmax_forward_kernel": case_softmax_forward,
    "_softmax_backward_kernel": case_softmax_backward,
    "_combine_forward_kernel": case_combine_forward,
    "_combine_backward_kernel": case_combine_backward,
}


def test_every_kernel_has_a_case():
    from tests.triton_aot import KERNELS       # and the AOT test compiles every one
    assert set(CASES) == set(TUNERS) == {name for _, name in KERNELS}


def _config_id(config: triton.Config) -> str:
    return "-".join([*(f"{k}{v}" for k, v in config.kwargs.items()), f"w{config.num_warps}", f"s{config.num_stages}"])


CANDIDATES = [pytest.param(name, index, id=f"{name.strip('_')}-{index}-{_config_id(config)}")
              for name, tuner in TUNERS.items() for index, config in enumerate(tuner.candidates)]


@pytest.mark.parametrize("kernel, index", CANDIDATES)
def test_every_candidate_computes_the_reference(kernel, index):
    tuner = TUNERS[kernel]
    config = tuner.candidates[index]
    with forcing(tuner, config) as record:
        CASES[kernel]()
    if record.ran == 0:
        pytest.skip(f"the prune keeps {_config_id(config)} for none of the case's {record.pruned} launches")


# ---------------------------------------------------------------------------------------------
# Bucketed keys: 20 distinct sizes time candidates once per bucket

@contextlib.contextmanager
def counting_benchmarks(tuner: Autotuner):
    """The autotuner's own keying, pruning and choosing, with its timing replaced by a counter (no
    kernel is timed). Under the interpreter it holds one config, which the autotuner never keys or
    times: it gets two (the same tiles, two warp counts; the interpreter ignores warps)."""
    held, cache = tuner.configs, tuner.cache
    if len(held) < 2:
        c = held[0]
        tuner.configs = [c, triton.Config(dict(c.kwargs), num_warps=2 * c.num_warps, num_stages=c.num_stages)]
    tuner.cache = {}
    timed = []

    def do_bench(kernel_call, quantiles=None, **kwargs):
        timed.append(1)
        return [1.0, 1.0, 1.0]

    tuner.__dict__["do_bench"] = do_bench          # shadows the autotuner's cached_property
    try:
        yield tuner.cache, timed
    finally:
        del tuner.__dict__["do_bench"]
        tuner.configs, tuner.cache = held, cache


def _buckets(sizes):
    return len({masked_gemm.size_bucket(n) for n in sizes})


LENGTHS = list(range(3, 43, 2))     # 20 distinct sequence lengths


def test_size_bucket():
    assert [masked_gemm.size_bucket(n) for n in (0, 1, 2, 3, 5, 16, 17, 1000, 1024, 1025)] == \
        [1, 1, 2, 4, 8, 16, 32, 1024, 1024, 2048]


@pytest.mark.parametrize("kernel", ["_grouped_forward_kernel", "_grouped_grad_input_kernel",
                                    "_grouped_grad_weight_kernel"])
def test_projection_over_20_lengths_tunes_once_per_bucket(kernel):
    """The LSTM's projections have rows = length x batch: 20 lengths, batch 2."""
    G, Kdim, N, S, P, B = 2, 20, 24, 1, 1, 2
    rows = [T * B for T in LENGTHS]
    tuner = TUNERS[kernel]
    with counting_benchmarks(tuner) as (cache, timed):
        candidates = len(tuner.configs)
        for R in rows:
            x, weight, m, wi, mi = gemm_inputs(G, R, Kdim, N, S, P, F32)
            if kernel == "_grouped_forward_kernel":
                out = masked_gemm.grouped_masked_matmul(x, weight, wi, pack_mask(m), mi)
                close(out[0], x[0].double() @ masked_weights(weight, wi, m, mi)[0].T, F32)
            elif kernel == "_grouped_grad_input_kernel":
                dy = torch.randn(G, R, N, device=DEVICE)
                dx = masked_gemm.grouped_masked_matmul_grad_input(dy, weight, wi, pack_mask(m), mi)
                close(dx[0], dy[0].double() @ masked_weights(weight, wi, m, mi)[0], F32)
            else:
                dy = torch.randn(G, R, N, device=DEVICE)
                dw = masked_gemm.grouped_masked_matmul_grad_weight(dy, x, None, mi)
                close(dw[0], dy[0].double().T @ x[0].double(), F32)
    assert 0 < len(cache) <= _buckets(rows) < len(rows), (len(cache), _buckets(rows))
    assert len(timed) <= len(cache) * candidates


@pytest.mark.parametrize("kernel", ["_forward_step_kernel", "_backward_step_kernel", "_forward_sequence_kernel",
                                    "_backward_sequence_kernel"])
def test_recurrence_over_20_batches_tunes_once_per_bucket(kernel):
    """The recurrences' rows are a group's batch, which varies with the batch and the task mix (and
    the sequence kernels' length is no key at all)."""
    batches = list(range(1, 21))
    tuner = TUNERS[kernel]
    mode = "step" if "_step_" in kernel else "sequence"
    with counting_benchmarks(tuner) as (cache, timed):
        for B in batches:
            G, T, H = 2, 1 + B % 3, 8
            args = recurrence_inputs(G, T, B, H, F32)
            if kernel.startswith("_forward"):
                masked_lstm.forward_recurrence(*args, mode=mode)
            else:
                xproj, h0, c0, w_hh, wi, bits, mi, lengths, reverse = args
                gates = torch.rand(G, T, B, 4 * H, device=DEVICE)
                cells = torch.randn(G, T, B, H, device=DEVICE)
                masked_lstm.backward_recurrence(torch.randn(G, T, B, H, device=DEVICE), h0, c0, gates, cells, c0,
                                                w_hh, wi, bits, mi, lengths, reverse, mode=mode)
    assert 0 < len(cache) <= _buckets(batches) < len(batches), (len(cache), _buckets(batches))


def test_gumbel_over_20_sizes_tunes_once_per_bucket():
    sizes = [7 * T for T in LENGTHS]
    tuner = TUNERS["_sigmoid_forward_kernel"]
    with counting_benchmarks(tuner) as (cache, timed):
        for n in sizes:
            x = torch.randn(n, device=DEVICE)
            assert torch.equal(gumbel.gumbel_sigmoid_forward(x, _tau(), SEED, True),
                               gumbel_sigmoid_reference(x, TAU, True, SEED))
    assert 0 < len(cache) <= _buckets(sizes) < len(sizes)


def test_softmax_rows_are_no_key():
    tuner = TUNERS["_softmax_forward_kernel"]
    with counting_benchmarks(tuner) as (cache, _):
        for R in range(1, 21):
            gumbel.gumbel_softmax_forward(torch.randn(R, 5, device=DEVICE), _tau(), SEED, True)
    assert len(cache) == 1


# ---------------------------------------------------------------------------------------------
# MTLFAST_AUTOTUNE=0

@pytest.mark.parametrize("value, enabled", [(None, True), ("1", True), ("", True), ("0", False), ("false", False),
                                            ("OFF", False), (" no ", False)])
def test_switch_reads_the_environment(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv("MTLFAST_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("MTLFAST_AUTOTUNE", value)
    assert masked_gemm.autotune_enabled() is enabled


def test_autotune_off_runs_the_first_kept_candidate_untimed(monkeypatch):
    """A kernel built as MTLFAST_AUTOTUNE=0 builds it (with the GPU's list) runs, for each new key,
    the first candidate its prune keeps (fp32: the first that fits the shared-memory budget; bf16:
    the list's first) and runs nothing else: no timing."""
    original = masked_gemm._grouped_forward_kernel
    monkeypatch.setattr(masked_gemm, "_AUTOTUNE", False)
    monkeypatch.setattr(masked_gemm, "_INTERPRET", False)         # the GPU's list
    tuner = masked_gemm.autotune((original.configs[0], original.candidates), key=original.keys,
                                 prune=original.candidate_prune)(original.fn)
    monkeypatch.undo()
    assert tuner.configs == original.candidates
    launched = []
    fn_run = tuner.fn.run

    def counted(*args, **kwargs):
        launched.append({k: kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")})
        return fn_run(*args, **kwargs)

    monkeypatch.setattr(tuner.fn, "run", counted)
    monkeypatch.setattr(masked_gemm, "_grouped_forward_kernel", tuner)
    G, R, Kdim, N, S, P = 2, 5, 33, 7, 1, 1
    for dtype in (F32, BF16):
        x, weight, m, wi, mi = gemm_inputs(G, R, Kdim, N, S, P, dtype)
        out = masked_gemm.grouped_masked_matmul(x, weight, wi, pack_mask(m), mi)
        for g, w in enumerate(masked_weights(weight, wi, m, mi)):
            close(out[g], x[g].double() @ w.T, dtype)
    first_fp32 = next(c for c in original.candidates if masked_gemm.fits_shared_memory(c, 4))
    want = [first_fp32, original.candidates[0]]
    assert first_fp32 is not original.candidates[0]
    assert launched == [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in want]
    assert list(tuner.cache.values()) == want
