"""Sluice networks: MF.alpha_mix, MF.layer_mix, MF.orthogonality_penalty on every backend against
the references (mtlfast.ops.sluice.*_reference; those against their oracles in
tests/test_oracles.py), and the modules (SluiceMixer, CrossStitch, LayerMixture, SluiceLSTM)
against independent formulations (M separate torch.nn.LSTM stacks)."""
from __future__ import annotations

import pytest
import torch

import mtlfast
import mtlfast.functional as MF
import mtlfast.nn as mnn
from mtlfast.ops.sluice import alpha_mix_reference, layer_mix_reference, orthogonality_penalty_reference
from tests.conftest import DEVICE
from tests.helpers import assert_close, backend_params, compare_with_reference

MIX_BACKENDS = backend_params(DEVICE, ("reference", "cpu", "triton"))
PENALTY_BACKENDS = backend_params(DEVICE, ("reference", "triton"))
DTYPES = (torch.float64, torch.float32, torch.bfloat16)
# What each backend takes (the others are reasons, tested in test_backend_reasons): no case is
# generated for the rest, rather than a skip.
BACKEND_DTYPES = {"reference": DTYPES, "cpu": (torch.float64, torch.float32),
                  "triton": (torch.float32, torch.bfloat16)}
MIX_CASES = [pytest.param(b.values[0], d, marks=b.marks, id=f"{b.id}-{str(d).replace('torch.', '')}")
             for b in MIX_BACKENDS for d in BACKEND_DTYPES[b.values[0]]]


def _weight_dtype(dtype: torch.dtype) -> torch.dtype:
    """Mixing weights stay float32 under low-precision activations (as the modules keep them)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# (M, S, middle dims, d): odd sizes, one task, cross-stitch (S = 1), three subspaces, one row
ALPHA_SHAPES = [(2, 2, (3, 5), 4), (3, 1, (7,), 5), (1, 3, (2, 3), 3), (2, 3, (1,), 33)]


@pytest.mark.parametrize("backend,dtype", MIX_CASES)
@pytest.mark.parametrize("shape", ALPHA_SHAPES, ids=lambda s: f"M{s[0]}S{s[1]}")
def test_alpha_mix_matches_reference(backend, dtype, shape):
    M, S, mid, d = shape
    h = torch.randn(M, *mid, S * d, device=DEVICE).to(dtype).requires_grad_()
    alpha = torch.randn(M * S, M * S, device=DEVICE, dtype=_weight_dtype(dtype)).requires_grad_()
    with mtlfast.use_backend(backend):
        compare_with_reference(lambda a, b: MF.alpha_mix(a, b, S), lambda a, b: alpha_mix_reference(a, b, S),
                               (h, alpha), dtype)


@pytest.mark.parametrize("backend,dtype", MIX_CASES)
@pytest.mark.parametrize("shape", [(3, 2, (4, 5), 6), (1, 3, (7,), 33), (2, 1, (1,), 1)], ids=lambda s: f"K{s[0]}M{s[1]}")
def test_layer_mix_matches_reference(backend, dtype, shape):
    K, M, mid, D = shape
    layers = torch.randn(K, M, *mid, D, device=DEVICE).to(dtype).requires_grad_()
    beta = torch.randn(M, K, device=DEVICE, dtype=_weight_dtype(dtype)).requires_grad_()
    with mtlfast.use_backend(backend):
        compare_with_reference(MF.layer_mix, layer_mix_reference, (layers, beta), dtype)


@pytest.mark.parametrize("backend", backend_params(DEVICE, ("reference", "cpu", "triton")))
def test_empty_rows(backend):
    h = torch.randn(2, 0, 4, device=DEVICE, requires_grad=True)
    alpha = torch.randn(4, 4, device=DEVICE, requires_grad=True)
    with mtlfast.use_backend(backend):
        out = MF.alpha_mix(h, alpha, 2)
        out.sum().backward()
    assert out.shape == (2, 0, 4)
    assert torch.equal(alpha.grad, torch.zeros_like(alpha))


@pytest.mark.parametrize("backend", backend_params(DEVICE, ("reference", "cpu")))
def test_gradcheck_float64(backend):
    h = torch.randn(2, 3, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    alpha = torch.randn(6, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    layers = torch.randn(3, 2, 4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    beta = torch.randn(2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    with mtlfast.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b: MF.alpha_mix(a, b, 3), (h, alpha))
        assert torch.autograd.gradcheck(MF.layer_mix, (layers, beta))




@pytest.mark.parametrize("backend", backend_params(DEVICE, ("cpu",)))
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    h = torch.randn(2, 3, 4, 6, device=DEVICE, requires_grad=True)
    alpha = torch.randn(4, 4, device=DEVICE, requires_grad=True)
    beta = torch.randn(2, 3, device=DEVICE, requires_grad=True)

    def net(h, alpha, beta):
        mixed = MF.alpha_mix(h, alpha, 2)
        return MF.layer_mix(torch.stack([h, mixed, mixed * 2]), beta)

    with mtlfast.use_backend(backend):
        out = torch.compile(net, fullgraph=True)(h, alpha, beta)
        grads = torch.autograd.grad(out.sum(), (h, alpha, beta))
    mixed = alpha_mix_reference(h, alpha, 2)
    want = layer_mix_reference(torch.stack([h, mixed, mixed * 2]), beta)
    want_grads = torch.autograd.grad(want.sum(), (h, alpha, beta))
    assert_close(out, want, torch.float32, "output")
    for name, a, b in zip(("h", "alpha", "beta"), grads, want_grads):
        assert_close(a, b, torch.float32, f"gradient of {name}")


# ---------------------------------------------------------------------------------------------
# Orthogonality penalty

def test_penalty_hand_made():
    """Two row blocks G1 = [[1, 0], [0, 2]], G2 = [[3, 0], [1, 1]]: G1ᵀG2 = [[3, 0], [2, 2]],
    squared norm 9 + 4 + 4 = 17. A third block of zeros adds nothing."""
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [1.0, 1.0]], device=DEVICE)
    assert MF.orthogonality_penalty(w, 2).item() == pytest.approx(17.0)
    w3 = torch.cat([w, torch.zeros(2, 2, device=DEVICE)])
    assert MF.orthogonality_penalty(w3, 3).item() == pytest.approx(17.0)
    assert MF.orthogonality_penalty(w, 1).item() == 0.0            # one subspace: nothing to separate


@pytest.mark.parametrize("backend", PENALTY_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_penalty_matches_reference(backend, dtype):
    S, r, C = 3, 5, 7
    w = (torch.randn(S * r, C, device=DEVICE) / 3).to(dtype).requires_grad_()
    with mtlfast.use_backend(backend):
        compare_with_reference(lambda x: MF.orthogonality_penalty(x, S), lambda x: orthogonality_penalty_reference(x, S),
                               (w,), dtype)


def test_penalty_gradcheck():
    w = torch.randn(6, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: MF.orthogonality_penalty(x, 3), (w,))


# ---------------------------------------------------------------------------------------------
# Bad input

BAD = [
    ("D not divisible by S", lambda: MF.alpha_mix(torch.randn(2, 3, 5), torch.randn(4, 4), 2),
     ValueError, ["num_subspaces", "divide", "5"]),
    ("alpha of the wrong shape", lambda: MF.alpha_mix(torch.randn(2, 3, 4), torch.randn(3, 3), 2),
     ValueError, ["alpha", "(4, 4)", "(3, 3)"]),
    ("M mismatch (alpha for 3 tasks)", lambda: MF.alpha_mix(torch.randn(2, 3, 4), torch.randn(6, 6), 2),
     ValueError, ["alpha", "M = h.shape[0] = 2"]),
    ("S not an int", lambda: MF.alpha_mix(torch.randn(2, 3, 4), torch.randn(4, 4), 2.0),
     TypeError, ["num_subspaces", "int"]),
    ("h not a tensor", lambda: MF.alpha_mix([1.0], torch.randn(2, 2), 1), TypeError, ["'h'", "Tensor"]),
    ("beta of the wrong shape", lambda: MF.layer_mix(torch.randn(3, 2, 4), torch.randn(3, 2)),
     ValueError, ["beta", "(2, 3)"]),
    ("penalty rows not divisible", lambda: MF.orthogonality_penalty(torch.randn(5, 3), 2),
     ValueError, ["num_subspaces", "rows"]),
    ("SluiceLSTM hidden not divisible", lambda: mnn.SluiceLSTM(4, 5, 2, num_subspaces=2),
     ValueError, ["num_subspaces", "hidden_size"]),
    ("SluiceLSTM task count mismatch", lambda: mnn.SluiceLSTM(4, 6, 2, num_layers=1)(torch.randn(3, 2, 5, 4)),
     ValueError, ["x", "num_tasks=2"]),
    ("unknown init", lambda: mnn.SluiceMixer(2, 2, init="random"), ValueError, ["init", "imbalanced"]),
    ("unknown layer mix", lambda: mnn.LayerMixture(2, 3, mode="mean"), ValueError, ["mode", "stitch"]),
]


@pytest.mark.parametrize("case,call,error,fragments", BAD, ids=[b[0] for b in BAD])
def test_bad_input(case, call, error, fragments):
    with pytest.raises(error) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {info.value}"


def test_backend_reasons():
    h, alpha = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(4, 4)
    reasons = mtlfast.backends.reasons("alpha_mix", h, alpha)
    assert "float64" in reasons["triton"] and reasons["reference"] is None
    # low precision on the cpu backend is computed in float32 (what autocast hands it)
    assert mtlfast.backends.reasons("layer_mix", torch.randn(2, 1, 4).bfloat16(), torch.randn(1, 2))["cpu"] is None
    assert "no CPU kernel" in mtlfast.backends.reasons("orthogonality_penalty", torch.randn(4, 4), 2)["cpu"]


# ---------------------------------------------------------------------------------------------
# Modules

def _plain_lstms(model: mnn.SluiceLSTM, task: int) -> torch.nn.LSTM:
    """Task ``task``'s layers as one multi-layer torch.nn.LSTM with the same weights."""
    ref = torch.nn.LSTM(model.input_size, model.hidden_size, model.num_layers, bidirectional=model.bidirectional,
                        batch_first=model.batch_first).to(device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        for k, layer in enumerate(model.lstms[task]):
            for name, p in layer.named_parameters():
                getattr(ref, name.replace("_l0", f"_l{k}")).copy_(p)
    return ref


@pytest.mark.parametrize("backend", MIX_BACKENDS)
@pytest.mark.parametrize("bidirectional", (True, False), ids=("bi", "uni"))
def test_identity_alpha_equals_independent_lstms(backend, bidirectional):
    torch.manual_seed(0)
    model = mnn.SluiceLSTM(5, 6, 3, num_layers=2, num_subspaces=2, bidirectional=bidirectional,
                           layer_mix="last", alpha_init="identity").to(device=DEVICE, dtype=torch.float64)
    x = torch.randn(3, 4, 7, 5, dtype=torch.float64, device=DEVICE)          # per task (M, B, L, I)
    if backend == "triton":
        model, x = model.float(), x.float()
    with mtlfast.use_backend(backend):
        out = model(x)
    dtype = x.dtype
    for t in range(3):
        want, _ = _plain_lstms(model.double(), t)(x[t].double())
        assert_close(out[t], want, dtype, f"task {t}")


def test_lengths_equal_packed_lstms():
    torch.manual_seed(0)
    model = mnn.SluiceLSTM(3, 4, 2, num_layers=2, num_subspaces=2, layer_mix="last",
                           alpha_init="identity").to(device=DEVICE, dtype=torch.float64)
    x = torch.randn(2, 5, 3, dtype=torch.float64, device=DEVICE)               # shared (B, L, I)
    lengths = torch.tensor([5, 2])
    out = model(x, lengths)
    for t in range(2):
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        want, _ = torch.nn.utils.rnn.pad_packed_sequence(_plain_lstms(model, t)(packed)[0], batch_first=True,
                                                         total_length=5)
        assert_close(out[t], want, torch.float64, f"task {t}")


def test_balanced_alpha_makes_tasks_equal():
    torch.manual_seed(0)
    model = mnn.SluiceLSTM.hard_sharing(4, 6, 3, num_layers=2, num_subspaces=2).to(device=DEVICE)
    out = model(torch.randn(3, 4, 7, 4, device=DEVICE))                        # different inputs per task
    for t in range(1, 3):
        assert_close(out[t], out[0], torch.float32, f"task {t} vs task 0")
    assert not any(a.requires_grad for a in (m.alpha for m in model.mixers))


def test_one_subspace_is_a_cross_stitch_unit():
    torch.manual_seed(0)
    unit = mnn.CrossStitch(3).to(DEVICE)
    with torch.no_grad():
        unit.alpha.copy_(torch.randn(3, 3))
    h = torch.randn(3, 2, 5, 4, device=DEVICE)
    want = alpha_mix_reference(h, unit.alpha, 1)                               # x̃_a = Σ_b α_ab x_b
    assert_close(unit(h), want, torch.float32, "cross-stitch")
    model = mnn.SluiceLSTM.cross_stitch(4, 6, 2, num_layers=1)
    assert model.num_subspaces == 1 and model.alphas()[0].shape == (2, 2)


def test_mixer_inits():
    alpha = mnn.SluiceMixer(2, 2, "imbalanced").alpha.detach()
    assert torch.allclose(alpha.sum(1), torch.ones(4))                       # rows are convex combinations
    assert alpha[0, 0] == alpha[0, 1] > alpha[0, 2] == alpha[0, 3]           # own task first
    assert torch.equal(mnn.SluiceMixer(2, 2, "identity").alpha.detach(), torch.eye(4))
    assert torch.allclose(mnn.SluiceMixer(2, 2, "balanced").alpha.detach(), torch.full((4, 4), 0.25))
    given = torch.randn(4, 4)
    assert torch.equal(mnn.SluiceMixer(2, 2, given).alpha.detach(), given)


def test_layer_mixture_modes():
    layers = [torch.randn(2, 3, 4, device=DEVICE) for _ in range(3)]
    assert torch.equal(mnn.LayerMixture(2, 3, "last").to(DEVICE)(layers), layers[-1])
    assert torch.allclose(mnn.LayerMixture(2, 3, "skip").to(DEVICE)(layers), sum(layers))
    assert mnn.LayerMixture(2, 3, "concat").to(DEVICE)(layers).shape == (2, 3, 12)
    stitch = mnn.LayerMixture(2, 3, "stitch").to(DEVICE)
    assert_close(stitch(layers), sum(layers) / 3, torch.float32, "stitch at init (1/K)")


def test_model_penalty_alphas_betas_and_gradients():
    torch.manual_seed(0)
    model = mnn.SluiceLSTM(4, 6, 2, num_layers=2, num_subspaces=3).to(DEVICE)
    out = model(torch.randn(3, 5, 4, device=DEVICE))
    assert out.shape == (2, 3, 5, 12)
    penalty = model.orthogonality_penalty()
    # the same sum written out: rows of subspace s are the units s*H/S.. of every gate
    want = 0.0
    for task in model.lstms:
        for layer in task:
            for w in (layer.weight_ih_l0, layer.weight_ih_l0_reverse):
                blocks = [w.view(4, 3, 2, -1)[:, s].reshape(8, -1) for s in range(3)]
                want += sum((blocks[s].t() @ blocks[t]).square().sum() for s in range(3) for t in range(s + 1, 3))
    assert_close(penalty, want, torch.float32, "model penalty")
    (out.square().mean() + penalty).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert len(model.alphas()) == 2 and model.betas().shape == (2, 2)


def _sluice_oracle(model: mnn.SluiceLSTM, x: torch.Tensor, lengths) -> torch.Tensor:
    """SluiceLSTM written out with every layer's own torch.nn.LSTM forward (packed when lengths are
    given), alpha_mix_reference per direction and the layer mixture by its definition: the same
    parameters, so gradients compare too. x per task (M, B, L, I) batch_first -> (M, B, L, D_out)."""
    M, D, H, K = model.num_tasks, model.num_directions, model.hidden_size, model.num_layers
    B, L = x.shape[1], x.shape[2]
    layer_in, layers = list(x.unbind(0)), []
    for k in range(K):
        outs = []
        for t in range(M):
            lstm = model.lstms[t][k]
            lstm.batch_first = True      # the module's own nn.LSTM, read batch-first here
            try:
                if lengths is None:
                    out, _ = lstm(layer_in[t])
                else:
                    packed = torch.nn.utils.rnn.pack_padded_sequence(layer_in[t], lengths, batch_first=True,
                                                                     enforce_sorted=False)
                    out, _ = torch.nn.utils.rnn.pad_packed_sequence(lstm(packed)[0], batch_first=True,
                                                                    total_length=L)
            finally:
                lstm.batch_first = False
            outs.append(out.view(B, L, D, H))
        mixed = alpha_mix_reference(torch.stack(outs), model.mixers[k].alpha, model.num_subspaces)
        layer_in = list(mixed.reshape(M, B, L, D * H).unbind(0))
        layers.append(mixed.reshape(M, B, L, D * H))
    mode = model.layer_mixture.mode
    if mode == "stitch":
        return layer_mix_reference(torch.stack(layers), model.layer_mixture.beta)
    if mode == "concat":
        return torch.cat(layers, dim=-1)
    return sum(layers) if mode == "skip" else layers[-1]


@pytest.mark.parametrize("layer_mix", ("stitch", "concat", "skip", "last"))
@pytest.mark.parametrize("batch_first", (True, False), ids=("batch_first", "time_first"))
@pytest.mark.parametrize("bidirectional", (True, False), ids=("bi", "uni"))
def test_sluice_lstm_matches_its_definition_with_every_gradient(layer_mix, batch_first, bidirectional):
    """The module's grouped layout (layers kept as (M, D, T, B, H), α mixed in place) against the
    network written out layer by layer: outputs and the gradients of x and of every parameter, with
    lengths (padding), odd sizes (H = 6 in 3 subspaces, batch 3, length 5) and a shared input."""
    torch.manual_seed(0)
    model = mnn.SluiceLSTM(5, 6, 2, num_layers=3, num_subspaces=3, bidirectional=bidirectional,
                           batch_first=batch_first, layer_mix=layer_mix).to(device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        for mixer in model.mixers:
            mixer.alpha.add_(0.1 * torch.randn_like(mixer.alpha))
        if model.layer_mixture.beta is not None:
            model.layer_mixture.beta.add_(0.1 * torch.randn_like(model.layer_mixture.beta))
    x = torch.randn(3, 5, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)     # shared (B, L, I)
    lengths = torch.tensor([5, 2, 4])
    params = [x, *model.parameters()]
    out = model(x if batch_first else x.transpose(0, 1), lengths)
    out = out if batch_first else out.transpose(1, 2)
    want = _sluice_oracle(model, x.unsqueeze(0).expand(2, *x.shape), lengths)
    assert_close(out, want, torch.float64, "output")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, params, grad)
    expected = torch.autograd.grad(want, params, grad)
    names = ["x"] + [name for name, _ in model.named_parameters()]
    for name, g, w in zip(names, got, expected):
        assert_close(g, w, torch.float64, f"gradient of {name}")
