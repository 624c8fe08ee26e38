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
