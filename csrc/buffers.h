// Checked views of the buffers an entry point of mtlfast._C is given. mtlfast._C is a public
// module, so a kernel must never see a pointer before every buffer of the call has been checked
// against the others: a wrong dtype, size, stride, device, index value or an output that aliases
// an input would otherwise read or write memory the caller does not own (DESIGN.md, "Checks every
// op carries"). Every binding uses these helpers, so every argument gets the same checks and the
// same messages: "mtlfast._C.<function>: argument '<name>' must ..., got ...".
//
// Buffers arrive as DLPack capsules (torch._C._to_dlpack(t)): a capsule is read, never consumed.
// It keeps its name "dltensor", its own destructor frees the DLManagedTensor, and the Python
// caller holds the capsule (and so the tensor) for the whole call. Read them with the GIL held.
#pragma once
#include <pybind11/pybind11.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "dlpack.h"

namespace mtlfast {
namespace buffers {

namespace py = pybind11;

// The CPU kernels start at most this many threads; more is a caller's mistake, not a request.
constexpr int64_t kMaxThreads = 1024;
// DLPack puts no bound on ndim; nothing here has more than a handful of dimensions.
constexpr int32_t kMaxDims = 16;
// In an expected shape: a size the buffer itself defines (the first buffer with that size).
constexpr int64_t kAny = -1;

constexpr DLDataType kFloat16{kDLFloat, 16, 1};
constexpr DLDataType kBFloat16{kDLBfloat, 16, 1};
constexpr DLDataType kFloat32{kDLFloat, 32, 1};
constexpr DLDataType kFloat64{kDLFloat, 64, 1};
constexpr DLDataType kInt32{kDLInt, 32, 1};
constexpr DLDataType kInt64{kDLInt, 64, 1};
constexpr DLDataType kBool{kDLBool, 8, 1};  // what torch exports for torch.bool: one byte per element

inline bool same(DLDataType a, DLDataType b) { return a.code == b.code && a.bits == b.bits && a.lanes == b.lanes; }

inline std::string dtype_name(DLDataType t) {
  for (const auto& [known, name] : std::initializer_list<std::pair<DLDataType, const char*>>{
           {kFloat16, "float16"}, {kBFloat16, "bfloat16"}, {kFloat32, "float32"}, {kFloat64, "float64"},
           {kInt32, "int32"}, {kInt64, "int64"}, {kBool, "bool"}}) {
    if (same(t, known)) return name;
  }
  return "(DLPack code " + std::to_string(t.code) + ", bits " + std::to_string(t.bits) + ", lanes " +
         std::to_string(t.lanes) + ")";
}

inline std::string device_name(DLDevice d) {
  if (d.device_type == kDLCPU) return "cpu";
  if (d.device_type == kDLCUDA) return "cuda:" + std::to_string(d.device_id);
  return "DLPack device type " + std::to_string(static_cast<int>(d.device_type)) + " id " +
         std::to_string(d.device_id);
}

inline std::string sizes_text(const std::vector<int64_t>& sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + (sizes.size() == 1 ? ",)" : ")");
}

// One argument, read from its capsule. Sizes and strides are in elements; strides are filled in
// (compact row-major) where the producer gave none. `present` is false for an optional None.
struct Buffer {
  const char* name = "";
  bool present = false;
  char* data = nullptr;  // DLTensor data + byte_offset: the first element
  DLDataType dtype{};
  DLDevice device{};
  std::vector<int64_t> shape, strides;
  int64_t numel = 0;

  int ndim() const { return static_cast<int>(shape.size()); }
  int64_t itemsize() const { return static_cast<int64_t>(dtype.bits / 8) * dtype.lanes; }
  template <typename T>
  T* as() const { return present ? reinterpret_cast<T*>(data) : nullptr; }

  // Size-1 dimensions may have any stride (torch gives them whatever fits), and a buffer without
  // elements has nothing to lay out.
  bool contiguous() const {
    int64_t expected = 1;
    for (int d = ndim() - 1; d >= 0; --d) {
      if (shape[d] != 1 && strides[d] != expected) return numel == 0;
      expected *= shape[d];
    }
    return true;
  }

  // [first, last) addresses its elements occupy by its strides; empty without elements.
  std::pair<uintptr_t, uintptr_t> bytes() const {
    if (!present || numel == 0) return {0, 0};
    int64_t low = 0, high = 0;  // element offsets; read() made sure these cannot overflow
    for (int d = 0; d < ndim(); ++d) (strides[d] < 0 ? low : high) += strides[d] * (shape[d] - 1);
    const uintptr_t base = reinterpret_cast<uintptr_t>(data);
    return {base + low * itemsize(), base + (high + 1) * itemsize()};
  }
};

// The checks of one call of `function`; every failure raises a Python exception naming the
// function and the argument.
class Call {
 public:
  explicit Call(const char* function) : function_(function) {}

  const char* function() const { return function_; }

  [[noreturn]] void type_error(const char* arg, const std::string& what) const {
    throw py::type_error(prefix(arg) + what);
  }
  [[noreturn]] void value_error(const char* arg, const std::string& what) const {
    throw py::value_error(prefix(arg) + what);
  }

  // The capsule `obj` as a Buffer; None gives an absent one where `optional`.
  Buffer read(py::handle obj, const char* name, bool optional = false) const {
    Buffer b;
    b.name = name;
    if (optional && obj.is_none()) return b;
    if (!PyCapsule_CheckExact(obj.ptr())) {
      type_error(name, std::string("must be a DLPack capsule (torch._C._to_dlpack(tensor))") +
                           (optional ? " or None" : "") + ", got " + Py_TYPE(obj.ptr())->tp_name);
    }
    if (!PyCapsule_IsValid(obj.ptr(), "dltensor")) {
      const char* got = PyCapsule_GetName(obj.ptr());
      PyErr_Clear();
      type_error(name, std::string("must be an unconsumed DLPack capsule named 'dltensor', got a capsule named '") +
                           (got ? got : "") + "'");
    }
    const auto* managed = static_cast<const DLManagedTensor*>(PyCapsule_GetPointer(obj.ptr(), "dltensor"));
    const DLTensor& t = managed->dl_tensor;
    if (t.ndim < 0 || t.ndim > kMaxDims || (t.ndim > 0 && t.shape == nullptr)) {
      value_error(name, "has an invalid DLPack ndim " + std::to_string(t.ndim));
    }
    b.present = true;
    b.dtype = t.dtype;
    b.device = t.device;
    b.shape.assign(t.shape, t.shape + t.ndim);
    b.numel = 1;
    for (int64_t size : b.shape) {
      if (size < 0) value_error(name, "has a negative size in its shape " + sizes_text(b.shape));
      if (__builtin_mul_overflow(b.numel, size, &b.numel)) value_error(name, "has too many elements");
    }
    if (t.strides != nullptr) {
      b.strides.assign(t.strides, t.strides + t.ndim);
    } else {
      b.strides.resize(t.ndim);
      int64_t stride = 1;
      for (int d = t.ndim - 1; d >= 0; --d) {
        b.strides[d] = stride;
        if (__builtin_mul_overflow(stride, std::max<int64_t>(b.shape[d], 1), &stride)) {
          value_error(name, "has too many elements");
        }
      }
    }
    if (t.dtype.bits == 0 || t.dtype.bits % 8 != 0 || t.dtype.lanes == 0) {
      type_error(name, "has an unsupported dtype " + dtype_name(t.dtype));
    }
    if (b.numel == 0) return b;  // nothing will be read or written: data may be anything
    // Every element's byte offset must fit: the span below and the kernels' index arithmetic
    // then cannot overflow.
    int64_t reach = 1;
    for (int d = 0; d < t.ndim; ++d) {
      int64_t extent;
      if (b.strides[d] == INT64_MIN || __builtin_mul_overflow(std::abs(b.strides[d]), b.shape[d] - 1, &extent) ||
          __builtin_add_overflow(reach, extent, &reach)) {
        value_error(name, "has strides too large for its shape");
      }
    }
    if (__builtin_mul_overflow(reach, b.itemsize(), &reach)) value_error(name, "has strides too large for its shape");
    if (t.data == nullptr) value_error(name, "has no data (a null pointer) but " + std::to_string(b.numel) + " elements");
    b.data = static_cast<char*>(t.data) + t.byte_offset;
    if (reinterpret_cast<uintptr_t>(b.data) % static_cast<uintptr_t>(std::min<int64_t>(b.itemsize(), 16)) != 0) {
      value_error(name, "is not aligned to its element size");
    }
    return b;
  }

  // The buffer that fixes the call's device type and dtype; the others are checked against it.
  Buffer first(py::handle obj, const char* name, DLDeviceType type, const char* type_name,
               std::initializer_list<DLDataType> dtypes) const {
    Buffer b = read(obj, name);
    device_type(b, type, type_name);
    dtype_in(b, dtypes);
    return b;
  }

  void device_type(const Buffer& b, DLDeviceType type, const char* expected) const {
    if (b.present && b.device.device_type != type) {
      value_error(b.name, std::string("must be on ") + expected + ", got " + device_name(b.device));
    }
  }

  void same_device(const Buffer& ref, const Buffer& b) const {
    if (b.present && (b.device.device_type != ref.device.device_type || b.device.device_id != ref.device.device_id)) {
      value_error(b.name, "must be on the device of '" + std::string(ref.name) + "' (" + device_name(ref.device) +
                              "), got " + device_name(b.device));
    }
  }

  void dtype_in(const Buffer& b, std::initializer_list<DLDataType> allowed) const {
    if (!b.present) return;
    std::string names;
    for (DLDataType t : allowed) {
      if (same(b.dtype, t)) return;
      names += (names.empty() ? "" : " or ") + dtype_name(t);
    }
    type_error(b.name, "must have dtype " + names + ", got " + dtype_name(b.dtype));
  }

  void same_dtype(const Buffer& ref, const Buffer& b) const {
    if (b.present && !same(b.dtype, ref.dtype)) {
      type_error(b.name, "must have the dtype of '" + std::string(ref.name) + "' (" + dtype_name(ref.dtype) +
                             "), got " + dtype_name(b.dtype));
    }
  }

  // The sizes of a buffer that defines some of the call's sizes, after checking its rank; `dims`
  // names them for the message, e.g. "(G, T, B, 4H)".
  template <int N>
  std::array<int64_t, N> sizes(const Buffer& b, const char* dims) const {
    if (b.ndim() != N) {
      value_error(b.name, "must be " + std::to_string(N) + "-D " + dims + ", got shape " + sizes_text(b.shape));
    }
    std::array<int64_t, N> out;
    std::copy(b.shape.begin(), b.shape.end(), out.begin());
    return out;
  }

  // `expected` may hold kAny where the buffer itself defines a size (then read it from b.shape).
  void shape(const Buffer& b, const char* dims, const std::vector<int64_t>& expected) const {
    if (!b.present) return;
    bool ok = b.shape.size() == expected.size();
    for (size_t d = 0; ok && d < expected.size(); ++d) ok = expected[d] == kAny || expected[d] == b.shape[d];
    if (!ok) {
      std::string text = sizes_text(expected);
      for (size_t at; (at = text.find(std::to_string(kAny))) != std::string::npos;) text.replace(at, 2, "*");
      value_error(b.name, std::string("must have shape ") + dims + " = " + text + ", got " + sizes_text(b.shape));
    }
  }

  void contiguous(const Buffer& b) const {
    if (b.present && !b.contiguous()) {
      value_error(b.name, "must be contiguous, got strides " + sizes_text(b.strides) + " for shape " +
                              sizes_text(b.shape));
    }
  }

  // A buffer of the call's element type, checked against `ref` (the buffer that fixed the dtype
  // and device): the same device and dtype, the given shape, contiguous.
  Buffer like(py::handle obj, const char* name, const Buffer& ref, const char* dims,
              const std::vector<int64_t>& shape, bool optional = false) const {
    Buffer b = read(obj, name, optional);
    matches(b, ref, dims, shape);
    return b;
  }

  // The same for an input a kernel reads through its strides, whatever they are.
  Buffer like_strided(py::handle obj, const char* name, const Buffer& ref, const char* dims,
                      const std::vector<int64_t>& shape, bool optional = false) const {
    Buffer b = read(obj, name, optional);
    matches(b, ref, dims, shape, false);
    return b;
  }

  // like()'s checks of a buffer already read (to take a size from it first).
  void matches(const Buffer& b, const Buffer& ref, const char* dims, const std::vector<int64_t>& shape,
               bool need_contiguous = true) const {
    same_device(ref, b);
    same_dtype(ref, b);
    this->shape(b, dims, shape);
    if (need_contiguous) contiguous(b);
  }

  // A buffer of a fixed dtype (indices, lengths, flags) on the device of `ref`, the given shape,
  // contiguous.
  Buffer typed(py::handle obj, const char* name, DLDataType dtype, const Buffer& ref, const char* dims,
               const std::vector<int64_t>& shape, bool optional = false, bool need_contiguous = true) const {
    Buffer b = read(obj, name, optional);
    same_device(ref, b);
    dtype_in(b, {dtype});
    this->shape(b, dims, shape);
    if (need_contiguous) contiguous(b);
    return b;
  }

  // Every value of an int64 buffer (checked contiguous, on the CPU) in [low, high]: indices and
  // lengths are addresses to the kernels. `range` names the interval, e.g. "[0, T]".
  void values_in(const Buffer& b, const char* range, int64_t low, int64_t high) const {
    if (!b.present) return;
    device_type(b, kDLCPU, "cpu");  // its values are read here, on the host
    const int64_t* v = b.as<const int64_t>();
    for (int64_t i = 0; i < b.numel; ++i) {
      if (v[i] < low || v[i] > high) {
        value_error(b.name, std::string("must have values in ") + range + " = [" + std::to_string(low) + ", " +
                                std::to_string(high) + "], got " + std::to_string(v[i]) + " at flat index " +
                                std::to_string(i));
      }
    }
  }

  // Outputs are written while inputs are still read (and outputs by other threads): none may
  // share a byte with another output or with an input. Absent buffers are skipped.
  void disjoint(std::initializer_list<const Buffer*> outputs, std::initializer_list<const Buffer*> inputs) const {
    std::vector<const Buffer*> seen;
    for (const Buffer* out : outputs) {
      for (const Buffer* other : seen) overlap(*out, *other);
      for (const Buffer* in : inputs) overlap(*out, *in);
      seen.push_back(out);
    }
  }

  int threads(int64_t threads) const {
    if (threads < 1 || threads > kMaxThreads) {
      value_error("threads", "must be in [1, " + std::to_string(kMaxThreads) + "], got " + std::to_string(threads));
    }
    return static_cast<int>(threads);
  }

 private:
  std::string prefix(const char* arg) const {
    return std::string("mtlfast._C.") + function_ + ": argument '" + arg + "' ";
  }

  void overlap(const Buffer& out, const Buffer& other) const {
    const auto [a0, a1] = out.bytes();
    const auto [b0, b1] = other.bytes();
    if (a0 < a1 && b0 < b1 && a0 < b1 && b0 < a1) {
      value_error(out.name, "must not overlap argument '" + std::string(other.name) + "' in memory");
    }
  }

  const char* function_;
};

}  // namespace buffers
}  // namespace mtlfast
