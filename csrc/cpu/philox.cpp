// Philox noise 8 lanes at a time (csrc/cpu/philox.h).
//
// Why by hand: ten rounds of 32x32 -> 64-bit products and two logs per element were the whole
// cost of a sample (33 ns an element, scalar: libm's logf does not vectorise without
// -ffast-math, and gcc does not vectorise the widening multiply inside the rounds).
//
// Why two hand-written versions instead of MTLFAST_CLONES: on GCC vector types a 64-bit lane
// product by a constant below 2^32 becomes shifts and adds (or, with the constant hidden, the full
// 64x64 emulation), three times the instructions of one vpmuludq, and the intrinsic cannot be
// named in a body the baseline clone also compiles. So the AVX2 version uses it, the baseline one
// stays on vector types, and gcc's function multiversioning picks one at load time. The logs are
// shared (vector types: they vectorise everywhere).
#include "cpu/philox.h"

#include <algorithm>
#include <cstring>

#include "cpu/vector_math.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define MTLFAST_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace mtlfast {
namespace cpu {
namespace {

#define MTLFAST_INLINE inline __attribute__((always_inline))

constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u, kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
constexpr int kRounds = 10;

typedef uint32_t VU32 __attribute__((vector_size(32)));
typedef uint64_t VU64 __attribute__((vector_size(32)));

// The counters (offset_lo, offset_hi) of lanes offset0 .. offset0 + 7.
MTLFAST_INLINE void counters(uint64_t offset0, VU32* lo, VU32* hi) {
  for (int lane = 0; lane < kFloatLanes; ++lane) {
    const uint64_t offset = offset0 + static_cast<uint64_t>(lane);
    (*lo)[lane] = static_cast<uint32_t>(offset);
    (*hi)[lane] = static_cast<uint32_t>(offset >> 32);
  }
}

// Philox's word 0 -> u = ((x >> 9) + 0.5) * 2^-23. 23 bits, not 24: (k + 0.5) * 2^-24 needs 25
// significant bits, and next to 1 it rounds to 1.0.
MTLFAST_INLINE VFloat to_uniform(VU32 x) {
  x = x >> 9;
  VInt k;
  std::memcpy(&k, &x, sizeof k);
  return (__builtin_convertvector(k, VFloat) + 0.5f) * 1.1920928955078125e-07f;
}

// The baseline: (high word, low word) of a * k per lane from the even and odd lanes widened to
// 64 bits (the lane pairs of a VU64, little-endian).
MTLFAST_INLINE void mul_wide(VU32 a, uint32_t k, VU32* hi, VU32* lo) {
  VU64 w;
  std::memcpy(&w, &a, sizeof w);
  const VU64 even = (w & 0xFFFFFFFFull) * static_cast<uint64_t>(k);
  const VU64 odd = (w >> 32) * static_cast<uint64_t>(k);
  const VU64 high = (even >> 32) | (odd & 0xFFFFFFFF00000000ull);
  const VU64 low = (even & 0xFFFFFFFFull) | (odd << 32);
  std::memcpy(hi, &high, sizeof *hi);
  std::memcpy(lo, &low, sizeof *lo);
}

MTLFAST_INLINE VFloat uniform8(uint64_t seed, uint64_t offset0) {
  VU32 c0, c1;
  counters(offset0, &c0, &c1);
  VU32 c2 = VU32{}, c3 = VU32{};
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kRounds; ++round) {
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
  return to_uniform(c0);
}

#if defined(__x86_64__)
// The same rounds on AVX2: vpmuludq multiplies the even lanes, the odd ones after a 32-bit shift;
// blends put the words back in place.
MTLFAST_AVX2 MTLFAST_INLINE void mul_wide_avx2(__m256i a, __m256i k, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, k);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), k);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

MTLFAST_AVX2 MTLFAST_INLINE VFloat uniform8_avx2(uint64_t seed, uint64_t offset0) {
  VU32 lo, hi;
  counters(offset0, &lo, &hi);
  __m256i c0, c1;
  std::memcpy(&c0, &lo, sizeof c0);
  std::memcpy(&c1, &hi, sizeof c1);
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  const __m256i ka = _mm256_set1_epi32(static_cast<int>(kRoundA)), kb = _mm256_set1_epi32(static_cast<int>(kRoundB));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kRounds; ++round) {
    __m256i hi_b, lo_b, hi_a, lo_a;
    mul_wide_avx2(c2, kb, &hi_b, &lo_b);
    mul_wide_avx2(c0, ka, &hi_a, &lo_a);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c1 = lo_b;
    c3 = lo_a;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  VU32 x;
  std::memcpy(&x, &c0, sizeof x);
  return to_uniform(x);
}
#endif

// log x for normal x > 0 (all that u and 1 - u can be), within 2 ulp: Cephes' logf, the mantissa
// m in [sqrt(1/2), sqrt(2)) and log(1 + (m - 1)) by its polynomial, plus e log 2 in two parts.
MTLFAST_INLINE VFloat vlog_positive(VFloat x) {
  VInt bits;
  std::memcpy(&bits, &x, sizeof bits);
  VInt e = ((bits >> 23) & 0xFF) - 126;  // x = m 2^e with m in [0.5, 1)
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

MTLFAST_INLINE VFloat noise_of(Noise kind, VFloat u) {
  return kind == Noise::kLogistic ? vlog_positive(u) - vlog_positive(1.0f - u) : -vlog_positive(-vlog_positive(u));
}

MTLFAST_INLINE void store(float* out, int64_t j, int64_t n, VFloat v) {
  std::memcpy(out + j, &v, static_cast<size_t>(std::min<int64_t>(kFloatLanes, n - j)) * sizeof(float));
}

#if defined(__x86_64__)
// The versions (gcc's function multiversioning dispatches calls in this file only: the public
// functions below are where the choice is made).
__attribute__((target("default"))) void noise_block(Noise kind, uint64_t seed, uint64_t offset0, int64_t n,
                                                    float* out) {
  for (int64_t j = 0; j < n; j += kFloatLanes) store(out, j, n, noise_of(kind, uniform8(seed, offset0 + j)));
}

MTLFAST_AVX2 void noise_block(Noise kind, uint64_t seed, uint64_t offset0, int64_t n, float* out) {
  for (int64_t j = 0; j < n; j += kFloatLanes) store(out, j, n, noise_of(kind, uniform8_avx2(seed, offset0 + j)));
}

__attribute__((target("default"))) void uniform_block(uint64_t seed, uint64_t offset0, int64_t n, float* out) {
  for (int64_t j = 0; j < n; j += kFloatLanes) store(out, j, n, uniform8(seed, offset0 + j));
}

MTLFAST_AVX2 void uniform_block(uint64_t seed, uint64_t offset0, int64_t n, float* out) {
  for (int64_t j = 0; j < n; j += kFloatLanes) store(out, j, n, uniform8_avx2(seed, offset0 + j));
}
#else
void noise_block(Noise kind, uint64_t seed, uint64_t offset0, int64_t n, float* out) {
  for (int64_t j = 0; j < n; j += kFloatLanes) store(out, j, n, noise_of(kind, uniform8(seed, offset0 + j)));
}

void uniform_block(uint64_t seed, uint64_t offset0, int64_t n, float* out) {
  for (int64_t j = 0; j < n; j += kFloatLanes) store(out, j, n, uniform8(seed, offset0 + j));
}
#endif

}  // namespace

void noise_into(Noise kind, uint64_t seed, uint64_t offset0, int64_t n, float* out) {
  noise_block(kind, seed, offset0, n, out);
}

void uniform_into(uint64_t seed, uint64_t offset0, int64_t n, float* out) { uniform_block(seed, offset0, n, out); }

}  // namespace cpu
}  // namespace mtlfast
