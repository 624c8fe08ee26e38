"""Host-side input validation shared by every op: errors name the op, the argument, what was
expected and what was given, so a user can fix the call without reading kernel code."""
from __future__ import annotations

import numbers
import sys
from typing import Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ArgumentError(ValueError, RuntimeError):
    """A bad argument value, shape, dtype or device. A ValueError by mtlfast's convention and a
    RuntimeError where torch.nn.LSTM raises one for the same mistake, so code written against
    either (a drop-in module's callers, PyTorch's own tests) catches it."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument of the wrong kind: a TypeError by mtlfast's convention, a RuntimeError where
    torch.nn.LSTM raises one (e.g. an ``hx`` that is not a pair of tensors)."""


class DimError(ValueError, IndexError):
    """A dim out of range: a ValueError by mtlfast's convention, an IndexError as torch raises."""


class UnsupportedError(ValueError, NotImplementedError):
    """A valid torch argument that mtlfast does not implement (e.g. LSTM projections)."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor(op: str, name: str, value: object, *, ndim: Optional[int] = None,
           min_ndim: Optional[int] = None, dtypes: Optional[Sequence[torch.dtype]] = None) -> torch.Tensor:
    """Checks that ``value`` is a tensor of the given rank and dtype; returns it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        expected = " or ".join(_dtype_name(d) for d in dtypes)
        raise TypeError(f"{op}: argument '{name}' must have dtype {expected}, got {_dtype_name(value.dtype)}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{op}: argument '{name}' must be {ndim}-D, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{op}: argument '{name}' must have at least {min_ndim} dimension(s), "
                         f"got shape {tuple(value.shape)}")
    return value


def local_tensors(op: str, params: Sequence[Tuple[str, str]], args: Sequence[object]) -> None:
    """Refuses a DTensor among an op's arguments (``params``: its schema's (kind, name) pairs): a
    shard of a distributed tensor, whose storage the kernels cannot read. Nothing to check, and
    nothing imported, until torch.distributed.tensor has been imported."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if dtensor is None:
        return
    for (_, name), value in zip(params, args):
        if isinstance(value, dtensor):
            raise TypeError(f"{op}: argument '{name}' must be a local tensor, got a DTensor; under FSDP2 "
                            "(fully_shard) a module's parameters are gathered only in its forward (and until "
                            "the backward with reshard_after_forward=False): call mtlfast ops and methods such "
                            "as orthogonality_penalty() there, or pass .full_tensor()")


def same_dtype(op: str, ref_name: str, ref: torch.Tensor, name: str, value: torch.Tensor) -> None:
    if value.dtype != ref.dtype:
        raise TypeError(f"{op}: argument '{name}' must have the dtype of '{ref_name}' "
                        f"({_dtype_name(ref.dtype)}), got {_dtype_name(value.dtype)}")


def same_device(op: str, ref_name: str, ref: torch.Tensor, name: str, value: torch.Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(f"{op}: argument '{name}' must be on the device of '{ref_name}' "
                         f"({ref.device}), got {value.device}")


def shape(op: str, name: str, value: torch.Tensor, expected: Sequence[int], why: str = "") -> None:
    if tuple(value.shape) != tuple(expected):
        hint = f" ({why})" if why else ""
        raise ValueError(f"{op}: argument '{name}' must have shape {tuple(expected)}{hint}, "
                         f"got {tuple(value.shape)}")


def integer(op: str, name: str, value: object, low: Optional[int] = None, stop: Optional[int] = None) -> int:
    """Checks that ``value`` is an int (not a bool) in [low, stop) (either bound optional); returns
    it. A non-int is a TypeError, an int out of range a ValueError, as torch.nn.LSTM raises them."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: argument '{name}' must be an int, got {type(value).__name__} {value!r}")
    if (low is not None and value < low) or (stop is not None and value >= stop):
        bounds = (f"in [{low}, {stop})" if low is not None and stop is not None
                  else f">= {low}" if low is not None else f"< {stop}")
        raise ValueError(f"{op}: argument '{name}' must be an int {bounds}, got {value!r}")
    return int(value)


def real(op: str, name: str, value: object, low: float, high: float,
         low_closed: bool = True, high_closed: bool = False) -> float:
    """Checks that ``value`` is a real number (not a bool) in the interval; returns it as a float.
    A non-number is a TypeError, a number outside the interval a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: argument '{name}' must be a real number, got {type(value).__name__}")
    x = float(value)
    inside = ((x >= low) if low_closed else (x > low)) and ((x <= high) if high_closed else (x < high))
    if not inside:
        interval = f"{'[' if low_closed else '('}{low:g}, {high:g}{']' if high_closed else ')'}"
        raise ValueError(f"{op}: argument '{name}' must be in {interval}, got {value!r}")
    return x


def host_check_is_free(t: torch.Tensor) -> bool:
    """Whether reading a value of ``t`` on the host costs nothing: a CPU tensor outside a
    torch.compile trace. On a GPU the read is a device sync (the training step would wait, and a
    CUDA graph could not be captured); while compiling the value is data."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def values_in_range(op: str, name: str, t: torch.Tensor, low: int, high: int, what: str) -> None:
    """Checks ``low <= t <= high`` elementwise (``what`` describes the range in the message). Where a
    host read is free the error names the offending min and max; elsewhere the check runs on the
    device without a sync (``torch._assert_async``: an out-of-range value fails like an
    out-of-range index into torch.nn.Embedding on a GPU)."""
    if not t.numel():
        return
    if host_check_is_free(t):
        t_min, t_max = torch.aminmax(t)
        if int(t_min) < low or int(t_max) > high:
            raise ValueError(f"{op}: argument '{name}' must be in {what}, got min {int(t_min)} and max {int(t_max)}")
        return
    torch._assert_async(((t >= low) & (t <= high)).all(), f"{op}: argument '{name}' must be in {what}")
