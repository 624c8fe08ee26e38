// Masked linear: y = x @ (W ⊙ M)^T + b and its gradients, M bit-packed (see masked_linear.h).
//
// All three ops are one tiled GEMM, C (m x n) = A (m x k) · B (k x n), that differs only in
// where the operands lie and in what is done to the output:
//
//   op           C    A             B              mask applied          extra
//   forward      y    x             W^T            to B while staging    + bias
//   grad_input   dx   dy            W              to B while staging
//   grad_weight  dW   dy^T          x              in the epilogue       dbias = row sums of A
//
// Operands are read in their own memory orientation ("outer" = the tensor's first index,
// "inner" = its second), so the common K-contiguous x / W and row-major dy all give 16-byte
// vector loads. The mask is applied in registers between the global load and the shared-memory
// store, so W ⊙ M never exists in global memory. Loads for tile t+1 are issued before the math
// on tile t (register prefetch into a double-buffered shared-memory stage), one barrier per
// K step.
//
// fp16 / bf16: WMMA tensor cores, fp32 accumulators. fp32: SIMT FMA (IEEE fp32, no TF32, as
// torch's default). fp64: SIMT FMA in fp64.
#include "cuda/masked_linear.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <climits>
#include <cstdint>
#include <type_traits>

namespace mtlfast {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Element types

enum class Op { kForward, kGradInput, kGradWeight };

template <typename T> struct Elem;
template <> struct Elem<float> {
  using Acc = float;
  using Raw = unsigned int;
  static __device__ __forceinline__ float from_acc(float v) { return v; }
};
template <> struct Elem<double> {
  using Acc = double;
  using Raw = unsigned long long;
  static __device__ __forceinline__ double from_acc(double v) { return v; }
};
template <> struct Elem<__half> {
  using Acc = float;
  using Raw = unsigned short;
  static __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
};
template <> struct Elem<__nv_bfloat16> {
  using Acc = float;
  using Raw = unsigned short;
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

__host__ __device__ constexpr int cmax(int a, int b) { return a > b ? a : b; }
__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The staging path moves bit patterns only (zero is all-zero bits in every dtype here), so it
// works on unsigned integers of the element's size: no arithmetic, no conversion constructors.
template <typename Raw> union Chunk {
  uint4 u;
  Raw e[16 / sizeof(Raw)];
};

// ---------------------------------------------------------------------------------------------
// Global -> registers -> shared memory staging of one operand tile.
//
// The tile is OUTER x INNER elements in the tensor's own orientation. Each thread owns kCount
// chunks of kVec consecutive inner elements (16 bytes). With kVecLoad (inner stride 1, 16-byte
// aligned base and outer stride, checked on the host) a chunk is one 128-bit load; otherwise
// each element is loaded with its own stride. Elements outside the tensor are zero, so tails
// need no special case in the math.
template <typename Raw, int OUTER, int INNER, int NTHREADS>
struct TileRegs {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(Raw));
  static constexpr int kChunksPerOuter = INNER / kVec;
  static constexpr int kCount = OUTER * kChunksPerOuter / NTHREADS;
  static_assert(INNER % kVec == 0, "tile inner extent must be a multiple of the chunk");
  static_assert((OUTER * kChunksPerOuter) % NTHREADS == 0, "chunks must split evenly over threads");
  static_assert(32 % kVec == 0, "a chunk must not straddle two mask words");

  Chunk<Raw> r[kCount];

  // kMasked: the tensor is W itself, so (outer, inner) is (row, column) of the mask.
  template <bool kVecLoad, bool kMasked>
  __device__ __forceinline__ void load(const Raw* g, int64_t so, int64_t si, int64_t o0, int64_t i0,
                                       int64_t o_end, int64_t i_end, const int32_t* mask,
                                       int64_t mask_rs) {
#pragma unroll
    for (int c = 0; c < kCount; ++c) {
      const int chunk = static_cast<int>(threadIdx.x) + c * NTHREADS;
      const int64_t o = o0 + chunk / kChunksPerOuter;
      const int64_t i = i0 + (chunk % kChunksPerOuter) * kVec;
      r[c].u = make_uint4(0u, 0u, 0u, 0u);
      if (o < o_end && i < i_end) {
        const Raw* row = g + o * so;
        if (kVecLoad && i + kVec <= i_end) {
          r[c].u = __ldg(reinterpret_cast<const uint4*>(row + i));
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            if (i + e < i_end) r[c].e[e] = __ldg(row + (i + e) * si);
          }
        }
        if (kMasked) {
          // i is a multiple of kVec, so the chunk's bits sit in one word; i < i_end keeps the
          // word inside the row's ceil(K/32) words.
          const uint32_t bits =
              static_cast<uint32_t>(__ldg(mask + o * mask_rs + (i >> 5))) >> (i & 31);
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            if (!((bits >> e) & 1u)) r[c].e[e] = 0;
          }
        }
      }
    }
  }

  // Element (outer, inner) of the tile goes to s[outer * SO + inner * SI].
  template <int SO, int SI>
  __device__ __forceinline__ void store(Raw* s) const {
#pragma unroll
    for (int c = 0; c < kCount; ++c) {
      const int chunk = static_cast<int>(threadIdx.x) + c * NTHREADS;
      const int ot = chunk / kChunksPerOuter;
      const int it = (chunk % kChunksPerOuter) * kVec;
      if (SI == 1) {
        *reinterpret_cast<uint4*>(s + ot * SO + it) = r[c].u;
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) s[ot * SO + (it + e) * SI] = r[c].e[e];
      }
    }
  }
};

// Which operand has K as its inner (memory-contiguous in the common case) index.
template <Op kOp> struct Orientation {
  static constexpr bool kAKInner = kOp != Op::kGradWeight;  // x (M,K), dy (M,N) vs dy^T
  static constexpr bool kBKInner = kOp == Op::kForward;     // W^T vs W, x
};

// ---------------------------------------------------------------------------------------------
// Tensor-core tile (fp16 / bf16): WARPS_M x WARPS_N warps, each owning a (BM/WARPS_M) x
// (BN/WARPS_N) block of 16x16 WMMA accumulators. Shared memory keeps each operand in its load
// orientation (so staging stores are 16-byte vectors) and WMMA reads it row- or column-major
// accordingly.
template <typename T, int BM_, int BN_, int BK_, int WARPS_M, int WARPS_N, Op kOp>
struct WmmaTile {
  using Acc = float;
  using Raw = typename Elem<T>::Raw;
  static constexpr int BM = BM_, BN = BN_, BK = BK_;
  static constexpr bool kAKInner = Orientation<kOp>::kAKInner;
  static constexpr bool kBKInner = Orientation<kOp>::kBKInner;
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int kMinBlocks = 1;
  static constexpr int kWarpM = BM / WARPS_M, kWarpN = BN / WARPS_N;
  static constexpr int kFragM = kWarpM / 16, kFragN = kWarpN / 16;
  static_assert(kWarpM % 16 == 0 && kWarpN % 16 == 0 && BK % 16 == 0, "WMMA works on 16x16x16");

  // 8 elements (16 bytes) of padding: consecutive rows start in different banks for the
  // fragment loads, while ld stays a multiple of 8 and every 16-row fragment start 32-byte
  // aligned, as load_matrix_sync requires.
  static constexpr int kPad = 8;
  static constexpr int kAOuter = kAKInner ? BM : BK, kAInner = kAKInner ? BK : BM;
  static constexpr int kBOuter = kBKInner ? BN : BK, kBInner = kBKInner ? BK : BN;
  static constexpr int kLdA = kAInner + kPad, kLdB = kBInner + kPad;
  static constexpr int kASize = kAOuter * kLdA, kBSize = kBOuter * kLdB;
  static constexpr int kASO = kLdA, kASI = 1, kBSO = kLdB, kBSI = 1;
  static constexpr int kEpilogueBytes = WARPS_M * WARPS_N * 16 * 16 * static_cast<int>(sizeof(float));

  using LayoutA = typename std::conditional<kAKInner, nvcuda::wmma::row_major, nvcuda::wmma::col_major>::type;
  using LayoutB = typename std::conditional<kBKInner, nvcuda::wmma::col_major, nvcuda::wmma::row_major>::type;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, LayoutA>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, LayoutB>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

  struct Accum {
    FragC f[kFragM][kFragN];
  };

  static __device__ __forceinline__ int warp_m() { return static_cast<int>(threadIdx.x) / 32 / WARPS_N; }
  static __device__ __forceinline__ int warp_n() { return static_cast<int>(threadIdx.x) / 32 % WARPS_N; }

  static __device__ __forceinline__ void zero(Accum& acc) {
#pragma unroll
    for (int fm = 0; fm < kFragM; ++fm)
#pragma unroll
      for (int fn = 0; fn < kFragN; ++fn) nvcuda::wmma::fill_fragment(acc.f[fm][fn], 0.0f);
  }

  // A(m, k) of the staged tile, for the dbias row sums.
  static __device__ __forceinline__ Acc a_at(const T* as, int m, int k) {
    return to_acc(kAKInner ? as[m * kLdA + k] : as[k * kLdA + m]);
  }

  static __device__ __forceinline__ void mma(Accum& acc, const T* as, const T* bs) {
    const int m_base = warp_m() * kWarpM, n_base = warp_n() * kWarpN;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      FragB b[kFragN];
#pragma unroll
      for (int fn = 0; fn < kFragN; ++fn) {
        const int n0 = n_base + fn * 16;
        nvcuda::wmma::load_matrix_sync(b[fn], kBKInner ? bs + n0 * kLdB + kk : bs + kk * kLdB + n0, kLdB);
      }
      // One A fragment live at a time keeps registers for the prefetched next tile.
#pragma unroll
      for (int fm = 0; fm < kFragM; ++fm) {
        const int m0 = m_base + fm * 16;
        FragA a;
        nvcuda::wmma::load_matrix_sync(a, kAKInner ? as + m0 * kLdA + kk : as + kk * kLdA + m0, kLdA);
#pragma unroll
        for (int fn = 0; fn < kFragN; ++fn) nvcuda::wmma::mma_sync(acc.f[fm][fn], a, b[fn], acc.f[fm][fn]);
      }
    }
  }

  // Accumulator element order is opaque, so each fragment goes through a per-warp 16x16 fp32
  // scratch (the pipeline's shared memory, free once the main loop has ended) and every lane
  // then owns 8 consecutive columns of one row. store(li, lj, v) gets tile-local coordinates.
  template <class Store>
  static __device__ __forceinline__ void epilogue(Accum& acc, unsigned char* smem, Store&& store) {
    float* scratch = reinterpret_cast<float*>(smem) + (static_cast<int>(threadIdx.x) / 32) * 256;
    const int lane = static_cast<int>(threadIdx.x) % 32;
    const int r = lane / 2, c0 = (lane % 2) * 8;
    const int m_base = warp_m() * kWarpM, n_base = warp_n() * kWarpN;
#pragma unroll
    for (int fm = 0; fm < kFragM; ++fm) {
#pragma unroll
      for (int fn = 0; fn < kFragN; ++fn) {
        nvcuda::wmma::store_matrix_sync(scratch, acc.f[fm][fn], 16, nvcuda::wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int e = 0; e < 8; ++e) store(m_base + fm * 16 + r, n_base + fn * 16 + c0 + e, scratch[r * 16 + c0 + e]);
        __syncwarp();  // the next fragment overwrites the scratch
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// SIMT tile (fp32 / fp64): each thread owns TM x TN outputs. Shared memory is [k][m] and [k][n]
// whatever the operand's orientation, so a thread's values at one k are contiguous and read
// with 16-byte loads; they are split in groups of kVE spread over the tile so that the 8 threads
// of a 128-bit shared-memory phase read consecutive addresses.
template <typename T, int BM_, int BN_, int BK_, int TM, int TN, Op kOp>
struct SimtTile {
  using Acc = T;
  using Raw = typename Elem<T>::Raw;
  static constexpr int BM = BM_, BN = BN_, BK = BK_;
  static constexpr bool kAKInner = Orientation<kOp>::kAKInner;
  static constexpr bool kBKInner = Orientation<kOp>::kBKInner;
  static constexpr int kVE = 16 / static_cast<int>(sizeof(T));
  static constexpr int kThreadsM = BM / TM, kThreadsN = BN / TN;
  static constexpr int kThreads = kThreadsM * kThreadsN;
  // Two blocks per SM (<= 128 registers) where the accumulators are small; with no minimum at
  // all ptxas picked 64 registers for one variant and spilled.
  static constexpr int kMinBlocks = TM * TN <= 16 ? 2 : 1;
  static constexpr int kGroupsM = TM / kVE, kGroupsN = TN / kVE;
  static_assert(TM % kVE == 0 && TN % kVE == 0, "per-thread extents must be whole 16-byte groups");

  // Padding of one 16-byte group: the transposed (scalar) stores of a K-inner operand then hit
  // distinct banks, and rows stay 16-byte aligned for the vector reads.
  static constexpr int kLdA = BM + kVE, kLdB = BN + kVE;
  static constexpr int kASize = BK * kLdA, kBSize = BK * kLdB;
  static constexpr int kAOuter = kAKInner ? BM : BK, kAInner = kAKInner ? BK : BM;
  static constexpr int kBOuter = kBKInner ? BN : BK, kBInner = kBKInner ? BK : BN;
  static constexpr int kASO = kAKInner ? 1 : kLdA, kASI = kAKInner ? kLdA : 1;
  static constexpr int kBSO = kBKInner ? 1 : kLdB, kBSI = kBKInner ? kLdB : 1;
  static constexpr int kEpilogueBytes = 0;

  struct Accum {
    Acc v[TM][TN];
  };

  static __device__ __forceinline__ int ty() { return static_cast<int>(threadIdx.x) / kThreadsN; }
  static __device__ __forceinline__ int tx() { return static_cast<int>(threadIdx.x) % kThreadsN; }
  // Tile-local row of the thread's r-th accumulator row (likewise columns).
  static __device__ __forceinline__ int row(int r) { return (r / kVE) * (kThreadsM * kVE) + ty() * kVE + r % kVE; }
  static __device__ __forceinline__ int col(int c) { return (c / kVE) * (kThreadsN * kVE) + tx() * kVE + c % kVE; }

  static __device__ __forceinline__ void zero(Accum& acc) {
#pragma unroll
    for (int r = 0; r < TM; ++r)
#pragma unroll
      for (int c = 0; c < TN; ++c) acc.v[r][c] = Acc(0);
  }

  static __device__ __forceinline__ Acc a_at(const T* as, int m, int k) { return as[k * kLdA + m]; }

  static __device__ __forceinline__ void load16(const float* p, float* v) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
  }
  static __device__ __forceinline__ void load16(const double* p, double* v) {
    const double2 q = *reinterpret_cast<const double2*>(p);
    v[0] = q.x; v[1] = q.y;
  }

  static __device__ __forceinline__ void mma(Accum& acc, const T* as, const T* bs) {
    const int a_off = ty() * kVE, b_off = tx() * kVE;
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      T a[TM], b[TN];
#pragma unroll
      for (int g = 0; g < kGroupsM; ++g) load16(as + k * kLdA + g * (kThreadsM * kVE) + a_off, a + g * kVE);
#pragma unroll
      for (int g = 0; g < kGroupsN; ++g) load16(bs + k * kLdB + g * (kThreadsN * kVE) + b_off, b + g * kVE);
#pragma unroll
      for (int r = 0; r < TM; ++r)
#pragma unroll
        for (int c = 0; c < TN; ++c) acc.v[r][c] = fma(a[r], b[c], acc.v[r][c]);
    }
  }

  template <class Store>
  static __device__ __forceinline__ void epilogue(Accum& acc, unsigned char*, Store&& store) {
#pragma unroll
    for (int r = 0; r < TM; ++r)
#pragma unroll
      for (int c = 0; c < TN; ++c) store(row(r), col(c), acc.v[r][c]);
  }
};

// ---------------------------------------------------------------------------------------------
// The kernel

template <typename T> struct GemmArgs {
  int64_t m, n, k;               // C (m x n) = A (m x k) · B (k x n)
  const T* a;                    // A as it lies in memory: outer/inner strides of its tensor
  int64_t a_so, a_si;
  const T* b;
  int64_t b_so, b_si;
  const int32_t* mask;           // bits of W: B's (outer, inner), or C's (i, j) for grad_weight
  int64_t mask_rs;
  const T* bias;                 // forward only, may be null
  T* c;
  int64_t c_sm, c_sn;
  T* dbias;                      // grad_weight only, may be null
};

template <class Tile, typename T, Op kOp, bool kVec>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocks) masked_gemm_kernel(const GemmArgs<T> p) {
  using Acc = typename Tile::Acc;
  using Raw = typename Elem<T>::Raw;
  constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, kThreads = Tile::kThreads;
  constexpr bool kMaskB = kOp != Op::kGradWeight;
  constexpr int kStageBytes = (Tile::kASize + Tile::kBSize) * static_cast<int>(sizeof(T));
  constexpr int kDbiasBytes = kOp == Op::kGradWeight ? kThreads * static_cast<int>(sizeof(Acc)) : 0;
  constexpr int kSmemBytes = cmax(2 * kStageBytes, cmax(Tile::kEpilogueBytes, kDbiasBytes));
  static_assert((Tile::kASize * sizeof(T)) % 128 == 0 && (Tile::kBSize * sizeof(T)) % 128 == 0,
                "stage buffers must keep the 32-byte WMMA / 16-byte vector alignment");
  __shared__ __align__(128) unsigned char smem[kSmemBytes];
  T* const sa0 = reinterpret_cast<T*>(smem);
  T* const sb0 = sa0 + Tile::kASize;
  T* const sa1 = sb0 + Tile::kBSize;
  T* const sb1 = sa1 + Tile::kASize;

  // Grouped raster (8 row tiles per group): blocks that run together share B column tiles and
  // a few A row tiles, so both stay in L2. The grid is 1D, so no 65535 limit on either side.
  constexpr int64_t kGroup = 8;
  const int64_t tiles_m = ceil_div(p.m, BM);
  const int64_t tiles_n = p.n > 0 ? ceil_div(p.n, BN) : 1;  // grad_weight with K == 0 still owes dbias
  const int64_t tile = blockIdx.x;
  const int64_t per_group = kGroup * tiles_n;
  const int64_t first_m = (tile / per_group) * kGroup;
  const int64_t group_m = tiles_m - first_m < kGroup ? tiles_m - first_m : kGroup;
  const int64_t tm = first_m + (tile % per_group) % group_m;
  const int64_t tn = (tile % per_group) / group_m;
  const int64_t m0 = tm * BM, n0 = tn * BN;

  TileRegs<Raw, Tile::kAOuter, Tile::kAInner, kThreads> ra;
  TileRegs<Raw, Tile::kBOuter, Tile::kBInner, kThreads> rb;
  const Raw* const ga = reinterpret_cast<const Raw*>(p.a);
  const Raw* const gb = reinterpret_cast<const Raw*>(p.b);
  auto load = [&](int64_t k0) {
    if (Tile::kAKInner) ra.template load<kVec, false>(ga, p.a_so, p.a_si, m0, k0, p.m, p.k, nullptr, 0);
    else                ra.template load<kVec, false>(ga, p.a_so, p.a_si, k0, m0, p.k, p.m, nullptr, 0);
    if (Tile::kBKInner) rb.template load<kVec, kMaskB>(gb, p.b_so, p.b_si, n0, k0, p.n, p.k, p.mask, p.mask_rs);
    else                rb.template load<kVec, kMaskB>(gb, p.b_so, p.b_si, k0, n0, p.k, p.n, p.mask, p.mask_rs);
  };
  auto stage = [&](T* sa, T* sb) {
    ra.template store<Tile::kASO, Tile::kASI>(reinterpret_cast<Raw*>(sa));
    rb.template store<Tile::kBSO, Tile::kBSI>(reinterpret_cast<Raw*>(sb));
  };

  // dbias = Σ_k A(i, k) is computed by the blocks of the first column tile from the staged A,
  // kSplit threads per row, each over its own slice of the K step.
  constexpr int kSplit = kThreads / BM;
  static_assert(kThreads % BM == 0 && BK % kSplit == 0, "dbias split must be even");
  const bool do_dbias = kOp == Op::kGradWeight && p.dbias != nullptr && tn == 0;
  const int d_row = static_cast<int>(threadIdx.x) % BM;
  const int d_k0 = static_cast<int>(threadIdx.x) / BM * (BK / kSplit);
  Acc dsum = Acc(0);

  typename Tile::Accum acc;
  Tile::zero(acc);
  const int64_t k_tiles = ceil_div(p.k, BK);
  if (k_tiles > 0) {
    load(0);
    stage(sa0, sb0);
    __syncthreads();
    for (int64_t t = 0; t < k_tiles; ++t) {
      const bool odd = t & 1;
      const T* sa = odd ? sa1 : sa0;
      const T* sb = odd ? sb1 : sb0;
      const bool more = t + 1 < k_tiles;
      if (more) load((t + 1) * BK);  // in flight during the math below
      Tile::mma(acc, sa, sb);
      if (do_dbias) {
#pragma unroll
        for (int k = 0; k < BK / kSplit; ++k) dsum += Tile::a_at(sa, d_row, d_k0 + k);
      }
      // The other stage was last read in iteration t - 1, before the barrier that ended it.
      if (more) stage(odd ? sa0 : sa1, odd ? sb0 : sb1);
      __syncthreads();
    }
  }
  // From here the pipeline's shared memory is free: the loop ended with a barrier.

  Tile::epilogue(acc, smem, [&](int li, int lj, Acc v) {
    const int64_t i = m0 + li, j = n0 + lj;
    if (i >= p.m || j >= p.n) return;
    if (kOp == Op::kForward && p.bias != nullptr) v += to_acc(p.bias[j]);
    if (kOp == Op::kGradWeight) {
      const uint32_t word = static_cast<uint32_t>(__ldg(p.mask + i * p.mask_rs + (j >> 5)));
      if (!((word >> (j & 31)) & 1u)) v = Acc(0);  // exactly zero, whatever the product was
    }
    p.c[i * p.c_sm + j * p.c_sn] = Elem<T>::from_acc(v);
  });

  if (do_dbias) {  // block-uniform, so the barriers below are safe
    Acc* partial = reinterpret_cast<Acc*>(smem);
    __syncthreads();  // the WMMA epilogue scratch aliases `partial`
    partial[threadIdx.x] = dsum;
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < BM && m0 + threadIdx.x < p.m) {
      Acc s = Acc(0);
#pragma unroll
      for (int q = 0; q < kSplit; ++q) s += partial[q * BM + threadIdx.x];
      p.dbias[m0 + threadIdx.x] = Elem<T>::from_acc(s);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

template <class Tile, typename T>
int64_t num_tiles(const GemmArgs<T>& p) {
  return ceil_div(p.m, Tile::BM) * (p.n > 0 ? ceil_div(p.n, Tile::BN) : 1);
}

template <class Tile, typename T, Op kOp>
cudaError_t launch(const GemmArgs<T>& p, bool vec, cudaStream_t stream) {
  const int64_t tiles = num_tiles<Tile>(p);
  if (tiles > INT_MAX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(tiles)), block(Tile::kThreads);
  if (vec) masked_gemm_kernel<Tile, T, kOp, true><<<grid, block, 0, stream>>>(p);
  else     masked_gemm_kernel<Tile, T, kOp, false><<<grid, block, 0, stream>>>(p);
  return cudaGetLastError();
}

// The 128-bit load path needs the inner index contiguous and every row start 16-byte aligned.
template <typename T>
bool vector_ok(const T* base, int64_t so, int64_t si) {
  constexpr int64_t kVec = 16 / sizeof(T);
  return si == 1 && so % kVec == 0 && reinterpret_cast<std::uintptr_t>(base) % 16 == 0;
}

int sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 1;
  return sms > 0 ? sms : 1;
}

// Large tiles when they alone fill the GPU, else smaller ones for more blocks.
template <class Big, class Small, typename T, Op kOp>
cudaError_t launch_best(const GemmArgs<T>& p, bool vec, cudaStream_t stream) {
  if (num_tiles<Big>(p) >= sm_count()) return launch<Big, T, kOp>(p, vec, stream);
  return launch<Small, T, kOp>(p, vec, stream);
}

template <typename T, Op kOp>
cudaError_t run_gemm(const GemmArgs<T>& p, cudaStream_t stream) {
  const bool vec = vector_ok(p.a, p.a_so, p.a_si) && vector_ok(p.b, p.b_so, p.b_si);
  if constexpr (std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value) {
    using Big = WmmaTile<T, 128, 128, 32, 2, 4, kOp>;   // 256 threads, warp tile 64x32
    using Small = WmmaTile<T, 64, 64, 32, 2, 2, kOp>;   // 128 threads, warp tile 32x32
    return launch_best<Big, Small, T, kOp>(p, vec, stream);
  } else if constexpr (std::is_same<T, float>::value) {
    using Big = SimtTile<float, 128, 128, 8, 8, 8, kOp>;  // 256 threads, 8x8 each
    using Small = SimtTile<float, 64, 64, 16, 4, 4, kOp>; // 256 threads, 4x4 each
    return launch_best<Big, Small, T, kOp>(p, vec, stream);
  } else {
    using Tile = SimtTile<double, 64, 64, 8, 4, 4, kOp>;  // 256 threads, 4x4 each
    return launch<Tile, T, kOp>(p, vec, stream);
  }
}

template <typename T>
cudaError_t forward_impl(int64_t M, int64_t N, int64_t K, const void* x, int64_t sxm, int64_t sxk,
                         const void* w, int64_t swn, int64_t swk, const int32_t* mask_bits,
                         int64_t mask_row_stride, const void* bias, void* out, int64_t som,
                         int64_t son, cudaStream_t stream) {
  GemmArgs<T> p{};
  p.m = M; p.n = N; p.k = K;
  p.a = static_cast<const T*>(x); p.a_so = sxm; p.a_si = sxk;          // x (M, K): outer m, inner k
  p.b = static_cast<const T*>(w); p.b_so = swn; p.b_si = swk;          // W (N, K): outer n, inner k
  p.mask = mask_bits; p.mask_rs = mask_row_stride;
  p.bias = static_cast<const T*>(bias);
  p.c = static_cast<T*>(out); p.c_sm = som; p.c_sn = son;
  return run_gemm<T, Op::kForward>(p, stream);
}

template <typename T>
cudaError_t grad_input_impl(int64_t M, int64_t N, int64_t K, const void* dy, int64_t sdm, int64_t sdn,
                            const void* w, int64_t swn, int64_t swk, const int32_t* mask_bits,
                            int64_t mask_row_stride, void* dx, int64_t sxm, int64_t sxk,
                            cudaStream_t stream) {
  GemmArgs<T> p{};
  p.m = M; p.n = K; p.k = N;
  p.a = static_cast<const T*>(dy); p.a_so = sdm; p.a_si = sdn;         // dy (M, N): outer m, inner n (= GEMM k)
  p.b = static_cast<const T*>(w); p.b_so = swn; p.b_si = swk;          // W (N, K): outer = GEMM k, inner = GEMM n
  p.mask = mask_bits; p.mask_rs = mask_row_stride;
  p.c = static_cast<T*>(dx); p.c_sm = sxm; p.c_sn = sxk;
  return run_gemm<T, Op::kGradInput>(p, stream);
}

template <typename T>
cudaError_t grad_weight_impl(int64_t M, int64_t N, int64_t K, const void* dy, int64_t sdm, int64_t sdn,
                             const void* x, int64_t sxm, int64_t sxk, const int32_t* mask_bits,
                             int64_t mask_row_stride, void* dw, int64_t swn, int64_t swk, void* dbias,
                             cudaStream_t stream) {
  GemmArgs<T> p{};
  p.m = N; p.n = K; p.k = M;
  p.a = static_cast<const T*>(dy); p.a_so = sdm; p.a_si = sdn;         // dy (M, N): outer = GEMM k, inner = GEMM m
  p.b = static_cast<const T*>(x); p.b_so = sxm; p.b_si = sxk;          // x (M, K): outer = GEMM k, inner = GEMM n
  p.mask = mask_bits; p.mask_rs = mask_row_stride;                     // (n, k) of dW = (i, j) of C
  p.c = static_cast<T*>(dw); p.c_sm = swn; p.c_sn = swk;
  p.dbias = static_cast<T*>(dbias);
  return run_gemm<T, Op::kGradWeight>(p, stream);
}

// Runs fn(T{}) for the element type `dtype` names; an unknown code is an invalid value.
template <typename Fn>
cudaError_t with_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(float{});
    case DType::kFloat16: return fn(__half{});
    case DType::kBFloat16: return fn(__nv_bfloat16{});
    case DType::kFloat64: return fn(double{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

// Every output element that exists is written, also when the reduction is empty: forward with
// K == 0 gives bias (or 0), grad_input with N == 0 gives 0, grad_weight with M == 0 gives zero
// dW and dbias. Only an empty output launches nothing.

cudaError_t masked_linear_forward(DType dtype, int64_t M, int64_t N, int64_t K,
                                  const void* x, int64_t sxm, int64_t sxk,
                                  const void* w, int64_t swn, int64_t swk,
                                  const int32_t* mask_bits, int64_t mask_row_stride,
                                  const void* bias,
                                  void* out, int64_t som, int64_t son,
                                  cudaStream_t stream) {
  if (M < 0 || N < 0 || K < 0) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return forward_impl<T>(M, N, K, x, sxm, sxk, w, swn, swk, mask_bits, mask_row_stride, bias, out, som, son, stream);
  });
}

cudaError_t masked_linear_grad_input(DType dtype, int64_t M, int64_t N, int64_t K,
                                     const void* dy, int64_t sdm, int64_t sdn,
                                     const void* w, int64_t swn, int64_t swk,
                                     const int32_t* mask_bits, int64_t mask_row_stride,
                                     void* dx, int64_t sxm, int64_t sxk,
                                     cudaStream_t stream) {
  if (M < 0 || N < 0 || K < 0) return cudaErrorInvalidValue;
  if (M == 0 || K == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return grad_input_impl<T>(M, N, K, dy, sdm, sdn, w, swn, swk, mask_bits, mask_row_stride, dx, sxm, sxk, stream);
  });
}

cudaError_t masked_linear_grad_weight(DType dtype, int64_t M, int64_t N, int64_t K,
                                      const void* dy, int64_t sdm, int64_t sdn,
                                      const void* x, int64_t sxm, int64_t sxk,
                                      const int32_t* mask_bits, int64_t mask_row_stride,
                                      void* dw, int64_t swn, int64_t swk,
                                      void* dbias,
                                      cudaStream_t stream) {
  if (M < 0 || N < 0 || K < 0) return cudaErrorInvalidValue;
  if (N == 0 || (K == 0 && dbias == nullptr)) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return grad_weight_impl<T>(M, N, K, dy, sdm, sdn, x, sxm, sxk, mask_bits, mask_row_stride, dw, swn, swk, dbias, stream);
  });
}

}  // namespace cuda
}  // namespace mtlfast
