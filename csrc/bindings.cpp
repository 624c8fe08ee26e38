// The pybind11 module mtlfast._C. Buffers arrive as DLPack capsules (torch._C._to_dlpack(t)),
// so nothing here depends on PyTorch headers (DESIGN.md), and every size, stride, dtype, device
// and index value is checked (buffers.h) before a kernel sees a pointer: the module is public,
// and no call from Python may crash the process or touch memory its caller does not own.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "buffers.h"
#include "cpu/combine.h"
#include "cpu/masked_linear.h"
#include "cpu/masked_lstm.h"
#include "cpu/gumbel.h"
#include "cpu/sluice.h"

#ifdef MTLFAST_WITH_CUDA
#include <cuda_runtime.h>
#include "cuda/masked_linear.h"
#endif

namespace py = pybind11;

namespace {

std::vector<int> split_archs(const std::string& csv) {
  std::vector<int> out;
  size_t start = 0;
  while (start < csv.size()) {
    size_t end = csv.find(',', start);
    if (end == std::string::npos) end = csv.size();
    std::string item = csv.substr(start, end - start);
    // "90-real" and "90a" both name compute capability 9.0.
    size_t digits = 0;
    while (digits < item.size() && item[digits] >= '0' && item[digits] <= '9') ++digits;
    if (digits > 0) out.push_back(std::stoi(item.substr(0, digits)));
    start = end + 1;
  }
  return out;
}

py::dict build_info() {
  py::dict info;
  info["version"] = std::string(MTLFAST_VERSION);
  info["cpu"] = true;
#ifdef MTLFAST_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = split_archs(MTLFAST_CUDA_ARCHS);
  info["cuda_version"] = std::string(MTLFAST_CUDA_VERSION);
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::vector<int>{};
  info["cuda_version"] = py::none();
#endif
  return info;
}

#ifdef MTLFAST_WITH_CUDA
void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("mtlfast._C.") + what + ": " + cudaGetErrorString(err));
  }
}

// Devices the runtime sees; 0 (not an error) where there is no driver or no GPU.
int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}
#else
int cuda_device_count() { return 0; }
#endif

namespace buffers = mtlfast::buffers;
namespace cpu = mtlfast::cpu;
#ifdef MTLFAST_WITH_CUDA
namespace cuda = mtlfast::cuda;
#endif
using buffers::Buffer;
using buffers::Call;
using buffers::kBool;
using buffers::kFloat32;
using buffers::kFloat64;
using buffers::kInt64;

// A buffer of a CPU kernel's element type (float32 or float64) that fixes the call's dtype.
Buffer cpu_floats(const Call& c, py::handle obj, const char* name) {
  Buffer b = c.first(obj, name, kDLCPU, "cpu", {kFloat32, kFloat64});
  c.contiguous(b);
  return b;
}

// After every check: validates `threads`, then runs run(T{}, threads) without the GIL, T the
// element type of `ref` (a cpu_floats buffer: float32 or float64).
template <typename F>
void run_cpu(const Call& c, const Buffer& ref, int64_t threads, F&& run) {
  const int team = c.threads(threads);
  py::gil_scoped_release nogil;
  if (buffers::same(ref.dtype, kFloat32)) {
    run(float{}, team);
  } else {
    run(double{}, team);
  }
}

// What lstm_forward and lstm_backward share: the sizes, from a (G, T, B, 4H) buffer (xproj or
// gates), and w, c0, lengths (in [0, T]) and reverse checked against them.
struct Recurrence {
  Buffer gates;  // the (G, T, B, 4H) buffer
  int64_t G, T, B, H;
  Buffer w, c0, lengths, reverse;
};

Recurrence recurrence(const Call& c, py::handle gates_, const char* gates_name, py::handle w_, py::handle c0_,
                      py::handle lengths_, py::handle reverse_) {
  Recurrence r;
  r.gates = cpu_floats(c, gates_, gates_name);
  const std::array<int64_t, 4> sizes = c.sizes<4>(r.gates, "(G, T, B, 4H)");
  if (sizes[3] % 4 != 0) {
    c.value_error(gates_name, "must have shape (G, T, B, 4H): its last size must be a multiple of 4, got " +
                                  buffers::sizes_text(r.gates.shape));
  }
  r.G = sizes[0], r.T = sizes[1], r.B = sizes[2], r.H = sizes[3] / 4;
  r.w = c.like(w_, "w", r.gates, "(G, 4H, H)", {r.G, 4 * r.H, r.H});
  r.c0 = c.like(c0_, "c0", r.gates, "(G, B, H)", {r.G, r.B, r.H});
  r.lengths = c.typed(lengths_, "lengths", kInt64, r.gates, "(G, B)", {r.G, r.B});
  r.reverse = c.typed(reverse_, "reverse", kBool, r.gates, "(G,)", {r.G});
  c.values_in(r.lengths, "[0, T]", 0, r.T);
  return r;
}

void lstm_forward(py::handle xproj_, py::handle w_, py::handle h0_, py::handle c0_, py::handle lengths_,
                  py::handle reverse_, py::handle hs_, py::handle gates_, py::handle cells_, py::handle h_prev_,
                  py::handle h_n_, py::handle c_n_, int64_t threads) {
  const Call c("lstm_forward");
  const Recurrence r = recurrence(c, xproj_, "xproj", w_, c0_, lengths_, reverse_);
  const Buffer& xproj = r.gates;
  const int64_t G = r.G, T = r.T, B = r.B, H = r.H;
  const Buffer h0 = c.like(h0_, "h0", xproj, "(G, B, H)", {G, B, H});
  const Buffer hs = c.like(hs_, "hs", xproj, "(G, T, B, H)", {G, T, B, H});
  // what backward needs: all three or none (inference)
  const bool save = !gates_.is_none();
  for (const auto& [obj, name] : {std::pair<py::handle, const char*>{cells_, "cells"}, {h_prev_, "h_prev"}}) {
    if (!save && !obj.is_none()) c.value_error(name, "must be None when 'gates' is None (inference saves nothing)");
  }
  const Buffer gates = c.like(gates_, "gates", xproj, "(G, T, B, 4H)", {G, T, B, 4 * H}, !save);
  const Buffer cells = c.like(cells_, "cells", xproj, "(G, T, B, H)", {G, T, B, H}, !save);
  const Buffer h_prev = c.like(h_prev_, "h_prev", xproj, "(G, T, B, H)", {G, T, B, H}, !save);
  const Buffer h_n = c.like(h_n_, "h_n", xproj, "(G, B, H)", {G, B, H});
  const Buffer c_n = c.like(c_n_, "c_n", xproj, "(G, B, H)", {G, B, H});
  c.disjoint({&hs, &gates, &cells, &h_prev, &h_n, &c_n}, {&xproj, &r.w, &h0, &r.c0, &r.lengths, &r.reverse});
  run_cpu(c, xproj, threads, [&](auto tag, int team) {
    using S = decltype(tag);
    cpu::lstm_forward<S>(G, T, B, H, xproj.as<const S>(), r.w.as<const S>(), h0.as<const S>(), r.c0.as<const S>(),
                         r.lengths.as<const int64_t>(), r.reverse.as<const uint8_t>(), hs.as<S>(), gates.as<S>(),
                         cells.as<S>(), h_prev.as<S>(), h_n.as<S>(), c_n.as<S>(), team);
  });
}

void lstm_backward(py::handle dhs_, py::handle dh_n_, py::handle dc_n_, py::handle gates_, py::handle cells_,
                   py::handle c0_, py::handle w_, py::handle lengths_, py::handle reverse_, py::handle dgates_,
                   py::handle dh0_, py::handle dc0_, int64_t threads) {
  const Call c("lstm_backward");
  const Recurrence r = recurrence(c, gates_, "gates", w_, c0_, lengths_, reverse_);
  const Buffer& gates = r.gates;
  const int64_t G = r.G, T = r.T, B = r.B, H = r.H;
  const Buffer dhs = c.like(dhs_, "dhs", gates, "(G, T, B, H)", {G, T, B, H});
  const Buffer dh_n = c.like(dh_n_, "dh_n", gates, "(G, B, H)", {G, B, H});
  const Buffer dc_n = c.like(dc_n_, "dc_n", gates, "(G, B, H)", {G, B, H});
  const Buffer cells = c.like(cells_, "cells", gates, "(G, T, B, H)", {G, T, B, H});
  const Buffer dgates = c.like(dgates_, "dgates", gates, "(G, T, B, 4H)", {G, T, B, 4 * H});
  const Buffer dh0 = c.like(dh0_, "dh0", gates, "(G, B, H)", {G, B, H});
  const Buffer dc0 = c.like(dc0_, "dc0", gates, "(G, B, H)", {G, B, H});
  c.disjoint({&dgates, &dh0, &dc0}, {&dhs, &dh_n, &dc_n, &gates, &cells, &r.c0, &r.w, &r.lengths, &r.reverse});
  run_cpu(c, gates, threads, [&](auto tag, int team) {
    using S = decltype(tag);
    cpu::lstm_backward<S>(G, T, B, H, dhs.as<const S>(), dh_n.as<const S>(), dc_n.as<const S>(), gates.as<const S>(),
                          cells.as<const S>(), r.c0.as<const S>(), r.w.as<const S>(), r.lengths.as<const int64_t>(),
                          r.reverse.as<const uint8_t>(), dgates.as<S>(), dh0.as<S>(), dc0.as<S>(), team);
  });
}

void mask_select(py::handle src_, py::handle index_, py::handle masks_, py::handle mask_index_, py::handle out_,
                 int64_t threads) {
  const Call c("mask_select");
  const Buffer out = cpu_floats(c, out_, "out");
  const std::array<int64_t, 3> sizes = c.sizes<3>(out, "(G, N, K)");
  const int64_t G = sizes[0], N = sizes[1], K = sizes[2];
  const Buffer index = c.typed(index_, "index", kInt64, out, "(G,)", {G}, true);
  const Buffer src = c.like(src_, "src", out, index.present ? "(S, N, K)" : "(G, N, K)",
                            {index.present ? buffers::kAny : G, N, K});
  const int64_t S = src.shape[0];
  const Buffer masks = c.typed(masks_, "masks", kBool, out, "(P, N, K)", {buffers::kAny, N, K}, true);
  const int64_t P = masks.present ? masks.shape[0] : 0;
  const Buffer mask_index = c.typed(mask_index_, "mask_index", kInt64, out, "(G,)", {G});
  c.values_in(index, "[0, S - 1]", 0, S - 1);
  // without masks the kernel never reads mask_index (a group may be masked in another matrix)
  if (masks.present) c.values_in(mask_index, "[-1, P - 1]", -1, P - 1);
  // masking a gradient in place: out may be src itself, never a part of it
  const bool in_place = !index.present && out.data == src.data;
  if (in_place) {
    c.disjoint({&out}, {&index, &masks, &mask_index});
  } else {
    c.disjoint({&out}, {&src, &index, &masks, &mask_index});
  }
  run_cpu(c, out, threads, [&](auto tag, int team) {
    using T = decltype(tag);
    cpu::mask_select<T>(G, N * K, src.as<const T>(), index.as<const int64_t>(), masks.as<const uint8_t>(),
                        mask_index.as<const int64_t>(), out.as<T>(), team);
  });
}

// What the direct masked_linear functions share: w (N, K) and its bool mask, sizes from w.
struct DirectWeight {
  Buffer w, mask;
  int64_t N, K;
};

DirectWeight direct_weight(const Call& c, py::handle w_, py::handle mask_, const Buffer& ref) {
  DirectWeight d;
  d.w = c.like(w_, "w", ref, "(N, K)", {buffers::kAny, buffers::kAny});
  d.N = d.w.shape[0], d.K = d.w.shape[1];
  d.mask = c.typed(mask_, "mask", kBool, ref, "(N, K)", {d.N, d.K});
  return d;
}

void masked_linear_direct_forward(py::handle x_, py::handle w_, py::handle mask_, py::handle bias_, py::handle out_,
                                  int64_t threads) {
  const Call c("masked_linear_direct_forward");
  const Buffer x = cpu_floats(c, x_, "x");
  const int64_t M = c.sizes<2>(x, "(M, K)")[0];
  const DirectWeight d = direct_weight(c, w_, mask_, x);
  c.matches(x, d.w, "(M, K)", {M, d.K});
  const Buffer bias = c.like(bias_, "bias", x, "(N,)", {d.N}, true);
  const Buffer out = c.like(out_, "out", x, "(M, N)", {M, d.N});
  c.disjoint({&out}, {&x, &d.w, &d.mask, &bias});
  run_cpu(c, x, threads, [&](auto tag, int team) {
    using T = decltype(tag);
    cpu::masked_linear_direct_forward<T>(M, d.N, d.K, x.as<const T>(), d.w.as<const T>(), d.mask.as<const uint8_t>(),
                                         bias.as<const T>(), out.as<T>(), team);
  });
}

void masked_linear_direct_grad_input(py::handle dy_, py::handle w_, py::handle mask_, py::handle dx_,
                                     int64_t threads) {
  const Call c("masked_linear_direct_grad_input");
  const Buffer dy = cpu_floats(c, dy_, "dy");
  const int64_t M = c.sizes<2>(dy, "(M, N)")[0];
  const DirectWeight d = direct_weight(c, w_, mask_, dy);
  c.matches(dy, d.w, "(M, N)", {M, d.N});
  const Buffer dx = c.like(dx_, "dx", dy, "(M, K)", {M, d.K});
  c.disjoint({&dx}, {&dy, &d.w, &d.mask});
  run_cpu(c, dy, threads, [&](auto tag, int team) {
    using T = decltype(tag);
    cpu::masked_linear_direct_grad_input<T>(M, d.N, d.K, dy.as<const T>(), d.w.as<const T>(),
                                            d.mask.as<const uint8_t>(), dx.as<T>(), team);
  });
}

void masked_linear_direct_grad_weight(py::handle dy_, py::handle x_, py::handle mask_, py::handle dw_,
                                      py::handle dbias_, int64_t threads) {
  const Call c("masked_linear_direct_grad_weight");
  const Buffer dy = cpu_floats(c, dy_, "dy");
  const std::array<int64_t, 2> dys = c.sizes<2>(dy, "(M, N)");
  const int64_t M = dys[0], N = dys[1];
  const Buffer x = c.like(x_, "x", dy, "(M, K)", {M, buffers::kAny});
  const int64_t K = x.shape[1];
  const Buffer mask = c.typed(mask_, "mask", kBool, dy, "(N, K)", {N, K});
  const Buffer dw = c.like(dw_, "dw", dy, "(N, K)", {N, K});
  const Buffer dbias = c.like(dbias_, "dbias", dy, "(N,)", {N}, true);
  c.disjoint({&dw, &dbias}, {&dy, &x, &mask});
  run_cpu(c, dy, threads, [&](auto tag, int team) {
    using T = decltype(tag);
    cpu::masked_linear_direct_grad_weight<T>(M, N, K, dy.as<const T>(), x.as<const T>(), mask.as<const uint8_t>(),
                                             dw.as<T>(), dbias.as<T>(), team);
  });
}

// What the alpha_mix functions share: h (M, N, D = S*d) and alpha (M*S, M*S), S read from
// alpha's shape.
struct AlphaMix {
  Buffer h, alpha;
  int64_t M, N, D, S;
};

AlphaMix alpha_mix(const Call& c, py::handle h_, py::handle alpha_) {
  AlphaMix a;
  a.h = cpu_floats(c, h_, "h");
  const std::array<int64_t, 3> sizes = c.sizes<3>(a.h, "(M, N, D)");
  a.M = sizes[0], a.N = sizes[1], a.D = sizes[2];
  a.alpha = c.read(alpha_, "alpha");
  const int64_t C = c.sizes<2>(a.alpha, "(M*S, M*S)")[0];
  a.S = a.M > 0 ? C / a.M : 1;
  if (a.S < 1 || a.S * a.M != C) {
    c.value_error("alpha", "must have shape (M*S, M*S) for some S >= 1 with M = " + std::to_string(a.M) + ", got " +
                               buffers::sizes_text(a.alpha.shape));
  }
  if (a.D % a.S != 0) {
    c.value_error("h", "must have a last size D = S*d divisible by S = " + std::to_string(a.S) + ", got " +
                           buffers::sizes_text(a.h.shape));
  }
  c.matches(a.alpha, a.h, "(M*S, M*S)", {C, C});
  return a;
}

void alpha_mix_forward(py::handle h_, py::handle alpha_, py::handle out_, int64_t threads) {
  const Call c("alpha_mix_forward");
  const AlphaMix a = alpha_mix(c, h_, alpha_);
  const Buffer out = c.like(out_, "out", a.h, "(M, N, D)", {a.M, a.N, a.D});
  c.disjoint({&out}, {&a.h, &a.alpha});
  run_cpu(c, a.h, threads, [&](auto tag, int team) {
    using T = decltype(tag);
    cpu::alpha_mix_forward<T>(a.M, a.S, a.N, a.D / a.S, a.h.as<const T>(), a.alpha.as<const T>(), out.as<T>(), team);
  });
}

void alpha_mix_backward(py::handle dout_, py::handle h_, py::handle alpha_, py::handle dh_, py::handle dalpha_,
                        int64_t threads) {
  const Call c("alpha_mix_backward");
  const AlphaMix a = alpha_mix(c, h_, alpha_);
  const Buffer dout = c.like(dout_, "dout", a.h, "(M, N, D)", {a.M, a.N, a.D});
  const Buffer dh = c.like(dh_, "dh", a.h, "(M, N, D)", {a.M, a.N, a.D});
  const Buffer dalpha = c.like(dalpha_, "dalpha", a.h, "(M*S, M*S)", a.alpha.shape);
  c.disjoint({&dh, &dalpha}, {&dout, &a.h, &a.alpha});
  run_cpu(c, a.h, threads, [&](auto tag, int team) {
    using T = decltype(tag);
    cpu::alpha_mix_backward<T>(a.M, a.S, a.N, a.D / a.S, dout.as<const T>(), a.h.as<const T>(), a.alpha.as<const T>(),
                               dh.as<T>(), dalpha.as<T>(), team);
  });
}

// What the layer_mix functions share: layers (K, M, N, D) and beta (M, K).
struct LayerMix {
  Buffer layers, beta;
  int64_t K, M, N, D;
};

LayerMix layer_mix(const Call& c, py::handle layers_, py::handle beta_) {
  LayerMix l;
  l.layers = cpu_floats(c, layers_, "layers");
  const std::array<int64_t, 4> sizes = c.sizes<4>(l.layers, "(K, M, N, D)");
  l.K = sizes[0], l.M = sizes[1], l.N = sizes[2], l.D = sizes[3];
  l.beta = c.like(beta_, "beta", l.layers, "(M, K)", {l.M, l.K});
  return l;
}

void layer_mix_forward(py::handle layers_, py::handle beta_, py::handle out_, int64_t threads) {
  const Call c("layer_mix_forward");
  const LayerMix l = layer_mix(c, layers_, beta_);
  const Buffer out = c.like(out_, "out", l.layers, "(M, N, D)", {l.M, l.N, l.D});
  c.disjoint({&out}, {&l.layers, &l.beta});
  run_cpu(c, l.layers, threads, [&](auto tag, int team) {
    using T = decltype(tag);
    cpu::layer_mix_forward<T>(l.K, l.M, l.N, l.D, l.layers.as<const T>(), l.beta.as<const T>(), out.as<T>(), team);
  });
}

void layer_mix_backward(py::handle dout_, py::handle layers_, py::handle beta_, py::handle dlayers_,
                        py::handle dbeta_, int64_t threads) {
  const Call c("layer_mix_backward");
  const LayerMix l = layer_mix(c, layers_, beta_);
  const Buffer dout = c.like(dout_, "dout", l.layers, "(M, N, D)", {l.M, l.N, l.D});
  const Buffer dlayers = c.like(dlayers_, "dlayers", l.layers, "(K, M, N, D)", l.layers.shape);
  const Buffer dbeta = c.like(dbeta_, "dbeta", l.layers, "(M, K)", l.beta.shape);
  c.disjoint({&dlayers, &dbeta}, {&dout, &l.layers, &l.beta});
  run_cpu(c, l.layers, threads, [&](auto tag, int team) {
    using T = decltype(tag);
    cpu::layer_mix_backward<T>(l.K, l.M, l.N, l.D, dout.as<const T>(), l.layers.as<const T>(), l.beta.as<const T>(),
                               dlayers.as<T>(), dbeta.as<T>(), team);
  });
}

void philox_uniform(uint64_t seed, int64_t offset0, py::handle out_, int64_t threads) {
  const Call c("philox_uniform");
  const Buffer out = c.first(out_, "out", kDLCPU, "cpu", {kFloat32});
  c.contiguous(out);
  if (offset0 < 0) c.value_error("offset0", "must be >= 0, got " + std::to_string(offset0));
  const int team = c.threads(threads);
  py::gil_scoped_release nogil;
  cpu::philox_uniform(seed, offset0, out.numel, out.as<float>(), team);
}

// tau in the kernel's type T: in T's normal range, so that neither v / tau nor
// s * (1 - s) / tau can overflow to inf or underflow tau to 0 (and so neither can give NaN).
template <typename T>
void check_tau(const Call& c, double tau) {
  constexpr double low = std::numeric_limits<T>::min(), high = std::numeric_limits<T>::max();
  if (!(tau >= low && tau <= high)) {
    auto text = [](double v) { return py::repr(py::float_(v)).cast<std::string>(); };
    c.value_error("tau", std::string("must be a positive finite number in the normal range of ") +
                             (sizeof(T) == 4 ? "float32" : "float64") + " [" + text(low) + ", " + text(high) +
                             "], got " + text(tau));
  }
}

// check_tau for the dtype of x (a cpu_floats buffer: float32 or float64).
void check_tau_for(const Call& c, const Buffer& x, double tau) {
  if (buffers::same(x.dtype, kFloat32)) {
    check_tau<float>(c, tau);
  } else {
    check_tau<double>(c, tau);
  }
}

// What the gumbel_sigmoid functions share: the logits x, the sample z (or its gradient) of x's
// shape or, for complementary pairs, of x's shape without its last size of 2, and tau.
struct Gumbel {
  Buffer x, z;
  bool pairs;
};

Gumbel gumbel(const Call& c, py::handle x_, py::handle z_, const char* z_name, double tau) {
  Gumbel g;
  g.x = cpu_floats(c, x_, "x");
  g.z = c.read(z_, z_name);
  c.matches(g.z, g.x, "x.shape or x.shape[:-1]", g.z.shape);  // the shape is checked below
  std::vector<int64_t> paired(g.z.shape);
  paired.push_back(2);
  g.pairs = g.z.shape != g.x.shape;
  if (g.pairs && paired != g.x.shape) {
    std::string expected = "must have the shape of 'x' " + buffers::sizes_text(g.x.shape);
    if (g.x.ndim() > 0 && g.x.shape.back() == 2) {
      expected += " or, for complementary pairs, " +
                  buffers::sizes_text(std::vector<int64_t>(g.x.shape.begin(), g.x.shape.end() - 1));
    }
    c.value_error(z_name, expected + ", got " + buffers::sizes_text(g.z.shape));
  }
  check_tau_for(c, g.x, tau);
  return g;
}

bool gumbel_sigmoid_forward(py::handle x_, double tau, uint64_t seed, bool hard, py::handle z_, int64_t threads) {
  const Call c("gumbel_sigmoid_forward");
  const Gumbel g = gumbel(c, x_, z_, "z", tau);
  c.disjoint({&g.z}, {&g.x});
  bool finite = true;
  run_cpu(c, g.x, threads, [&](auto tag, int team) {
    using T = decltype(tag);
    finite = cpu::gumbel_sigmoid_forward<T>(g.z.numel, g.pairs, g.x.as<const T>(), tau, seed, hard, g.z.as<T>(), team);
  });
  return finite;
}

void gumbel_sigmoid_backward(py::handle dz_, py::handle x_, double tau, uint64_t seed, py::handle dx_,
                             int64_t threads) {
  const Call c("gumbel_sigmoid_backward");
  const Gumbel g = gumbel(c, x_, dz_, "dz", tau);
  const Buffer dx = c.like(dx_, "dx", g.x, "x.shape", g.x.shape);
  c.disjoint({&dx}, {&g.z, &g.x});
  run_cpu(c, g.x, threads, [&](auto tag, int team) {
    using T = decltype(tag);
    cpu::gumbel_sigmoid_backward<T>(g.z.numel, g.pairs, g.z.as<const T>(), g.x.as<const T>(), tau, seed, dx.as<T>(),
                                    team);
  });
}

// The rows x (R, C) of a gumbel_softmax call, after checking tau for x's dtype.
Buffer softmax_rows(const Call& c, py::handle x_, double tau, int64_t* R, int64_t* C) {
  Buffer x = cpu_floats(c, x_, "x");
  const std::array<int64_t, 2> sizes = c.sizes<2>(x, "(R, C)");
  *R = sizes[0], *C = sizes[1];
  check_tau_for(c, x, tau);
  return x;
}

bool gumbel_softmax_forward(py::handle x_, double tau, uint64_t seed, bool hard, py::handle y_, int64_t threads) {
  const Call c("gumbel_softmax_forward");
  int64_t R, C;
  const Buffer x = softmax_rows(c, x_, tau, &R, &C);
  const Buffer y = c.like(y_, "y", x, "(R, C)", {R, C});
  c.disjoint({&y}, {&x});
  bool finite = true;
  run_cpu(c, x, threads, [&](auto tag, int team) {
    using T = decltype(tag);
    finite = cpu::gumbel_softmax_forward<T>(R, C, x.as<const T>(), tau, seed, hard, y.as<T>(), team);
  });
  return finite;
}

void gumbel_softmax_backward(py::handle dy_, py::handle x_, double tau, uint64_t seed, py::handle dx_,
                             int64_t threads) {
  const Call c("gumbel_softmax_backward");
  int64_t R, C;
  const Buffer x = softmax_rows(c, x_, tau, &R, &C);
  const Buffer dy = c.like(dy_, "dy", x, "(R, C)", {R, C});
  const Buffer dx = c.like(dx_, "dx", x, "(R, C)", {R, C});
  c.disjoint({&dx}, {&dy, &x});
  run_cpu(c, x, threads, [&](auto tag, int team) {
    using T = decltype(tag);
    cpu::gumbel_softmax_backward<T>(R, C, dy.as<const T>(), x.as<const T>(), tau, seed, dx.as<T>(), team);
  });
}

// outputs (C, N) and z (C,) of an allocation_combine call.
struct Combine {
  Buffer outputs, z;
  int64_t C, N;
};

Combine combine(const Call& c, py::handle outputs_, py::handle z_) {
  Combine k;
  k.outputs = cpu_floats(c, outputs_, "outputs");
  const std::array<int64_t, 2> sizes = c.sizes<2>(k.outputs, "(C, N)");
  k.C = sizes[0], k.N = sizes[1];
  k.z = c.like(z_, "z", k.outputs, "(C,)", {k.C});
  return k;
}

void allocation_combine_forward(py::handle outputs_, py::handle z_, py::handle out_, int64_t threads) {
  const Call c("allocation_combine_forward");
  const Combine k = combine(c, outputs_, z_);
  const Buffer out = c.like(out_, "out", k.outputs, "(N,)", {k.N});
  c.disjoint({&out}, {&k.outputs, &k.z});
  run_cpu(c, k.outputs, threads, [&](auto tag, int team) {
    using T = decltype(tag);
    cpu::allocation_combine_forward<T>(k.C, k.N, k.outputs.as<const T>(), k.z.as<const T>(), out.as<T>(), team);
  });
}

void allocation_combine_backward(py::handle dout_, py::handle outputs_, py::handle z_, py::handle doutputs_,
                                 py::handle dz_, int64_t threads) {
  const Call c("allocation_combine_backward");
  const Combine k = combine(c, outputs_, z_);
  const Buffer dout = c.like(dout_, "dout", k.outputs, "(N,)", {k.N});
  const Buffer doutputs = c.like(doutputs_, "doutputs", k.outputs, "(C, N)", {k.C, k.N}, true);
  const Buffer dz = c.like(dz_, "dz", k.outputs, "(C,)", {k.C}, true);
  c.disjoint({&doutputs, &dz}, {&dout, &k.outputs, &k.z});
  run_cpu(c, k.outputs, threads, [&](auto tag, int team) {
    using T = decltype(tag);
    cpu::allocation_combine_backward<T>(k.C, k.N, dout.as<const T>(), k.outputs.as<const T>(), k.z.as<const T>(),
                                        doutputs.present ? doutputs.as<T>() : nullptr,
                                        dz.present ? dz.as<T>() : nullptr, team);
  });
}

#ifdef MTLFAST_WITH_CUDA
// Makes `device` current for the scope and restores the caller's device after it, as
// torch.cuda.device does: the launchers work on the current device.
class DeviceScope {
 public:
  DeviceScope(int device, const char* function) {
    check(cudaGetDevice(&previous_), function);
    if (previous_ != device) {
      check(cudaSetDevice(device), function);
      restore_ = true;
    }
  }
  ~DeviceScope() {
    if (restore_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
  bool restore_ = false;
};

// The stream to launch on. A CUDA stream handle cannot be validated, so a bare int (what a
// data_ptr() mix-up passes) is refused: it must come as a torch.cuda.Stream, e.g.
// torch.cuda.current_stream(device), or another object with an int `cuda_stream` (and, where it
// has one, a `device_index` that is the tensors' device). That the handle names a live stream
// is the caller's side of the contract, as it is for torch's own launches.
cudaStream_t stream_of(const Call& c, py::handle stream, int device) {
  if (!py::hasattr(stream, "cuda_stream")) {
    c.type_error("stream", std::string("must be a torch.cuda.Stream (an object with an int attribute "
                                       "'cuda_stream'), got ") + Py_TYPE(stream.ptr())->tp_name);
  }
  const py::object handle = stream.attr("cuda_stream");
  if (!PyLong_Check(handle.ptr()) || PyBool_Check(handle.ptr())) {
    c.type_error("stream", std::string("must have an int 'cuda_stream', got ") + Py_TYPE(handle.ptr())->tp_name);
  }
  if (py::hasattr(stream, "device_index")) {
    const py::object index = stream.attr("device_index");
    if (!PyLong_Check(index.ptr()) || index.cast<int64_t>() != device) {
      c.value_error("stream", "must be a stream of cuda:" + std::to_string(device) + ", got one of device_index " +
                                  py::repr(index).cast<std::string>());
    }
  }
  const unsigned long long value = PyLong_AsUnsignedLongLong(handle.ptr());
  if (PyErr_Occurred() || value > std::numeric_limits<uintptr_t>::max()) {
    PyErr_Clear();
    c.value_error("stream", "must have a 'cuda_stream' that is a pointer-sized handle, got " +
                                py::repr(handle).cast<std::string>());
  }
  return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(value));
}

// The first operand fixes the call's dtype and device; the kernels take any element strides of
// their inputs (checked, with the alignment the vector path needs, in the launcher).
Buffer cuda_first(const Call& c, py::handle obj, const char* name) {
  Buffer b = c.first(obj, name, kDLCUDA, "cuda", {kFloat32, buffers::kFloat16, buffers::kBFloat16, kFloat64});
  if (b.device.device_id < 0) c.value_error(name, "has an invalid CUDA device id " + std::to_string(b.device.device_id));
  return b;
}

mtlfast::DType launcher_dtype(const Buffer& b) {
  if (buffers::same(b.dtype, buffers::kFloat16)) return mtlfast::DType::kFloat16;
  if (buffers::same(b.dtype, buffers::kBFloat16)) return mtlfast::DType::kBFloat16;
  if (buffers::same(b.dtype, kFloat64)) return mtlfast::DType::kFloat64;
  return mtlfast::DType::kFloat32;
}

// mask_bits (N, ceil(K/32)) int32 words of W's rows: each row's words consecutive, rows at any
// stride (the launcher's mask_row_stride).
Buffer mask_words(const Call& c, py::handle obj, const Buffer& ref, int64_t N, int64_t K) {
  Buffer b = c.typed(obj, "mask_bits", buffers::kInt32, ref, "(N, ceil(K/32))", {N, (K + 31) / 32}, false, false);
  if (b.shape[1] > 1 && b.strides[1] != 1) {
    c.value_error(b.name, "must have consecutive words in a row (stride 1 in dim 1), got strides " +
                              buffers::sizes_text(b.strides));
  }
  return b;
}

// Runs a launcher on the tensors' device and stream, without the GIL, and raises its error.
template <typename F>
void launch(const Call& c, const Buffer& ref, py::handle stream, F&& run) {
  const int device = ref.device.device_id;
  const cudaStream_t s = stream_of(c, stream, device);
  DeviceScope scope(device, c.function());
  cudaError_t err;
  {
    py::gil_scoped_release nogil;
    err = run(s);
  }
  check(err, c.function());
}

void masked_linear_forward(py::handle x_, py::handle w_, py::handle mask_bits_, py::handle bias_, py::handle out_,
                           py::handle stream) {
  const Call c("masked_linear_forward");
  const Buffer x = cuda_first(c, x_, "x");
  const std::array<int64_t, 2> xs = c.sizes<2>(x, "(M, K)");
  const int64_t M = xs[0], K = xs[1];
  const Buffer w = c.like_strided(w_, "w", x, "(N, K)", {buffers::kAny, K});
  const int64_t N = w.shape[0];
  const Buffer mask_bits = mask_words(c, mask_bits_, x, N, K);
  const Buffer bias = c.like(bias_, "bias", x, "(N,)", {N}, true);
  const Buffer out = c.like(out_, "out", x, "(M, N)", {M, N});
  c.disjoint({&out}, {&x, &w, &mask_bits, &bias});
  launch(c, x, stream, [&](cudaStream_t s) {
    return cuda::masked_linear_forward(launcher_dtype(x), M, N, K, x.data, x.strides[0], x.strides[1], w.data,
                                       w.strides[0], w.strides[1], mask_bits.as<const int32_t>(),
                                       mask_bits.strides[0], bias.as<const void>(), out.data, out.strides[0],
                                       out.strides[1], s);
  });
}

void masked_linear_grad_input(py::handle dy_, py::handle w_, py::handle mask_bits_, py::handle dx_,
                              py::handle stream) {
  const Call c("masked_linear_grad_input");
  const Buffer dy = cuda_first(c, dy_, "dy");
  const std::array<int64_t, 2> dys = c.sizes<2>(dy, "(M, N)");
  const int64_t M = dys[0], N = dys[1];
  const Buffer w = c.like_strided(w_, "w", dy, "(N, K)", {N, buffers::kAny});
  const int64_t K = w.shape[1];
  const Buffer mask_bits = mask_words(c, mask_bits_, dy, N, K);
  const Buffer dx = c.like(dx_, "dx", dy, "(M, K)", {M, K});
  c.disjoint({&dx}, {&dy, &w, &mask_bits});
  launch(c, dy, stream, [&](cudaStream_t s) {
    return cuda::masked_linear_grad_input(launcher_dtype(dy), M, N, K, dy.data, dy.strides[0], dy.strides[1], w.data,
                                          w.strides[0], w.strides[1], mask_bits.as<const int32_t>(),
                                          mask_bits.strides[0], dx.data, dx.strides[0], dx.strides[1], s);
  });
}

void masked_linear_grad_weight(py::handle dy_, py::handle x_, py::handle mask_bits_, py::handle dw_,
                               py::handle dbias_, py::handle stream) {
  const Call c("masked_linear_grad_weight");
  const Buffer dy = cuda_first(c, dy_, "dy");
  const std::array<int64_t, 2> dys = c.sizes<2>(dy, "(M, N)");
  const int64_t M = dys[0], N = dys[1];
  const Buffer x = c.like_strided(x_, "x", dy, "(M, K)", {M, buffers::kAny});
  const int64_t K = x.shape[1];
  const Buffer mask_bits = mask_words(c, mask_bits_, dy, N, K);
  const Buffer dw = c.like(dw_, "dw", dy, "(N, K)", {N, K});
  const Buffer dbias = c.like(dbias_, "dbias", dy, "(N,)", {N}, true);
  c.disjoint({&dw, &dbias}, {&dy, &x, &mask_bits});
  launch(c, dy, stream, [&](cudaStream_t s) {
    return cuda::masked_linear_grad_weight(launcher_dtype(dy), M, N, K, dy.data, dy.strides[0], dy.strides[1],
                                           x.data, x.strides[0], x.strides[1], mask_bits.as<const int32_t>(),
                                           mask_bits.strides[0], dw.data, dw.strides[0], dw.strides[1],
                                           dbias.as<void>(), s);
  });
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mtlfast native kernels (CPU and CUDA), framework-free; buffers are DLPack capsules "
            "(torch._C._to_dlpack(t)), each checked before use";
  m.attr("MAX_THREADS") = buffers::kMaxThreads;
  m.def("build_info", &build_info,
        "dict: version, cpu, cuda (CUDA kernels compiled), cuda_archs, cuda_version");
  m.def("lstm_forward", &lstm_forward, py::arg("xproj"), py::arg("w"), py::arg("h0"), py::arg("c0"),
        py::arg("lengths"), py::arg("reverse"), py::arg("hs"), py::arg("gates"), py::arg("cells"), py::arg("h_prev"),
        py::arg("h_n"), py::arg("c_n"), py::arg("threads"),
        "Every step of G x B LSTM rows on CPU, recurrent matmul and cell fused (csrc/cpu/masked_lstm.h). "
        "xproj, gates (G, T, B, 4H); hs, cells, h_prev (G, T, B, H); w (G, 4H, H); h0, c0, h_n, c_n (G, B, H), "
        "float32 or float64; lengths (G, B) int64 in [0, T]; reverse (G,) bool; gates, cells, h_prev all None "
        "for inference");
  m.def("lstm_backward", &lstm_backward, py::arg("dhs"), py::arg("dh_n"), py::arg("dc_n"), py::arg("gates"),
        py::arg("cells"), py::arg("c0"), py::arg("w"), py::arg("lengths"), py::arg("reverse"), py::arg("dgates"),
        py::arg("dh0"), py::arg("dc0"), py::arg("threads"),
        "Backward of lstm_forward (csrc/cpu/masked_lstm.h); shapes as there, dgates (G, T, B, 4H)");
  m.def("masked_linear_direct_forward", &masked_linear_direct_forward, py::arg("x"), py::arg("w"), py::arg("mask"),
        py::arg("bias"), py::arg("out"), py::arg("threads"),
        "out (M, N) = x (M, K) @ where(mask, w, 0)^T (+ bias (N,)), mask (N, K) bool, read where w is "
        "(csrc/cpu/masked_linear.h: the few-rows CPU path)");
  m.def("masked_linear_direct_grad_input", &masked_linear_direct_grad_input, py::arg("dy"), py::arg("w"),
        py::arg("mask"), py::arg("dx"), py::arg("threads"), "dx (M, K) = dy (M, N) @ where(mask, w, 0)");
  m.def("masked_linear_direct_grad_weight", &masked_linear_direct_grad_weight, py::arg("dy"), py::arg("x"),
        py::arg("mask"), py::arg("dw"), py::arg("dbias"), py::arg("threads"),
        "dw (N, K) = where(mask, dy^T @ x, 0); dbias (N,) = dy summed over rows, or None");
  m.def("direct_rows", [] { return cpu::kMaskedLinearDirectRows; },
        "the row count up to which masked_linear's CPU backend runs the direct loops");
  m.def("mask_select", &mask_select, py::arg("src"), py::arg("index"), py::arg("masks"), py::arg("mask_index"),
        py::arg("out"), py::arg("threads"),
        "out (G, N, K)[g] = src[index[g]] (src[g] when index is None) where masks[mask_index[g]], else 0; "
        "mask_index (G,) in [-1, P), -1 or masks None: unmasked; out may be src itself when index is None "
        "(csrc/cpu/masked_lstm.h)");
  m.def("alpha_mix_forward", &alpha_mix_forward, py::arg("h"), py::arg("alpha"), py::arg("out"), py::arg("threads"),
        "Sluice alpha mixing on CPU: h, out (M, N, S*d), alpha (M*S, M*S) (csrc/cpu/sluice.h)");
  m.def("alpha_mix_backward", &alpha_mix_backward, py::arg("dout"), py::arg("h"), py::arg("alpha"), py::arg("dh"),
        py::arg("dalpha"), py::arg("threads"), "dh and dalpha of alpha_mix_forward (csrc/cpu/sluice.h)");
  m.def("layer_mix_forward", &layer_mix_forward, py::arg("layers"), py::arg("beta"), py::arg("out"),
        py::arg("threads"),
        "Sluice beta (layer) mixing on CPU: layers (K, M, N, D), beta (M, K), out (M, N, D) (csrc/cpu/sluice.h)");
  m.def("layer_mix_backward", &layer_mix_backward, py::arg("dout"), py::arg("layers"), py::arg("beta"),
        py::arg("dlayers"), py::arg("dbeta"), py::arg("threads"),
        "dlayers and dbeta of layer_mix_forward (csrc/cpu/sluice.h)");
  m.def("philox_uniform", &philox_uniform, py::arg("seed"), py::arg("offset0"), py::arg("out"), py::arg("threads"),
        "out (float32, any shape, flat order) = u in (0, 1) of the Philox stream (seed, offset0 + i), as Triton's "
        "tl.randint (csrc/cpu/gumbel.h)");
  m.def("gumbel_sigmoid_forward", &gumbel_sigmoid_forward, py::arg("x"), py::arg("tau"), py::arg("seed"),
        py::arg("hard"), py::arg("z"), py::arg("threads"),
        "Straight-through Gumbel sigmoid on CPU (csrc/cpu/gumbel.h): z of x's shape, or of x.shape[:-1] for "
        "complementary pairs (x's last size 2); tau in the normal range of x's dtype; returns whether every logit is "
        "finite");
  m.def("gumbel_sigmoid_backward", &gumbel_sigmoid_backward, py::arg("dz"), py::arg("x"), py::arg("tau"),
        py::arg("seed"), py::arg("dx"), py::arg("threads"),
        "Its backward, noise recomputed from the seed (csrc/cpu/gumbel.h)");
  m.def("gumbel_softmax_forward", &gumbel_softmax_forward, py::arg("x"), py::arg("tau"), py::arg("seed"),
        py::arg("hard"), py::arg("y"), py::arg("threads"),
        "Straight-through Gumbel softmax over the rows of x (R, C) into y (R, C) on CPU (csrc/cpu/gumbel.h); tau in "
        "the normal range of x's dtype; returns whether every logit is finite");
  m.def("gumbel_softmax_backward", &gumbel_softmax_backward, py::arg("dy"), py::arg("x"), py::arg("tau"),
        py::arg("seed"), py::arg("dx"), py::arg("threads"),
        "Its backward, noise recomputed from the seed (csrc/cpu/gumbel.h)");
  m.def("allocation_combine_forward", &allocation_combine_forward, py::arg("outputs"), py::arg("z"), py::arg("out"),
        py::arg("threads"),
        "out (N,) = sum_c z_c outputs (C, N)_c / max(1, sum z), z (C,), on CPU (csrc/cpu/combine.h)");
  m.def("allocation_combine_backward", &allocation_combine_backward, py::arg("dout"), py::arg("outputs"), py::arg("z"),
        py::arg("doutputs"), py::arg("dz"), py::arg("threads"),
        "doutputs (C, N) and dz (C,) of allocation_combine_forward, either None to skip it (csrc/cpu/combine.h)");
  m.def("cuda_device_count", &cuda_device_count, "CUDA devices visible to mtlfast._C (0 without a driver)");
#ifdef MTLFAST_WITH_CUDA
  m.def("masked_linear_forward", &masked_linear_forward, py::arg("x"), py::arg("w"), py::arg("mask_bits"),
        py::arg("bias"), py::arg("out"), py::arg("stream"),
        "out (M, N) = x (M, K) @ (w (N, K) * mask)^T + bias (N,) or None; mask_bits (N, ceil(K/32)) int32 words; "
        "x, w at any strides, out contiguous, all on one CUDA device; stream a torch.cuda.Stream of that device "
        "(csrc/cuda/masked_linear.h)");
  m.def("masked_linear_grad_input", &masked_linear_grad_input, py::arg("dy"), py::arg("w"), py::arg("mask_bits"),
        py::arg("dx"), py::arg("stream"), "dx (M, K) = dy (M, N) @ (w (N, K) * mask), as masked_linear_forward");
  m.def("masked_linear_grad_weight", &masked_linear_grad_weight, py::arg("dy"), py::arg("x"), py::arg("mask_bits"),
        py::arg("dw"), py::arg("dbias"), py::arg("stream"),
        "dw (N, K) = mask * (dy (M, N)^T @ x (M, K)), zero where the mask is 0; dbias (N,) = dy.sum(0) unless "
        "None; as masked_linear_forward");
#endif
}
