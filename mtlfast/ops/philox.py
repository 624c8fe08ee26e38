"""The counter-based noise behind the Gumbel-Matrix kernels, in pure PyTorch (CPU or CUDA tensors).

Element i of a sample keyed by `seed` draws x = Philox4x32-10(counter (i_lo, i_hi, 0, 0), key
(seed_lo, seed_hi)), word 0: exactly what Triton's ``tl.randint(seed, i)`` returns, so the
reference backend, the Triton kernels and the tests see the same bits, and a backward pass
recomputes the noise from (seed, index) instead of storing it.

Uniform: u = ((x >> 9) + 0.5) * 2**-23. The top 23 bits, not 24: (k + 0.5) needs one bit more than
k, and fp32 holds 24, so with 24-bit k the midpoints of the upper half are not representable and
k = 2**24 - 1 rounds to u = 1 (ties to even). With 23 bits every u is exact, u lies in
[2**-24, 1 - 2**-24] and 1 - u is exact too (so logistic noise is exactly antisymmetric in x ->
~x); log(u), log(1 - u) and -log(-log(u)) are all finite.

torch has no uint32 arithmetic with wraparound on every device, so words are held in int64 and a
32x32 -> 64-bit product is formed from the constant's 16-bit halves (each partial < 2**48).
"""
from __future__ import annotations

import torch

# Philox4x32 constants (Salmon et al. 2011; triton/language/random.py)
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
# u = (k + 0.5) * 2**-23 with k the top 23 bits of x
UNIFORM_SHIFT = 9
UNIFORM_SCALE = 2.0 ** -23


def _mul_hi_lo(a: int, b: torch.Tensor):
    """(high, low) 32-bit words of the 64-bit product a * b, a a 32-bit constant, b int64 holding
    uint32 values. a = a_hi * 2**16 + a_lo, so a * b = (a_hi * b) * 2**16 + a_lo * b with both
    partial products below 2**48; hi = (a_hi * b + (a_lo * b >> 16)) >> 16 (nested floors)."""
    p_hi = b * (a >> 16)
    p_lo = b * (a & 0xFFFF)
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox_randint(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """seed: int in [0, 2**64), offsets: int64 tensor (any shape, >= 0) -> int64 tensor of the same
    shape holding the uint32 values of ``tl.randint(seed, offsets)``."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected an int in [0, 2**64), got {seed!r}")
    if offsets.dtype != torch.int64:
        raise TypeError(f"offsets: expected an int64 tensor, got {offsets.dtype}")
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(offsets)
    c3 = torch.zeros_like(offsets)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0


def uniform_from_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 tensor of uint32 values -> float32 u = ((x >> 9) + 0.5) * 2**-23, exact, in (0, 1)."""
    return ((x >> UNIFORM_SHIFT).to(torch.float32) + 0.5) * UNIFORM_SCALE


def uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """float32 uniform noise in (0, 1) (never 0 or 1) at the int64 `offsets` of stream `seed`."""
    return uniform_from_bits(philox_randint(seed, offsets))


def logistic_noise(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """float32 L = log(u) - log(1 - u), finite (|L| < 16.7)."""
    u = uniform(seed, offsets)
    return torch.log(u) - torch.log(1 - u)


def gumbel_noise(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """float32 g = -log(-log(u)), finite (-2.8 < g < 16.7)."""
    u = uniform(seed, offsets)
    return -torch.log(-torch.log(u))
