"""Every op definition (mtlfast/ops/definition.py) on every backend with a kernel: the registered
custom ops pass torch.library.opcheck (schema, fake kernel, autograd registration, aot dispatch),
the backward op's fake agrees with its kernels for every combination of needed gradients, and the
eager path and the custom op compute the same numbers. Adding an op means adding its sample here:
the first test fails until then."""
from __future__ import annotations

import pytest
import torch

import mtlfast.functional  # noqa: F401  (registers every op)
from mtlfast.ops.definition import definitions
from tests.conftest import DEVICE
from tests.helpers import backend_skip
from tests.test_masked_lstm import DIFFERENTIABLE, ORDER, make_case


def _rnd(*shape, grad=True):
    return torch.randn(*shape, device=DEVICE).requires_grad_(grad)


def _lstm_sample():
    case = make_case(G=2, T=3, B=2, I=5, H=4, S=1, P=2, dtype=torch.float32)
    return tuple(case[k].requires_grad_() if k in DIFFERENTIABLE else case[k] for k in ORDER)


SAMPLES = {
    "masked_linear": lambda: (_rnd(7, 40), _rnd(33, 40), torch.rand(33, 40, device=DEVICE) < 0.5, _rnd(33)),
    "masked_lstm_layer": _lstm_sample,
    "alpha_mix": lambda: (_rnd(2, 12, 6), _rnd(4, 4), 2),
    "layer_mix": lambda: (_rnd(3, 2, 5, 4), _rnd(2, 3)),
    "orthogonality_penalty": lambda: (_rnd(6, 5), 3),
    "gumbel_sigmoid": lambda: (_rnd(5, 2), torch.tensor(0.7, device=DEVICE), torch.tensor([12345]), True, True),
    "gumbel_softmax": lambda: (_rnd(5, 3), torch.tensor(0.7, device=DEVICE), torch.tensor([12345]), True),
    "allocation_combine": lambda: (_rnd(3, 10), torch.tensor([1.0, 0.0, 1.0], device=DEVICE, requires_grad=True)),
}


def _cases():
    for name, op in sorted(definitions().items()):
        for backend in sorted(op.adapters):
            yield pytest.param(name, backend, marks=backend_skip(backend, DEVICE), id=f"{name}-{backend}")


def test_every_op_has_a_sample():
    assert sorted(definitions()) == sorted(SAMPLES)


@pytest.mark.parametrize("name,backend", list(_cases()))
def test_opcheck(name, backend):
    torch.library.opcheck(getattr(torch.ops.mtlfast, name).default, (*SAMPLES[name](), backend))


@pytest.mark.parametrize("name,backend", list(_cases()))
def test_backward_op_for_every_needs(name, backend):
    """The backward custom op, called as autograd calls it, with every gradient needed and with each
    one alone: opcheck of its fake against its kernels, and the gradients it gives equal to the
    eager path's (nothing where not needed)."""
    op = definitions()[name]
    args = SAMPLES[name]()
    outs = getattr(torch.ops.mtlfast, name)(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                                            backend)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs[:op.num_outputs]]
    saved = list(outs[op.num_outputs:])
    differentiable = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    eager = op(backend, *args)
    eager = eager if isinstance(eager, tuple) else (eager,)
    expected = torch.autograd.grad(eager, [args[i] for i in differentiable], grads, allow_unused=True)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    subsets = [differentiable] + [[i] for i in differentiable]
    for k, subset in enumerate(subsets):
        needs = [i in subset for i in range(len(args))]
        call = (grads, *detached, saved, needs, backend)
        if k < 2:
            torch.library.opcheck(getattr(torch.ops.mtlfast, f"{name}_backward").default, call,
                                  test_utils=("test_schema", "test_faketensor"))
        result = getattr(torch.ops.mtlfast, f"{name}_backward")(*call)
        for i, want in zip(differentiable, expected):
            if needs[i]:
                torch.testing.assert_close(result[i], want, msg=lambda m: f"gradient of argument {i}: {m}")
            else:
                assert result[i].numel() == 0, f"argument {i} was not needed but got a gradient"
