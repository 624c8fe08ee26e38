// The Gumbel kernels' counter-based noise, 8 lanes at a time: element i of a call keyed by `seed`
// draws u = ((philox(seed, i) >> 9) + 0.5) * 2^-23, bit for bit the stream of Triton's tl.randint
// (Philox4x32-10, counter (i_lo, i_hi, 0, 0), key (seed_lo, seed_hi)) and of
// mtlfast/ops/philox.py, so every backend draws the same sample. u is never 0 or 1, so the noise
// is always finite.
//
// Why by hand: ten rounds of 32x32 -> 64-bit products and two logs per element were the whole
// cost of a sample (33 ns an element, scalar: libm's logf does not vectorise without
// -ffast-math, and gcc does not vectorise the widening multiply inside the rounds). Written on
// GCC vector types so that every clone (csrc/cpu/clones.h) compiles it: vpmuludq and 8-lane
// float math under x86-64-v3, SSE pairs in the baseline. Only included by kernels' .cpp files.
#pragma once
#include <cstdint>
#include <cstring>

#include "cpu/vector_math.h"

namespace mtlfast {
namespace cpu {

typedef uint32_t VU32 __attribute__((vector_size(32)));
typedef uint64_t VU64 __attribute__((vector_size(32)));

// (high word, low word) of a * k per lane: even and odd lanes widened to 64 bits (the lane pairs
// of a VU64 in little-endian order), multiplied, and both words put back in place (the low word
// from the same product: vpmulld would cost two more uops).
inline __attribute__((always_inline)) void mul_wide(VU32 a, uint32_t k, VU32* hi, VU32* lo) {
  VU64 w;
  std::memcpy(&w, &a, sizeof w);
  const VU64 even = (w & 0xFFFFFFFFull) * static_cast<uint64_t>(k);
  const VU64 odd = (w >> 32) * static_cast<uint64_t>(k);
  const VU64 high = (even >> 32) | (odd & 0xFFFFFFFF00000000ull);
  const VU64 low = (even & 0xFFFFFFFFull) | (odd << 32);
  std::memcpy(hi, &high, sizeof *hi);
  std::memcpy(lo, &low, sizeof *lo);
}

// u of offsets offset0 .. offset0 + 7 (Triton's philox_impl with 32-bit words, word 0).
inline __attribute__((always_inline)) VFloat uniform8(uint64_t seed, uint64_t offset0) {
  VU32 c0, c1;
  for (int lane = 0; lane < kFloatLanes; ++lane) {
    const uint64_t offset = offset0 + static_cast<uint64_t>(lane);
    c0[lane] = static_cast<uint32_t>(offset);
    c1[lane] = static_cast<uint32_t>(offset >> 32);
  }
  VU32 c2 = VU32{}, c3 = VU32{};
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u, kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  for (int round = 0; round < 10; ++round) {
    VU32 hi_b, lo_b, hi_a, lo_a;
    mul_wide(c2, kRoundB, &hi_b, &lo_b);
    mul_wide(c0, kRoundA, &hi_a, &lo_a);
    c0 = hi_b ^ c1 ^ k0;
    c2 = hi_a ^ c3 ^ k1;
    c1 = lo_b;
    c3 = lo_a;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  // 23 bits, not 24: (k + 0.5) * 2^-24 needs 25 significant bits, and next to 1 it rounds to 1.0
  c0 = c0 >> 9;
  VInt k;
  std::memcpy(&k, &c0, sizeof k);
  return (__builtin_convertvector(k, VFloat) + 0.5f) * 1.1920928955078125e-07f;
}

// log x for normal x > 0 (all that u and 1 - u can be), within 2 ulp: Cephes' logf, the mantissa
// m in [sqrt(1/2), sqrt(2)) and log(1 + (m - 1)) by its polynomial, plus e log 2 in two parts.
inline __attribute__((always_inline)) VFloat vlog_positive(VFloat x) {
  VInt bits;
  std::memcpy(&bits, &x, sizeof bits);
  VInt e = ((bits >> 23) & 0xFF) - 126;                // x = m 2^e with m in [0.5, 1)
  bits = (bits & 0x007FFFFF) | 0x3F000000;
  VFloat m;
  std::memcpy(&m, &bits, sizeof m);
  const VInt small = m < vbroadcast(0.707106781186547524f);  // -1 where true
  e += small;
  m = (small ? m + m : m) - 1.0f;
  const VFloat fe = __builtin_convertvector(e, VFloat);
  const VFloat z = m * m;
  VFloat p = vbroadcast(7.0376836292e-2f);
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  VFloat y = p * m * z;
  y += fe * -2.12194440e-4f;
  y -= 0.5f * z;
  return m + y + fe * 0.693359375f;
}

enum class Noise { kLogistic, kGumbel };

// out[j] = noise of element offset0 + j for j < n: logistic log u - log(1 - u), or Gumbel
// -log(-log u) (both finite: |L| < 16.7, -2.8 < g < 16.7).
inline __attribute__((always_inline)) void noise_into(Noise kind, uint64_t seed, uint64_t offset0, int64_t n,
                                                      float* out) {
  for (int64_t j = 0; j < n; j += kFloatLanes) {
    const VFloat u = uniform8(seed, offset0 + static_cast<uint64_t>(j));
    const VFloat v = kind == Noise::kLogistic ? vlog_positive(u) - vlog_positive(1.0f - u)
                                              : -vlog_positive(-vlog_positive(u));
    if (j + kFloatLanes <= n) {
      std::memcpy(out + j, &v, sizeof v);
    } else {
      std::memcpy(out + j, &v, static_cast<size_t>(n - j) * sizeof(float));
    }
  }
}

}  // namespace cpu
}  // namespace mtlfast
