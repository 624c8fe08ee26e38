// The pybind11 module mtlfast._C: launchers take raw pointers (tensor.data_ptr()), element strides
// and the CUDA stream as integers, so nothing here depends on PyTorch headers (DESIGN.md).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <type_traits>
#include <string>
#include <vector>

#include "cpu/lstm_recurrence.h"
#include "cpu/gumbel.h"
#include "cpu/mixing.h"

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

// Pointers cross the binding as integers (tensor.data_ptr()); 0 is null.
template <typename T>
T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace

// CPU kernels take dtype 0 = float32 or 3 = float64 (csrc/cuda/dtype.h numbering).
template <typename F>
void with_cpu_dtype(int dtype, const char* name, F&& run) {
  if (dtype == 0) {
    run(static_cast<float*>(nullptr));
  } else if (dtype == 3) {
    run(static_cast<double*>(nullptr));
  } else {
    throw py::value_error(std::string("mtlfast._C.") + name + ": dtype must be 0 (float32) or 3 (float64), got " +
                          std::to_string(dtype));
  }
}

void lstm_forward(int dtype, int64_t G, int64_t T_, int64_t B, int64_t H, std::uintptr_t xproj, std::uintptr_t w,
                  std::uintptr_t h0, std::uintptr_t c0, std::uintptr_t lengths, std::uintptr_t reverse,
                  std::uintptr_t hs, std::uintptr_t gates, std::uintptr_t cells, std::uintptr_t h_prev,
                  std::uintptr_t h_n, std::uintptr_t c_n, int threads) {
  with_cpu_dtype(dtype, "lstm_forward", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    mtlfast::cpu::lstm_forward<T>(G, T_, B, H, ptr<const T>(xproj), ptr<const T>(w), ptr<const T>(h0), ptr<const T>(c0),
                                  ptr<const int64_t>(lengths), ptr<const bool>(reverse), ptr<T>(hs), ptr<T>(gates),
                                  ptr<T>(cells), ptr<T>(h_prev), ptr<T>(h_n), ptr<T>(c_n), threads);
  });
}

void lstm_backward(int dtype, int64_t G, int64_t T_, int64_t B, int64_t H, std::uintptr_t dhs, std::uintptr_t dh_n,
                   std::uintptr_t dc_n, std::uintptr_t gates, std::uintptr_t cells, std::uintptr_t c0,
                   std::uintptr_t w, std::uintptr_t lengths, std::uintptr_t reverse, std::uintptr_t dgates,
                   std::uintptr_t dh0, std::uintptr_t dc0, int threads) {
  with_cpu_dtype(dtype, "lstm_backward", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    mtlfast::cpu::lstm_backward<T>(G, T_, B, H, ptr<const T>(dhs), ptr<const T>(dh_n), ptr<const T>(dc_n),
                                   ptr<const T>(gates), ptr<const T>(cells), ptr<const T>(c0), ptr<const T>(w),
                                   ptr<const int64_t>(lengths), ptr<const bool>(reverse), ptr<T>(dgates), ptr<T>(dh0),
                                   ptr<T>(dc0), threads);
  });
}

void mask_select(int dtype, int64_t G, int64_t size, std::uintptr_t src, std::uintptr_t index, std::uintptr_t masks,
                 std::uintptr_t mask_index, std::uintptr_t out, int threads) {
  with_cpu_dtype(dtype, "mask_select", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    mtlfast::cpu::mask_select<T>(G, size, ptr<const T>(src), ptr<const int64_t>(index), ptr<const bool>(masks),
                                 ptr<const int64_t>(mask_index), ptr<T>(out), threads);
  });
}

void alpha_mix_forward(int dtype, int64_t M, int64_t S, int64_t N, int64_t d, std::uintptr_t h, std::uintptr_t alpha,
                       std::uintptr_t out, int threads) {
  with_cpu_dtype(dtype, "alpha_mix_forward", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    mtlfast::cpu::alpha_mix_forward<T>(M, S, N, d, ptr<const T>(h), ptr<const T>(alpha), ptr<T>(out), threads);
  });
}

void alpha_mix_backward(int dtype, int64_t M, int64_t S, int64_t N, int64_t d, std::uintptr_t dout, std::uintptr_t h,
                        std::uintptr_t alpha, std::uintptr_t dh, std::uintptr_t dalpha, int threads) {
  with_cpu_dtype(dtype, "alpha_mix_backward", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    mtlfast::cpu::alpha_mix_backward<T>(M, S, N, d, ptr<const T>(dout), ptr<const T>(h), ptr<const T>(alpha),
                                        ptr<T>(dh), ptr<T>(dalpha), threads);
  });
}

void layer_mix_forward(int dtype, int64_t K, int64_t M, int64_t N, int64_t D, std::uintptr_t layers,
                       std::uintptr_t beta, std::uintptr_t out, int threads) {
  with_cpu_dtype(dtype, "layer_mix_forward", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    mtlfast::cpu::layer_mix_forward<T>(K, M, N, D, ptr<const T>(layers), ptr<const T>(beta), ptr<T>(out), threads);
  });
}

void layer_mix_backward(int dtype, int64_t K, int64_t M, int64_t N, int64_t D, std::uintptr_t dout,
                        std::uintptr_t layers, std::uintptr_t beta, std::uintptr_t dlayers, std::uintptr_t dbeta,
                        int threads) {
  with_cpu_dtype(dtype, "layer_mix_backward", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    mtlfast::cpu::layer_mix_backward<T>(K, M, N, D, ptr<const T>(dout), ptr<const T>(layers), ptr<const T>(beta),
                                        ptr<T>(dlayers), ptr<T>(dbeta), threads);
  });
}

void gumbel_sigmoid_forward(int dtype, int64_t N, bool pairs, std::uintptr_t x, float tau, uint64_t seed, bool hard,
                            std::uintptr_t z, int threads) {
  with_cpu_dtype(dtype, "gumbel_sigmoid_forward", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    mtlfast::cpu::gumbel_sigmoid_forward<T>(N, pairs, ptr<const T>(x), tau, seed, hard, ptr<T>(z), threads);
  });
}

void gumbel_sigmoid_backward(int dtype, int64_t N, bool pairs, std::uintptr_t dz, std::uintptr_t x, float tau,
                             uint64_t seed, std::uintptr_t dx, int threads) {
  with_cpu_dtype(dtype, "gumbel_sigmoid_backward", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    mtlfast::cpu::gumbel_sigmoid_backward<T>(N, pairs, ptr<const T>(dz), ptr<const T>(x), tau, seed, ptr<T>(dx),
                                             threads);
  });
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "mtlfast native kernels (CPU and CUDA), framework-free";
  m.def("build_info", &build_info,
        "dict: version, cpu, cuda (CUDA kernels compiled), cuda_archs, cuda_version");
  m.def("lstm_forward", &lstm_forward, py::call_guard<py::gil_scoped_release>(),
        "Every step of G x B LSTM rows on CPU, recurrent matmul and cell fused (csrc/cpu/lstm_recurrence.h); "
        "pointers as integers");
  m.def("lstm_backward", &lstm_backward, py::call_guard<py::gil_scoped_release>(),
        "Backward of lstm_forward (csrc/cpu/lstm_recurrence.h); pointers as integers");
  m.def("mask_select", &mask_select, py::call_guard<py::gil_scoped_release>(),
        "out[g] = src[index[g]] where masks[mask_index[g]], else 0 (csrc/cpu/lstm_recurrence.h); pointers as "
        "integers, 0 = null");
  m.def("alpha_mix_forward", &alpha_mix_forward, py::call_guard<py::gil_scoped_release>(),
        "Sluice alpha mixing on CPU (csrc/cpu/mixing.h); pointers as integers");
  m.def("alpha_mix_backward", &alpha_mix_backward, py::call_guard<py::gil_scoped_release>(),
        "dh and dalpha of alpha_mix_forward (csrc/cpu/mixing.h); pointers as integers");
  m.def("layer_mix_forward", &layer_mix_forward, py::call_guard<py::gil_scoped_release>(),
        "Sluice beta (layer) mixing on CPU (csrc/cpu/mixing.h); pointers as integers");
  m.def("layer_mix_backward", &layer_mix_backward, py::call_guard<py::gil_scoped_release>(),
        "dlayers and dbeta of layer_mix_forward (csrc/cpu/mixing.h); pointers as integers");
  m.def("philox_uniform", [](uint64_t seed, int64_t offset0, int64_t n, std::uintptr_t out, int threads) {
          mtlfast::cpu::philox_uniform(seed, offset0, n, ptr<float>(out), threads);
        }, py::call_guard<py::gil_scoped_release>(),
        "float32 u in (0, 1) of the Philox stream (seed, offset0 + i), as Triton's tl.randint (csrc/cpu/gumbel.h)");
  m.def("gumbel_sigmoid_forward", &gumbel_sigmoid_forward, py::call_guard<py::gil_scoped_release>(),
        "Straight-through Gumbel sigmoid (or complementary pairs) on CPU (csrc/cpu/gumbel.h)");
  m.def("gumbel_sigmoid_backward", &gumbel_sigmoid_backward, py::call_guard<py::gil_scoped_release>(),
        "Its backward, noise recomputed from the seed (csrc/cpu/gumbel.h)");
  m.def("cuda_device_count", &cuda_device_count, "CUDA devices visible to mtlfast._C (0 without a driver)");
#ifdef MTLFAST_WITH_CUDA
  // Same arguments, same order as csrc/cuda/masked_linear.h; pointers and the stream as integers
  // (0 = null), dtype as the DType code.
  auto to_dtype = [](int code) {
    if (code < 0 || code > static_cast<int>(mtlfast::DType::kFloat64)) {
      throw py::value_error("mtlfast._C: dtype code must be 0 (float32), 1 (float16), 2 (bfloat16) or "
                            "3 (float64), got " + std::to_string(code));
    }
    return static_cast<mtlfast::DType>(code);
  };
  m.def(
      "masked_linear_forward",
      [to_dtype](int dtype, int64_t M, int64_t N, int64_t K, std::uintptr_t x, int64_t sxm, int64_t sxk,
                 std::uintptr_t w, int64_t swn, int64_t swk, std::uintptr_t mask_bits, int64_t mask_row_stride,
                 std::uintptr_t bias, std::uintptr_t out, int64_t som, int64_t son, std::uintptr_t stream) {
        const mtlfast::DType dt = to_dtype(dtype);
        cudaError_t err;
        {
          py::gil_scoped_release nogil;
          err = mtlfast::cuda::masked_linear_forward(
              dt, M, N, K, ptr<const void>(x), sxm, sxk, ptr<const void>(w), swn, swk,
              ptr<const int32_t>(mask_bits), mask_row_stride, ptr<const void>(bias), ptr<void>(out), som, son,
              ptr<CUstream_st>(stream));
        }
        check(err, "masked_linear_forward");
      },
      py::arg("dtype"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("x"), py::arg("sxm"), py::arg("sxk"),
      py::arg("w"), py::arg("swn"), py::arg("swk"), py::arg("mask_bits"), py::arg("mask_row_stride"),
      py::arg("bias"), py::arg("out"), py::arg("som"), py::arg("son"), py::arg("stream"),
      "out (M, N) = x (M, K) @ (w (N, K) * mask)^T + bias; mask_bits (N, ceil(K/32)) int32 words, "
      "element strides, pointers and stream as integers (0 = null bias / default stream)");
  m.def(
      "masked_linear_grad_input",
      [to_dtype](int dtype, int64_t M, int64_t N, int64_t K, std::uintptr_t dy, int64_t sdm, int64_t sdn,
                 std::uintptr_t w, int64_t swn, int64_t swk, std::uintptr_t mask_bits, int64_t mask_row_stride,
                 std::uintptr_t dx, int64_t sxm, int64_t sxk, std::uintptr_t stream) {
        const mtlfast::DType dt = to_dtype(dtype);
        cudaError_t err;
        {
          py::gil_scoped_release nogil;
          err = mtlfast::cuda::masked_linear_grad_input(
              dt, M, N, K, ptr<const void>(dy), sdm, sdn, ptr<const void>(w), swn, swk,
              ptr<const int32_t>(mask_bits), mask_row_stride, ptr<void>(dx), sxm, sxk, ptr<CUstream_st>(stream));
        }
        check(err, "masked_linear_grad_input");
      },
      py::arg("dtype"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("dy"), py::arg("sdm"), py::arg("sdn"),
      py::arg("w"), py::arg("swn"), py::arg("swk"), py::arg("mask_bits"), py::arg("mask_row_stride"),
      py::arg("dx"), py::arg("sxm"), py::arg("sxk"), py::arg("stream"),
      "dx (M, K) = dy (M, N) @ (w (N, K) * mask); element strides, pointers and stream as integers");
  m.def(
      "masked_linear_grad_weight",
      [to_dtype](int dtype, int64_t M, int64_t N, int64_t K, std::uintptr_t dy, int64_t sdm, int64_t sdn,
                 std::uintptr_t x, int64_t sxm, int64_t sxk, std::uintptr_t mask_bits, int64_t mask_row_stride,
                 std::uintptr_t dw, int64_t swn, int64_t swk, std::uintptr_t dbias, std::uintptr_t stream) {
        const mtlfast::DType dt = to_dtype(dtype);
        cudaError_t err;
        {
          py::gil_scoped_release nogil;
          err = mtlfast::cuda::masked_linear_grad_weight(
              dt, M, N, K, ptr<const void>(dy), sdm, sdn, ptr<const void>(x), sxm, sxk,
              ptr<const int32_t>(mask_bits), mask_row_stride, ptr<void>(dw), swn, swk, ptr<void>(dbias),
              ptr<CUstream_st>(stream));
        }
        check(err, "masked_linear_grad_weight");
      },
      py::arg("dtype"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("dy"), py::arg("sdm"), py::arg("sdn"),
      py::arg("x"), py::arg("sxm"), py::arg("sxk"), py::arg("mask_bits"), py::arg("mask_row_stride"),
      py::arg("dw"), py::arg("swn"), py::arg("swk"), py::arg("dbias"), py::arg("stream"),
      "dw (N, K) = mask * (dy (M, N)^T @ x (M, K)), zero where the mask is 0; dbias (N,) = dy.sum(0) "
      "when dbias != 0; element strides, pointers and stream as integers");
#endif
}
