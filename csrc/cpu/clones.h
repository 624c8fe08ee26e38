// Function multiversioning for the CPU kernels: two clones of each marked function, picked at
// load time by the CPU, AVX2+FMA (x86-64-v3) and baseline, so the module runs on every x86-64
// CPU and uses 256-bit FMAs where they exist. Helpers called from a clone are inlined into it.
#pragma once

#if defined(__x86_64__)
#define MTLFAST_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
// One function compiled for AVX-512 (x86-64-v4), for kernels that pick it at run time by the CPU
// (a different vector width changes their data layout, so they are templates on the width, not
// clones of one body).
#define MTLFAST_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
#define MTLFAST_CLONES
#endif

#include <cstdlib>
#include <cstring>

namespace mtlfast {
namespace cpu {

// The vector width in bytes of the kernels that have an AVX-512 body (the LSTM recurrences'
// tiles, masked_linear's few-row loops): 64 where the CPU has AVX-512 (F, VL, BW, DQ: what
// x86-64-v4 means), else 32. MTLFAST_CPU_VECTOR_BITS=256, read once, forces the 32-byte bodies (the
// tests run both on an AVX-512 machine).
inline int vector_bytes() {
#ifdef MTLFAST_AVX512
  static const int bytes = [] {
    const char* forced = std::getenv("MTLFAST_CPU_VECTOR_BITS");
    if (forced != nullptr && std::strcmp(forced, "256") == 0) return 32;
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    return avx512 ? 64 : 32;
  }();
  return bytes;
#else
  return 32;
#endif
}

}  // namespace cpu
}  // namespace mtlfast
