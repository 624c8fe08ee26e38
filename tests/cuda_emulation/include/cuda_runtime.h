// CPU emulation of the CUDA runtime subset csrc/cuda uses, for tests/test_cuda_emulation.py:
// each block runs as block.x real threads, __syncthreads/__syncwarp are std::barrier, global reads
// are bounds- and alignment-checked. Enough to execute the kernels' index math, synchronisation
// and tails on a machine with no GPU; says nothing about speed.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>
#include <math.h>
#include <barrier>
#include <thread>
#include <vector>
#include <functional>
#include <cassert>
#include <cstdio>
#include <cstdlib>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
extern int g_sms;
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = g_sms; return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }
extern std::barrier<>* g_bar;
extern std::barrier<>* g_warp_bars[64];
inline void __syncthreads() { g_bar->arrive_and_wait(); }
inline void __syncwarp() { g_warp_bars[threadIdx.x / 32]->arrive_and_wait(); }
extern long g_misaligned;
extern long g_oob;
void check_addr(const void* p, size_t n);
// Every global read of the kernels goes through __ldg: check it lies inside an input tensor.
template <typename T> inline T __ldg(const T* p) {
  check_addr(p, sizeof(T));
  if (reinterpret_cast<std::uintptr_t>(p) % alignof(T)) { ++g_misaligned; }
  if (!p) { fprintf(stderr, "null ldg\n"); abort(); }
  return *p;
}
void emu_launch(dim3 grid, dim3 block, const std::function<void()>& body);
extern long g_vec;
