// Masked linear kernels: y = x @ (W ⊙ M)^T + b and its gradients, with M bit-packed.
// Framework-free on purpose (see DESIGN.md): raw pointers, element strides, a stream.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "cuda/dtype.h"

namespace mtlfast {
namespace cuda {
using ::mtlfast::DType;

// Shapes: x (M, K), w (N, K), mask_bits (N, ceil(K/32)) int32 words, bias (N,), out (M, N).
// Bit j of mask_bits[n * mask_row_stride + w] keeps weight (n, 32*w + j).
// All strides are in elements. bias may be null. Accumulation is fp32 (fp64 for float64).
cudaError_t masked_linear_forward(DType dtype, int64_t M, int64_t N, int64_t K,
                                  const void* x, int64_t sxm, int64_t sxk,
                                  const void* w, int64_t swn, int64_t swk,
                                  const int32_t* mask_bits, int64_t mask_row_stride,
                                  const void* bias,
                                  void* out, int64_t som, int64_t son,
                                  cudaStream_t stream);

// dx (M, K) = dy (M, N) @ (W ⊙ M) (N, K)
cudaError_t masked_linear_grad_input(DType dtype, int64_t M, int64_t N, int64_t K,
                                     const void* dy, int64_t sdm, int64_t sdn,
                                     const void* w, int64_t swn, int64_t swk,
                                     const int32_t* mask_bits, int64_t mask_row_stride,
                                     void* dx, int64_t sxm, int64_t sxk,
                                     cudaStream_t stream);

// dw (N, K) = M ⊙ (dy^T @ x), zero where the mask is 0; dbias (N,) = Σ_m dy[m, :] when not null.
cudaError_t masked_linear_grad_weight(DType dtype, int64_t M, int64_t N, int64_t K,
                                      const void* dy, int64_t sdm, int64_t sdn,
                                      const void* x, int64_t sxm, int64_t sxk,
                                      const int32_t* mask_bits, int64_t mask_row_stride,
                                      void* dw, int64_t swn, int64_t swk,
                                      void* dbias,
                                      cudaStream_t stream);

}  // namespace cuda
}  // namespace mtlfast
