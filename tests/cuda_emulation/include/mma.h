// Emulated nvcuda::wmma (16x16x16, fp32 accumulate) for tests/test_cuda_emulation.py: each lane holds
// the whole tile; load/store check the 256-bit pointer and ldm rules the real API demands.
#pragma once
#include <type_traits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include "cuda_fp16.h"
#include "cuda_bf16.h"
inline float wtof(__half h) { return __half2float(h); }
inline float wtof(__nv_bfloat16 h) { return __bfloat162float(h); }
extern long g_wmma_bad;
namespace nvcuda { namespace wmma {
struct row_major {}; struct col_major {}; struct matrix_a {}; struct matrix_b {}; struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class L = void> struct fragment { float x[256]; };
inline void chk(const void* p, unsigned ldm, unsigned mult) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 || ldm % mult) { ++g_wmma_bad; }
}
template <class Use, class T, class L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  chk(p, ldm, 8);
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j)
    f.x[i * 16 + j] = wtof(std::is_same<L, row_major>::value ? p[i * ldm + j] : p[i + j * ldm]);
}
template <class A, class B, class C>
inline void mma_sync(C& d, const A& a, const B& b, const C& c) {
  float t[256];
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j) {
    float s = c.x[i * 16 + j];
    for (int k = 0; k < 16; ++k) s += a.x[i * 16 + k] * b.x[k * 16 + j];
    t[i * 16 + j] = s;
  }
  for (int i = 0; i < 256; ++i) d.x[i] = t[i];
}
template <class F> inline void fill_fragment(F& f, float v) { for (auto& e : f.x) e = v; }
template <class F> inline void store_matrix_sync(float* p, const F& f, unsigned ldm, layout_t l) {
  chk(p, ldm, 4);
  // only lane 0 writes (all lanes hold the same full matrix in this emulation)
  if (threadIdx.x % 32 == 0)
    for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j)
      (l == mem_row_major ? p[i * ldm + j] : p[i + j * ldm]) = f.x[i * 16 + j];
}
}}
