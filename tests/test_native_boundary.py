"""The native boundary cannot be crashed: every mtlfast._C entry point checks every buffer it is
given (csrc/buffers.h) and raises a Python exception for a mismatched call.

The fuzz runs in a subprocess (this file run as a script), so a crash shows up as a signal in the
return code instead of killing pytest: a hypothesis loop builds a valid call of each function,
breaks exactly one thing in it (dtype, one size, rank, strides, device, an index value, an output
overlapping another buffer, a non-capsule, a consumed or hand-made broken capsule, an empty tensor,
a bad scalar) and requires a TypeError or ValueError naming the function, never a signal and never
a silent success. Valid calls (also with empty sizes and hand-made capsules without strides) must
succeed, so the fuzz cannot pass by rejecting everything. Also here: the public-API reproducers of
the crashes, and the native numerics the hardening changed (masked-out inf/NaN, float64 Gumbel)."""
from __future__ import annotations

import ctypes
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _native_or_skip():
    try:
        from mtlfast import _C
    except ImportError as error:
        pytest.skip(f"mtlfast._C is not built: {error}")
    return _C


# ---------------------------------------------------------------------------------------------
# Hand-made DLPack capsules (csrc/dlpack.h layouts): a device or a header no torch tensor gives

class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_EXT_DEV = 1, 2, 3, 12
_DL_CODES = {torch.float16: (2, 16), torch.bfloat16: (4, 16), torch.float32: (2, 32), torch.float64: (2, 64),
             torch.int32: (0, 32), torch.int64: (0, 64), torch.uint8: (1, 8), torch.bool: (6, 8),
             torch.complex64: (5, 64)}


@dataclass
class Crafted:
    """A capsule describing `tensor`'s memory with the given header fields changed; the tensor and
    every ctypes object stay referenced here for as long as the capsule is used."""
    tensor: torch.Tensor
    device: Tuple[int, int] = (KDL_CPU, 0)
    name: bytes = b"dltensor"
    ndim: Optional[int] = None
    shape: Optional[List[int]] = None
    strides: Optional[List[int]] = "tensor"      # None: a NULL strides pointer (compact row-major)
    byte_offset: int = 0
    null_data: bool = False
    dtype: Optional[Tuple[int, int, int]] = None
    _keep: list = field(default_factory=list)

    def capsule(self):
        t = self.tensor
        shape = list(t.shape) if self.shape is None else self.shape
        strides = list(t.stride()) if self.strides == "tensor" else self.strides
        shape_arr = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        strides_arr = None if strides is None else (ctypes.c_int64 * max(len(strides), 1))(*strides)
        code, bits = _DL_CODES[t.dtype]
        dtype = _DLDataType(*(self.dtype or (code, bits, 1)))
        managed = _DLManagedTensor()
        managed.dl_tensor = _DLTensor(None if self.null_data else t.data_ptr(), _DLDevice(*self.device),
                                      len(shape) if self.ndim is None else self.ndim, dtype,
                                      ctypes.cast(shape_arr, ctypes.POINTER(ctypes.c_int64)),
                                      None if strides_arr is None else ctypes.cast(strides_arr,
                                                                                   ctypes.POINTER(ctypes.c_int64)),
                                      self.byte_offset)
        name = ctypes.c_char_p(self.name)
        self._keep += [shape_arr, strides_arr, managed, name]
        return _capsule_new(ctypes.addressof(managed), name, None)


@dataclass
class Raw:
    """Passed as it is: a non-capsule, or a scalar argument."""
    value: object


class FakeStream:
    def __init__(self, cuda_stream=0, device_index=0):
        self.cuda_stream = cuda_stream
        if device_index is not None:
            self.device_index = device_index


# ---------------------------------------------------------------------------------------------
# The functions: argument kinds, one valid call, and what may legitimately vary

@dataclass
class Arg:
    name: str
    kind: str                  # "float" (the call's dtype), "int64", "bool", "int32", or a scalar kind
    output: bool = False
    optional: bool = False
    strided: bool = False      # the kernel reads it through its strides (CUDA operands)


@dataclass
class Spec:
    name: str
    args: List[Arg]
    build: Callable            # (draw, min_size) -> (values, ranges)
    cuda: bool = False
    # after a shape change, is the call still a valid one (so not a mismatch to report)?
    still_valid: Callable = lambda values: False


def _floats(dtypes):
    import hypothesis.strategies as st
    return st.sampled_from(dtypes)


def _sizes(draw, count, min_size, high=4):
    import hypothesis.strategies as st
    return [draw(st.integers(min_size, high)) for _ in range(count)]


def _lstm_forward(draw, min_size):
    import hypothesis.strategies as st
    G, T, B, H = _sizes(draw, 4, min_size)
    dt = draw(_floats([torch.float32, torch.float64]))
    save = draw(st.booleans())
    v = dict(xproj=torch.randn(G, T, B, 4 * H, dtype=dt), w=torch.randn(G, 4 * H, H, dtype=dt) * 0.3,
             h0=torch.randn(G, B, H, dtype=dt), c0=torch.randn(G, B, H, dtype=dt),
             lengths=torch.randint(0, T + 1, (G, B)), reverse=torch.rand(G) < 0.5,
             hs=torch.empty(G, T, B, H, dtype=dt),
             gates=torch.empty(G, T, B, 4 * H, dtype=dt) if save else None,
             cells=torch.empty(G, T, B, H, dtype=dt) if save else None,
             h_prev=torch.empty(G, T, B, H, dtype=dt) if save else None,
             h_n=torch.empty(G, B, H, dtype=dt), c_n=torch.empty(G, B, H, dtype=dt), threads=Raw(2))
    return v, {"lengths": (0, T)}


def _lstm_backward(draw, min_size):
    G, T, B, H = _sizes(draw, 4, min_size)
    dt = draw(_floats([torch.float32, torch.float64]))
    v = dict(dhs=torch.randn(G, T, B, H, dtype=dt), dh_n=torch.randn(G, B, H, dtype=dt),
             dc_n=torch.randn(G, B, H, dtype=dt), gates=torch.rand(G, T, B, 4 * H, dtype=dt),
             cells=torch.randn(G, T, B, H, dtype=dt), c0=torch.randn(G, B, H, dtype=dt),
             w=torch.randn(G, 4 * H, H, dtype=dt) * 0.3, lengths=torch.randint(0, T + 1, (G, B)),
             reverse=torch.rand(G) < 0.5, dgates=torch.empty(G, T, B, 4 * H, dtype=dt),
             dh0=torch.empty(G, B, H, dtype=dt), dc0=torch.empty(G, B, H, dtype=dt), threads=Raw(1))
    return v, {"lengths": (0, T)}


def _mask_select(draw, min_size):
    import hypothesis.strategies as st
    G, N, K = _sizes(draw, 3, min_size)
    S, P = _sizes(draw, 2, 1, 3)
    dt = draw(_floats([torch.float32, torch.float64]))
    with_index, with_masks = draw(st.booleans()), draw(st.booleans())
    v = dict(src=torch.randn(S if with_index else G, N, K, dtype=dt),
             index=torch.randint(0, S, (G,)) if with_index else None,
             masks=torch.rand(P, N, K) < 0.5 if with_masks else None,
             mask_index=torch.randint(-1, P, (G,)), out=torch.empty(G, N, K, dtype=dt), threads=Raw(2))
    ranges = {}
    if with_index:
        ranges["index"] = (0, S - 1)
    if with_masks:
        ranges["mask_index"] = (-1, P - 1)
    return v, ranges


def _mask_select_still_valid(v) -> bool:
    """src's and masks' first sizes are free (S, P): only the index values bound them."""
    out, src, index, masks, mask_index = v["out"], v["src"], v["index"], v["masks"], v["mask_index"]
    if not all(isinstance(t, torch.Tensor) or t is None for t in (out, src, index, masks, mask_index)):
        return False
    if out.dim() != 3 or src.dim() != 3 or src.shape[1:] != out.shape[1:]:
        return False
    if index is None and src.shape[0] != out.shape[0]:
        return False
    if index is not None and (index.shape != (out.shape[0],) or (index.numel() and index.max() >= src.shape[0])):
        return False
    if mask_index.shape != (out.shape[0],):
        return False
    if masks is not None and (masks.dim() != 3 or masks.shape[1:] != out.shape[1:]
                              or (mask_index.numel() and mask_index.max() >= masks.shape[0])):
        return False
    return True


def _alpha_mix(draw, min_size, backward):
    M, N = _sizes(draw, 2, min_size)
    S, d = _sizes(draw, 2, 1, 3)
    dt = draw(_floats([torch.float32, torch.float64]))
    h = torch.randn(M, N, S * d, dtype=dt)
    alpha = torch.randn(M * S, M * S, dtype=dt)
    if backward:
        return dict(dout=torch.randn_like(h), h=h, alpha=alpha, dh=torch.empty_like(h),
                    dalpha=torch.empty_like(alpha), threads=Raw(2)), {}
    return dict(h=h, alpha=alpha, out=torch.empty_like(h), threads=Raw(2)), {}


def _layer_mix(draw, min_size, backward):
    K, M, N, D = _sizes(draw, 4, min_size, 3)
    dt = draw(_floats([torch.float32, torch.float64]))
    layers, beta = torch.randn(K, M, N, D, dtype=dt), torch.randn(M, K, dtype=dt)
    if backward:
        return dict(dout=torch.randn(M, N, D, dtype=dt), layers=layers, beta=beta,
                    dlayers=torch.empty_like(layers), dbeta=torch.empty_like(beta), threads=Raw(1)), {}
    return dict(layers=layers, beta=beta, out=torch.empty(M, N, D, dtype=dt), threads=Raw(1)), {}


def _philox(draw, min_size):
    import hypothesis.strategies as st
    n = draw(st.integers(min_size, 40))
    return dict(seed=Raw(draw(st.integers(0, 2**64 - 1))), offset0=Raw(draw(st.integers(0, 2**40))),
                out=torch.empty(n), threads=Raw(2)), {}


def _gumbel(draw, min_size, backward):
    import hypothesis.strategies as st
    shape = _sizes(draw, draw(st.integers(0, 2)), min_size)
    pairs = draw(st.booleans())
    dt = draw(_floats([torch.float32, torch.float64]))
    x = torch.randn(shape + [2] if pairs else shape, dtype=dt)
    common = dict(tau=Raw(draw(st.sampled_from([1.0, 0.5, 1e-30]))), seed=Raw(draw(st.integers(0, 2**64 - 1))))
    if backward:
        return dict(dz=torch.randn(shape, dtype=dt), x=x, **common, dx=torch.empty_like(x), threads=Raw(2)), {}
    return dict(x=x, **common, hard=Raw(draw(st.booleans())), z=torch.empty(shape, dtype=dt), threads=Raw(2)), {}


def _gumbel_still_valid(v) -> bool:
    """z (or dz) of x's shape, or of x's shape without a last size of 2, is a valid pairing."""
    x, z = v["x"], v["z"] if "z" in v else v["dz"]
    if not (isinstance(x, torch.Tensor) and isinstance(z, torch.Tensor)):
        return False
    if "dx" in v and (not isinstance(v["dx"], torch.Tensor) or v["dx"].shape != x.shape):
        return False
    return z.shape == x.shape or tuple(z.shape) + (2,) == tuple(x.shape)


def _softmax(draw, min_size, backward):
    import hypothesis.strategies as st
    R, C = _sizes(draw, 2, min_size)
    dt = draw(_floats([torch.float32, torch.float64]))
    x = torch.randn(R, C, dtype=dt)
    common = dict(tau=Raw(draw(st.sampled_from([1.0, 0.5, 1e-30]))), seed=Raw(draw(st.integers(0, 2**64 - 1))))
    if backward:
        return dict(dy=torch.randn(R, C, dtype=dt), x=x, **common, dx=torch.empty_like(x), threads=Raw(2)), {}
    return dict(x=x, **common, hard=Raw(draw(st.booleans())), y=torch.empty_like(x), threads=Raw(2)), {}


def _combine(draw, min_size, backward):
    C, N = _sizes(draw, 2, min_size)
    dt = draw(_floats([torch.float32, torch.float64]))
    outputs, z = torch.randn(C, N, dtype=dt), (torch.rand(C) < 0.5).to(dt)
    if backward:
        return dict(dout=torch.randn(N, dtype=dt), outputs=outputs, z=z, doutputs=torch.empty_like(outputs),
                    dz=torch.empty_like(z), threads=Raw(2)), {}
    return dict(outputs=outputs, z=z, out=torch.empty(N, dtype=dt), threads=Raw(2)), {}


_CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _linear(draw, min_size, op: str, direct: bool = False):
    """A masked_linear call: forward, grad_input or grad_weight, bias / dbias drawn or None. The
    CUDA kernels' (bit-packed mask, a stream) or, with ``direct``, the cpu backend's few-row loops
    (bool mask, float32/float64, threads)."""
    import hypothesis.strategies as st
    M, N = draw(st.integers(min_size, 9)), draw(st.integers(min_size, 9))
    K = draw(st.integers(min_size, 70))        # past 32 mask words and the AVX-512 tiles' 16 and 64
    dt = draw(_floats([torch.float32, torch.float64] if direct else _CUDA_DTYPES))
    name, mask = (("mask", torch.rand(N, K) < 0.5) if direct else
                  ("mask_bits", torch.randint(-2**31, 2**31 - 1, (N, (K + 31) // 32), dtype=torch.int32)))
    x, w, dy = torch.randn(M, K, dtype=dt), torch.randn(N, K, dtype=dt), torch.randn(M, N, dtype=dt)
    with_bias = draw(st.booleans())
    values = {"forward": dict(x=x, w=w, **{name: mask}, bias=torch.randn(N, dtype=dt) if with_bias else None,
                              out=torch.empty(M, N, dtype=dt)),
              "grad_input": dict(dy=dy, w=w, **{name: mask}, dx=torch.empty(M, K, dtype=dt)),
              "grad_weight": dict(dy=dy, x=x, **{name: mask}, dw=torch.empty(N, K, dtype=dt),
                                  dbias=torch.empty(N, dtype=dt) if with_bias else None)}[op]
    return {**values, **({"threads": Raw(2)} if direct else {"stream": Raw("stream")})}, {}


def _f(name, kind="float", **kw):
    return Arg(name, kind, **kw)


SPECS = [
    Spec("lstm_forward", [_f("xproj"), _f("w"), _f("h0"), _f("c0"), _f("lengths", "int64"), _f("reverse", "bool"),
                          _f("hs", output=True), _f("gates", output=True, optional=True),
                          _f("cells", output=True, optional=True), _f("h_prev", output=True, optional=True),
                          _f("h_n", output=True), _f("c_n", output=True), _f("threads", "threads")], _lstm_forward),
    Spec("lstm_backward", [_f("dhs"), _f("dh_n"), _f("dc_n"), _f("gates"), _f("cells"), _f("c0"), _f("w"),
                           _f("lengths", "int64"), _f("reverse", "bool"), _f("dgates", output=True),
                           _f("dh0", output=True), _f("dc0", output=True), _f("threads", "threads")], _lstm_backward),
    Spec("mask_select", [_f("src"), _f("index", "int64", optional=True), _f("masks", "bool", optional=True),
                         _f("mask_index", "int64"), _f("out", output=True), _f("threads", "threads")], _mask_select,
         still_valid=_mask_select_still_valid),
    Spec("alpha_mix_forward", [_f("h"), _f("alpha"), _f("out", output=True), _f("threads", "threads")],
         lambda draw, m: _alpha_mix(draw, m, False)),
    Spec("alpha_mix_backward", [_f("dout"), _f("h"), _f("alpha"), _f("dh", output=True),
                                _f("dalpha", output=True), _f("threads", "threads")],
         lambda draw, m: _alpha_mix(draw, m, True)),
    Spec("layer_mix_forward", [_f("layers"), _f("beta"), _f("out", output=True), _f("threads", "threads")],
         lambda draw, m: _layer_mix(draw, m, False)),
    Spec("layer_mix_backward", [_f("dout"), _f("layers"), _f("beta"), _f("dlayers", output=True),
                                _f("dbeta", output=True), _f("threads", "threads")],
         lambda draw, m: _layer_mix(draw, m, True)),
    # out's shape is free: n is its element count
    Spec("philox_uniform", [_f("seed", "seed"), _f("offset0", "offset"), _f("out", output=True),
                            _f("threads", "threads")], _philox, still_valid=lambda v: isinstance(v["out"], torch.Tensor)),
    Spec("gumbel_sigmoid_forward", [_f("x"), _f("tau", "tau"), _f("seed", "seed"), _f("hard", "hard"),
                                    _f("z", output=True), _f("threads", "threads")],
         lambda draw, m: _gumbel(draw, m, False), still_valid=_gumbel_still_valid),
    Spec("gumbel_sigmoid_backward", [_f("dz"), _f("x"), _f("tau", "tau"), _f("seed", "seed"),
                                     _f("dx", output=True), _f("threads", "threads")],
         lambda draw, m: _gumbel(draw, m, True), still_valid=_gumbel_still_valid),
    Spec("masked_linear_direct_forward", [_f("x"), _f("w"), _f("mask", "bool"), _f("bias", optional=True),
                                          _f("out", output=True), _f("threads", "threads")],
         lambda draw, m: _linear(draw, m, "forward", direct=True)),
    Spec("masked_linear_direct_grad_input", [_f("dy"), _f("w"), _f("mask", "bool"), _f("dx", output=True),
                                             _f("threads", "threads")], lambda draw, m: _linear(draw, m, "grad_input", direct=True)),
    Spec("masked_linear_direct_grad_weight", [_f("dy"), _f("x"), _f("mask", "bool"), _f("dw", output=True),
                                              _f("dbias", output=True, optional=True), _f("threads", "threads")],
         lambda draw, m: _linear(draw, m, "grad_weight", direct=True)),
    Spec("gumbel_softmax_forward", [_f("x"), _f("tau", "tau"), _f("seed", "seed"), _f("hard", "hard"),
                                    _f("y", output=True), _f("threads", "threads")],
         lambda draw, m: _softmax(draw, m, False)),
    Spec("gumbel_softmax_backward", [_f("dy"), _f("x"), _f("tau", "tau"), _f("seed", "seed"),
                                     _f("dx", output=True), _f("threads", "threads")],
         lambda draw, m: _softmax(draw, m, True)),
    Spec("allocation_combine_forward", [_f("outputs"), _f("z"), _f("out", output=True), _f("threads", "threads")],
         lambda draw, m: _combine(draw, m, False)),
    Spec("allocation_combine_backward", [_f("dout"), _f("outputs"), _f("z"), _f("doutputs", output=True, optional=True),
                                         _f("dz", output=True, optional=True), _f("threads", "threads")],
         lambda draw, m: _combine(draw, m, True)),
    Spec("masked_linear_forward", [_f("x", strided=True), _f("w", strided=True), _f("mask_bits", "int32", strided=True),
                                   _f("bias", optional=True), _f("out", output=True), _f("stream", "stream")],
         lambda draw, m: _linear(draw, m, "forward"), cuda=True),
    Spec("masked_linear_grad_input", [_f("dy", strided=True), _f("w", strided=True),
                                      _f("mask_bits", "int32", strided=True), _f("dx", output=True),
                                      _f("stream", "stream")], lambda draw, m: _linear(draw, m, "grad_input"),
         cuda=True),
    Spec("masked_linear_grad_weight", [_f("dy", strided=True), _f("x", strided=True),
                                       _f("mask_bits", "int32", strided=True), _f("dw", output=True),
                                       _f("dbias", output=True, optional=True), _f("stream", "stream")],
         lambda draw, m: _linear(draw, m, "grad_weight"), cuda=True),
]
SCALARS = {"threads", "tau", "seed", "offset", "hard", "stream"}


# ---------------------------------------------------------------------------------------------
# Calling, and breaking one thing of a valid call

class Caller:
    """Turns values into arguments: tensors become capsules (CUDA functions get real CUDA tensors
    where torch has a GPU, else hand-made capsules that claim cuda:0 for host memory: every
    mutated call must be refused before anything is launched)."""

    def __init__(self):
        from mtlfast import _C
        self.C = _C
        self.real_cuda = torch.cuda.is_available()

    def arg(self, spec: Spec, value):
        if isinstance(value, Raw):
            if value.value == "stream":
                return torch.cuda.current_stream() if self.real_cuda else FakeStream()
            return value.value
        if isinstance(value, Crafted):
            return value.capsule()
        if value is None:
            return None
        if spec.cuda and self.real_cuda:
            return torch._C._to_dlpack(value.cuda())
        return torch._C._to_dlpack(value)

    def call(self, spec: Spec, values: Dict[str, object]):
        values = {name: Crafted(v, device=(KDL_CUDA, 0)) if spec.cuda and not self.real_cuda and
                  isinstance(v, torch.Tensor) else v for name, v in values.items()}   # alive until the call returns
        args = [self.arg(spec, values[a.name]) for a in spec.args]
        return getattr(self.C, spec.name)(*args)


_OTHER_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool,
                 torch.uint8, torch.complex64]
BAD_SCALARS = {
    "threads": [0, -1, 1025, 2**31, 2**63, 2**70, "2", None, 2.0],
    "tau": [0.0, -1.0, math.nan, math.inf, -math.inf, 1e-320, 1e309, "1", None],
    "seed": [-1, 2**64, None, "1", 1.5],
    "offset": [-1, -2**63, 2**63, None, "0"],
    "stream": [0, None, "s", 1.5, FakeStream(cuda_stream="x"), FakeStream(cuda_stream=True),
               FakeStream(cuda_stream=-1), FakeStream(cuda_stream=2**70), FakeStream(device_index=1),
               FakeStream(device_index="0")],
}
NOT_CAPSULES = [0, 12345678, "x", 1.5, [], object(), torch.zeros(2)]
KINDS = ["dtype", "size", "rank", "strides", "device", "value", "overlap", "object", "consumed", "empty",
         "header", "scalar"]


def _like(t: torch.Tensor, shape) -> torch.Tensor:
    """A tensor of t's dtype and the given shape with valid contents (zeros for indices)."""
    if t.dtype in (torch.int64, torch.int32):
        return torch.zeros(shape, dtype=t.dtype)
    if t.dtype == torch.bool:
        return torch.rand(shape) < 0.5
    return torch.randn(shape).to(t.dtype)


def _overlapping(inp: torch.Tensor, out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Copies of inp and out in one byte buffer, out starting inside inp's last element."""
    b_in, b_out = inp.numel() * inp.element_size(), out.numel() * out.element_size()
    start = (b_in - 1) // out.element_size() * out.element_size()
    base = torch.zeros(start + b_out + b_in, dtype=torch.uint8)
    new_in = base[:b_in].view(inp.dtype).view(inp.shape)
    new_in.copy_(inp)
    return new_in, base[start:start + b_out].view(out.dtype).view(out.shape)


def _applies(kind: str, arg: Arg, values: dict, ranges: dict, present: List[Arg]) -> bool:
    t: torch.Tensor = values[arg.name]
    if kind in ("size", "empty"):
        return t.dim() > 0
    if kind == "strides":
        return not arg.strided and any(s > 1 for s in t.shape)
    if kind == "value":
        return arg.name in ranges
    if kind == "overlap":
        return arg.output and len(present) > 1
    return kind != "scalar"


def mutate(draw, spec: Spec, values: dict, ranges: dict, caller: Caller) -> Optional[Tuple[str, str, dict]]:
    """One broken copy of a valid call: (kind, argument, values), or None where the drawn kind
    does not apply to the drawn argument."""
    import hypothesis.strategies as st
    present = [a for a in spec.args if a.kind not in SCALARS and isinstance(values[a.name], torch.Tensor)]
    applicable = {kind: [a for a in present if _applies(kind, a, values, ranges, present)] for kind in KINDS}
    applicable["scalar"] = [a for a in spec.args if a.kind in BAD_SCALARS]
    kind = draw(st.sampled_from([k for k in KINDS if applicable[k]]))
    arg = draw(st.sampled_from(applicable[kind]))
    if kind == "scalar":
        bad = draw(st.sampled_from(BAD_SCALARS[arg.kind]))
        if arg.kind == "tau" and bad == 1e309:
            bad = 1e39 if values["x"].dtype == torch.float32 else math.inf
        if arg.kind == "tau" and bad == 1e-320 and values["x"].dtype == torch.float32:
            bad = 1e-39    # below float32's smallest normal number
        return kind, arg.name, {**values, arg.name: Raw(bad)}
    t: torch.Tensor = values[arg.name]
    new = dict(values)
    if kind == "dtype":
        new[arg.name] = t.to(draw(st.sampled_from([d for d in _OTHER_DTYPES if d != t.dtype])))
    elif kind in ("size", "rank", "empty"):
        shape = list(t.shape)
        if kind == "size":
            d = draw(st.integers(0, len(shape) - 1))
            shape[d] += draw(st.sampled_from([1, -1] if shape[d] > 1 else [1]))
        elif kind == "rank":
            shape = shape[:-1] if shape and draw(st.booleans()) else shape + [1]
        else:
            shape[draw(st.integers(0, len(shape) - 1))] = 0
        new[arg.name] = _like(t, shape)
        if spec.still_valid(new):
            return None
    elif kind == "strides":
        dims = [d for d, s in enumerate(t.shape) if s > 1]
        d = draw(st.sampled_from(dims))
        if draw(st.booleans()):   # every other element
            big = torch.zeros(*t.shape[:d], 2 * t.shape[d], *t.shape[d + 1:], dtype=t.dtype)
            new[arg.name] = big[(slice(None),) * d + (slice(None, None, 2),)].copy_(t)
        else:                      # stride 0: one slice repeated
            new[arg.name] = t.narrow(d, 0, 1).clone().expand(t.shape)
    elif kind == "device":
        device = draw(st.sampled_from([(KDL_CUDA, 1), (KDL_CUDA_HOST, 0), (KDL_EXT_DEV, 0)] +
                                      ([(KDL_CPU, 0)] if spec.cuda else [(KDL_CUDA, 0)])))
        new[arg.name] = Crafted(t, device=device)
    elif kind == "value":
        low, high = ranges[arg.name]
        bad = t.clone()
        bad.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([low - 1, high + 1, 2**62, -2**63]))
        new[arg.name] = bad
    elif kind == "overlap":
        other = draw(st.sampled_from([a for a in present if a.name != arg.name]))
        new[other.name], new[arg.name] = _overlapping(values[other.name], t)
    elif kind == "object":
        new[arg.name] = Raw(draw(st.sampled_from(NOT_CAPSULES + ([] if arg.optional else [None]))))
    elif kind == "consumed":
        new[arg.name] = Crafted(t, name=draw(st.sampled_from([b"used_dltensor", b"dltensor_versioned", b"x"])),
                                device=(KDL_CUDA, 0) if spec.cuda else (KDL_CPU, 0))
    elif kind == "header":
        device = (KDL_CUDA, 0) if spec.cuda else (KDL_CPU, 0)
        which = draw(st.sampled_from(["null", "offset", "negative", "ndim", "huge", "lanes", "bits"]))
        if which == "offset" and t.element_size() == 1:
            return None   # a byte offset by one whole element is a valid header: DLPack trusts it
        fields = {"null": dict(null_data=True), "offset": dict(byte_offset=1),
                  "negative": dict(shape=[-s - 1 for s in t.shape] or None, strides=list(t.stride())),
                  "ndim": dict(ndim=draw(st.sampled_from([-1, 17, 2**31 - 1]))),
                  "huge": dict(strides=[2**62] * t.dim()),
                  "lanes": dict(dtype=(*_DL_CODES[t.dtype], 2)),
                  "bits": dict(dtype=(_DL_CODES[t.dtype][0], 0, 1))}[which]
        if which == "negative" and not t.shape:
            return None
        if which == "huge" and all(s <= 1 for s in t.shape):
            return None   # a stride of a size-1 dimension is never used
        new[arg.name] = Crafted(t, device=device, **fields)
    return kind, arg.name, new


def _refusal_ok(spec: Spec, error: BaseException) -> bool:
    message = str(error)
    return isinstance(error, (TypeError, ValueError)) and (
        message.startswith(f"mtlfast._C.{spec.name}: argument '") or "incompatible function arguments" in message)


def fuzz(examples: int) -> dict:
    """Runs the fuzz; returns the summary (failures listed, at most 20)."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    caller = Caller()
    cuda_safe = caller.real_cuda or caller.C.cuda_device_count() == 0
    specs = [s for s in SPECS if hasattr(caller.C, s.name) and (not s.cuda or cuda_safe)]
    summary = {"functions": {}, "kinds": {}, "valid": 0, "failures": []}

    def fail(text):
        if len(summary["failures"]) < 20:
            summary["failures"].append(text)

    def check_valid(spec, values, label):
        try:
            caller.call(spec, values)
        except RuntimeError as error:
            # hand-made CUDA capsules pass every check, then find no device to run on
            if not (spec.cuda and not caller.real_cuda and "mtlfast._C." in str(error)):
                fail(f"{spec.name}: a valid call ({label}) raised {error!r}")
        except Exception as error:  # noqa: BLE001 - reported, not raised
            fail(f"{spec.name}: a valid call ({label}) raised {error!r}")
        summary["valid"] += 1

    def mismatched(spec: Spec):
        @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def run(data):
            values, ranges = spec.build(data.draw, 1)
            check_valid(spec, values, "sizes >= 1")
            mutated = mutate(data.draw, spec, values, ranges, caller)
            if mutated is None:
                return
            kind, name, new = mutated
            try:
                caller.call(spec, new)
            except Exception as error:  # noqa: BLE001
                if not _refusal_ok(spec, error):
                    fail(f"{spec.name}: {kind} of '{name}' raised {error!r}")
            else:
                fail(f"{spec.name}: {kind} of '{name}' was accepted")
            summary["functions"][spec.name] = summary["functions"].get(spec.name, 0) + 1
            summary["kinds"][kind] = summary["kinds"].get(kind, 0) + 1
        return run

    def valid_empty(spec: Spec):
        @settings(max_examples=max(examples // 8, 5), derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def run(data):
            values, _ = spec.build(data.draw, 0)
            check_valid(spec, values, "sizes >= 0")
            # a header without strides means compact row-major: valid
            name = data.draw(st.sampled_from([a.name for a in spec.args if isinstance(values[a.name], torch.Tensor)]))
            check_valid(spec, {**values, name: Crafted(values[name], strides=None,
                                                       device=(KDL_CUDA, 0) if spec.cuda else (KDL_CPU, 0))},
                        f"'{name}' without strides")
        return run

    for spec in specs:
        mismatched(spec)()
        if not spec.cuda or not caller.real_cuda:
            valid_empty(spec)()
    return summary


def test_fuzz_every_entry_point_refuses_mismatched_buffers():
    """The fuzz in a subprocess: exit status 0 (no signal) and a summary with no failure."""
    C = _native_or_skip()
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, __file__, "fuzz", "150"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert done.returncode >= 0, f"the fuzz died of signal {-done.returncode}:\n{done.stderr[-3000:]}"
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["failures"] == [], "\n".join(summary["failures"])
    expected = {s.name for s in SPECS if hasattr(C, s.name)}
    if C.build_info()["cuda"] and C.cuda_device_count() and not torch.cuda.is_available():
        expected -= {s.name for s in SPECS if s.cuda}
    assert set(summary["functions"]) == expected, summary
    assert set(summary["kinds"]) == set(KINDS), summary
    assert sum(summary["functions"].values()) >= 50 * len(expected) and summary["valid"] >= 150 * len(expected)


# ---------------------------------------------------------------------------------------------
# Reproducers through the public API, in a subprocess: they used to kill the process

def _run_script(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MTLFAST_BACKEND": "cpu"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def test_public_reproducers_raise_instead_of_crashing():
    _native_or_skip()
    script = r"""
import torch, mtlfast.nn as mnn
cases = {
    "float64 module, float32 input": lambda: mnn.SparseSharingLSTM(3, 4, num_tasks=2).double()(
        torch.randn(5, 2, 3), task=0),
    "meta hx": lambda: mnn.SparseSharingLSTM(3, 4, num_tasks=2)(
        torch.randn(5, 2, 3), hx=(torch.zeros(1, 2, 4, device="meta"),) * 2, task=0),
}
for name, case in cases.items():
    try:
        case()
    except Exception as error:
        print(f"{name}: raised {type(error).__name__}")
    else:
        print(f"{name}: no error")
"""
    done = _run_script(script)
    assert done.returncode >= 0, f"killed by signal {-done.returncode}: {done.stderr[-3000:]}"
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and all(": raised " in line for line in lines), done.stdout


def test_native_reproducers_raise_instead_of_crashing():
    """The same mistakes one level down, straight into mtlfast._C (the module is public): a
    float32 buffer in a float64 call, and a buffer that is not on the CPU."""
    _native_or_skip()
    script = r"""
import torch
from mtlfast import _C
cap = torch._C._to_dlpack
G, T, B, H = 2, 5, 2, 4
f64 = dict(dtype=torch.float64)
args = [torch.randn(G, T, B, 4 * H, **f64), torch.randn(G, 4 * H, H, **f64), torch.randn(G, B, H),
        torch.randn(G, B, H, **f64), torch.full((G, B), T), torch.zeros(G, dtype=torch.bool),
        torch.empty(G, T, B, H, **f64), None, None, None, torch.empty(G, B, H, **f64), torch.empty(G, B, H, **f64)]
try:
    _C.lstm_forward(*[None if a is None else cap(a) for a in args], 1)
except TypeError as error:
    print(error)
"""
    done = _run_script(script)
    assert done.returncode == 0, f"return code {done.returncode}: {done.stderr[-3000:]}"
    assert done.stdout.strip() == ("mtlfast._C.lstm_forward: argument 'h0' must have the dtype of 'xproj' "
                                   "(float64), got float32"), done.stdout


# ---------------------------------------------------------------------------------------------
# Messages and the allowed exceptions, in process (all of these are refused before any kernel)

def _cap(t):
    return None if t is None else torch._C._to_dlpack(t)


def test_messages_name_function_argument_expected_and_given():
    C = _native_or_skip()
    G, T, B, H = 2, 3, 3, 4
    x = torch.randn(G, T, B, 4 * H)
    args = dict(xproj=x, w=torch.randn(G, 4 * H, H), h0=torch.randn(G, B, H + 1), c0=torch.randn(G, B, H),
                lengths=torch.full((G, B), T), reverse=torch.zeros(G, dtype=torch.bool),
                hs=torch.empty(G, T, B, H), gates=None, cells=None, h_prev=None, h_n=torch.empty(G, B, H),
                c_n=torch.empty(G, B, H))
    with pytest.raises(ValueError) as info:
        C.lstm_forward(*map(_cap, args.values()), 1)
    assert str(info.value) == ("mtlfast._C.lstm_forward: argument 'h0' must have shape (G, B, H) = (2, 3, 4), "
                               "got (2, 3, 5)")
    args["h0"] = torch.randn(G, B, H)
    args["lengths"] = torch.tensor([[0, 1, 2], [3, 4, 0]])
    with pytest.raises(ValueError, match=r"argument 'lengths' must have values in \[0, T\] = \[0, 3\], got 4"):
        C.lstm_forward(*map(_cap, args.values()), 1)
    args["lengths"] = torch.full((G, B), T)
    with pytest.raises(ValueError, match=r"argument 'threads' must be in \[1, 1024\], got 0"):
        C.lstm_forward(*map(_cap, args.values()), 0)
    with pytest.raises(TypeError, match=r"argument 'xproj' must be a DLPack capsule .* got int"):
        C.lstm_forward(x.data_ptr(), *map(_cap, list(args.values())[1:]), 1)
    args["gates"] = torch.empty(G, T, B, 4 * H)
    with pytest.raises(TypeError, match=r"argument 'cells' must be a DLPack capsule \(torch._C._to_dlpack\(tensor\)\), "
                                        r"got NoneType"):
        C.lstm_forward(*map(_cap, args.values()), 1)
    args.update(gates=None, cells=torch.empty(G, T, B, H))
    with pytest.raises(ValueError, match=r"argument 'cells' must be None when 'gates' is None"):
        C.lstm_forward(*map(_cap, args.values()), 1)


def test_mask_select_in_place_is_allowed_partial_overlap_is_not():
    C = _native_or_skip()
    dw = torch.randn(2, 3, 5)
    masks = torch.rand(1, 3, 5) < 0.5
    mask_index = torch.tensor([0, -1])
    expected = torch.stack([torch.where(masks[0], dw[0], 0), dw[1]])
    C.mask_select(_cap(dw), None, _cap(masks), _cap(mask_index), _cap(dw), 1)
    assert torch.equal(dw, expected)
    base = torch.randn(2 * 3 * 5 + 1)
    with pytest.raises(ValueError, match="argument 'out' must not overlap argument 'src'"):
        C.mask_select(_cap(base[:30].view(2, 3, 5)), None, _cap(masks), _cap(mask_index),
                      _cap(base[1:].view(2, 3, 5)), 1)
    with pytest.raises(ValueError, match="argument 'out' must not overlap argument 'src'"):
        C.mask_select(_cap(dw), _cap(torch.tensor([1, 0])), None, _cap(mask_index), _cap(dw), 1)


def test_cuda_entry_points_refuse_host_buffers_and_int_streams():
    C = _native_or_skip()
    if not C.build_info()["cuda"]:
        pytest.skip("built without CUDA kernels")
    x, w, bits, out = torch.randn(3, 8), torch.randn(5, 8), torch.zeros(5, 1, dtype=torch.int32), torch.empty(3, 5)
    with pytest.raises(ValueError, match=r"masked_linear_forward: argument 'x' must be on cuda, got cpu"):
        C.masked_linear_forward(_cap(x), _cap(w), _cap(bits), None, _cap(out), 0)
    crafted = [Crafted(t, device=(KDL_CUDA, 0)) for t in (x, w, bits, out)]
    with pytest.raises(TypeError, match=r"argument 'stream' must be a torch.cuda.Stream"):
        C.masked_linear_forward(*[c.capsule() for c in crafted[:3]], None, crafted[3].capsule(), 0)
    with pytest.raises(ValueError, match=r"argument 'stream' must be a stream of cuda:0"):
        C.masked_linear_forward(*[c.capsule() for c in crafted[:3]], None, crafted[3].capsule(),
                                FakeStream(device_index=1))


# ---------------------------------------------------------------------------------------------
# Semantics the hardening changed in the native kernels

def test_masked_out_inf_and_nan_weights_change_nothing_on_cpu():
    """A select, not a product: inf or NaN outside the mask gives the outputs and gradients of 0
    there (0 * inf would be NaN)."""
    _native_or_skip()
    import mtlfast
    import mtlfast.functional  # noqa: F401 - registers the ops
    from mtlfast.ops.masked_lstm import masked_lstm_layer

    G, T, B, I, H = 2, 4, 3, 5, 6
    torch.manual_seed(0)
    x, h0, c0 = torch.randn(G, T, B, I), torch.randn(G, B, H), torch.randn(G, B, H)
    w_ih, w_hh = torch.randn(1, 4 * H, I) * 0.3, torch.randn(1, 4 * H, H) * 0.3
    b_ih, b_hh = torch.randn(1, 4 * H), torch.randn(1, 4 * H)
    masks_ih, masks_hh = torch.rand(2, 4 * H, I) < 0.6, torch.rand(2, 4 * H, H) < 0.6
    outside = ~(masks_ih[0] | masks_ih[1]), ~(masks_hh[0] | masks_hh[1])   # masked out in both groups
    index, mask_index = torch.zeros(G, dtype=torch.int64), torch.tensor([0, 1])
    lengths, reverse = torch.tensor([[4, 2, 3], [1, 4, 4]]), torch.tensor([False, True])

    def run(poison: Optional[float]):
        wi, wh = w_ih.clone(), w_hh.clone()
        fill = 0.0 if poison is None else poison
        wi[0][outside[0]] = fill
        wh[0][outside[1]] = fill
        leaves = [t.clone().requires_grad_() for t in (x, h0, c0, wi, wh)]
        with mtlfast.use_backend("cpu"):
            y, h_n, c_n = masked_lstm_layer(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], b_ih, b_hh, index,
                                            masks_ih, masks_hh, mask_index, lengths, reverse)
        (y.sum() + h_n.sum() + c_n.sum()).backward()
        return [y, h_n, c_n] + [t.grad for t in leaves]

    expected = run(None)
    for poison in (math.inf, -math.inf, math.nan):
        got = run(poison)
        for name, a, b in zip(["y", "h_n", "c_n", "dx", "dh0", "dc0", "dw_ih", "dw_hh"], got, expected):
            assert torch.equal(a, b), f"{name} changed by a masked-out {poison}"


def _pairs_logits(n: int, first: float, second: float) -> torch.Tensor:
    return torch.tensor([[first, second]], dtype=torch.float64).expand(n, 2).contiguous()


def test_float64_pairs_keep_their_difference():
    """(1e8 + 3, 1e8) is a difference of 3 in float64 (0 once rounded to float32): z = 1 with
    probability sigmoid(3) = 0.953, not 0.5."""
    _native_or_skip()
    import mtlfast
    import mtlfast.functional as MF
    torch.manual_seed(0)
    with mtlfast.use_backend("cpu"):
        z = MF.gumbel_pairs(_pairs_logits(20000, 1e8 + 3, 1e8), tau=1.0, hard=True)
    assert abs(z.mean().item() - 1 / (1 + math.exp(-3))) < 0.01


def test_float64_pairs_of_huge_equal_logits_are_finite():
    _native_or_skip()
    import mtlfast
    import mtlfast.functional as MF
    torch.manual_seed(0)
    with mtlfast.use_backend("cpu"):
        z = MF.gumbel_pairs(_pairs_logits(20000, 1e300, 1e300), tau=1.0, hard=False)
    assert torch.isfinite(z).all() and ((z > 0) & (z < 1)).all()
    assert abs(z.mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("pairs", [False, True], ids=["sigmoid", "pairs"])
def test_tiny_tau_gives_finite_float64_gradients(pairs):
    """tau = 1e-50 is a normal float64: computed in float64, sigmoid'(v / tau) / tau is 0 or
    large but never NaN or inf; in float32 it would underflow to 0 (refused, see below)."""
    _native_or_skip()
    from mtlfast.ops import gumbel_cpu
    torch.manual_seed(0)
    logits = torch.randn(1000, 2, dtype=torch.float64) if pairs else torch.randn(1000, dtype=torch.float64)
    logits[:3] = 0.0
    tau = torch.tensor(1e-50, dtype=torch.float64)
    forward = gumbel_cpu.gumbel_pairs_forward if pairs else gumbel_cpu.gumbel_sigmoid_forward
    backward = gumbel_cpu.gumbel_pairs_backward if pairs else gumbel_cpu.gumbel_sigmoid_backward
    soft = forward(logits, tau, 1234, False)
    grad = backward(torch.ones_like(soft), logits, tau, 1234)
    assert torch.isfinite(soft).all() and torch.isfinite(grad).all()
    assert torch.equal(forward(logits, tau, 1234, True), (soft > 0.5).to(soft.dtype))


def test_tau_outside_the_dtype_normal_range_is_refused():
    C = _native_or_skip()
    x, z = torch.randn(4), torch.empty(4)
    with pytest.raises(ValueError, match=r"gumbel_sigmoid_forward: argument 'tau' must be a positive finite number "
                                         r"in the normal range of float32 .* got 1e-50"):
        C.gumbel_sigmoid_forward(_cap(x), 1e-50, 0, False, _cap(z), 1)
    with pytest.raises(ValueError, match=r"normal range of float64 .* got 1e-310"):
        C.gumbel_sigmoid_backward(_cap(x.double()), _cap(x.double()), 1e-310, 0, _cap(z.double()), 1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["fuzz"]:
        print(json.dumps(fuzz(int(sys.argv[2]))))
