// Straight-through Gumbel sampling on CPU with counter-based noise: element i of a call keyed by
// `seed` draws u = ((philox(seed, i) >> 9) + 0.5) * 2^-23, bit for bit the stream of Triton's
// tl.randint (Philox4x32-10, counter (i_lo, i_hi, 0, 0), key (seed_lo, seed_hi)) and of
// mtlfast/ops/philox.py, so every backend draws the same sample. u is never 0 or 1, so the
// noise is always finite. Backward recomputes the noise from (seed, i) instead of storing it.
// Framework-free (DESIGN.md).
#pragma once
#include <cstdint>

namespace mtlfast {
namespace cpu {

// out[i] = u for offsets offset0 .. offset0 + n - 1 (float32).
void philox_uniform(uint64_t seed, int64_t offset0, int64_t n, float* out, int threads);

// Pairs (N, 2): d = x[n, 0] - x[n, 1], L = logistic noise of element n; soft = sigmoid((d + L) / tau);
// z[n] = hard ? (d + L > 0) : soft. With pairs == false, x is (N,) and d = x[n].
// Everything after the noise is computed in T, with tau as T: float64 logits keep their float64
// difference (a pair (1e8 + 3, 1e8) is d = 3, not the 0 of a float32 difference). The noise is
// the float32 stream's, converted to T, so every backend and dtype draws the same sample.
// tau must be in T's normal range (the binding checks): then no finite input gives NaN.
template <typename T>
void gumbel_sigmoid_forward(int64_t N, bool pairs, const T* x, double tau, uint64_t seed, bool hard, T* z,
                            int threads);

// dx from dz: g = dz * (soft * (1 - soft) / tau); dx[n] = g (or (g, -g) for pairs).
template <typename T>
void gumbel_sigmoid_backward(int64_t N, bool pairs, const T* dz, const T* x, double tau, uint64_t seed, T* dx,
                             int threads);

}  // namespace cpu
}  // namespace mtlfast
