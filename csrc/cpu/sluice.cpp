// Loops over a row's d contiguous elements with restrict-qualified pointers: the shape gcc
// vectorises. A row of every chunk (M*S*d elements) stays in L1 while all outputs of the row are
// formed, so each element comes from memory once.
#include "cpu/sluice.h"

#include <algorithm>
#include <vector>

#include "cpu/clones.h"
#include "cpu/parallel.h"

namespace mtlfast {
namespace cpu {
namespace {

// Rows per thread below which a second thread costs more than it saves.
constexpr int64_t kMinElementsPerThread = 1 << 16;

int team_for(int threads, int64_t elements) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, elements / kMinElementsPerThread)));
}

// out[e] = sum_j coef[j] * in[j][e] for e < n, kBlock elements at a time: the block's sum stays
// in registers over all j and is stored once (the sluice chunks are short, d = 50: accumulating
// in out itself wrote every output count + 1 times).
constexpr int64_t kBlock = 16;

template <typename T>
inline void combine(int64_t n, int64_t count, const T* const* in, const T* coef, T* __restrict out) {
  for (int64_t e0 = 0; e0 < n; e0 += kBlock) {
    T acc[kBlock] = {};
    if (n - e0 >= kBlock) {
      for (int64_t j = 0; j < count; ++j) {
        const T c = coef[j];
        const T* __restrict src = in[j] + e0;
        for (int64_t e = 0; e < kBlock; ++e) acc[e] += c * src[e];
      }
      for (int64_t e = 0; e < kBlock; ++e) out[e0 + e] = acc[e];
    } else {
      for (int64_t j = 0; j < count; ++j) {
        const T c = coef[j];
        const T* __restrict src = in[j] + e0;
        for (int64_t e = 0; e < n - e0; ++e) acc[e] += c * src[e];
      }
      for (int64_t e = 0; e < n - e0; ++e) out[e0 + e] = acc[e];
    }
  }
}

template <typename T>
inline double dot(int64_t n, const T* __restrict a, const T* __restrict b) {
  T acc = T(0);
  for (int64_t e = 0; e < n; ++e) acc += a[e] * b[e];
  return static_cast<double>(acc);
}

// One thread's rows of alpha_mix forward (alpha_t = alpha) or of dh (alpha_t = alpha transposed).
template <typename T>
MTLFAST_CLONES void alpha_mix_rows(int64_t begin, int64_t end, int64_t M, int64_t S, int64_t N, int64_t d,
                                   const T* in, const T* coef, T* out) {
  const int64_t C = M * S, D = S * d;
  std::vector<const T*> chunk(C);
  for (int64_t n = begin; n < end; ++n) {
    for (int64_t j = 0; j < C; ++j) chunk[j] = in + ((j / S) * N + n) * D + (j % S) * d;
    for (int64_t i = 0; i < C; ++i) {
      combine(d, C, chunk.data(), coef + i * C, out + ((i / S) * N + n) * D + (i % S) * d);
    }
  }
}

template <typename T>
MTLFAST_CLONES void alpha_grad_rows(int64_t begin, int64_t end, int64_t M, int64_t S, int64_t N, int64_t d,
                                    const T* dout, const T* h, double* partial) {
  const int64_t C = M * S, D = S * d;
  for (int64_t n = begin; n < end; ++n) {
    for (int64_t i = 0; i < C; ++i) {
      const T* g = dout + ((i / S) * N + n) * D + (i % S) * d;
      for (int64_t j = 0; j < C; ++j) partial[i * C + j] += dot(d, g, h + ((j / S) * N + n) * D + (j % S) * d);
    }
  }
}

template <typename T>
MTLFAST_CLONES void layer_mix_rows(int64_t begin, int64_t end, int64_t K, int64_t M, int64_t N, int64_t D,
                                   const T* layers, const T* beta, T* out) {
  std::vector<const T*> rows(K);
  for (int64_t mn = begin; mn < end; ++mn) {  // mn = m * N + n
    const int64_t m = mn / N;
    for (int64_t k = 0; k < K; ++k) rows[k] = layers + (k * M * N + mn) * D;
    combine(D, K, rows.data(), beta + m * K, out + mn * D);
  }
}

template <typename T>
MTLFAST_CLONES void layer_grad_rows(int64_t begin, int64_t end, int64_t K, int64_t M, int64_t N, int64_t D,
                                    const T* dout, const T* layers, const T* beta, T* dlayers, double* partial) {
  for (int64_t mn = begin; mn < end; ++mn) {
    const int64_t m = mn / N;
    const T* __restrict g = dout + mn * D;
    for (int64_t k = 0; k < K; ++k) {
      const T* src = layers + (k * M * N + mn) * D;
      T* __restrict dst = dlayers + (k * M * N + mn) * D;
      const T b = beta[m * K + k];
      for (int64_t e = 0; e < D; ++e) dst[e] = b * g[e];
      partial[m * K + k] += dot(D, g, src);
    }
  }
}

// Runs rows [0, rows) over a team, each thread with its own zeroed double accumulator of `size`,
// and writes the sum of the accumulators to out.
template <typename T, typename F>
void reduce_rows(int64_t rows, int64_t elements, int threads, int64_t size, T* out, F&& body) {
  const int team = team_for(threads, elements);
  std::vector<double> partials(static_cast<size_t>(team) * size, 0.0);
  int used = team;
  run_team(team, [&](int t, int n, SpinBarrier&) {
    if (t == 0) used = n;
    int64_t begin, end;
    split(rows, t, n, &begin, &end);
    body(begin, end, partials.data() + t * size);
  });
  for (int64_t i = 0; i < size; ++i) {
    double total = 0.0;
    for (int t = 0; t < used; ++t) total += partials[t * size + i];
    out[i] = static_cast<T>(total);
  }
}

template <typename T, typename F>
void for_rows(int64_t rows, int64_t elements, int threads, F&& body) {
  run_team(team_for(threads, elements), [&](int t, int n, SpinBarrier&) {
    int64_t begin, end;
    split(rows, t, n, &begin, &end);
    body(begin, end);
  });
}

}  // namespace

template <typename T>
void alpha_mix_forward(int64_t M, int64_t S, int64_t N, int64_t d, const T* h, const T* alpha, T* out,
                       int threads) {
  for_rows<T>(N, M * N * S * d, threads,
              [&](int64_t begin, int64_t end) { alpha_mix_rows(begin, end, M, S, N, d, h, alpha, out); });
}

template <typename T>
void alpha_mix_backward(int64_t M, int64_t S, int64_t N, int64_t d, const T* dout, const T* h, const T* alpha,
                        T* dh, T* dalpha, int threads) {
  const int64_t C = M * S;
  std::vector<T> alpha_t(C * C);
  for (int64_t i = 0; i < C; ++i)
    for (int64_t j = 0; j < C; ++j) alpha_t[j * C + i] = alpha[i * C + j];
  reduce_rows(N, 2 * M * N * S * d, threads, C * C, dalpha, [&](int64_t begin, int64_t end, double* partial) {
    alpha_mix_rows(begin, end, M, S, N, d, dout, alpha_t.data(), dh);
    alpha_grad_rows(begin, end, M, S, N, d, dout, h, partial);
  });
}

template <typename T>
void layer_mix_forward(int64_t K, int64_t M, int64_t N, int64_t D, const T* layers, const T* beta, T* out,
                       int threads) {
  for_rows<T>(M * N, K * M * N * D, threads,
              [&](int64_t begin, int64_t end) { layer_mix_rows(begin, end, K, M, N, D, layers, beta, out); });
}

template <typename T>
void layer_mix_backward(int64_t K, int64_t M, int64_t N, int64_t D, const T* dout, const T* layers, const T* beta,
                        T* dlayers, T* dbeta, int threads) {
  reduce_rows(M * N, 2 * K * M * N * D, threads, M * K, dbeta, [&](int64_t begin, int64_t end, double* partial) {
    layer_grad_rows(begin, end, K, M, N, D, dout, layers, beta, dlayers, partial);
  });
}

#define MTLFAST_INSTANTIATE(T)                                                                                   \
  template void alpha_mix_forward<T>(int64_t, int64_t, int64_t, int64_t, const T*, const T*, T*, int);           \
  template void alpha_mix_backward<T>(int64_t, int64_t, int64_t, int64_t, const T*, const T*, const T*, T*, T*, \
                                      int);                                                                     \
  template void layer_mix_forward<T>(int64_t, int64_t, int64_t, int64_t, const T*, const T*, T*, int);           \
  template void layer_mix_backward<T>(int64_t, int64_t, int64_t, int64_t, const T*, const T*, const T*, T*, T*, \
                                      int);
MTLFAST_INSTANTIATE(float)
MTLFAST_INSTANTIATE(double)
#undef MTLFAST_INSTANTIATE

}  // namespace cpu
}  // namespace mtlfast
