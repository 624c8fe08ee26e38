// Sluice-network mixing on CPU: alpha mixing of the M*S subspace chunks of M task outputs, and
// beta mixing of K layer outputs per task. Both are memory-bound: one pass reads every input
// element once and writes every output element once; the backward pass also accumulates the
// mixing-weight gradient, per thread in double, reduced at the end. Framework-free (DESIGN.md).
#pragma once
#include <cstdint>

namespace mtlfast {
namespace cpu {

// h, out: (M, N, S*d) contiguous; chunk i = m*S + s of row n is h[m, n, s*d:(s+1)*d].
// out chunk i = sum_j alpha[i, j] * chunk j; alpha (M*S, M*S) row-major.
template <typename T>
void alpha_mix_forward(int64_t M, int64_t S, int64_t N, int64_t d, const T* h, const T* alpha, T* out,
                       int threads);

// dh chunk j = sum_i alpha[i, j] * dout chunk i; dalpha[i, j] = sum over rows and columns of
// dout chunk i * h chunk j. dh and dalpha are written (not accumulated).
template <typename T>
void alpha_mix_backward(int64_t M, int64_t S, int64_t N, int64_t d, const T* dout, const T* h, const T* alpha,
                        T* dh, T* dalpha, int threads);

// layers (K, M, N, D), out (M, N, D), beta (M, K): out[m] = sum_k beta[m, k] * layers[k, m].
template <typename T>
void layer_mix_forward(int64_t K, int64_t M, int64_t N, int64_t D, const T* layers, const T* beta, T* out,
                       int threads);

// dlayers[k, m] = beta[m, k] * dout[m]; dbeta[m, k] = sum of dout[m] * layers[k, m].
template <typename T>
void layer_mix_backward(int64_t K, int64_t M, int64_t N, int64_t D, const T* dout, const T* layers, const T* beta,
                        T* dlayers, T* dbeta, int threads);

}  // namespace cpu
}  // namespace mtlfast
