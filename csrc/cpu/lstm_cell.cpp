// Compiled with -ffast-math (CMakeLists.txt) so gcc calls glibc's vector expf/tanhf (libmvec,
// baseline SSE2: runs on every x86-64): the transcendentals are most of a step's pointwise cost.
// Nothing here compares values, so NaN and Inf still propagate (tests/test_masked_lstm.py checks).
#include "cpu/lstm_cell.h"

#include <cmath>
#include <cstring>

namespace mtlfast {
namespace cpu {
namespace {

// tanh through exp: glibc's vector expf is several times faster than its vector tanhf, and
// e^{-2|x|} never overflows, so large |x| gives exactly ±1 (and NaN stays NaN).
template <typename T>
inline T fast_tanh(T x) {
  const T e = std::exp(T(-2) * std::fabs(x));
  return std::copysign((T(1) - e) / (T(1) + e), x);
}

// Each helper is a few simple loops over one row with restrict-qualified parameters: the shape
// gcc vectorises (with libmvec calls for exp/tanh); one fused loop writing eight arrays is not.
// Two clones each, picked at load time by the CPU: AVX2 (8-wide exp) and baseline x86-64 (4-wide),
// so the module still runs on CPUs without AVX2.
#define MTLFAST_CLONES __attribute__((target_clones("avx2", "default")))

template <typename T>
MTLFAST_CLONES void activate(int64_t n, const T* __restrict pre, T* __restrict out, bool tanh_block) {
  if (tanh_block) {
    for (int64_t j = 0; j < n; ++j) out[j] = fast_tanh(pre[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = T(1) / (T(1) + std::exp(-pre[j]));
  }
}

template <typename T>
MTLFAST_CLONES void update_row(int64_t H, const T* __restrict act, T* __restrict c, T* __restrict h, T* __restrict c_out,
                T* __restrict h_out) {
  const T* i = act;
  const T* f = act + H;
  const T* g = act + 2 * H;
  const T* o = act + 3 * H;
  for (int64_t j = 0; j < H; ++j) c[j] = f[j] * c[j] + i[j] * g[j];
  for (int64_t j = 0; j < H; ++j) h[j] = o[j] * fast_tanh(c[j]);
  for (int64_t j = 0; j < H; ++j) c_out[j] = c[j];
  for (int64_t j = 0; j < H; ++j) h_out[j] = h[j];
}

template <typename T>
MTLFAST_CLONES void backward_row(int64_t H, const T* __restrict act, const T* __restrict cs, const T* __restrict cp,
                  const T* __restrict dy, const T* __restrict dh, T* __restrict dc, T* __restrict d) {
  const T* i = act;
  const T* f = act + H;
  const T* g = act + 2 * H;
  const T* o = act + 3 * H;
  for (int64_t j = 0; j < H; ++j) {
    const T tc = fast_tanh(cs[j]);
    const T dh_tot = dy[j] + dh[j];
    const T dc_tot = dc[j] + dh_tot * o[j] * (T(1) - tc * tc);
    d[j] = dc_tot * g[j] * i[j] * (T(1) - i[j]);
    d[H + j] = dc_tot * cp[j] * f[j] * (T(1) - f[j]);
    d[2 * H + j] = dc_tot * i[j] * (T(1) - g[j] * g[j]);
    d[3 * H + j] = dh_tot * tc * o[j] * (T(1) - o[j]);
    dc[j] = dc_tot * f[j];
  }
}

}  // namespace

template <typename T>
void lstm_cell_forward(int64_t G, int64_t B, int64_t H, int64_t step, const T* pre, const int64_t* lengths,
                       T* h_state, T* c_state, T* hs, int64_t hs_sg, T* gates, int64_t gates_sg,
                       T* cells, int64_t cells_sg) {
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = g * B + b;
      T* h_out = hs + g * hs_sg + b * H;
      T* c_out = cells + g * cells_sg + b * H;
      T* act = gates + g * gates_sg + b * 4 * H;
      if (step >= lengths[row]) {
        std::memset(h_out, 0, sizeof(T) * H);
        std::memset(act, 0, sizeof(T) * 4 * H);
        std::memcpy(c_out, c_state + row * H, sizeof(T) * H);
        continue;
      }
      const T* p = pre + row * 4 * H;
      activate(2 * H, p, act, false);              // i, f
      activate(H, p + 2 * H, act + 2 * H, true);   // g
      activate(H, p + 3 * H, act + 3 * H, false);  // o
      update_row(H, act, c_state + row * H, h_state + row * H, c_out, h_out);
    }
  }
}

template <typename T>
void lstm_cell_backward(int64_t G, int64_t B, int64_t H, int64_t step, const int64_t* lengths,
                        const T* gates, int64_t gates_sg, const T* cells, int64_t cells_sg,
                        const T* c_prev, int64_t c_prev_sg, const T* dhs, int64_t dhs_sg,
                        const T* dh, T* dc, T* dgates, int64_t dgates_sg) {
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = g * B + b;
      T* d = dgates + g * dgates_sg + b * 4 * H;
      if (step >= lengths[row]) {
        std::memset(d, 0, sizeof(T) * 4 * H);
        continue;
      }
      backward_row(H, gates + g * gates_sg + b * 4 * H, cells + g * cells_sg + b * H,
                   c_prev + g * c_prev_sg + b * H, dhs + g * dhs_sg + b * H, dh + row * H, dc + row * H, d);
    }
  }
}

template void lstm_cell_forward<float>(int64_t, int64_t, int64_t, int64_t, const float*, const int64_t*, float*,
                                       float*, float*, int64_t, float*, int64_t, float*, int64_t);
template void lstm_cell_forward<double>(int64_t, int64_t, int64_t, int64_t, const double*, const int64_t*, double*,
                                        double*, double*, int64_t, double*, int64_t, double*, int64_t);
template void lstm_cell_backward<float>(int64_t, int64_t, int64_t, int64_t, const int64_t*, const float*, int64_t,
                                        const float*, int64_t, const float*, int64_t, const float*, int64_t,
                                        const float*, float*, float*, int64_t);
template void lstm_cell_backward<double>(int64_t, int64_t, int64_t, int64_t, const int64_t*, const double*, int64_t,
                                         const double*, int64_t, const double*, int64_t, const double*, int64_t,
                                         const double*, double*, double*, int64_t);

}  // namespace cpu
}  // namespace mtlfast
