// The Gumbel kernels' counter-based noise: element i of a call keyed by `seed` draws
// u = ((philox(seed, i) >> 9) + 0.5) * 2^-23, bit for bit the stream of Triton's tl.randint
// (Philox4x32-10, counter (i_lo, i_hi, 0, 0), key (seed_lo, seed_hi)) and of
// mtlfast/ops/philox.py, so every backend draws the same sample. u is never 0 or 1, so the noise
// is always finite. 8 lanes at a time (csrc/cpu/philox.cpp).
#pragma once
#include <cstdint>

namespace mtlfast {
namespace cpu {

enum class Noise { kLogistic, kGumbel };

// out[j] = noise of element offset0 + j for j < n: logistic log u - log(1 - u), or Gumbel
// -log(-log u) (both finite: |L| < 16.7, -2.8 < g < 16.7). Callers pass blocks of a few hundred.
void noise_into(Noise kind, uint64_t seed, uint64_t offset0, int64_t n, float* out);

// out[j] = u of element offset0 + j for j < n.
void uniform_into(uint64_t seed, uint64_t offset0, int64_t n, float* out);

}  // namespace cpu
}  // namespace mtlfast
