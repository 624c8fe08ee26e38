#include "cpu/gumbel.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/clones.h"
#include "cpu/parallel.h"
#include "cpu/philox.h"
#include "cpu/vector_math.h"

namespace mtlfast {
namespace cpu {
namespace {

// Elements per block: the noise and the intermediate values of a block stay in L1, and each pass
// over a block is a loop gcc vectorises.
constexpr int64_t kBlock = 256;

// Below this many elements one thread does it all: a second costs more than it saves.
constexpr int64_t kMinPerThread = 1 << 13;

template <typename F>
void for_range(int64_t n, int64_t min_per_thread, int threads, F&& body) {
  const int team = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n / min_per_thread)));
  run_team(team, [&](int t, int count, SpinBarrier&) {
    int64_t begin, end;
    split(n, t, count, &begin, &end);
    if (begin < end) body(begin, end);
  });
}

// Helpers of the clones are inlined into them (csrc/cpu/clones.h).
#define MTLFAST_INLINE inline __attribute__((always_inline))

// Whether v is finite: v * 0 is NaN for ±inf and NaN (a compare gcc vectorises, unlike isfinite).
template <typename T>
MTLFAST_INLINE bool finite(T v) { return v * T(0) == T(0); }

// e[j] = e^{-|y[j]|} in [0, 1] for j < n: never overflows, so neither sigmoid(y) nor sigmoid'(y)
// can be NaN for any y that is not NaN, ±inf included (e = 0 there). 8 lanes at a time in float32
// (within 2 ulp of libm); float64 is the correctness path and calls libm.
MTLFAST_INLINE void exp_neg_abs(const float* y, float* e, int64_t n) {
  map_floats(y, e, n, [](VFloat v) { return vexp_nonpositive(-vabs(v)); },
             [](float v) { return std::exp(-std::fabs(v)); });
}

MTLFAST_INLINE void exp_neg_abs(const double* y, double* e, int64_t n) {
  for (int64_t j = 0; j < n; ++j) e[j] = std::exp(-std::fabs(y[j]));
}

// v[j] = d + L of element begin + j (d the pair's difference in T, before any rounding to
// float32), y[j] = v[j] / tau and e[j] = e^{-|y[j]|}, for a block of at most kBlock elements;
// returns whether every logit read is finite.
template <typename T>
MTLFAST_INLINE bool sigmoid_block(int64_t begin, int64_t n, bool pairs, const T* x, T tau, uint64_t seed, T* v, T* y,
                          T* e, bool need_exp) {
  float noise[kBlock];
  noise_into(Noise::kLogistic, seed, static_cast<uint64_t>(begin), n, noise);
  bool ok = true;
  if (pairs) {
    const T* p = x + 2 * begin;
    for (int64_t j = 0; j < n; ++j) {
      ok &= finite(p[2 * j]) & finite(p[2 * j + 1]);
      v[j] = (p[2 * j] - p[2 * j + 1]) + static_cast<T>(noise[j]);
    }
  } else {
    const T* p = x + begin;
    for (int64_t j = 0; j < n; ++j) {
      ok &= finite(p[j]);
      v[j] = p[j] + static_cast<T>(noise[j]);
    }
  }
  if (need_exp) {
    for (int64_t j = 0; j < n; ++j) y[j] = v[j] / tau;
    exp_neg_abs(y, e, n);
  }
  return ok;
}

template <typename T>
MTLFAST_CLONES bool sigmoid_forward_range(int64_t begin, int64_t end, bool pairs, const T* x, T tau, uint64_t seed,
                                          bool hard, T* z) {
  T v[kBlock], y[kBlock], e[kBlock];
  bool ok = true;
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    ok &= sigmoid_block(b, n, pairs, x, tau, seed, v, y, e, !hard);
    T* out = z + b;
    if (hard) {
      for (int64_t j = 0; j < n; ++j) out[j] = v[j] > T(0) ? T(1) : T(0);
    } else {
      for (int64_t j = 0; j < n; ++j) out[j] = (y[j] >= T(0) ? T(1) : e[j]) / (T(1) + e[j]);
    }
  }
  return ok;
}

template <typename T>
MTLFAST_CLONES void sigmoid_backward_range(int64_t begin, int64_t end, bool pairs, const T* dz, const T* x, T tau,
                                           uint64_t seed, T* dx) {
  T v[kBlock], y[kBlock], e[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    sigmoid_block(b, n, pairs, x, tau, seed, v, y, e, true);
    // sigmoid'(y) = e / (1 + e)^2: no 1 - s cancellation next to s = 1. tau is normal in T, so
    // slope / tau <= 0.25 / tau is finite: dz * it is never 0 * inf.
    for (int64_t j = 0; j < n; ++j) v[j] = dz[b + j] * (e[j] / ((T(1) + e[j]) * (T(1) + e[j])) / tau);
    if (pairs) {
      for (int64_t j = 0; j < n; ++j) {
        dx[2 * (b + j)] = v[j];
        dx[2 * (b + j) + 1] = -v[j];
      }
    } else {
      std::copy(v, v + n, dx + b);
    }
  }
}

// The soft samples of rows [r0, r0 + rows) of x (R, C) into soft (rows * C), noise and y as
// scratch of the same size; returns whether every logit read is finite.
template <typename T>
MTLFAST_INLINE bool soft_rows(int64_t r0, int64_t rows, int64_t C, const T* x, T tau, uint64_t seed, float* noise, T* y,
                      T* soft) {
  const int64_t n = rows * C;
  noise_into(Noise::kGumbel, seed, static_cast<uint64_t>(r0 * C), n, noise);
  const T* p = x + r0 * C;
  bool ok = true;
  for (int64_t j = 0; j < n; ++j) {
    ok &= finite(p[j]);
    y[j] = p[j] + static_cast<T>(noise[j]);
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* row = y + r * C;
    const T top = *std::max_element(row, row + C);
    // the max is subtracted before dividing: (v - max) / tau <= 0 cannot overflow for any tau > 0
    for (int64_t c = 0; c < C; ++c) row[c] = (row[c] - top) / tau;
  }
  exp_neg_abs(y, soft, n);  // y <= 0: e^{-|y|} = e^y
  for (int64_t r = 0; r < rows; ++r) {
    T* row = soft + r * C;
    T sum = T(0);
    for (int64_t c = 0; c < C; ++c) sum += row[c];  // >= 1: the max's term is e^0
    const T inv = T(1) / sum;
    for (int64_t c = 0; c < C; ++c) row[c] *= inv;
  }
  return ok;
}

// Rows per block: whole rows, about kBlock elements (one row when a row is wider).
inline int64_t block_rows(int64_t C) { return std::max<int64_t>(1, kBlock / C); }

template <typename T>
MTLFAST_CLONES bool softmax_forward_range(int64_t begin, int64_t end, int64_t C, const T* x, T tau, uint64_t seed,
                                          bool hard, T* out) {
  const int64_t per = block_rows(C);
  std::vector<float> noise(per * C);
  std::vector<T> y(per * C), soft(per * C);
  bool ok = true;
  for (int64_t r0 = begin; r0 < end; r0 += per) {
    const int64_t rows = std::min(per, end - r0);
    ok &= soft_rows(r0, rows, C, x, tau, seed, noise.data(), y.data(), soft.data());
    T* dst = out + r0 * C;
    if (!hard) {
      std::copy(soft.begin(), soft.begin() + rows * C, dst);
      continue;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = soft.data() + r * C;
      const int64_t best = std::max_element(row, row + C) - row;  // the first of equal maxima
      std::fill(dst + r * C, dst + (r + 1) * C, T(0));
      dst[r * C + best] = T(1);
    }
  }
  return ok;
}

template <typename T>
MTLFAST_CLONES void softmax_backward_range(int64_t begin, int64_t end, int64_t C, const T* dy, const T* x, T tau,
                                           uint64_t seed, T* dx) {
  const int64_t per = block_rows(C);
  std::vector<float> noise(per * C);
  std::vector<T> y(per * C), soft(per * C);
  for (int64_t r0 = begin; r0 < end; r0 += per) {
    const int64_t rows = std::min(per, end - r0);
    soft_rows(r0, rows, C, x, tau, seed, noise.data(), y.data(), soft.data());
    for (int64_t r = 0; r < rows; ++r) {
      const T* s = soft.data() + r * C;
      const T* g = dy + (r0 + r) * C;
      T dot = T(0);
      for (int64_t c = 0; c < C; ++c) dot += g[c] * s[c];
      T* d = dx + (r0 + r) * C;
      for (int64_t c = 0; c < C; ++c) d[c] = s[c] * (g[c] - dot) / tau;
    }
  }
}

// Runs body(begin, end) -> ok over the thread team's shares of n items; true if every share is.
template <typename F>
bool all_ok(int64_t n, int64_t min_per_thread, int threads, F&& body) {
  std::atomic<bool> ok{true};
  for_range(n, min_per_thread, threads, [&](int64_t begin, int64_t end) {
    if (!body(begin, end)) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

}  // namespace

void philox_uniform(uint64_t seed, int64_t offset0, int64_t n, float* out, int threads) {
  for_range(n, kMinPerThread, threads, [&](int64_t begin, int64_t end) {
    uniform_into(seed, static_cast<uint64_t>(offset0 + begin), end - begin, out + begin);
  });
}

template <typename T>
bool gumbel_sigmoid_forward(int64_t N, bool pairs, const T* x, double tau, uint64_t seed, bool hard, T* z,
                            int threads) {
  const T t = static_cast<T>(tau);
  return all_ok(N, kMinPerThread, threads, [&](int64_t begin, int64_t end) {
    return sigmoid_forward_range(begin, end, pairs, x, t, seed, hard, z);
  });
}

template <typename T>
void gumbel_sigmoid_backward(int64_t N, bool pairs, const T* dz, const T* x, double tau, uint64_t seed, T* dx,
                             int threads) {
  const T t = static_cast<T>(tau);
  for_range(N, kMinPerThread, threads, [&](int64_t begin, int64_t end) {
    sigmoid_backward_range(begin, end, pairs, dz, x, t, seed, dx);
  });
}

template <typename T>
bool gumbel_softmax_forward(int64_t R, int64_t C, const T* x, double tau, uint64_t seed, bool hard, T* y,
                            int threads) {
  if (R == 0 || C == 0) return true;  // nothing to read (and no row width to divide by)
  const T t = static_cast<T>(tau);
  return all_ok(R, std::max<int64_t>(1, kMinPerThread / C), threads, [&](int64_t begin, int64_t end) {
    return softmax_forward_range(begin, end, C, x, t, seed, hard, y);
  });
}

template <typename T>
void gumbel_softmax_backward(int64_t R, int64_t C, const T* dy, const T* x, double tau, uint64_t seed, T* dx,
                             int threads) {
  if (R == 0 || C == 0) return;
  const T t = static_cast<T>(tau);
  for_range(R, std::max<int64_t>(1, kMinPerThread / C), threads, [&](int64_t begin, int64_t end) {
    softmax_backward_range(begin, end, C, dy, x, t, seed, dx);
  });
}

#define MTLFAST_INSTANTIATE(T)                                                                                 \
  template bool gumbel_sigmoid_forward<T>(int64_t, bool, const T*, double, uint64_t, bool, T*, int);           \
  template void gumbel_sigmoid_backward<T>(int64_t, bool, const T*, const T*, double, uint64_t, T*, int);      \
  template bool gumbel_softmax_forward<T>(int64_t, int64_t, const T*, double, uint64_t, bool, T*, int);        \
  template void gumbel_softmax_backward<T>(int64_t, int64_t, const T*, const T*, double, uint64_t, T*, int);
MTLFAST_INSTANTIATE(float)
MTLFAST_INSTANTIATE(double)
#undef MTLFAST_INSTANTIATE

}  // namespace cpu
}  // namespace mtlfast
