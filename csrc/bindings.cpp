// The pybind11 module mtlfast._C: launchers take raw pointers (tensor.data_ptr()), element strides
// and the CUDA stream as integers, so nothing here depends on PyTorch headers (DESIGN.md).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <type_traits>
#include <string>
#include <vector>

#include "cpu/lstm_cell.h"

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

template <typename T>
T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }
#else
int cuda_device_count() { return 0; }
#endif

}  // namespace

// CPU LSTM cell: dtype 0 = float32, 3 = float64 (csrc/cuda/dtype.h numbering).
void lstm_cell_forward(int dtype, int64_t G, int64_t B, int64_t H, int64_t step, std::uintptr_t pre,
                       std::uintptr_t lengths, std::uintptr_t h_state, std::uintptr_t c_state, std::uintptr_t hs,
                       int64_t hs_sg, std::uintptr_t gates, int64_t gates_sg, std::uintptr_t cells, int64_t cells_sg) {
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    mtlfast::cpu::lstm_cell_forward<T>(G, B, H, step, reinterpret_cast<const T*>(pre),
                                       reinterpret_cast<const int64_t*>(lengths), reinterpret_cast<T*>(h_state),
                                       reinterpret_cast<T*>(c_state), reinterpret_cast<T*>(hs), hs_sg,
                                       reinterpret_cast<T*>(gates), gates_sg, reinterpret_cast<T*>(cells), cells_sg);
  };
  if (dtype == 0) run(static_cast<float*>(nullptr));
  else if (dtype == 3) run(static_cast<double*>(nullptr));
  else throw py::value_error("mtlfast._C.lstm_cell_forward: dtype must be 0 (float32) or 3 (float64)");
}

void lstm_cell_backward(int dtype, int64_t G, int64_t B, int64_t H, int64_t step, std::uintptr_t lengths,
                        std::uintptr_t gates, int64_t gates_sg, std::uintptr_t cells, int64_t cells_sg,
                        std::uintptr_t c_prev, int64_t c_prev_sg, std::uintptr_t dhs, int64_t dhs_sg,
                        std::uintptr_t dh, std::uintptr_t dc, std::uintptr_t dgates, int64_t dgates_sg) {
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    mtlfast::cpu::lstm_cell_backward<T>(G, B, H, step, reinterpret_cast<const int64_t*>(lengths),
                                        reinterpret_cast<const T*>(gates), gates_sg, reinterpret_cast<const T*>(cells),
                                        cells_sg, reinterpret_cast<const T*>(c_prev), c_prev_sg,
                                        reinterpret_cast<const T*>(dhs), dhs_sg, reinterpret_cast<const T*>(dh),
                                        reinterpret_cast<T*>(dc), reinterpret_cast<T*>(dgates), dgates_sg);
  };
  if (dtype == 0) run(static_cast<float*>(nullptr));
  else if (dtype == 3) run(static_cast<double*>(nullptr));
  else throw py::value_error("mtlfast._C.lstm_cell_backward: dtype must be 0 (float32) or 3 (float64)");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "mtlfast native kernels (CPU and CUDA), framework-free";
  m.def("build_info", &build_info,
        "dict: version, cpu, cuda (CUDA kernels compiled), cuda_archs, cuda_version");
  m.def("lstm_cell_forward", &lstm_cell_forward, py::call_guard<py::gil_scoped_release>(),
        "One LSTM step for (G, B) rows on CPU (csrc/cpu/lstm_cell.h); pointers as integers");
  m.def("lstm_cell_backward", &lstm_cell_backward, py::call_guard<py::gil_scoped_release>(),
        "Backward of one LSTM step on CPU (csrc/cpu/lstm_cell.h); pointers as integers");
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
