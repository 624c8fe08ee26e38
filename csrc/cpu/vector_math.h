// Vectorised sigmoid and tanh for the LSTM cells, on GCC vector types (8 floats per 256 bits).
//
// Why not libm: gcc vectorises expf through glibc's libmvec only under -ffast-math and only where
// glibc declares the float variant; on the CI image it did not, and the cell's scalar expf calls
// were 18 % of the forward recurrence (perf) and made it half as fast as the backward one.
// These are written out so that they vectorise under every flag set and every clone, and they keep
// IEEE semantics (the file is not compiled with -ffast-math): NaN stays NaN, ±inf saturate exactly.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace mtlfast {
namespace cpu {

typedef float VFloat __attribute__((vector_size(32)));
typedef int32_t VInt __attribute__((vector_size(32)));
constexpr int kFloatLanes = 8;

inline __attribute__((always_inline)) VFloat vbroadcast(float x) { return VFloat{} + x; }

// e^x for x <= 0 (or NaN), within 2 ulp: Cephes' expf polynomial on the reduced argument
// r = x - n ln2, |r| <= ln2 / 2, times 2^n built in the exponent bits. Below the smallest normal
// result it returns exactly 0 (so e^-inf = 0); NaN propagates through r.
inline __attribute__((always_inline)) VFloat vexp_nonpositive(VFloat x) {
  const VFloat lo = vbroadcast(-87.33654f);  // ln(2^-126): 2^n stays a normal number
  const VFloat xc = x < lo ? lo : x;         // NaN compares false and stays
  const VFloat shifter = vbroadcast(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const VFloat t = xc * vbroadcast(1.44269504088896341f) + shifter;
  const VFloat n = t - shifter;
  VFloat r = xc - n * vbroadcast(0.693359375f);
  r = r - n * vbroadcast(-2.12194440e-4f);
  VFloat p = vbroadcast(1.9875691500e-4f);
  p = p * r + vbroadcast(1.3981999507e-3f);
  p = p * r + vbroadcast(8.3334519073e-3f);
  p = p * r + vbroadcast(4.1665795894e-2f);
  p = p * r + vbroadcast(1.6666665459e-1f);
  p = p * r + vbroadcast(5.0000001201e-1f);
  p = p * r * r + r + vbroadcast(1.0f);
  // t's low mantissa bits hold n in two's complement: 2^n = (n + 127) << 23
  VInt bits;
  std::memcpy(&bits, &t, sizeof bits);
  VInt shifter_bits;
  std::memcpy(&shifter_bits, &shifter, sizeof shifter_bits);
  const VInt scale_bits = (bits - shifter_bits + 127) << 23;
  VFloat scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  const VFloat e = p * scale;
  return x < lo ? VFloat{} : e;
}

inline __attribute__((always_inline)) VFloat vabs(VFloat x) {
  VInt b;
  std::memcpy(&b, &x, sizeof b);
  b &= 0x7fffffff;
  std::memcpy(&x, &b, sizeof b);
  return x;
}

// 1 / (1 + e^-x) through e = e^{-|x|} in (0, 1]: no overflow, sigmoid(±inf) = 1 / 0 exactly.
inline __attribute__((always_inline)) VFloat vsigmoid(VFloat x) {
  const VFloat e = vexp_nonpositive(-vabs(x));
  const VFloat one = vbroadcast(1.0f);
  return (x >= VFloat{} ? one : e) / (one + e);
}

// tanh through e = e^{-2|x|}: (1 - e) / (1 + e) with x's sign, tanh(±inf) = ±1 exactly.
inline __attribute__((always_inline)) VFloat vtanh(VFloat x) {
  const VFloat e = vexp_nonpositive(vbroadcast(-2.0f) * vabs(x));
  const VFloat one = vbroadcast(1.0f);
  const VFloat m = (one - e) / (one + e);
  VInt mb, xb;
  std::memcpy(&mb, &m, sizeof mb);
  std::memcpy(&xb, &x, sizeof xb);
  mb |= xb & static_cast<int32_t>(0x80000000u);
  VFloat out;
  std::memcpy(&out, &mb, sizeof out);
  return out;
}

// Scalar forms for fp64 (a correctness path, not a fast one) and for tails.
template <typename T>
inline T sigmoid_scalar(T x) {
  const T e = std::exp(-std::fabs(x));
  return (x >= T(0) ? T(1) : e) / (T(1) + e);
}

template <typename T>
inline T tanh_scalar(T x) {
  const T e = std::exp(T(-2) * std::fabs(x));
  return std::copysign((T(1) - e) / (T(1) + e), x);
}

// out[i] = f(in[i]) for i < n (in may be out): whole vectors through vf, the tail through sf.
template <typename VF, typename SF>
inline __attribute__((always_inline)) void map_floats(const float* in, float* out, int64_t n, VF vf, SF sf) {
  int64_t i = 0;
  for (; i + kFloatLanes <= n; i += kFloatLanes) {
    VFloat x;
    std::memcpy(&x, in + i, sizeof x);
    x = vf(x);
    std::memcpy(out + i, &x, sizeof x);
  }
  for (; i < n; ++i) out[i] = sf(in[i]);
}

inline __attribute__((always_inline)) void sigmoid_into(const float* in, float* out, int64_t n) {
  map_floats(in, out, n, [](VFloat x) { return vsigmoid(x); }, [](float x) { return sigmoid_scalar(x); });
}

inline __attribute__((always_inline)) void tanh_into(const float* in, float* out, int64_t n) {
  map_floats(in, out, n, [](VFloat x) { return vtanh(x); }, [](float x) { return tanh_scalar(x); });
}

inline void sigmoid_into(const double* in, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = sigmoid_scalar(in[i]);
}

inline void tanh_into(const double* in, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = tanh_scalar(in[i]);
}

}  // namespace cpu
}  // namespace mtlfast
