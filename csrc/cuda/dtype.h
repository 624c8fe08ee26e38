// Element types the CUDA kernels are instantiated for. Only C++ uses these codes: the binding
// maps each buffer's DLPack dtype to one of them (csrc/bindings.cpp), so nothing mirrors them in
// Python.
#pragma once

namespace mtlfast {
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
}  // namespace mtlfast
