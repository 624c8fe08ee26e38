"""The CPU LSTM recurrences (csrc/cpu/masked_lstm.cpp) come in two vector widths, picked at run time:
AVX-512 (64-byte vectors, 8-row tiles) where the CPU has it, else AVX2 (32-byte, 6-row tiles).
Both against the reference, outputs and every gradient, at sizes that leave tails in every tile
dimension (hidden not a multiple of 8 or 16 units, batch not a multiple of 6 or 8 rows), with
lengths and reverse groups. The width this machine does not pick by itself runs in a subprocess
with MTLFAST_CPU_VECTOR_BITS=256 (a no-op where the CPU has no AVX-512: both runs are then AVX2)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mtlfast
import mtlfast.functional as MF
from tests.helpers import assert_close, backend_skip

pytestmark = backend_skip("cpu", torch.device("cpu"))

# (groups, steps, batch, input, hidden): tails of 8 and 16 units, of 6 and 8 rows, batch 1
SIZES = ((4, 5, 13, 7, 17), (2, 3, 1, 3, 33), (3, 4, 9, 5, 1))


def _inputs(G: int, T: int, B: int, I: int, H: int, dtype: torch.dtype) -> tuple:
    g = torch.Generator().manual_seed(G * 100 + H)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()  # noqa: E731
    lengths = torch.randint(0, T + 1, (G, B), generator=g)
    lengths[:, 0] = T                       # at least one full row per group
    return (rand(G, T, B, I), rand(G, B, H), rand(G, B, H), rand(G, 4 * H, I, scale=H ** -0.5),
            rand(G, 4 * H, H, scale=H ** -0.5), rand(G, 4 * H), rand(G, 4 * H), torch.arange(G), None, None,
            torch.full((G,), -1), lengths, torch.arange(G) % 2 == 1)


def check_every_size() -> None:
    """masked_lstm_layer on the cpu backend against the float64 reference at SIZES, float32 and
    float64: y, h_n, c_n and the gradients of x, h0, c0, w_ih, w_hh and both biases."""
    from mtlfast.ops.masked_lstm import masked_lstm_layer_reference

    for dtype in (torch.float32, torch.float64):
        for size in SIZES:
            ours = _inputs(*size, dtype)
            ref = [t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) and t.requires_grad else t
                   for t in ours]
            with mtlfast.use_backend("cpu"):
                got = MF.masked_lstm_layer(*ours)
            want = masked_lstm_layer_reference(*ref)
            grads = [torch.randn_like(w) for w in want]
            for name, a, b in zip(("y", "h_n", "c_n"), got, want):
                assert_close(a, b, dtype, f"{name} at {size}")
            torch.autograd.backward(got, [g.to(dtype) for g in grads])
            torch.autograd.backward(want, grads)
            for i, (a, b) in enumerate(zip(ours, ref)):
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    assert_close(a.grad, b.grad, dtype, f"gradient of argument {i} at {size}")


def test_default_width():
    check_every_size()


def test_avx2_width_in_a_subprocess():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MTLFAST_CPU_VECTOR_BITS": "256"}
    result = subprocess.run([sys.executable, "-c", "from tests.test_cpu_vector_width import check_every_size; "
                             "check_every_size()"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
