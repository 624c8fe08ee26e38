// Runs csrc/cuda/masked_linear.cu (launches rewritten by tests/test_cuda_emulation.py) on the CPU
// against a float64 reference: every output element written and right, guard memory untouched,
// no out-of-bounds or misaligned read. Arg: 0-3 = dtype (fp32, fp16, bf16, fp64) over shapes
// {1,7,33,130}^3 x random layouts; 10-13 = the same dtypes on shapes that take the vector path;
// 20-23 = the same dtypes with inf and NaN weights outside the mask, every layout.
#include "cuda_runtime.h"
#include "cuda_fp16.h"
#include "cuda_bf16.h"
#include "cuda/masked_linear.h"
#include <random>
#include <map>
#include <string>
int g_sms = 1;
thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
std::barrier<>* g_bar;
std::barrier<>* g_warp_bars[64];
long g_vec = 0; long g_misaligned = 0, g_oob = 0, g_wmma_bad = 0;
struct Region { const char* b; size_t n; };
std::vector<Region> g_regions;
void check_addr(const void* p, size_t n) {
  const char* c = (const char*)p;
  for (auto& r : g_regions) if (c >= r.b && c + n <= r.b + r.n) return;
  __atomic_add_fetch(&g_oob, 1, __ATOMIC_RELAXED);
}
void emu_launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  for (unsigned b = 0; b < grid.x; ++b) {
    std::barrier<> bar(block.x);
    g_bar = &bar;
    std::vector<std::unique_ptr<std::barrier<>>> wb;
    for (unsigned w = 0; w < block.x / 32; ++w) { wb.emplace_back(new std::barrier<>(32)); g_warp_bars[w] = wb.back().get(); }
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < block.x; ++t) ts.emplace_back([&, t, b] { threadIdx = dim3(t); blockIdx = dim3(b); body(); });
    for (auto& t : ts) t.join();
  }
}
using mtlfast::DType;
template <typename T> struct Conv;
template <> struct Conv<float> { static float to(double v) { return (float)v; } static double from(float v) { return v; } static constexpr DType d = DType::kFloat32; static constexpr double tol = 1e-5; };
template <> struct Conv<double> { static double to(double v) { return v; } static double from(double v) { return v; } static constexpr DType d = DType::kFloat64; static constexpr double tol = 1e-12; };
template <> struct Conv<__half> { static __half to(double v) { return __float2half_rn((float)v); } static double from(__half v) { return __half2float(v); } static constexpr DType d = DType::kFloat16; static constexpr double tol = 2e-3; };
template <> struct Conv<__nv_bfloat16> { static __nv_bfloat16 to(double v) { return __float2bfloat16_rn((float)v); } static double from(__nv_bfloat16 v) { return __bfloat162float(v); } static constexpr DType d = DType::kBFloat16; static constexpr double tol = 1.6e-2; };

std::mt19937 rng(123);
// A logical R x C tensor stored with some layout; returns storage (with guard and base offset) and strides.
template <typename T> struct Tensor {
  std::vector<T> buf; size_t off = 0; int64_t sr = 0, sc = 0; int64_t R, C; std::vector<double> val;
  T* ptr() { return buf.data() + off; }
  double at(int64_t r, int64_t c) const { return val[r * C + c]; }
};
template <typename T> Tensor<T> make(int64_t R, int64_t C, int layout, bool fill, std::vector<double>* ref) {
  Tensor<T> t; t.R = R; t.C = C;
  int64_t pad8 = (C + 7) / 8 * 8 + 8;
  switch (layout) {
    case 0: t.sr = C; t.sc = 1; t.off = 8; break;            // contiguous, 16B-aligned base
    case 1: t.sr = 1; t.sc = R; t.off = 8; break;            // transposed
    case 2: t.sr = pad8; t.sc = 1; t.off = 8; break;         // padded rows, vector ok
    case 3: t.sr = C; t.sc = 1; t.off = 9; break;            // misaligned base
    case 4: t.sr = 2 * C + 1; t.sc = 2; t.off = 8; break;    // non-unit inner stride
  }
  size_t span = (R > 0 && C > 0) ? (R - 1) * t.sr + (C - 1) * t.sc + 1 : 0;
  t.buf.assign(t.off + span + 64, Conv<T>::to(std::nan("")));
  t.val.assign(R * C, 0.0);
  std::uniform_int_distribution<int> d(-8, 8);
  for (int64_t r = 0; r < R; ++r) for (int64_t c = 0; c < C; ++c) {
    double v = fill ? d(rng) / 8.0 : 0.0;
    t.buf[t.off + r * t.sr + c * t.sc] = Conv<T>::to(v);
    t.val[r * C + c] = Conv<T>::from(Conv<T>::to(v));
  }
  return t;
}
int fails = 0, runs = 0;
void fail(const std::string& s) { if (fails < 40) fprintf(stderr, "FAIL %s\n", s.c_str()); ++fails; }
template <typename T> void check_out(Tensor<T>& o, const std::vector<double>& ref, const std::vector<double>& scale, const std::string& tag) {
  // every element written, guards untouched, values right
  std::vector<char> is_el(o.buf.size(), 0);
  for (int64_t r = 0; r < o.R; ++r) for (int64_t c = 0; c < o.C; ++c) {
    size_t idx = o.off + r * o.sr + c * o.sc; is_el[idx] = 1;
    double v = Conv<T>::from(o.buf[idx]), e = ref[r * o.C + c];
    if (!(std::fabs(v - e) <= Conv<T>::tol * (scale[r * o.C + c] + 1e-30) + 1e-300) && !(v == e)) {
      char b[256]; snprintf(b, sizeof b, "%s at (%ld,%ld): got %g want %g", tag.c_str(), (long)r, (long)c, v, e); fail(b); return;
    }
  }
  for (size_t i = 0; i < o.buf.size(); ++i) if (!is_el[i] && !std::isnan(Conv<T>::from(o.buf[i]))) { fail(tag + " guard clobbered"); return; }
}
struct Mask { std::vector<int32_t> buf; int64_t rs; std::vector<char> keep; int64_t K; bool at(int64_t n, int64_t k) const { return keep[n * K + k]; } };
Mask make_mask(int64_t N, int64_t K, int pad) {
  Mask m; int64_t W = (K + 31) / 32; m.rs = W + pad; m.K = K; m.buf.assign(N * m.rs + 4, 0x5a5a5a5a); m.keep.assign(N * K, 0);
  for (int64_t n = 0; n < N; ++n) { for (int64_t w = 0; w < W; ++w) m.buf[n * m.rs + w] = 0;
    for (int64_t k = 0; k < K; ++k) { bool kp = (rng() % 3) != 0; m.keep[n * K + k] = kp; if (kp) m.buf[n * m.rs + k / 32] |= int32_t(1u << (k % 32)); }
    // junk in the unused high bits of the last word
    if (K % 32) m.buf[n * m.rs + K / 32] |= int32_t(0xffffffffu << (K % 32)); }
  return m;
}
template <typename T> void reg(Tensor<T>& t) { g_regions.push_back({(const char*)(t.ptr()), ((t.R > 0 && t.C > 0) ? ((t.R - 1) * t.sr + (t.C - 1) * t.sc + 1) : 0) * sizeof(T)}); }
// poison: every weight outside the mask is inf, -inf or NaN. The reference never reads them, so
// any of them reaching an output (as 0 * inf = NaN would) is a mismatch.
template <typename T> void run_case(int64_t M, int64_t N, int64_t K, int lx, int lw, int ldy, int mpad, bool bias_on, bool poison = false) {
  char tagb[200]; snprintf(tagb, sizeof tagb, "dt=%d M=%ld N=%ld K=%ld lx=%d lw=%d ldy=%d mpad=%d bias=%d sms=%d poison=%d", (int)Conv<T>::d, (long)M, (long)N, (long)K, lx, lw, ldy, mpad, bias_on, g_sms, poison);
  std::string tag = tagb;
  auto x = make<T>(M, K, lx, true, nullptr); auto w = make<T>(N, K, lw, true, nullptr); auto dy = make<T>(M, N, ldy, true, nullptr);
  auto b = make<T>(1, N, 0, true, nullptr);
  Mask mk = make_mask(N, K, mpad);
  if (poison) {
    const double bad[3] = {INFINITY, -INFINITY, std::nan("")};
    for (int64_t n = 0; n < N; ++n) for (int64_t k = 0; k < K; ++k)
      if (!mk.at(n, k)) w.buf[w.off + n * w.sr + k * w.sc] = Conv<T>::to(bad[(n + k) % 3]);
  }
  g_regions.clear(); reg(x); reg(w); reg(dy); if (bias_on) reg(b);
  g_regions.push_back({(const char*)mk.buf.data(), (size_t)(N > 0 ? ((N - 1) * mk.rs + (K + 31) / 32) : 0) * 4});
  g_misaligned = g_oob = g_wmma_bad = 0;
  // forward
  { auto out = make<T>(M, N, 0, false, nullptr); std::fill(out.buf.begin(), out.buf.end(), Conv<T>::to(std::nan("")));
    std::vector<double> ref(M * N), sc(M * N);
    for (int64_t m = 0; m < M; ++m) for (int64_t n = 0; n < N; ++n) { double s = bias_on ? b.at(0, n) : 0, a = std::fabs(s);
      for (int64_t k = 0; k < K; ++k) if (mk.at(n, k)) { s += x.at(m, k) * w.at(n, k); a += std::fabs(x.at(m, k) * w.at(n, k)); }
      ref[m * N + n] = s; sc[m * N + n] = a; }
    auto e = mtlfast::cuda::masked_linear_forward(Conv<T>::d, M, N, K, x.ptr(), x.sr, x.sc, w.ptr(), w.sr, w.sc, mk.buf.data(), mk.rs, bias_on ? b.ptr() : nullptr, out.ptr(), out.sr, out.sc, nullptr);
    if (e) fail(tag + " fwd err"); else check_out(out, ref, sc, "fwd " + tag); }
  // grad_input
  { auto dx = make<T>(M, K, 0, false, nullptr); std::fill(dx.buf.begin(), dx.buf.end(), Conv<T>::to(std::nan("")));
    std::vector<double> ref(M * K), sc(M * K);
    for (int64_t m = 0; m < M; ++m) for (int64_t k = 0; k < K; ++k) { double s = 0, a = 0;
      for (int64_t n = 0; n < N; ++n) if (mk.at(n, k)) { s += dy.at(m, n) * w.at(n, k); a += std::fabs(dy.at(m, n) * w.at(n, k)); }
      ref[m * K + k] = s; sc[m * K + k] = a; }
    auto e = mtlfast::cuda::masked_linear_grad_input(Conv<T>::d, M, N, K, dy.ptr(), dy.sr, dy.sc, w.ptr(), w.sr, w.sc, mk.buf.data(), mk.rs, dx.ptr(), dx.sr, dx.sc, nullptr);
    if (e) fail(tag + " gi err"); else check_out(dx, ref, sc, "gi " + tag); }
  // grad_weight
  { auto dw = make<T>(N, K, 0, false, nullptr); std::fill(dw.buf.begin(), dw.buf.end(), Conv<T>::to(std::nan("")));
    auto db = make<T>(1, N, 0, false, nullptr); std::fill(db.buf.begin(), db.buf.end(), Conv<T>::to(std::nan("")));
    std::vector<double> ref(N * K), sc(N * K), rb(N), sb(N);
    for (int64_t n = 0; n < N; ++n) { for (int64_t k = 0; k < K; ++k) { double s = 0, a = 0;
      for (int64_t m = 0; m < M; ++m) { s += dy.at(m, n) * x.at(m, k); a += std::fabs(dy.at(m, n) * x.at(m, k)); }
      ref[n * K + k] = mk.at(n, k) ? s : 0; sc[n * K + k] = a; }
      double s = 0, a = 0; for (int64_t m = 0; m < M; ++m) { s += dy.at(m, n); a += std::fabs(dy.at(m, n)); } rb[n] = s; sb[n] = a; }
    auto e = mtlfast::cuda::masked_linear_grad_weight(Conv<T>::d, M, N, K, dy.ptr(), dy.sr, dy.sc, x.ptr(), x.sr, x.sc, mk.buf.data(), mk.rs, dw.ptr(), dw.sr, dw.sc, bias_on ? db.ptr() : nullptr, nullptr);
    if (e) fail(tag + " gw err"); else { check_out(dw, ref, sc, "gw " + tag); if (bias_on) check_out(db, rb, sb, "gb " + tag); } }
  if (g_oob) fail(tag + " out-of-bounds reads " + std::to_string(g_oob));
  if (g_misaligned) fail(tag + " misaligned reads");
  if (g_wmma_bad) fail(tag + " wmma misaligned");
  ++runs;
}
int main(int argc, char** argv) {
  int which = argc > 1 ? atoi(argv[1]) : -1;
  if (which >= 20) { int d = which - 20;  // 20-23: inf / NaN weights outside the mask, every layout
    for (int sms : {1, 100000}) { g_sms = sms;
      for (auto s : std::vector<std::array<int64_t,3>>{{40,72,96},{7,130,33},{33,7,130}})
        for (int l = 0; l < 5; ++l) { bool bo = l % 2;
          if (d == 0) run_case<float>(s[0], s[1], s[2], l, l, (l + 2) % 5, 1, bo, true);
          if (d == 1) run_case<__half>(s[0], s[1], s[2], l, l, (l + 2) % 5, 1, bo, true);
          if (d == 2) run_case<__nv_bfloat16>(s[0], s[1], s[2], l, l, (l + 2) % 5, 1, bo, true);
          if (d == 3) run_case<double>(s[0], s[1], s[2], l, l, (l + 2) % 5, 1, bo, true); } }
    printf("runs=%d fails=%d vec_launches=%ld\n", runs, fails, g_vec); return fails != 0; }
  if (which >= 10) { int d = which - 10;
    for (int sms : {1, 100000}) { g_sms = sms;
      for (auto s : std::vector<std::array<int64_t,3>>{{40,72,96},{130,33,7},{7,130,33},{33,7,130},{136,136,64},{16,264,40}})
        for (int l : {0, 2}) { bool bo = s[0] % 2;
          if (d == 0) run_case<float>(s[0], s[1], s[2], l, l, l, 1, bo);
          if (d == 1) run_case<__half>(s[0], s[1], s[2], l, l, l, 1, bo);
          if (d == 2) run_case<__nv_bfloat16>(s[0], s[1], s[2], l, l, l, 1, bo);
          if (d == 3) run_case<double>(s[0], s[1], s[2], l, l, l, 1, bo); } }
    printf("runs=%d fails=%d vec_launches=%ld\n", runs, fails, g_vec); return fails != 0; }
  std::vector<int64_t> sz = {1, 7, 33, 130};
  for (int sms : {1, 100000}) { g_sms = sms;
  for (int64_t M : sz) for (int64_t N : sz) for (int64_t K : sz) {
    int lx = rng() % 5, lw = rng() % 5, ldy = rng() % 5, mp = rng() % 2; bool bo = rng() % 2;
    if (which < 0 || which == 0) run_case<float>(M, N, K, lx, lw, ldy, mp, bo);
    if (which < 0 || which == 1) run_case<__half>(M, N, K, lx, lw, ldy, mp, bo);
    if (which < 0 || which == 2) run_case<__nv_bfloat16>(M, N, K, lx, lw, ldy, mp, bo);
    if (which < 0 || which == 3) run_case<double>(M, N, K, lx, lw, ldy, mp, bo);
  } }
  // empty sizes and all layouts at one shape
  for (int l = 0; l < 5; ++l) for (int sms : {1, 100000}) { g_sms = sms;
    if (which < 0 || which == 0) run_case<float>(40, 72, 96, l, (l + 1) % 5, (l + 2) % 5, 0, true);
    if (which < 0 || which == 1) run_case<__half>(40, 72, 96, l, (l + 1) % 5, (l + 2) % 5, 0, true);
    if (which < 0 || which == 3) run_case<double>(40, 72, 96, l, (l + 1) % 5, (l + 2) % 5, 0, true); }
  for (auto s : std::vector<std::array<int64_t,3>>{{0,5,7},{5,0,7},{5,7,0},{0,0,0},{0,5,0},{3,130,0}}) {
    if (which < 0 || which == 0) run_case<float>(s[0], s[1], s[2], 0, 0, 0, 0, true);
    if (which < 0 || which == 1) run_case<__half>(s[0], s[1], s[2], 0, 0, 0, 0, true);
    if (which < 0 || which == 3) run_case<double>(s[0], s[1], s[2], 0, 0, 0, 0, false); }
  printf("runs=%d fails=%d\n", runs, fails);
  return fails != 0;
}
