"""Machinery for tests/test_lstm_dropin.py: PyTorch's own nn.LSTM test inputs, ported.

Vendored (not imported) from PyTorch's ``torch/testing/_internal/common_modules.py`` and
``common_utils.py``: importing those modules runs ``torch.backends.disable_global_flags()`` and
patches ``torch._C.ScriptFunction.__call__`` for the whole pytest process, which would leak into the
rest of this suite. The code below is a faithful copy of what the LSTM tests use; the only
adaptation is that the module class is not fixed (each test passes a *factory*: ``torch.nn.LSTM`` or
``mtlfast.nn.SparseSharingLSTM``).
"""
from __future__ import annotations

import contextlib
from copy import deepcopy
from enum import Enum
from functools import partial, wraps
from itertools import product
from unittest.mock import MagicMock

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence
from torch.testing import make_tensor


# --- common_modules.py: FunctionInput / ModuleInput / ErrorModuleInput ---------------------------

class FunctionInput:
    """ Contains args and kwargs to pass as input to a function. """
    __slots__ = ['args', 'kwargs']

    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs


class ModuleInput:
    """ Contains args / kwargs for module instantiation + forward pass. """
    __slots__ = ['constructor_input', 'forward_input', 'desc', 'reference_fn']

    def __init__(self, constructor_input, forward_input=None, desc='', reference_fn=None):
        self.constructor_input = constructor_input  # Inputs to pass during construction
        self.forward_input = forward_input  # Inputs to pass to forward()
        self.desc = desc  # Description for this set of inputs
        self.reference_fn = reference_fn  # Reference with signature: reference_fn(module, parameters, *args, **kwargs)

        if reference_fn is not None:

            @wraps(reference_fn)
            def copy_reference_fn(m, *args, **kwargs):
                # Copy inputs to avoid undesired side effects from calling the reference.
                args, kwargs = deepcopy(args), deepcopy(kwargs)

                # Note that module parameters are passed in for convenience.
                return reference_fn(m, list(m.parameters()), *args, **kwargs)

            self.reference_fn = copy_reference_fn


class ModuleErrorEnum(Enum):
    """ Enumerates when error is raised when testing modules. """
    CONSTRUCTION_ERROR = 0
    FORWARD_ERROR = 1


class ErrorModuleInput:
    """A ModuleInput that will cause the operation to throw an error plus information about it."""
    __slots__ = ["module_error_input", "error_on", "error_type", "error_regex"]

    def __init__(self, module_error_input, *, error_on=ModuleErrorEnum.CONSTRUCTION_ERROR,
                 error_type=RuntimeError, error_regex):
        self.module_error_input = module_error_input
        self.error_on = error_on
        self.error_type = error_type
        self.error_regex = error_regex


# --- common_utils.py -----------------------------------------------------------------------------

@contextlib.contextmanager
def freeze_rng_state():
    """common_utils.freeze_rng_state (torch.testing._utils): restores the CPU (and CUDA) RNG."""
    rng_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)
        torch.set_rng_state(rng_state)


def gradcheck(fn, inputs, **kwargs):
    """common_utils.gradcheck: torch.autograd.gradcheck with batched-grad (vmap) and fast mode on."""
    for key, value in {"check_batched_grad": True, "fast_mode": True}.items():
        k = kwargs.get(key)
        kwargs[key] = k if k is not None else value
    return torch.autograd.gradcheck(fn, inputs, **kwargs)


def gradgradcheck(fn, inputs, grad_outputs=None, **kwargs):
    """common_utils.gradgradcheck, same defaults as gradcheck above."""
    for key, value in {"check_batched_grad": True, "fast_mode": True}.items():
        k = kwargs.get(key)
        kwargs[key] = k if k is not None else value
    return torch.autograd.gradgradcheck(fn, inputs, grad_outputs, **kwargs)


def mock_wrapper(method):
    """Returns a function that calls the real implementation of a method in addition to passing
    args to a mock object."""
    mock = MagicMock()

    @wraps(method)
    def wrapper(self, *args, **kwargs):
        mock(*args, **kwargs)
        return method(self, *args, **kwargs)
    wrapper.mock = mock
    return wrapper


def get_tensors_from(args, kwargs):
    """ Returns a set of all Tensor objects in the given args and kwargs. """
    return set([arg for arg in args if isinstance(arg, torch.Tensor)]
               + [v for v in kwargs.values() if isinstance(v, torch.Tensor)])


dtype2prec_DONTUSE = {torch.float: 1e-5, torch.double: 1e-5, torch.half: 1e-2, torch.bfloat16: 1e-1}


# --- common_modules.py: the LSTM samples and error inputs ----------------------------------------

def no_batch_dim_reference_lstm(m, p, *args, **kwargs):
    """Reference function for LSTM supporting no batch dimensions.

    Unbatched inputs are unsqueezed to form a
    single batch input before passing them to the module.
    The output is squeezed to compare with the
    output of unbatched input to the module.
    """
    if len(args) == 1:
        inp, = args
        h = None
    elif len(args) == 2:
        inp, h = args
        h = (h[0].unsqueeze(1), h[1].unsqueeze(1))

    batch_dim = 0 if kwargs['batch_first'] else 1
    kwargs.pop('batch_first')
    inp = inp.unsqueeze(batch_dim)
    single_batch_input_args = (inp, h)
    with freeze_rng_state():
        output = m(*single_batch_input_args, **kwargs)
        return (output[0].squeeze(batch_dim), (output[1][0].squeeze(1), output[1][1].squeeze(1)))


def module_inputs_torch_nn_LSTM(module_info=None, device=None, dtype=None, requires_grad=False,
                                training=True, **kwargs):
    # Currently all samples below are for validating the no-batch-dim support.
    make_input = partial(make_tensor, device=device, dtype=dtype, requires_grad=requires_grad)
    bias = (False, True)
    batch_first = (False, True)
    bidirectional = (False, True)
    proj_sizes = (0, 2)

    samples = []
    prod_gen = product(bias, batch_first, bidirectional, proj_sizes)

    for args in prod_gen:
        b, b_f, bidir, proj_size = args
        hidden_size = 3
        cons_args = {'input_size': 2, 'hidden_size': hidden_size, 'num_layers': 2, 'proj_size': proj_size,
                     'batch_first': b_f, 'bias': b, 'bidirectional': bidir}
        cons_args_hidden = {'input_size': 2, 'hidden_size': hidden_size, 'num_layers': 2, 'proj_size': proj_size,
                            'batch_first': b_f, 'bias': b, 'bidirectional': bidir}

        samples.append(
            ModuleInput(
                constructor_input=FunctionInput(**cons_args),
                forward_input=FunctionInput(make_input((2, 2))),
                reference_fn=partial(no_batch_dim_reference_lstm, batch_first=b_f),
            )
        )

        h_out = proj_size if proj_size > 0 else hidden_size
        hx = (make_input((4 if bidir else 2, h_out)), make_input((4 if bidir else 2, hidden_size)))
        samples.append(
            ModuleInput(
                constructor_input=FunctionInput(**cons_args_hidden),
                forward_input=FunctionInput(make_input((3, 2)), hx),
                reference_fn=partial(no_batch_dim_reference_lstm, batch_first=b_f),
            )
        )

    return samples


def module_error_inputs_torch_nn_RNN_GRU(module_info=None, device=None, dtype=None, requires_grad=False,
                                         training=True, **kwargs):
    # use float64 for dtype mismatch test if current dtype is float32, otherwise use float32
    # (the MPS branch of the original is left out: these tests run on CPU)
    mismatched_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    make_input = partial(make_tensor, device=device, dtype=mismatched_dtype, requires_grad=requires_grad)
    C, F_ = ModuleErrorEnum.CONSTRUCTION_ERROR, ModuleErrorEnum.FORWARD_ERROR

    def construction(args, kwargs, error_type, error_regex):
        return ErrorModuleInput(ModuleInput(constructor_input=FunctionInput(*args, **kwargs)),
                                error_on=C, error_type=error_type, error_regex=error_regex)

    return [
        construction((10, 0, 1), {}, ValueError, "hidden_size must be greater than zero"),
        construction((10, 10, 0), {}, ValueError, "num_layers must be greater than zero"),
        # Test dtype mismatch error message
        ErrorModuleInput(
            ModuleInput(
                constructor_input=FunctionInput(3, 5, dtype=dtype, device=device),
                forward_input=FunctionInput(make_input((2, 4, 3))),
            ),
            error_on=F_,
            error_type=ValueError,
            error_regex=(r"RNN input dtype .* does not match weight dtype .* "
                         r"Convert input: input\.to\(.*\), or convert model: model\.to\(.*\)")
        ),
        # Test bias parameter type validation
        construction((3, 5), {"bias": 0}, TypeError, "bias should be of type bool, got: int"),
        construction((3, 5), {"bias": 1}, TypeError, "bias should be of type bool, got: int"),
        construction((3, 5), {"bias": "True"}, TypeError, "bias should be of type bool, got: str"),
        # Test batch_first parameter type validation
        construction((3, 5), {"batch_first": 0}, TypeError, "batch_first should be of type bool, got: int"),
        construction((3, 5), {"batch_first": 1}, TypeError, "batch_first should be of type bool, got: int"),
        construction((3, 5), {"batch_first": "False"}, TypeError, "batch_first should be of type bool, got: str"),
        # Test input_size parameter type validation
        construction((3.0, 5), {}, TypeError, "input_size should be of type int, got: float"),
        construction(("10", 5), {}, TypeError, "input_size should be of type int, got: str"),
        # Test input_size parameter value validation
        construction((0, 5), {}, ValueError, "input_size must be greater than zero"),
        construction((-1, 5), {}, ValueError, "input_size must be greater than zero"),
        # Test hidden_size parameter type validation
        construction((3, 5.0), {}, TypeError, "hidden_size should be of type int, got: float"),
    ]


# --- adapting the construction to a factory ------------------------------------------------------

_LSTM_POSITIONAL = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                    "bidirectional", "proj_size", "device", "dtype")


def requested_proj_size(args, kwargs) -> int:
    """The proj_size a constructor call asks for (positional or keyword)."""
    i = _LSTM_POSITIONAL.index("proj_size")
    return kwargs.get("proj_size", args[i] if len(args) > i else 0)


def assert_proj_size_refused(factory, *args, **kwargs) -> None:
    """SparseSharingLSTM's documented refusal of ``proj_size > 0``: an error that is both a
    ValueError and a NotImplementedError and names ``proj_size``."""
    with pytest.raises(ValueError, match="proj_size") as info:
        factory(*args, **kwargs)
    assert isinstance(info.value, NotImplementedError), (
        f"proj_size > 0 must raise an error that is also a NotImplementedError, got {type(info.value).__mro__}")


def construct(factory, *args, **kwargs):
    """``factory(*args, **kwargs)``; for a factory other than torch.nn.LSTM and ``proj_size > 0``,
    asserts the documented refusal instead and returns None (the caller skips that sample, having
    checked the documented behaviour)."""
    if factory is not torch.nn.LSTM and requested_proj_size(args, kwargs) > 0:
        assert_proj_size_refused(factory, *args, **kwargs)
        return None
    return factory(*args, **kwargs)


# --- comparison ----------------------------------------------------------------------------------

def assert_equal(actual, expected, *, atol=None, rtol=None, exact_dtype: bool = True, path: str = "output"):
    """TestCase.assertEqual for the structures an LSTM returns: tensors (values, shape, dtype),
    tuples/lists (equal length, element-wise; a list and a tuple compare equal, as in
    assertEqual), PackedSequence (all four fields), None and numbers. ``atol=rtol=None`` is
    assertEqual's default: torch.testing's per-dtype tolerances (float32: 1e-5 / 1.3e-6,
    float64: 1e-7 / 1e-7). ``atol`` may be a function of each expected tensor."""
    if isinstance(expected, PackedSequence) or isinstance(actual, PackedSequence):
        assert isinstance(actual, PackedSequence) and isinstance(expected, PackedSequence), (
            f"{path}: {type(actual).__name__} vs {type(expected).__name__}")
        for field in PackedSequence._fields:
            assert_equal(getattr(actual, field), getattr(expected, field), atol=atol, rtol=rtol,
                         exact_dtype=exact_dtype, path=f"{path}.{field}")
        return
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: {type(actual).__name__} is not a Tensor"
        assert actual.shape == expected.shape, f"{path}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        if exact_dtype:
            assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        tensor_atol = atol(expected) if callable(atol) else atol
        torch.testing.assert_close(actual, expected, atol=tensor_atol, rtol=rtol, check_dtype=exact_dtype,
                                   equal_nan=True, msg=lambda m: f"{path}: {m}")
        return
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)), f"{path}: {type(actual).__name__} is not a sequence"
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_equal(a, e, atol=atol, rtol=rtol, exact_dtype=exact_dtype, path=f"{path}[{i}]")
        return
    assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def assert_not_equal(actual, expected, path: str = "output"):
    """TestCase.assertNotEqual for tensors/tuples: at least one element differs."""
    flat_a = torch.utils._pytree.tree_leaves(actual)
    flat_e = torch.utils._pytree.tree_leaves(expected)
    assert len(flat_a) == len(flat_e)
    assert any(not torch.equal(a, e) for a, e in zip(flat_a, flat_e)), f"{path}: expected a difference"
