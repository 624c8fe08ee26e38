// Straight-through Gumbel sampling on CPU with counter-based noise (csrc/cpu/philox.h: element i
// of a call keyed by `seed` draws the Philox stream of Triton's tl.randint and of
// mtlfast/ops/philox.py, bit for bit, so every backend draws the same sample). Backward recomputes
// the noise from (seed, i) instead of storing it. Framework-free (DESIGN.md).
//
// Everything after the noise is computed in T, with tau as T: float64 logits keep their float64
// differences (a pair (1e8 + 3, 1e8) is d = 3, not the 0 of a float32 difference). The noise is
// the float32 stream's, converted to T, so every backend and dtype draws the same sample. tau must
// be in T's normal range (the binding checks): then no finite input gives NaN.
//
// The forwards read every logit anyway, so they also say whether all of them are finite (the
// op's validation, without a pass of its own): they return false if one is inf or NaN, and then
// their output is meaningless.
#pragma once
#include <cstdint>

namespace mtlfast {
namespace cpu {

// out[i] = u for offsets offset0 .. offset0 + n - 1 (float32).
void philox_uniform(uint64_t seed, int64_t offset0, int64_t n, float* out, int threads);

// Pairs (N, 2): d = x[n, 0] - x[n, 1], L = logistic noise of element n; soft = sigmoid((d + L) / tau);
// z[n] = hard ? (d + L > 0) : soft. With pairs == false, x is (N,) and d = x[n].
template <typename T>
bool gumbel_sigmoid_forward(int64_t N, bool pairs, const T* x, double tau, uint64_t seed, bool hard, T* z,
                            int threads);

// dx from dz: g = dz * (soft * (1 - soft) / tau); dx[n] = g (or (g, -g) for pairs).
template <typename T>
void gumbel_sigmoid_backward(int64_t N, bool pairs, const T* dz, const T* x, double tau, uint64_t seed, T* dx,
                             int threads);

// Rows x (R, C), g Gumbel noise of element r * C + c: soft = softmax((x + g - max_c(x + g)) / tau)
// per row; y = hard ? one_hot(first argmax of soft) : soft.
template <typename T>
bool gumbel_softmax_forward(int64_t R, int64_t C, const T* x, double tau, uint64_t seed, bool hard, T* y,
                            int threads);

// dx = soft * (dy - sum_c(dy * soft)) / tau per row, soft recomputed from the seed.
template <typename T>
void gumbel_softmax_backward(int64_t R, int64_t C, const T* dy, const T* x, double tau, uint64_t seed, T* dx,
                             int threads);

}  // namespace cpu
}  // namespace mtlfast
