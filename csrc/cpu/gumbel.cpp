#include "cpu/gumbel.h"

#include <algorithm>
#include <cmath>

#include "cpu/clones.h"
#include "cpu/parallel.h"

namespace mtlfast {
namespace cpu {
namespace {

inline uint32_t mulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Triton's philox_impl with 32-bit words; returns the first word of the block.
inline uint32_t philox(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u, kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  for (int round = 0; round < 10; ++round) {
    const uint32_t p0 = c0, p2 = c2;
    c0 = mulhi(kRoundB, p2) ^ c1 ^ k0;
    c2 = mulhi(kRoundA, p0) ^ c3 ^ k1;
    c1 = kRoundB * p2;
    c3 = kRoundA * p0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c0;
}

// 23 bits, not 24: (k + 0.5) * 2^-24 needs 25 significant bits, and next to 1 it rounds to 1.0.
inline float uniform(uint64_t seed, uint64_t offset) {
  return (static_cast<float>(philox(seed, offset) >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

inline float logistic(uint64_t seed, uint64_t offset) {
  const float u = uniform(seed, offset);
  return std::log(u) - std::log(1.0f - u);
}

// e = e^{-|y|} in [0, 1]: never overflows, so neither sigmoid(y) nor sigmoid'(y) can be NaN for
// any y that is not NaN, ±inf included (e = 0 there).
template <typename T>
inline T exp_neg_abs(T y) { return std::exp(-std::fabs(y)); }

template <typename T>
inline T sigmoid(T y) {
  const T e = exp_neg_abs(y);
  return (y >= T(0) ? T(1) : e) / (T(1) + e);
}

// sigmoid(y) * (1 - sigmoid(y)) = e / (1 + e)^2: no 1 - s cancellation next to s = 1, and
// exactly 0 (not 0 * inf) where y is ±inf.
template <typename T>
inline T sigmoid_slope(T y) {
  const T e = exp_neg_abs(y);
  return e / ((T(1) + e) * (T(1) + e));
}

// Below this many elements one thread does it all: a second costs more than it saves.
constexpr int64_t kMinPerThread = 1 << 14;

template <typename F>
void for_range(int64_t n, int threads, F&& body) {
  const int team = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n / kMinPerThread)));
  run_team(team, [&](int t, int count, SpinBarrier&) {
    int64_t begin, end;
    split(n, t, count, &begin, &end);
    body(begin, end);
  });
}

// d + L in T: the pair's difference before any rounding to float32.
template <typename T>
inline T perturbed(const T* x, bool pairs, int64_t n, uint64_t seed) {
  const T d = pairs ? x[2 * n] - x[2 * n + 1] : x[n];
  return d + static_cast<T>(logistic(seed, static_cast<uint64_t>(n)));
}

template <typename T>
MTLFAST_CLONES void forward_range(int64_t begin, int64_t end, bool pairs, const T* x, T tau, uint64_t seed,
                                  bool hard, T* z) {
  for (int64_t n = begin; n < end; ++n) {
    const T v = perturbed(x, pairs, n, seed);
    z[n] = hard ? (v > T(0) ? T(1) : T(0)) : sigmoid(v / tau);
  }
}

template <typename T>
MTLFAST_CLONES void backward_range(int64_t begin, int64_t end, bool pairs, const T* dz, const T* x, T tau,
                                   uint64_t seed, T* dx) {
  for (int64_t n = begin; n < end; ++n) {
    // tau is normal in T, so slope / tau <= 0.25 / tau is finite: dz * it is never 0 * inf
    const T g = dz[n] * (sigmoid_slope(perturbed(x, pairs, n, seed) / tau) / tau);
    if (pairs) {
      dx[2 * n] = g;
      dx[2 * n + 1] = -g;
    } else {
      dx[n] = g;
    }
  }
}

}  // namespace

void philox_uniform(uint64_t seed, int64_t offset0, int64_t n, float* out, int threads) {
  for_range(n, threads, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = uniform(seed, static_cast<uint64_t>(offset0 + i));
  });
}

template <typename T>
void gumbel_sigmoid_forward(int64_t N, bool pairs, const T* x, double tau, uint64_t seed, bool hard, T* z,
                            int threads) {
  const T t = static_cast<T>(tau);
  for_range(N, threads, [&](int64_t begin, int64_t end) { forward_range(begin, end, pairs, x, t, seed, hard, z); });
}

template <typename T>
void gumbel_sigmoid_backward(int64_t N, bool pairs, const T* dz, const T* x, double tau, uint64_t seed, T* dx,
                             int threads) {
  const T t = static_cast<T>(tau);
  for_range(N, threads, [&](int64_t begin, int64_t end) { backward_range(begin, end, pairs, dz, x, t, seed, dx); });
}

#define MTLFAST_INSTANTIATE(T)                                                                                 \
  template void gumbel_sigmoid_forward<T>(int64_t, bool, const T*, double, uint64_t, bool, T*, int);           \
  template void gumbel_sigmoid_backward<T>(int64_t, bool, const T*, const T*, double, uint64_t, T*, int);
MTLFAST_INSTANTIATE(float)
MTLFAST_INSTANTIATE(double)
#undef MTLFAST_INSTANTIATE

}  // namespace cpu
}  // namespace mtlfast
