// Gumbel-Matrix's allocation-weighted combine of C components' outputs on CPU:
// out = sum_c z_c * outputs_c / D, D = max(1, sum_c z_c). Framework-free (DESIGN.md).
//
// Every component is read, z_c == 0 ones too: skipping them would be faster for hard allocations
// but would turn the reference's 0 * inf = NaN into 0, and the backends must agree on every input.
#pragma once
#include <cstdint>

namespace mtlfast {
namespace cpu {

// outputs (C, N), z (C,) -> out (N,).
template <typename T>
void allocation_combine_forward(int64_t C, int64_t N, const T* outputs, const T* z, T* out, int threads);

// From dout (N,): doutputs (C, N) = z_c / D * dout (skipped when null) and dz (C,) =
// (dout . outputs_c - [sum z >= 1] sum_c' z_c' (dout . outputs_c') / D) / D (skipped when null;
// clamp's gradient passes at sum z == 1, as torch's). Dot products accumulate in float64.
template <typename T>
void allocation_combine_backward(int64_t C, int64_t N, const T* dout, const T* outputs, const T* z, T* doutputs,
                                 T* dz, int threads);

}  // namespace cpu
}  // namespace mtlfast
