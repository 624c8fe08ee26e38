"""Bad input, across every op and module, on every backend that runs here: each is refused before a
backend is chosen, with the same exception on every backend, of the type torch raises for the same
mistake where a drop-in has a torch counterpart (else ValueError / TypeError), and a message that
names the argument, what was expected and what was given. Nothing reaches a kernel; nothing
computes a number."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mtlfast
import mtlfast.functional as MF
import mtlfast.nn as mnn
from mtlfast.ops.masked_lstm import masked_lstm_layer
from tests.conftest import DEVICE
from tests.helpers import backend_params

BACKENDS = backend_params(DEVICE, ("reference", "cpu", "triton"))
f32, f64 = torch.float32, torch.float64


def _lstm_args(**override):
    """Valid arguments of masked_lstm_layer: G=2 groups, T=3, B=2, I=5, H=4, one weight set, 2 masks."""
    G, T, B, I, H = 2, 3, 2, 5, 4
    args = dict(x=torch.randn(G, T, B, I), h0=torch.zeros(G, B, H), c0=torch.zeros(G, B, H),
                w_ih=torch.randn(1, 4 * H, I), w_hh=torch.randn(1, 4 * H, H), b_ih=torch.zeros(1, 4 * H),
                b_hh=torch.zeros(1, 4 * H), weight_index=torch.zeros(G, dtype=torch.int64),
                masks_ih=torch.ones(2, 4 * H, I, dtype=torch.bool), masks_hh=torch.ones(2, 4 * H, H, dtype=torch.bool),
                mask_index=torch.tensor([0, -1]), lengths=torch.full((G, B), T), reverse=torch.tensor([False, True]))
    args.update(override)
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v)
            for k, v in args.items()}


def lstm_layer(**override):
    return masked_lstm_layer(*_lstm_args(**override).values())


def _dev(*shape, dtype=f32):
    return torch.randn(shape, device=DEVICE).to(dtype)


def ssl(**kwargs):
    return mnn.SparseSharingLSTM(3, 4, **kwargs).to(DEVICE)


def sluice():
    return mnn.SluiceLSTM(3, 4, 2, num_layers=1).to(DEVICE)


MASK = torch.ones(5, 8, dtype=torch.bool)

# (name, call, exception types (all must hold), fragments of the message)
CALLS = [
    # masked_linear
    ("linear x int", lambda: MF.masked_linear(torch.ones(3, 8, dtype=torch.int64, device=DEVICE), _dev(5, 8),
                                              MASK.to(DEVICE)), (TypeError,), ["'x'", "int64"]),
    ("linear x complex", lambda: MF.masked_linear(torch.ones(3, 8, dtype=torch.complex64, device=DEVICE),
                                                  _dev(5, 8), MASK.to(DEVICE)), (TypeError,), ["'x'", "complex64"]),
    ("linear x bool", lambda: MF.masked_linear(torch.ones(3, 8, dtype=torch.bool, device=DEVICE), _dev(5, 8),
                                               MASK.to(DEVICE)), (TypeError,), ["'x'", "bool"]),
    ("linear x 0-d", lambda: MF.masked_linear(_dev(), _dev(5, 8), MASK.to(DEVICE)), (ValueError,),
     ["'x'", "at least 1"]),
    ("linear weight f64", lambda: MF.masked_linear(_dev(3, 8), _dev(5, 8, dtype=f64), MASK.to(DEVICE)),
     (TypeError,), ["'weight'", "float32", "float64"]),
    ("linear mask float", lambda: MF.masked_linear(_dev(3, 8), _dev(5, 8), torch.ones(5, 8, device=DEVICE)),
     (TypeError,), ["'mask'", "bool", "float32"]),
    ("linear mask transposed", lambda: MF.masked_linear(_dev(3, 8), _dev(5, 8), MASK.t().to(DEVICE)),
     (ValueError,), ["'mask'", "(5, 8)", "(8, 5)"]),
    ("linear x meta", lambda: MF.masked_linear(torch.randn(3, 8, device="meta"), _dev(5, 8), MASK.to(DEVICE)),
     (ValueError,), ["'weight'", "meta"]),
    ("linear bias 2-D", lambda: MF.masked_linear(_dev(3, 8), _dev(5, 8), MASK.to(DEVICE), _dev(1, 5)),
     (ValueError,), ["'bias'", "(5,)", "(1, 5)"]),
    # masked_lstm_layer
    ("lstm h0 float64", lambda: lstm_layer(h0=torch.zeros(2, 2, 4, dtype=f64)), (TypeError,),
     ["'h0'", "float32", "float64"]),
    ("lstm c0 meta", lambda: lstm_layer(c0=torch.zeros(2, 2, 4, device="meta")), (ValueError,), ["'c0'", "meta"]),
    ("lstm lengths float", lambda: lstm_layer(lengths=torch.full((2, 2), 2.5)), (TypeError,),
     ["'lengths'", "int64", "float32"]),
    ("lstm lengths negative", lambda: lstm_layer(lengths=torch.tensor([[1, -1], [2, 2]])), (ValueError,),
     ["'lengths'", "[0, 3]"]),
    ("lstm weight_index out of range", lambda: lstm_layer(weight_index=torch.tensor([0, 1])), (ValueError,),
     ["'weight_index'", "[0, 1)"]),
    ("lstm mask_index below -1", lambda: lstm_layer(mask_index=torch.tensor([-2, 0])), (ValueError,),
     ["'mask_index'", "[-1, 2)"]),
    ("lstm reverse int", lambda: lstm_layer(reverse=torch.tensor([0, 1])), (TypeError,), ["'reverse'", "bool"]),
    ("lstm x 3-D", lambda: lstm_layer(x=torch.randn(3, 2, 5)), (ValueError,), ["'x'", "4-D"]),
    ("lstm b_hh alone", lambda: lstm_layer(b_ih=None), (ValueError,), ["'b_ih'", "'b_hh' alone"]),
    ("lstm b_ih alone", lambda: lstm_layer(b_hh=None), (ValueError,), ["'b_hh'", "'b_ih' alone"]),
    ("lstm masks_hh wrong columns", lambda: lstm_layer(masks_hh=torch.ones(2, 16, 5, dtype=torch.bool)),
     (ValueError,), ["'masks_hh'", "(2, 16, 4)", "(2, 16, 5)"]),
    # alpha_mix, layer_mix, orthogonality_penalty
    ("alpha_mix S zero", lambda: MF.alpha_mix(_dev(2, 3, 4), _dev(4, 4), 0), (ValueError,), ["'num_subspaces'", "0"]),
    ("alpha_mix S bool", lambda: MF.alpha_mix(_dev(2, 3, 4), _dev(4, 4), True), (TypeError,),
     ["'num_subspaces'", "True"]),
    ("alpha_mix S not dividing", lambda: MF.alpha_mix(_dev(2, 3, 5), _dev(4, 4), 2), (ValueError,),
     ["'num_subspaces'", "5"]),
    ("alpha_mix alpha shape", lambda: MF.alpha_mix(_dev(2, 3, 4), _dev(2, 2), 2), (ValueError,),
     ["'alpha'", "(4, 4)", "(2, 2)"]),
    ("alpha_mix h int", lambda: MF.alpha_mix(torch.ones(2, 3, 4, dtype=torch.int32, device=DEVICE), _dev(4, 4), 2),
     (TypeError,), ["'h'", "int32"]),
    ("alpha_mix alpha meta", lambda: MF.alpha_mix(_dev(2, 3, 4), torch.zeros(4, 4, device="meta"), 2),
     (ValueError,), ["'alpha'", "meta"]),
    ("layer_mix beta shape", lambda: MF.layer_mix(_dev(3, 2, 4, 5), _dev(3, 2)), (ValueError,),
     ["'beta'", "(2, 3)", "(3, 2)"]),
    ("layer_mix layers 2-D", lambda: MF.layer_mix(_dev(3, 2), _dev(2, 3)), (ValueError,), ["'layers'", "3"]),
    ("penalty weight 1-D", lambda: MF.orthogonality_penalty(_dev(8), 2), (ValueError,), ["'weight'", "2-D"]),
    ("penalty S not dividing", lambda: MF.orthogonality_penalty(_dev(9, 4), 2), (ValueError,),
     ["'num_subspaces'", "9"]),
    ("penalty S float", lambda: MF.orthogonality_penalty(_dev(8, 4), 2.0), (TypeError,), ["'num_subspaces'", "2.0"]),
    # Gumbel ops
    ("gumbel tau zero", lambda: MF.gumbel_sigmoid(_dev(3), tau=0.0), (ValueError,), ["'tau'", "> 0", "0.0"]),
    ("gumbel tau underflows float32", lambda: MF.gumbel_sigmoid(_dev(3), tau=1e-50), (ValueError,),
     ["'tau'", "float32", "1e-50"]),
    ("gumbel tau overflows float32", lambda: MF.gumbel_sigmoid(_dev(3), tau=1e39), (ValueError,),
     ["'tau'", "float32", "1e+39"]),
    ("gumbel tau subnormal float64", lambda: MF.gumbel_pairs(_dev(3, 2, dtype=f64), tau=1e-310), (ValueError,),
     ["'tau'", "float64"]),
    ("gumbel tau string", lambda: MF.gumbel_sigmoid(_dev(3), tau="1"), (TypeError,), ["'tau'", "str"]),
    ("gumbel tau 2 elements", lambda: MF.gumbel_sigmoid(_dev(3), tau=torch.ones(2)), (ValueError,),
     ["'tau'", "(2,)"]),
    ("gumbel logits int", lambda: MF.gumbel_sigmoid(torch.zeros(3, dtype=torch.int64, device=DEVICE)),
     (TypeError,), ["'logits'", "int64"]),
    ("gumbel inf logit", lambda: MF.gumbel_pairs(torch.tensor([[0.0, float("inf")]], device=DEVICE)),
     (ValueError,), ["'logits'", "finite"]),
    ("pairs last dim 3", lambda: MF.gumbel_pairs(_dev(4, 3)), (ValueError,), ["'logits'", "last dim of 2", "(4, 3)"]),
    ("softmax dim bool", lambda: MF.gumbel_softmax(_dev(2, 3), dim=True), (TypeError,), ["'dim'", "bool"]),
    ("softmax dim float", lambda: MF.gumbel_softmax(_dev(2, 3), dim=1.0), (TypeError,), ["'dim'", "float"]),
    ("softmax dim out of range", lambda: MF.gumbel_softmax(_dev(2, 3), dim=2), (ValueError, IndexError),
     ["'dim'", "[-2, 1]", "2"]),
    ("softmax 0-d dim 1", lambda: MF.gumbel_softmax(_dev(), dim=1), (ValueError, IndexError), ["'dim'", "[-1, 0]"]),
    ("softmax hard over empty dim", lambda: MF.gumbel_softmax(_dev(3, 0), hard=True), (ValueError,),
     ["'logits'", "(3, 0)"]),
    ("combine z 2-D", lambda: MF.allocation_combine(_dev(3, 4), _dev(3, 1)), (ValueError,), ["'z'", "1-D"]),
    ("combine z length", lambda: MF.allocation_combine(_dev(3, 4), _dev(2)), (ValueError,), ["'z'", "(3,)", "(2,)"]),
    ("combine outputs int", lambda: MF.allocation_combine(torch.ones(3, 4, dtype=torch.int64, device=DEVICE),
                                                          _dev(3)), (TypeError,), ["'outputs'", "int64"]),
    # SparseSharingLSTM forward: nn.LSTM's exception types
    ("ssl float64 input", lambda: ssl()(_dev(5, 2, 3, dtype=f64)), (ValueError,),
     ["'input'", "RNN input dtype (torch.float64) does not match weight dtype (torch.float32)"]),
    ("ssl float64 module float32 input", lambda: ssl().double()(_dev(5, 2, 3)), (ValueError,),
     ["'input'", "torch.float32", "torch.float64"]),
    ("ssl int input", lambda: ssl()(torch.ones(5, 2, 3, dtype=torch.int64, device=DEVICE)), (ValueError,),
     ["'input'", "torch.int64"]),
    ("ssl meta input", lambda: ssl()(torch.ones(5, 2, 3, device="meta")), (ValueError, RuntimeError),
     ["'input'", "meta"]),
    ("ssl 1-D input", lambda: ssl()(_dev(3)), (ValueError,), ["'input'", "2D or 3D", "1D"]),
    ("ssl input size", lambda: ssl()(_dev(5, 2, 4)), (ValueError, RuntimeError), ["'input'", "Expected 3, got 4"]),
    ("ssl length 0", lambda: ssl()(_dev(0, 2, 3)), (ValueError, RuntimeError),
     ["Expected sequence length to be larger than 0"]),
    ("ssl hx float64", lambda: ssl()(_dev(5, 2, 3), (_dev(1, 2, 4, dtype=f64), _dev(1, 2, 4, dtype=f64))),
     (ValueError, RuntimeError), ["'hx'", "float32", "float64"]),
    ("ssl hx meta", lambda: ssl()(_dev(5, 2, 3), (torch.zeros(1, 2, 4, device="meta"),) * 2),
     (ValueError, RuntimeError), ["'hx'", "meta"]),
    ("ssl hx shape", lambda: ssl()(_dev(5, 2, 3), (_dev(1, 3, 4), _dev(1, 2, 4))), (ValueError, RuntimeError),
     ["'hx'", "(1, 2, 4)", "[1, 3, 4]"]),
    ("ssl hx 2-D for batched input", lambda: ssl()(_dev(5, 2, 3), (_dev(2, 4), _dev(2, 4))),
     (ValueError, RuntimeError), ["'hx'", "3-D", "(2-D, 2-D)"]),
    ("ssl hx a tensor", lambda: ssl()(_dev(5, 2, 3), _dev(1, 2, 4)), (TypeError,), ["'hx'", "tuple"]),
    ("ssl task required", lambda: ssl(num_tasks=2)(_dev(5, 2, 3)), (ValueError,), ["'task'", "num_tasks=2"]),
    ("ssl task string", lambda: ssl(num_tasks=2)(_dev(5, 2, 3), task="every"), (ValueError,), ["'task'", "'every'"]),
    ("ssl task float tensor", lambda: ssl(num_tasks=2)(_dev(5, 2, 3), task=torch.tensor([0.0, 1.0])),
     (TypeError,), ["'task'", "float32"]),
    ("ssl task out of range", lambda: ssl(num_tasks=2)(_dev(5, 2, 3), task=2), (ValueError,), ["'task'", "[0, 2)"]),
    ("ssl mask buffer float", lambda: _with_float_mask(ssl())(_dev(5, 2, 3)), (ValueError, RuntimeError),
     ["'mask_ih_l0'", "bool", "torch.float32"]),
    # SluiceLSTM
    ("sluice lengths float", lambda: sluice()(_dev(2, 5, 3), lengths=torch.tensor([2.5, 5.0])), (TypeError,),
     ["'lengths'", "float32"]),
    ("sluice lengths bool", lambda: sluice()(_dev(2, 5, 3), lengths=torch.tensor([True, True])), (TypeError,),
     ["'lengths'", "bool"]),
    ("sluice lengths too long", lambda: sluice()(_dev(2, 5, 3), lengths=torch.tensor([2, 6])), (ValueError,),
     ["'lengths'", "[0, 5]"]),
    ("sluice x int", lambda: sluice()(torch.ones(2, 5, 3, dtype=torch.int64, device=DEVICE)), (TypeError,),
     ["'x'", "int64"]),
    ("sluice x float64", lambda: sluice()(_dev(2, 5, 3, dtype=f64)), (TypeError,), ["'x'", "float32", "float64"]),
    # ModularLayer / GumbelMatrix forward
    ("modular allocation shape", lambda: mnn.ModularLayer([nn.Linear(2, 2)]).to(DEVICE)(_dev(1, 2), _dev(2)),
     (ValueError,), ["'allocation'", "(1,)"]),
    ("matrix task out of range", lambda: mnn.GumbelMatrix(2, [3]).to(DEVICE)(5), (ValueError,), ["'task'", "[0, 2)"]),
]


def _with_float_mask(model):
    model.mask_ih_l0 = model.mask_ih_l0.float()      # a buffer replaced by assignment, not through set_mask
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,call,errors,fragments", CALLS, ids=[c[0] for c in CALLS])
def test_bad_call_is_refused_the_same_on_every_backend(backend, name, call, errors, fragments):
    with mtlfast.use_backend(backend), pytest.raises(errors[0]) as info:
        call()
    assert all(isinstance(info.value, e) for e in errors), f"{type(info.value).__mro__} lacks one of {errors}"
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {info.value}"


# Constructors: nothing dispatches, so once. SparseSharingLSTM's are nn.LSTM's checks and messages.
CONSTRUCTORS = [
    ("ssl bias str", lambda: mnn.SparseSharingLSTM(3, 4, bias="True"), (TypeError,), ["bias", "str"]),
    ("ssl batch_first str", lambda: mnn.SparseSharingLSTM(3, 4, batch_first="False"), (TypeError,),
     ["batch_first", "str"]),
    ("ssl dropout True", lambda: mnn.SparseSharingLSTM(3, 4, dropout=True), (ValueError,), ["dropout", "[0, 1]"]),
    ("ssl dropout 2", lambda: mnn.SparseSharingLSTM(3, 4, 2, dropout=2), (ValueError,), ["dropout", "[0, 1]"]),
    ("ssl hidden 0", lambda: mnn.SparseSharingLSTM(10, 0, 1), (ValueError,), ["hidden_size must be greater than zero"]),
    ("ssl layers 0", lambda: mnn.SparseSharingLSTM(10, 10, 0), (ValueError,), ["num_layers must be greater than zero"]),
    ("ssl layers float", lambda: mnn.SparseSharingLSTM(10, 10, 2.0), (TypeError,), ["num_layers", "float"]),
    ("ssl input_size float", lambda: mnn.SparseSharingLSTM(3.0, 4), (TypeError,), ["input_size", "float"]),
    ("ssl proj_size", lambda: mnn.SparseSharingLSTM(3, 4, proj_size=2), (ValueError, NotImplementedError),
     ["'proj_size'", "2", "not supported"]),
    ("ssl proj_size too big", lambda: mnn.SparseSharingLSTM(3, 4, proj_size=4), (ValueError,),
     ["proj_size has to be smaller than hidden_size"]),
    ("ssl num_tasks 0", lambda: mnn.SparseSharingLSTM(3, 4, num_tasks=0), (ValueError,), ["'num_tasks'", "0"]),
    ("ssl num_tasks positional", lambda: mnn.SparseSharingLSTM(3, 4, 1, True, False, 0.0, False, 0, None, None, 2),
     (TypeError,), ["positional"]),
    ("sluice layer_mix", lambda: mnn.SluiceLSTM(3, 4, 2, layer_mix="sum"), (ValueError,), ["'layer_mix'", "'sum'"]),
    ("sluice S not dividing hidden", lambda: mnn.SluiceLSTM(3, 5, 2, num_subspaces=2), (ValueError,),
     ["'num_subspaces'", "hidden_size"]),
    ("matrix tau str", lambda: mnn.GumbelMatrix(2, [3], tau="1"), (TypeError,), ["'tau'", "str"]),
    ("matrix tau zero", lambda: mnn.GumbelMatrix(2, [3], tau=0.0), (ValueError,), ["'tau'", "> 0"]),
    ("matrix p_init str", lambda: mnn.GumbelMatrix(2, [3], p_init="0.5"), (TypeError,), ["'p_init'", "str"]),
    ("matrix components 0", lambda: mnn.GumbelMatrix(2, [3, 0]), (ValueError,), ["'components'", "0"]),
    ("mixer init", lambda: mnn.SluiceMixer(2, 2, init="random"), (ValueError,), ["'init'", "'random'"]),
]


@pytest.mark.parametrize("name,call,errors,fragments", CONSTRUCTORS, ids=[c[0] for c in CONSTRUCTORS])
def test_bad_constructor_is_refused(name, call, errors, fragments):
    with pytest.raises(errors[0]) as info:
        call()
    assert all(isinstance(info.value, e) for e in errors), f"{type(info.value).__mro__} lacks one of {errors}"
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {info.value}"

