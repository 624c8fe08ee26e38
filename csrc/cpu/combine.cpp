#include "cpu/combine.h"

#include <algorithm>
#include <vector>

#include "cpu/clones.h"
#include "cpu/parallel.h"

namespace mtlfast {
namespace cpu {
namespace {

// Elements of a chunk: out's chunk (and dout's) stays in L2 while the components stream past it,
// in runs long enough for the hardware prefetcher (2048-element runs were 1.6x slower backward).
constexpr int64_t kChunk = 1 << 14;
// Below this many elements per thread a second thread costs more than it saves.
constexpr int64_t kMinPerThread = 1 << 15;

// w_c = z_c / D, D = max(1, sum z), in T; the sum (in float64: C is small) and 1 / D through
// the pointers.
template <typename T>
std::vector<T> weights(int64_t C, const T* z, double* total, double* inv) {
  double sum = 0.0;
  for (int64_t c = 0; c < C; ++c) sum += static_cast<double>(z[c]);
  *total = sum;
  *inv = 1.0 / std::max(1.0, sum);
  std::vector<T> w(C);
  for (int64_t c = 0; c < C; ++c) w[c] = static_cast<T>(static_cast<double>(z[c]) * *inv);
  return w;
}

int team_for(int64_t N, int threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, N / kMinPerThread)));
}

// Components summed in one pass over out: a chunk is read and written once per kPass components,
// not once per component (the components are often still in L3, where out's extra passes showed:
// 1.7x torch.compile's one-pass loop on 7 components before).
constexpr int kPass = 8;

// dst (+)= the K components src, weighted by w.
template <typename T, int K>
inline void accumulate(bool first, int64_t n, T* dst, const T* const* src, const T* w) {
  for (int64_t j = 0; j < n; ++j) {
    T acc = first ? T(0) : dst[j];
    for (int k = 0; k < K; ++k) acc += w[k] * src[k][j];
    dst[j] = acc;
  }
}

template <typename T>
MTLFAST_CLONES void forward_range(int64_t begin, int64_t end, int64_t C, int64_t N, const T* outputs,
                                  const T* w, T* out) {
  for (int64_t b = begin; b < end; b += kChunk) {
    const int64_t n = std::min(kChunk, end - b);
    T* dst = out + b;
    // every component, z_c = 0 ones too: 0 * inf and 0 * NaN must give NaN here as they do in
    // the reference and the Triton kernel (backends agree on every input)
    for (int64_t c = 0; c < C; c += kPass) {
      const T* src[kPass];
      const int64_t k = std::min<int64_t>(kPass, C - c);
      for (int64_t i = 0; i < k; ++i) src[i] = outputs + (c + i) * N + b;
      const bool first = c == 0;
      switch (k) {
        case 1: accumulate<T, 1>(first, n, dst, src, w + c); break;
        case 2: accumulate<T, 2>(first, n, dst, src, w + c); break;
        case 3: accumulate<T, 3>(first, n, dst, src, w + c); break;
        case 4: accumulate<T, 4>(first, n, dst, src, w + c); break;
        case 5: accumulate<T, 5>(first, n, dst, src, w + c); break;
        case 6: accumulate<T, 6>(first, n, dst, src, w + c); break;
        case 7: accumulate<T, 7>(first, n, dst, src, w + c); break;
        default: accumulate<T, kPass>(first, n, dst, src, w + c); break;
      }
    }
    if (C == 0) std::fill(dst, dst + n, T(0));
  }
}

// dots[c] += dout . outputs_c over [begin, end), and doutputs_c = w_c dout there; each chunk's dot
// is summed in T (a vectorised reduction, the file is built with -fassociative-math) and added to
// the float64 total.
template <typename T>
MTLFAST_CLONES void backward_range(int64_t begin, int64_t end, int64_t C, int64_t N, const T* dout,
                                   const T* outputs, const T* w, T* doutputs, double* dots) {
  for (int64_t b = begin; b < end; b += kChunk) {
    const int64_t n = std::min(kChunk, end - b);
    const T* g = dout + b;
    for (int64_t c = 0; c < C; ++c) {
      const T* src = outputs + c * N + b;
      T* dst = doutputs != nullptr ? doutputs + c * N + b : nullptr;
      const T wc = w[c];
      T sum = T(0);
      if (dots != nullptr && dst != nullptr) {  // one pass over the chunk of dout for both
        for (int64_t j = 0; j < n; ++j) {
          sum += g[j] * src[j];
          dst[j] = wc * g[j];
        }
      } else if (dots != nullptr) {
        for (int64_t j = 0; j < n; ++j) sum += g[j] * src[j];
      } else if (dst != nullptr) {
        for (int64_t j = 0; j < n; ++j) dst[j] = wc * g[j];
      }
      if (dots != nullptr) dots[c] += static_cast<double>(sum);
    }
  }
}

}  // namespace

template <typename T>
void allocation_combine_forward(int64_t C, int64_t N, const T* outputs, const T* z, T* out, int threads) {
  double total, inv;
  const std::vector<T> w = weights(C, z, &total, &inv);
  run_team(team_for(N, threads), [&](int t, int count, SpinBarrier&) {
    int64_t begin, end;
    split(N, t, count, &begin, &end);
    forward_range(begin, end, C, N, outputs, w.data(), out);
  });
}

template <typename T>
void allocation_combine_backward(int64_t C, int64_t N, const T* dout, const T* outputs, const T* z, T* doutputs,
                                 T* dz, int threads) {
  double total, inv;
  const std::vector<T> w = weights(C, z, &total, &inv);
  const int team = team_for(N, threads);
  std::vector<double> dots(static_cast<size_t>(team) * C, 0.0);  // one row per thread
  run_team(team, [&](int t, int count, SpinBarrier&) {
    int64_t begin, end;
    split(N, t, count, &begin, &end);
    backward_range(begin, end, C, N, dout, outputs, w.data(), doutputs, dz != nullptr ? &dots[t * C] : nullptr);
  });
  if (dz == nullptr) return;
  std::vector<double> dot(C, 0.0);
  for (int t = 0; t < team; ++t) {
    for (int64_t c = 0; c < C; ++c) dot[c] += dots[t * C + c];
  }
  // d out / d D = -out / D, and dD / dz_c = [sum z >= 1]: dz_c = (dot_c - [sum z >= 1] (dout . out)) / D
  double through_d = 0.0;
  if (total >= 1.0) {
    for (int64_t c = 0; c < C; ++c) through_d += static_cast<double>(z[c]) * dot[c];
    through_d *= inv;
  }
  for (int64_t c = 0; c < C; ++c) dz[c] = static_cast<T>((dot[c] - through_d) * inv);
}

#define MTLFAST_INSTANTIATE(T)                                                                              \
  template void allocation_combine_forward<T>(int64_t, int64_t, const T*, const T*, T*, int);               \
  template void allocation_combine_backward<T>(int64_t, int64_t, const T*, const T*, const T*, T*, T*, int);
MTLFAST_INSTANTIATE(float)
MTLFAST_INSTANTIATE(double)
#undef MTLFAST_INSTANTIATE

}  // namespace cpu
}  // namespace mtlfast
