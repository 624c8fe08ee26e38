// Compiled with -ffp-contract=fast (CMakeLists.txt) so the multiply-adds become FMAs; not with
// -ffast-math: NaN and Inf propagate as in F.linear (tests/test_masked_linear.py checks).
//
// The loops keep the mask where the weight is read: a vector of weights is loaded under the
// matching mask bytes (AVX-512: the bytes become a lane mask and the load zeroes the other lanes;
// elsewhere a blend), so W ⊙ M is never written anywhere. float32 on AVX-512 CPUs has its own
// register tiles (the ones that keep up with BLAS, which uses AVX-512 there); float64 and CPUs
// without AVX-512 run the portable loops (GCC vector types, AVX2 + FMA clone or baseline).
#include "cpu/masked_linear.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/clones.h"
#include "cpu/parallel.h"

namespace mtlfast {
namespace cpu {
namespace {

#define MTLFAST_INLINE inline __attribute__((always_inline))

// 256-bit vectors: 8 floats or 4 doubles, the mask bytes of one vector, and the integer vector a
// blend compares (same element width as the floats).
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  typedef uint8_t Bytes __attribute__((vector_size(8)));
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t I __attribute__((vector_size(32)));
  typedef uint8_t Bytes __attribute__((vector_size(4)));
};
template <typename T>
constexpr int kLanes = 32 / sizeof(T);

template <typename T>
MTLFAST_INLINE typename Simd<T>::V load(const T* p) {
  typename Simd<T>::V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
MTLFAST_INLINE void store(T* p, typename Simd<T>::V v) {
  std::memcpy(p, &v, sizeof v);
}

// v where the mask byte is nonzero, else 0 (a blend: branch-free, NaN outside the mask dropped).
template <typename T>
MTLFAST_INLINE typename Simd<T>::V keep(const uint8_t* mask, typename Simd<T>::V v) {
  typename Simd<T>::Bytes bytes;
  std::memcpy(&bytes, mask, sizeof bytes);
  const typename Simd<T>::I wide = __builtin_convertvector(bytes, typename Simd<T>::I);
  return wide != 0 ? v : typename Simd<T>::V{};
}

template <typename T>
MTLFAST_INLINE T hsum(typename Simd<T>::V v) {
  T s = v[0];
#pragma GCC unroll 8
  for (int i = 1; i < kLanes<T>; ++i) s += v[i];
  return s;
}

// ---------------------------------------------------------------------------------------------
// Forward: y[r, n] = x[r] · (w[n] ⊙ mask[n]), R rows of x against one weight row at a time.

template <typename T, int R>
MTLFAST_INLINE void dot_rows(int64_t K, const T* x, const T* w, const uint8_t* mask, T* sums) {
  using V = typename Simd<T>::V;
  constexpr int L = kLanes<T>;
  V acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = V{};
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    const V wk = keep<T>(mask + k, load(w + k));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] += load(x + r * K + k) * wk;
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) sums[r] = hsum<T>(acc[r]);
  for (; k < K; ++k) {
    const T wk = mask[k] != 0 ? w[k] : T(0);
    for (int r = 0; r < R; ++r) sums[r] += x[r * K + k] * wk;
  }
}

constexpr int kDotRows = 8;  // 8 accumulators + the weight vector: no spill in 16 registers

template <typename T>
MTLFAST_CLONES void forward_range(int64_t n0, int64_t n1, int64_t M, int64_t N, int64_t K, const T* x, const T* w,
                                  const uint8_t* mask, const T* bias, T* y) {
  T sums[kDotRows];
  for (int64_t n = n0; n < n1; ++n) {
    const T* wn = w + n * K;
    const uint8_t* mn = mask + n * K;
    const T b = bias ? bias[n] : T(0);
    for (int64_t r0 = 0; r0 < M; r0 += kDotRows) {
      const T* xr = x + r0 * K;
      switch (std::min<int64_t>(kDotRows, M - r0)) {
        case 8: dot_rows<T, 8>(K, xr, wn, mn, sums); break;
        case 7: dot_rows<T, 7>(K, xr, wn, mn, sums); break;
        case 6: dot_rows<T, 6>(K, xr, wn, mn, sums); break;
        case 5: dot_rows<T, 5>(K, xr, wn, mn, sums); break;
        case 4: dot_rows<T, 4>(K, xr, wn, mn, sums); break;
        case 3: dot_rows<T, 3>(K, xr, wn, mn, sums); break;
        case 2: dot_rows<T, 2>(K, xr, wn, mn, sums); break;
        default: dot_rows<T, 1>(K, xr, wn, mn, sums); break;
      }
      const int64_t rows = std::min<int64_t>(kDotRows, M - r0);
      for (int64_t r = 0; r < rows; ++r) y[(r0 + r) * N + n] = sums[r] + b;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Grad input: dx[r, k0:k0+S*L] = Σ_n dy[r, n] (w[n] ⊙ mask[n])[k0:k0+S*L], a strip of S vectors of
// columns for R rows at a time (R*S accumulators).

template <typename T, int R, int S>
MTLFAST_INLINE void strip_rows(int64_t N, int64_t K, int64_t k0, const T* dy, const T* w, const uint8_t* mask, T* dx) {
  using V = typename Simd<T>::V;
  constexpr int L = kLanes<T>;
  V acc[R][S];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int s = 0; s < S; ++s) acc[r][s] = V{};
  for (int64_t n = 0; n < N; ++n) {
    V wn[S];
#pragma GCC unroll 2
    for (int s = 0; s < S; ++s) wn[s] = keep<T>(mask + n * K + k0 + s * L, load(w + n * K + k0 + s * L));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const T d = dy[r * N + n];
#pragma GCC unroll 2
      for (int s = 0; s < S; ++s) acc[r][s] += d * wn[s];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int s = 0; s < S; ++s) store(dx + r * K + k0 + s * L, acc[r][s]);
}

constexpr int kStripRows = 6;  // 6 rows x 2 vectors = 12 accumulators of 16 registers

template <typename T, int S>
MTLFAST_INLINE void strip(int64_t M, int64_t N, int64_t K, int64_t k0, const T* dy, const T* w, const uint8_t* mask,
                          T* dx) {
  for (int64_t r0 = 0; r0 < M; r0 += kStripRows) {
    const T* d = dy + r0 * N;
    T* o = dx + r0 * K;
    switch (std::min<int64_t>(kStripRows, M - r0)) {
      case 6: strip_rows<T, 6, S>(N, K, k0, d, w, mask, o); break;
      case 5: strip_rows<T, 5, S>(N, K, k0, d, w, mask, o); break;
      case 4: strip_rows<T, 4, S>(N, K, k0, d, w, mask, o); break;
      case 3: strip_rows<T, 3, S>(N, K, k0, d, w, mask, o); break;
      case 2: strip_rows<T, 2, S>(N, K, k0, d, w, mask, o); break;
      default: strip_rows<T, 1, S>(N, K, k0, d, w, mask, o); break;
    }
  }
}

// Columns [c0, c1) of dx; c0 a multiple of 2L. Full two-vector strips, then one vector, then the
// last < L columns one at a time.
template <typename T>
MTLFAST_CLONES void grad_input_range(int64_t c0, int64_t c1, int64_t M, int64_t N, int64_t K, const T* dy,
                                     const T* w, const uint8_t* mask, T* dx) {
  constexpr int L = kLanes<T>;
  int64_t k = c0;
  for (; k + 2 * L <= c1; k += 2 * L) strip<T, 2>(M, N, K, k, dy, w, mask, dx);
  for (; k + L <= c1; k += L) strip<T, 1>(M, N, K, k, dy, w, mask, dx);
  for (; k < c1; ++k) {
    for (int64_t r = 0; r < M; ++r) {
      T s = 0;
      for (int64_t n = 0; n < N; ++n) s += dy[r * N + n] * (mask[n * K + k] != 0 ? w[n * K + k] : T(0));
      dx[r * K + k] = s;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Grad weight: dw[n] = where(mask[n], Σ_r dy[r, n] x[r], 0), four vectors of a row at a time (four
// independent sums: one would wait on its own FMA latency M times).

template <typename T, int S>
MTLFAST_INLINE void weight_vectors(int64_t M, int64_t N, int64_t K, int64_t n, int64_t k, const T* dy, const T* x,
                                   const uint8_t* mask, T* dw) {
  using V = typename Simd<T>::V;
  constexpr int L = kLanes<T>;
  V acc[S];
#pragma GCC unroll 4
  for (int s = 0; s < S; ++s) acc[s] = V{};
  for (int64_t r = 0; r < M; ++r) {
    const T d = dy[r * N + n];
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) acc[s] += d * load(x + r * K + k + s * L);
  }
#pragma GCC unroll 4
  for (int s = 0; s < S; ++s) store(dw + n * K + k + s * L, keep<T>(mask + n * K + k + s * L, acc[s]));
}

template <typename T>
MTLFAST_CLONES void grad_weight_range(int64_t n0, int64_t n1, int64_t M, int64_t N, int64_t K, const T* dy,
                                      const T* x, const uint8_t* mask, T* dw, T* dbias) {
  constexpr int L = kLanes<T>;
  for (int64_t n = n0; n < n1; ++n) {
    int64_t k = 0;
    for (; k + 4 * L <= K; k += 4 * L) weight_vectors<T, 4>(M, N, K, n, k, dy, x, mask, dw);
    for (; k + L <= K; k += L) weight_vectors<T, 1>(M, N, K, n, k, dy, x, mask, dw);
    for (; k < K; ++k) {
      T s = 0;
      for (int64_t r = 0; r < M; ++r) s += dy[r * N + n] * x[r * K + k];
      dw[n * K + k] = mask[n * K + k] != 0 ? s : T(0);
    }
    if (dbias) {
      T s = 0;
      for (int64_t r = 0; r < M; ++r) s += dy[r * N + n];
      dbias[n] = s;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// float32 on AVX-512 (explicit dispatch by clones.h's vector_bytes: its tiles differ from the
// portable ones, which a target_clones clone could not express).

#ifdef MTLFAST_AVX512
// The lanes of [k, k + 16) below K.
MTLFAST_AVX512 MTLFAST_INLINE __mmask16 lanes_below(int64_t k, int64_t K) {
  return K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
}

// Lanes whose mask byte is nonzero, among `valid` (bytes past `valid` are not read).
MTLFAST_AVX512 MTLFAST_INLINE __mmask16 kept(const uint8_t* mask, __mmask16 valid) {
  const __m128i bytes = _mm_maskz_loadu_epi8(valid, mask);
  return _mm_test_epi8_mask(bytes, bytes);
}

// Lane i of the result = the sum of v[i]'s 16 lanes, for 16 vectors: a transposing tree of 30
// shuffles and adds where sixteen separate horizontal sums take about 130 (a third of a full
// tile's time at K = 200).
MTLFAST_AVX512 MTLFAST_INLINE __m512 sum_each(const __m512* v) {
  __m512 quads[4];
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], then [Σa, Σb, Σc, Σd] of that lane
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(v[4 * g], v[4 * g + 1]),
                                    _mm512_unpackhi_ps(v[4 * g], v[4 * g + 1]));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(v[4 * g + 2], v[4 * g + 3]),
                                    _mm512_unpackhi_ps(v[4 * g + 2], v[4 * g + 3]));
    const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
    quads[g] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
  }
  // then the four lanes of each quad: pairs of lanes, then pairs of pairs
  const __m512 q01 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 q23 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(q01, q23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(q01, q23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// y[r, c] for R rows of x and C weight rows: R x C dot products over all of K.
template <int R, int C>
MTLFAST_AVX512 MTLFAST_INLINE void dot_tile_avx512(int64_t K, const float* x, const float* w, const uint8_t* mask,
                                                   const float* bias, float* y, int64_t N) {
  __m512 acc[R][C];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 valid = lanes_below(k, K);
    __m512 wv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) wv[c] = _mm512_maskz_loadu_ps(kept(mask + c * K + k, valid), w + c * K + k);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(valid, x + r * K + k);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  if constexpr (R == 4 && C == 4) {
    const __m512 sums = sum_each(&acc[0][0]);
    const __m128 b = bias ? _mm_loadu_ps(bias) : _mm_setzero_ps();
    _mm_storeu_ps(y, _mm_add_ps(_mm512_extractf32x4_ps(sums, 0), b));
    _mm_storeu_ps(y + N, _mm_add_ps(_mm512_extractf32x4_ps(sums, 1), b));
    _mm_storeu_ps(y + 2 * N, _mm_add_ps(_mm512_extractf32x4_ps(sums, 2), b));
    _mm_storeu_ps(y + 3 * N, _mm_add_ps(_mm512_extractf32x4_ps(sums, 3), b));
  } else {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) y[r * N + c] = _mm512_reduce_add_ps(acc[r][c]) + (bias ? bias[c] : 0.0f);
  }
}

template <int C>
MTLFAST_AVX512 MTLFAST_INLINE void dot_rows_avx512(int64_t M, int64_t N, int64_t K, const float* x, const float* w,
                                                   const uint8_t* mask, const float* bias, float* y) {
  int64_t r = 0;
  for (; r + 4 <= M; r += 4) dot_tile_avx512<4, C>(K, x + r * K, w, mask, bias, y + r * N, N);
  switch (M - r) {
    case 3: dot_tile_avx512<3, C>(K, x + r * K, w, mask, bias, y + r * N, N); break;
    case 2: dot_tile_avx512<2, C>(K, x + r * K, w, mask, bias, y + r * N, N); break;
    case 1: dot_tile_avx512<1, C>(K, x + r * K, w, mask, bias, y + r * N, N); break;
    default: break;
  }
}

// Weight rows [n0, n1): four at a time (4 x 4 accumulators: the loads of one step feed 16 FMAs).
MTLFAST_AVX512 void forward_range_avx512(int64_t n0, int64_t n1, int64_t M, int64_t N, int64_t K, const float* x,
                                         const float* w, const uint8_t* mask, const float* bias, float* y) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) dot_rows_avx512<4>(M, N, K, x, w + n * K, mask + n * K, bias ? bias + n : nullptr, y + n);
  for (; n < n1; ++n) dot_rows_avx512<1>(M, N, K, x, w + n * K, mask + n * K, bias ? bias + n : nullptr, y + n);
}

// dx[r, k0 : k0 + 64] for R rows: per weight row n, four masked vectors of it times R broadcasts of
// dy (R x 4 accumulators).
template <int R>
MTLFAST_AVX512 MTLFAST_INLINE void strip_avx512(int64_t N, int64_t K, int64_t k0, int64_t k1, const float* dy,
                                                const float* w, const uint8_t* mask, float* dx) {
  __mmask16 valid[4];  // the columns of [k0, k0 + 64) below k1
#pragma GCC unroll 4
  for (int s = 0; s < 4; ++s) valid[s] = k0 + 16 * s < k1 ? lanes_below(k0 + 16 * s, k1) : __mmask16(0);
  __m512 acc[R][4];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) acc[r][s] = _mm512_setzero_ps();
  for (int64_t n = 0; n < N; ++n) {
    __m512 wv[4];
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      const int64_t at = n * K + k0 + 16 * s;
      wv[s] = _mm512_maskz_loadu_ps(kept(mask + at, valid[s]), w + at);
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512 d = _mm512_set1_ps(dy[r * N + n]);
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) acc[r][s] = _mm512_fmadd_ps(d, wv[s], acc[r][s]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) _mm512_mask_storeu_ps(dx + r * K + k0 + 16 * s, valid[s], acc[r][s]);
}

// Columns [c0, c1) of dx.
MTLFAST_AVX512 void grad_input_range_avx512(int64_t c0, int64_t c1, int64_t M, int64_t N, int64_t K, const float* dy,
                                            const float* w, const uint8_t* mask, float* dx) {
  for (int64_t k = c0; k < c1; k += 64) {
    for (int64_t r = 0; r < M; r += 6) {
      const float* d = dy + r * N;
      float* o = dx + r * K;
      switch (std::min<int64_t>(6, M - r)) {
        case 6: strip_avx512<6>(N, K, k, c1, d, w, mask, o); break;
        case 5: strip_avx512<5>(N, K, k, c1, d, w, mask, o); break;
        case 4: strip_avx512<4>(N, K, k, c1, d, w, mask, o); break;
        case 3: strip_avx512<3>(N, K, k, c1, d, w, mask, o); break;
        case 2: strip_avx512<2>(N, K, k, c1, d, w, mask, o); break;
        default: strip_avx512<1>(N, K, k, c1, d, w, mask, o); break;
      }
    }
  }
}

// dw[n : n + C] (C rows), 64 columns at a time: C x 4 independent sums over the M rows of dy and
// x (fewer would wait on their own FMA latency), kept where the mask is, zero elsewhere.
template <int C>
MTLFAST_AVX512 MTLFAST_INLINE void weight_rows_avx512(int64_t n, int64_t M, int64_t N, int64_t K, const float* dy,
                                                      const float* x, const uint8_t* mask, float* dw) {
  for (int64_t k0 = 0; k0 < K; k0 += 64) {
    __mmask16 valid[4];
    __m512 acc[C][4];
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      valid[s] = k0 + 16 * s < K ? lanes_below(k0 + 16 * s, K) : __mmask16(0);
#pragma GCC unroll 2
      for (int c = 0; c < C; ++c) acc[c][s] = _mm512_setzero_ps();
    }
    for (int64_t r = 0; r < M; ++r) {
      __m512 xv[4];
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) xv[s] = _mm512_maskz_loadu_ps(valid[s], x + r * K + k0 + 16 * s);
#pragma GCC unroll 2
      for (int c = 0; c < C; ++c) {
        const __m512 d = _mm512_set1_ps(dy[r * N + n + c]);
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) acc[c][s] = _mm512_fmadd_ps(d, xv[s], acc[c][s]);
      }
    }
#pragma GCC unroll 2
    for (int c = 0; c < C; ++c)
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        const int64_t at = (n + c) * K + k0 + 16 * s;
        _mm512_mask_storeu_ps(dw + at, valid[s], _mm512_maskz_mov_ps(kept(mask + at, valid[s]), acc[c][s]));
      }
  }
}

// dw rows [n0, n1), two at a time; dbias alongside.
MTLFAST_AVX512 void grad_weight_range_avx512(int64_t n0, int64_t n1, int64_t M, int64_t N, int64_t K,
                                             const float* dy, const float* x, const uint8_t* mask, float* dw,
                                             float* dbias) {
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) weight_rows_avx512<2>(n, M, N, K, dy, x, mask, dw);
  if (n < n1) weight_rows_avx512<1>(n, M, N, K, dy, x, mask, dw);
  if (dbias) {
    for (n = n0; n < n1; ++n) {
      float s = 0;
      for (int64_t r = 0; r < M; ++r) s += dy[r * N + n];
      dbias[n] = s;
    }
  }
}
#endif

// The AVX-512 tiles for float32 where the CPU has them (clones.h: vector_bytes), else the portable
// loops.
template <typename T>
bool use_avx512() {
  return std::is_same<T, float>::value && vector_bytes() == 64;
}

// A second thread pays for itself above about 64K multiply-adds (measured on 2 cores: the team's
// start costs a few microseconds).
int team_for(int threads, int64_t multiply_adds, int64_t items) {
  return team_size(threads, std::min<int64_t>(items, multiply_adds / (1 << 16) + 1));
}

}  // namespace

template <typename T>
void masked_linear_direct_forward(int64_t M, int64_t N, int64_t K, const T* x, const T* w, const uint8_t* mask,
                                  const T* bias, T* y, int threads) {
  run_team(team_for(threads, M * N * K, N), [&](int t, int n, SpinBarrier&) {
    int64_t begin, end;
    split(N, t, n, &begin, &end);
#ifdef MTLFAST_AVX512
    if constexpr (std::is_same<T, float>::value) {
      if (use_avx512<T>()) return forward_range_avx512(begin, end, M, N, K, x, w, mask, bias, y);
    }
#endif
    forward_range(begin, end, M, N, K, x, w, mask, bias, y);
  });
}

template <typename T>
void masked_linear_direct_grad_input(int64_t M, int64_t N, int64_t K, const T* dy, const T* w, const uint8_t* mask,
                                     T* dx, int threads) {
  // threads own whole vectors of columns (the AVX-512 strips end where a thread's columns do); the
  // last thread also takes the columns after them
  const bool wide = use_avx512<T>();
  const int64_t width = wide ? 16 : 2 * kLanes<T>, strips = K / width;
  run_team(team_for(threads, M * N * K, std::max<int64_t>(strips, 1)), [&](int t, int n, SpinBarrier&) {
    int64_t begin, end;
    split(strips, t, n, &begin, &end);
    const int64_t c0 = begin * width, c1 = t == n - 1 ? K : end * width;
#ifdef MTLFAST_AVX512
    if constexpr (std::is_same<T, float>::value) {
      if (wide) return grad_input_range_avx512(c0, c1, M, N, K, dy, w, mask, dx);
    }
#endif
    grad_input_range(c0, c1, M, N, K, dy, w, mask, dx);
  });
}

template <typename T>
void masked_linear_direct_grad_weight(int64_t M, int64_t N, int64_t K, const T* dy, const T* x, const uint8_t* mask,
                                      T* dw, T* dbias, int threads) {
  run_team(team_for(threads, M * N * K, N), [&](int t, int n, SpinBarrier&) {
    int64_t begin, end;
    split(N, t, n, &begin, &end);
#ifdef MTLFAST_AVX512
    if constexpr (std::is_same<T, float>::value) {
      if (use_avx512<T>()) return grad_weight_range_avx512(begin, end, M, N, K, dy, x, mask, dw, dbias);
    }
#endif
    grad_weight_range(begin, end, M, N, K, dy, x, mask, dw, dbias);
  });
}

#define MTLFAST_INSTANTIATE(T)                                                                                      \
  template void masked_linear_direct_forward<T>(int64_t, int64_t, int64_t, const T*, const T*, const uint8_t*,   \
                                                const T*, T*, int);                                             \
  template void masked_linear_direct_grad_input<T>(int64_t, int64_t, int64_t, const T*, const T*, const uint8_t*, \
                                                   T*, int);                                                    \
  template void masked_linear_direct_grad_weight<T>(int64_t, int64_t, int64_t, const T*, const T*,              \
                                                    const uint8_t*, T*, T*, int);
MTLFAST_INSTANTIATE(float)
MTLFAST_INSTANTIATE(double)
#undef MTLFAST_INSTANTIATE

}  // namespace cpu
}  // namespace mtlfast
