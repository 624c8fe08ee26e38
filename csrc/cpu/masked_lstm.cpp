// Compiled with -ffp-contract=fast (CMakeLists.txt) so the tile's multiply-adds become FMAs; not
// with -ffast-math: the cell's sigmoid and tanh are vectorised by hand (cpu/vector_math.h) and
// NaN and Inf propagate as in eager PyTorch (tests/test_sparse_sharing_lstm.py checks).
//
// Why a hand-written GEMM: the recurrent matmul of a step has B rows (10 in the papers' taggers)
// against a (H, 4H) weight. BLAS packs the weight on every call and reaches about half of the
// FMA peak at such shapes; here each group's weight is packed once per call into column panels,
// a tile of up to 6 rows x 2 vectors (8 rows with AVX-512) keeps its accumulators in registers,
// and the cell runs on the tile while it is still in L1, so the pre-activations never go back to
// memory.
#include "cpu/masked_lstm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "cpu/clones.h"
#include "cpu/parallel.h"
#include "cpu/vector_math.h"

namespace mtlfast {
namespace cpu {
namespace {

#define MTLFAST_INLINE inline __attribute__((always_inline))

// The recurrences are templates on the vector width W in bytes: 32 (AVX2, and the baseline clone)
// or 64 (AVX-512, chosen at run time where the CPU has it: twice the FMA width, and 32 registers
// for a taller tile). The cell's sigmoid and tanh stay 256-bit (vector_math.h); the tile is where
// the time goes.
template <typename T, int W>
struct Vec {
  typedef T type __attribute__((vector_size(W)));
};
template <typename T, int W>
constexpr int kLanes = W / static_cast<int>(sizeof(T));  // per vector: 8 floats, 4 doubles at W = 32
// Rows of a tile: 6 rows x 2 vectors = 12 accumulators of AVX2's 16 registers; AVX-512 has 32,
// so 8 rows (B = 32 rows split in 4 full tiles).
template <int W>
constexpr int kMaxRows = W == 64 ? 8 : 6;

// Panels are read with aligned vector loads.
template <typename T>
struct AlignedBuffer {
  explicit AlignedBuffer(size_t n) {
    size_t bytes = ((n * sizeof(T) + 63) / 64) * 64;
    data = static_cast<T*>(std::aligned_alloc(64, bytes > 0 ? bytes : 64));
    if (data == nullptr) throw std::bad_alloc();
  }
  ~AlignedBuffer() { std::free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  T* data;
};

// out (R, 2L) with row stride ldo = a (R rows of K, row stride lda) @ panel (K, 2L), panel aligned.
template <typename T, int W, int R>
MTLFAST_INLINE void tile(int64_t K, const T* a, int64_t lda, const T* panel, T* out, int64_t ldo) {
  using V = typename Vec<T, W>::type;
  constexpr int L = kLanes<T, W>;
  V acc0[R], acc1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = V{};
  for (int64_t k = 0; k < K; ++k) {
    const V w0 = *reinterpret_cast<const V*>(panel + k * 2 * L);
    const V w1 = *reinterpret_cast<const V*>(panel + k * 2 * L + L);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const T s = a[r * lda + k];
      acc0[r] += s * w0;
      acc1[r] += s * w1;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    std::memcpy(out + r * ldo, &acc0[r], sizeof(V));
    std::memcpy(out + r * ldo + L, &acc1[r], sizeof(V));
  }
}

template <typename T, int W>
MTLFAST_INLINE void tile_rows(int rows, int64_t K, const T* a, int64_t lda, const T* panel, T* out, int64_t ldo) {
  static_assert(kMaxRows<W> <= 8, "tile_rows dispatches up to 8 rows");
  switch (rows) {
    case 8: tile<T, W, (kMaxRows<W> >= 8 ? 8 : 1)>(K, a, lda, panel, out, ldo); break;
    case 7: tile<T, W, (kMaxRows<W> >= 7 ? 7 : 1)>(K, a, lda, panel, out, ldo); break;
    case 6: tile<T, W, 6>(K, a, lda, panel, out, ldo); break;
    case 5: tile<T, W, 5>(K, a, lda, panel, out, ldo); break;
    case 4: tile<T, W, 4>(K, a, lda, panel, out, ldo); break;
    case 3: tile<T, W, 3>(K, a, lda, panel, out, ldo); break;
    case 2: tile<T, W, 2>(K, a, lda, panel, out, ldo); break;
    default: tile<T, W, 1>(K, a, lda, panel, out, ldo); break;
  }
}

// dst[0:n) = src[0:n) for n <= Full: with n == Full (every block but a tail) a fixed-size copy
// gcc inlines as vector moves; a libc memcpy call per 32 bytes cost 14 % of the forward (perf).
template <int Full, typename T>
MTLFAST_INLINE void copy_units(T* dst, const T* src, int n) {
  if (n == Full) {
    std::memcpy(dst, src, sizeof(T) * Full);
  } else {
    std::memcpy(dst, src, sizeof(T) * n);
  }
}

template <int Full, typename T>
MTLFAST_INLINE void zero_units(T* dst, int n) {
  if (n == Full) {
    std::memset(dst, 0, sizeof(T) * Full);
  } else {
    std::memset(dst, 0, sizeof(T) * n);
  }
}

// The time slot step s of row (g, b) reads and writes: s going forward; within the row's length,
// backwards for a reverse group (like a packed sequence); padded steps map to themselves (they are
// the last slots either way), so the mapping is a permutation of the slots.
MTLFAST_INLINE int64_t time_of(int64_t s, int64_t length, bool reverse) {
  return reverse && s < length ? length - 1 - s : s;
}

// ---------------------------------------------------------------------------------------------
// Forward

template <typename T>
struct ForwardArgs {
  int64_t G, T_, B, H;
  const T *xproj, *w;
  const int64_t* lengths;
  const uint8_t* reverse;
  T *hs, *gates, *cells, *h_prev;
  T* c;                       // the running cell state (c_n), updated in place
  T* h[2];                    // double-buffered hidden state: step s reads h[s % 2], writes the other
  T* panels;                  // (G, blocks, 2 halves, H, 2L): W^T columns of L units x 4 gates
  int64_t blocks;             // ceil(H / L) unit blocks
};

// Panel (g, jb, half)[k][c] = W[g][q*H + u][k] with gate q = 2*half + c / L, unit u = jb*L + c % L
// (0 past H): the two halves of a block hold the i, f and the g, o columns of the same L units.
template <typename T, int W>
MTLFAST_INLINE void pack_forward_block(const ForwardArgs<T>& a, int64_t g, int64_t jb) {
  constexpr int L = kLanes<T, W>;
  const int64_t H = a.H;
  for (int half = 0; half < 2; ++half) {
    T* panel = a.panels + ((g * a.blocks + jb) * 2 + half) * H * 2 * L;
    for (int c = 0; c < 2 * L; ++c) {
      const int64_t q = 2 * half + c / L, u = jb * L + c % L;
      const T* src = u < H ? a.w + (g * 4 * H + q * H + u) * H : nullptr;
      for (int64_t k = 0; k < H; ++k) panel[k * 2 * L + c] = src ? src[k] : T(0);
    }
  }
}

// One (group, unit block) of step s: the tile's pre-activations, the gates and the cell for
// every row, written straight from L1.
template <typename T, int W>
MTLFAST_INLINE void forward_block(const ForwardArgs<T>& a, int64_t s, int64_t g, int64_t jb) {
  constexpr int L = kLanes<T, W>;
  constexpr int kRows = kMaxRows<W>;
  const int64_t H = a.H, B = a.B;
  const int64_t u0 = jb * L;
  const int units = static_cast<int>(std::min<int64_t>(L, H - u0));
  const T* h_in = a.h[s % 2];
  T* h_out = a.h[(s + 1) % 2];
  const T* panel = a.panels + (g * a.blocks + jb) * 2 * H * 2 * L;
  alignas(64) T pre[kRows][4 * L];
  alignas(64) T cnew[kRows][L];
  alignas(64) T hnew[kRows][L];
  for (int64_t b0 = 0; b0 < B; b0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, B - b0));
    const T* h_rows = h_in + (g * B + b0) * H;
    int64_t at[kRows];  // each row's (g, t, b) slot: rows of a reverse group differ in t
    for (int r = 0; r < rows; ++r) {
      const int64_t row = g * B + b0 + r;
      at[r] = (g * a.T_ + time_of(s, a.lengths[row], a.reverse[g])) * B + b0 + r;
      // xproj is read 4 x L values per row, 4H apart: no pattern the hardware prefetcher
      // follows, and from L3 (it is megabytes). Asked for now, it arrives while the tile runs.
      for (int q = 0; q < 4; ++q) __builtin_prefetch(a.xproj + at[r] * 4 * H + q * H + u0);
    }
    tile_rows<T, W>(rows, H, h_rows, H, panel, &pre[0][0], 4 * L);
    tile_rows<T, W>(rows, H, h_rows, H, panel + H * 2 * L, &pre[0][2 * L], 4 * L);
    for (int r = 0; r < rows; ++r) {
      const T* xp = a.xproj + at[r] * 4 * H;
      for (int q = 0; q < 4; ++q) {
        for (int u = 0; u < units; ++u) pre[r][q * L + u] += xp[q * H + u0 + u];
        for (int u = units; u < L; ++u) pre[r][q * L + u] = T(0);
      }
      // tanh(x) = 2 sigmoid(2x) - 1: one sigmoid loop over every gate vectorises best
      for (int u = 0; u < L; ++u) pre[r][2 * L + u] *= T(2);
    }
    sigmoid_into(&pre[0][0], &pre[0][0], rows * 4 * L);
    for (int r = 0; r < rows; ++r) {
      const T* c_row = a.c + (g * B + b0 + r) * H + u0;
      for (int u = 0; u < L; ++u) {
        const T gg = T(2) * pre[r][2 * L + u] - T(1);
        pre[r][2 * L + u] = gg;
        cnew[r][u] = pre[r][L + u] * (u < units ? c_row[u] : T(0)) + pre[r][u] * gg;
      }
    }
    // h = o * tanh(c) over the tile in local arrays, then written into the outputs below
    tanh_into(&cnew[0][0], &hnew[0][0], rows * L);
    for (int r = 0; r < rows; ++r) {
      for (int u = 0; u < L; ++u) hnew[r][u] *= pre[r][3 * L + u];
    }
    // gates, cells and h_prev are what backward needs; null when nothing will be differentiated
    const bool save = a.gates != nullptr;
    for (int r = 0; r < rows; ++r) {
      const int64_t row = g * B + b0 + r;
      T* hs = a.hs + at[r] * H + u0;
      T* c = a.c + row * H + u0;
      if (save) copy_units<L>(a.h_prev + at[r] * H + u0, h_in + row * H + u0, units);
      if (s >= a.lengths[row]) {
        copy_units<L>(h_out + row * H + u0, h_in + row * H + u0, units);
        zero_units<L>(hs, units);
        if (save) {
          for (int q = 0; q < 4; ++q) zero_units<L>(a.gates + at[r] * 4 * H + q * H + u0, units);
          copy_units<L>(a.cells + at[r] * H + u0, c, units);
        }
        continue;
      }
      for (int u = 0; u < units; ++u) {
        c[u] = cnew[r][u];
        hs[u] = h_out[row * H + u0 + u] = hnew[r][u];
      }
      if (save) {
        copy_units<L>(a.cells + at[r] * H + u0, c, units);
        for (int q = 0; q < 4; ++q) copy_units<L>(a.gates + at[r] * 4 * H + q * H + u0, &pre[r][q * L], units);
      }
    }
  }
}

// How the team shares the groups. Groups are independent recurrences, so they are dealt out whole,
// one member each, and a member runs its groups one after the other, all T steps of one before
// the next, with no barrier at all; the G % team groups left over are then run by the whole team
// together, one at a time, splitting the group's unit blocks (and rows) with a barrier per step.
// Either way a member's panels during a group's T steps are that group's (640 KB at H = 200,
// fp32), or its share of them, and stay in its L2. Stepping every group at each step, as before,
// streamed a member's share of every group's panels (1.9 MB) from L3 on each step: the
// recurrences ran at 100 (forward) and 102 (backward) GFLOP/s against 122 and 156 dealt whole
// (conll03: G = 6, B = 10, H = 200, fp32, 2 threads of a Xeon with 2 MB L2 per core, the best
// of 30 calls each, interleaved in one process).
//
// A member runs the groups of its Deal in order: deal[i] is the i-th group, its index among the
// threads sharing it, and how many share it (a plain loop, not a callback: a lambda would not
// inherit the AVX-512 target of the clone that calls it, and the tiles inlined into it would be
// built for the baseline ISA, 30x slower).
struct GroupShare {
  int64_t g;
  int member, sharing;
};

struct Deal {
  Deal(int64_t groups, int t, int threads) : groups(groups), t(t), threads(threads) {
    whole = groups - groups % threads;
    split(whole, t, threads, &begin, &end);
  }
  int64_t size() const { return (end - begin) + (groups - whole); }
  GroupShare operator[](int64_t i) const {
    // a member that reaches the shared groups early can start them: their data are disjoint from
    // the groups others still run, and the per-step barriers keep the sharers in step
    if (i < end - begin) return {begin + i, 0, 1};
    return {whole + i - (end - begin), t, threads};
  }
  int64_t groups, whole, begin, end;
  int t, threads;
};

template <int W, typename T>
MTLFAST_INLINE void steps(const ForwardArgs<T>& a, int t, int threads, SpinBarrier& barrier) {
  const Deal deal(a.G, t, threads);
  for (int64_t i = 0; i < deal.size(); ++i) {
    const int64_t g = deal[i].g;
    const int sharing = deal[i].sharing;
    int64_t begin, end;
    split(a.blocks, deal[i].member, sharing, &begin, &end);
    // each member packs the blocks it runs: no barrier before the first step
    for (int64_t jb = begin; jb < end; ++jb) pack_forward_block<T, W>(a, g, jb);
    for (int64_t s = 0; s < a.T_; ++s) {
      for (int64_t jb = begin; jb < end; ++jb) forward_block<T, W>(a, s, g, jb);
      if (sharing > 1) barrier.wait();  // every h row of group g, step s is written
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

template <typename T>
struct BackwardArgs {
  int64_t G, T_, B, H;
  const T *dhs, *gates, *cells, *c0;
  const int64_t* lengths;
  const uint8_t* reverse;
  T *dgates, *dc;  // dc: the running cell gradient (dc0), updated in place
  T* step_dgates;  // (G, B, 4H): step s's dgates, rows contiguous for the matmul
  T* dh[2];        // double-buffered: step s reads dh[parity], the matmul writes the other
  T* panels;       // (G, blocks, 4H, 2L): W columns of 2L units
  const T* w;
  int64_t blocks;  // ceil(H / 2L)
};

template <typename T, int W>
MTLFAST_INLINE void pack_backward_block(const BackwardArgs<T>& a, int64_t g, int64_t cb) {
  constexpr int L = kLanes<T, W>;
  const int64_t H = a.H;
  T* panel = a.panels + (g * a.blocks + cb) * 4 * H * 2 * L;
  const int64_t u0 = cb * 2 * L;
  const int units = static_cast<int>(std::min<int64_t>(2 * L, H - u0));
  for (int64_t k = 0; k < 4 * H; ++k) {
    const T* src = a.w + (g * 4 * H + k) * H + u0;
    for (int c = 0; c < 2 * L; ++c) panel[k * 2 * L + c] = c < units ? src[c] : T(0);
  }
}

// The cell's backward for one row: dh_tot = dhs + dh, the pre-activation gradients, dc <- dc_tot * f.
// In chunks of 8 units: tanh(c) of a chunk is one vector call, the rest vectorises as it stands.
template <typename T>
MTLFAST_INLINE void backward_row(int64_t H, const T* __restrict act, const T* __restrict cs, const T* __restrict cp,
                                 const T* __restrict dy, const T* __restrict dh, T* __restrict dc, T* __restrict d) {
  constexpr int64_t C = 8;
  const T* i = act;
  const T* f = act + H;
  const T* g = act + 2 * H;
  const T* o = act + 3 * H;
  alignas(64) T tcs[C];
  for (int64_t j0 = 0; j0 < H; j0 += C) {
    const int64_t n = std::min<int64_t>(C, H - j0);
    tanh_into(cs + j0, tcs, n);
    for (int64_t u = 0; u < n; ++u) {
      const int64_t j = j0 + u;
      const T tc = tcs[u];
      const T dh_tot = dy[j] + dh[j];
      const T dc_tot = dc[j] + dh_tot * o[j] * (T(1) - tc * tc);
      d[j] = dc_tot * g[j] * i[j] * (T(1) - i[j]);
      d[H + j] = dc_tot * cp[j] * f[j] * (T(1) - f[j]);
      d[2 * H + j] = dc_tot * i[j] * (T(1) - g[j] * g[j]);
      d[3 * H + j] = dh_tot * tc * o[j] * (T(1) - o[j]);
      dc[j] = dc_tot * f[j];
    }
  }
}

template <typename T>
MTLFAST_INLINE void backward_cell(const BackwardArgs<T>& a, int64_t s, int64_t row) {
  const int64_t H = a.H, B = a.B, g = row / B, b = row % B, length = a.lengths[row];
  const int64_t at = (g * a.T_ + time_of(s, length, a.reverse[g])) * B + b;
  T* d = a.step_dgates + row * 4 * H;
  if (s >= length) {
    std::memset(d, 0, sizeof(T) * 4 * H);
  } else {
    const T* c_prev = s > 0 ? a.cells + ((g * a.T_ + time_of(s - 1, length, a.reverse[g])) * B + b) * H
                            : a.c0 + row * H;
    backward_row(H, a.gates + at * 4 * H, a.cells + at * H, c_prev, a.dhs + at * H, a.dh[s % 2] + row * H,
                 a.dc + row * H, d);
  }
  std::memcpy(a.dgates + at * 4 * H, d, sizeof(T) * 4 * H);
}

// dh entering step s-1 for one (group, block of 2L units): dgates[:, s] @ W; rows inactive at s
// carry dh through unchanged.
template <typename T, int W>
MTLFAST_INLINE void backward_block(const BackwardArgs<T>& a, int64_t s, int64_t g, int64_t cb) {
  constexpr int L = kLanes<T, W>;
  constexpr int kRows = kMaxRows<W>;
  const int64_t H = a.H, B = a.B;
  const int64_t u0 = cb * 2 * L;
  const int units = static_cast<int>(std::min<int64_t>(2 * L, H - u0));
  const T* dh_in = a.dh[s % 2];
  T* dh_out = a.dh[(s + 1) % 2];
  const T* panel = a.panels + (g * a.blocks + cb) * 4 * H * 2 * L;
  alignas(64) T out[kRows][2 * L];
  for (int64_t b0 = 0; b0 < B; b0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, B - b0));
    tile_rows<T, W>(rows, 4 * H, a.step_dgates + (g * B + b0) * 4 * H, 4 * H, panel, &out[0][0], 2 * L);
    for (int r = 0; r < rows; ++r) {
      const int64_t row = g * B + b0 + r;
      const T* src = s < a.lengths[row] ? &out[r][0] : dh_in + row * H + u0;
      copy_units<2 * L>(dh_out + row * H + u0, src, units);
    }
  }
}

template <int W, typename T>
MTLFAST_INLINE void steps(const BackwardArgs<T>& a, int t, int threads, SpinBarrier& barrier) {
  const Deal deal(a.G, t, threads);
  for (int64_t i = 0; i < deal.size(); ++i) {
    const int64_t g = deal[i].g;
    const int sharing = deal[i].sharing;
    int64_t block_begin, block_end, row_begin, row_end;
    split(a.blocks, deal[i].member, sharing, &block_begin, &block_end);
    split(a.B, deal[i].member, sharing, &row_begin, &row_end);
    for (int64_t cb = block_begin; cb < block_end; ++cb) pack_backward_block<T, W>(a, g, cb);
    for (int64_t s = a.T_ - 1; s >= 0; --s) {
      for (int64_t b = row_begin; b < row_end; ++b) backward_cell(a, s, g * a.B + b);
      if (sharing > 1) barrier.wait();  // every dgates[g, s] row is written
      for (int64_t cb = block_begin; cb < block_end; ++cb) backward_block<T, W>(a, s, g, cb);
      if (sharing > 1) barrier.wait();  // every dh row of group g, step s-1 is written
    }
  }
}

// A team member's share of a recurrence (ForwardArgs or BackwardArgs) at either width: the
// 32-byte body as AVX2 and baseline clones, the 64-byte one built for AVX-512.
template <typename Args>
MTLFAST_CLONES void steps_avx2(const Args& a, int t, int threads, SpinBarrier& barrier) {
  steps<32>(a, t, threads, barrier);
}

#ifdef MTLFAST_AVX512
template <typename Args>
MTLFAST_AVX512 void steps_avx512(const Args& a, int t, int threads, SpinBarrier& barrier) {
  steps<64>(a, t, threads, barrier);
}
#endif

template <typename Args>
void run_steps(const Args& a, int team, int wide) {
  run_team(team, [&](int t, int n, SpinBarrier& barrier) {
#ifdef MTLFAST_AVX512
    if (wide == 64) return steps_avx512(a, t, n, barrier);
#endif
    steps_avx2(a, t, n, barrier);
  });
}

template <typename T>
MTLFAST_CLONES void mask_select_range(int64_t begin, int64_t end, int64_t size, const T* src, const int64_t* index,
                                      const uint8_t* masks, const int64_t* mask_index, T* out) {
  while (begin < end) {
    const int64_t g = begin / size, offset = begin % size, n = std::min(end - begin, size - offset);
    const T* s = src + (index ? index[g] : g) * size + offset;
    T* o = out + g * size + offset;
    const int64_t m = masks ? mask_index[g] : -1;
    if (m < 0) {
      if (o != s) std::memcpy(o, s, sizeof(T) * n);
    } else {
      const uint8_t* keep = masks + m * size + offset;
      // a select, so inf or NaN outside the mask is dropped; gcc makes it a vector blend
      // (branch-free: random masks defeat branch prediction), 0.86 ms against 2.4 ms for the
      // product s * keep it replaced on a (6, 800, 330) float32 mask, one thread (the
      // bool-to-float conversion was the cost)
      for (int64_t i = 0; i < n; ++i) o[i] = keep[i] != 0 ? s[i] : T(0);
    }
    begin += n;
  }
}

}  // namespace

template <typename T>
void lstm_forward(int64_t G, int64_t T_, int64_t B, int64_t H, const T* xproj, const T* w, const T* h0,
                  const T* c0, const int64_t* lengths, const uint8_t* reverse, T* hs, T* gates, T* cells, T* h_prev,
                  T* h_n, T* c_n, int threads) {
  if (G == 0 || B == 0 || H == 0) return;
  const int wide = vector_bytes();
  const int L = wide / static_cast<int>(sizeof(T));
  const int64_t blocks = (H + L - 1) / L;
  AlignedBuffer<T> panels(G * blocks * 2 * H * 2 * L);
  AlignedBuffer<T> h_spare(G * B * H);
  std::memcpy(c_n, c0, sizeof(T) * G * B * H);
  // h[0] is read at step 0; the final state lands in h[T % 2], which should be h_n.
  T* h_even = T_ % 2 == 0 ? h_n : h_spare.data;
  T* h_odd = T_ % 2 == 0 ? h_spare.data : h_n;
  std::memcpy(h_even, h0, sizeof(T) * G * B * H);
  ForwardArgs<T> a{G, T_, B, H, xproj, w, lengths, reverse, hs, gates, cells, h_prev, c_n, {h_even, h_odd},
                   panels.data, blocks};
  const int team = team_size(threads, G * blocks);
  run_steps(a, team, wide);
}

template <typename T>
void lstm_backward(int64_t G, int64_t T_, int64_t B, int64_t H, const T* dhs, const T* dh_n, const T* dc_n,
                   const T* gates, const T* cells, const T* c0, const T* w, const int64_t* lengths,
                   const uint8_t* reverse, T* dgates, T* dh0, T* dc0, int threads) {
  if (G == 0 || B == 0 || H == 0) return;
  if (T_ == 0) {
    std::memcpy(dh0, dh_n, sizeof(T) * G * B * H);
    std::memcpy(dc0, dc_n, sizeof(T) * G * B * H);
    return;
  }
  const int wide = vector_bytes();
  const int L = wide / static_cast<int>(sizeof(T));
  const int64_t blocks = (H + 2 * L - 1) / (2 * L);
  AlignedBuffer<T> panels(G * blocks * 4 * H * 2 * L);
  AlignedBuffer<T> dh_spare(G * B * H);
  AlignedBuffer<T> step_dgates(G * B * 4 * H);
  std::memcpy(dc0, dc_n, sizeof(T) * G * B * H);
  // Step s reads dh[s % 2] and writes the other; the last step (s = 0) writes dh[1] = dh0.
  T* dh_parity[2] = {dh_spare.data, dh0};
  std::memcpy(dh_parity[(T_ - 1) % 2], dh_n, sizeof(T) * G * B * H);
  BackwardArgs<T> a{G, T_, B, H, dhs, gates, cells, c0, lengths, reverse, dgates, dc0, step_dgates.data,
                    {dh_parity[0], dh_parity[1]},
                    panels.data, w, blocks};
  const int team = team_size(threads, std::min(G * blocks, G * B));
  run_steps(a, team, wide);
}

template <typename T>
void mask_select(int64_t G, int64_t size, const T* src, const int64_t* index, const uint8_t* masks,
                 const int64_t* mask_index, T* out, int threads) {
  const int64_t total = G * size;
  // below ~256K elements a second thread costs more than it saves
  const int team = team_size(threads, total / (1 << 18) + 1);
  run_team(team, [&](int t, int n, SpinBarrier&) {
    int64_t begin, end;
    split(total, t, n, &begin, &end);
    mask_select_range(begin, end, size, src, index, masks, mask_index, out);
  });
}

#define MTLFAST_INSTANTIATE(T)                                                                                   \
  template void lstm_forward<T>(int64_t, int64_t, int64_t, int64_t, const T*, const T*, const T*, const T*,   \
                                const int64_t*, const uint8_t*, T*, T*, T*, T*, T*, T*, int);                   \
  template void lstm_backward<T>(int64_t, int64_t, int64_t, int64_t, const T*, const T*, const T*, const T*,  \
                                 const T*, const T*, const T*, const int64_t*, const uint8_t*, T*, T*, T*, int); \
  template void mask_select<T>(int64_t, int64_t, const T*, const int64_t*, const uint8_t*, const int64_t*, T*, int);
MTLFAST_INSTANTIATE(float)
MTLFAST_INSTANTIATE(double)
#undef MTLFAST_INSTANTIATE

}  // namespace cpu
}  // namespace mtlfast
