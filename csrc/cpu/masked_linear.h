// masked_linear on the CPU for few rows: y = x @ (w ⊙ m)^T + b and its two gradients, reading the
// weight and the bool mask where they are used (no masked copy, no packing). Framework-free (see
// DESIGN.md).
//
// Why only few rows: with M rows each weight is used M times, so for the M of one recurrent step
// or one decoded token (M <= 16) the call is bound by reading w once, which BLAS pays too, plus
// its packing of w; these loops beat it there. For more rows BLAS's register-blocked GEMM wins and
// mtlfast/ops/masked_linear_cpu.py runs it on a masked copy instead (the measurements are there).
//
// Layouts, all contiguous row-major: x (M, K), w and mask (N, K), bias and dbias (N,), y (M, N),
// dy (M, N), dx (M, K), dw (N, K). mask: bytes of torch.bool, read as != 0. The weight is selected,
// not multiplied: a w that is inf or NaN outside the mask contributes 0 (as the reference's
// torch.where), while an inf or NaN in x still propagates through the zero weight, as in F.linear.
#pragma once
#include <cstdint>

namespace mtlfast {
namespace cpu {

// The row count up to which the direct loops are used (mtlfast/ops/masked_linear_cpu.py reads it).
constexpr int64_t kMaskedLinearDirectRows = 16;

// y = x @ (w ⊙ mask)^T (+ bias when not null).
template <typename T>
void masked_linear_direct_forward(int64_t M, int64_t N, int64_t K, const T* x, const T* w, const uint8_t* mask,
                                  const T* bias, T* y, int threads);

// dx = dy @ (w ⊙ mask).
template <typename T>
void masked_linear_direct_grad_input(int64_t M, int64_t N, int64_t K, const T* dy, const T* w, const uint8_t* mask,
                                     T* dx, int threads);

// dw = where(mask, dy^T @ x, 0): exactly 0 outside the mask; dbias (when not null) = dy summed over
// rows.
template <typename T>
void masked_linear_direct_grad_weight(int64_t M, int64_t N, int64_t K, const T* dy, const T* x, const uint8_t* mask,
                                      T* dw, T* dbias, int threads);

}  // namespace cpu
}  // namespace mtlfast
