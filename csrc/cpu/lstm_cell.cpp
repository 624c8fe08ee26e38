// Compiled with -ffast-math (CMakeLists.txt) so gcc calls glibc's vector expf/tanhf (libmvec,
// baseline SSE2: runs on every x86-64): the transcendentals are most of a step's pointwise cost.
// Nothing here compares values, so NaN and Inf still propagate (tests/test_masked_lstm.py checks).
#include "cpu/lstm_cell.h"

#include <cmath>
#include <cstring>

namespace mtlfast {
namespace cpu {
namespace {

template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

}  // namespace

template <typename T>
void lstm_cell_forward(int64_t G, int64_t B, int64_t H, int64_t step, const T* pre, const int64_t* lengths,
                       T* h_state, T* c_state, T* hs, int64_t hs_sg, T* gates, int64_t gates_sg,
                       T* cells, int64_t cells_sg) {
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = g * B + b;
      T* __restrict h = h_state + row * H;
      T* __restrict c = c_state + row * H;
      T* __restrict h_out = hs + g * hs_sg + b * H;
      T* __restrict c_out = cells + g * cells_sg + b * H;
      T* __restrict act = gates + g * gates_sg + b * 4 * H;
      if (step >= lengths[row]) {
        std::memset(h_out, 0, sizeof(T) * H);
        std::memset(act, 0, sizeof(T) * 4 * H);
        std::memcpy(c_out, c, sizeof(T) * H);
        continue;
      }
      const T* __restrict p = pre + row * 4 * H;
      for (int64_t j = 0; j < H; ++j) {
        const T i = sigmoid(p[j]), f = sigmoid(p[H + j]), gg = std::tanh(p[2 * H + j]), o = sigmoid(p[3 * H + j]);
        const T cn = f * c[j] + i * gg;
        const T hn = o * std::tanh(cn);
        c[j] = cn;
        h[j] = hn;
        c_out[j] = cn;
        h_out[j] = hn;
        act[j] = i;
        act[H + j] = f;
        act[2 * H + j] = gg;
        act[3 * H + j] = o;
      }
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
      T* __restrict d = dgates + g * dgates_sg + b * 4 * H;
      if (step >= lengths[row]) {
        std::memset(d, 0, sizeof(T) * 4 * H);
        continue;
      }
      const T* __restrict a = gates + g * gates_sg + b * 4 * H;
      const T* __restrict cs = cells + g * cells_sg + b * H;
      const T* __restrict cp = c_prev + g * c_prev_sg + b * H;
      const T* __restrict dy = dhs + g * dhs_sg + b * H;
      const T* __restrict dhc = dh + row * H;
      T* __restrict dcc = dc + row * H;
      for (int64_t j = 0; j < H; ++j) {
        const T i = a[j], f = a[H + j], gg = a[2 * H + j], o = a[3 * H + j];
        const T tc = std::tanh(cs[j]);
        const T dh_tot = dy[j] + dhc[j];
        const T dc_tot = dcc[j] + dh_tot * o * (T(1) - tc * tc);
        d[j] = dc_tot * gg * i * (T(1) - i);
        d[H + j] = dc_tot * cp[j] * f * (T(1) - f);
        d[2 * H + j] = dc_tot * i * (T(1) - gg * gg);
        d[3 * H + j] = dh_tot * tc * o * (T(1) - o);
        dcc[j] = dc_tot * f;
      }
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
