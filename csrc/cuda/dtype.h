// Element types the kernels are instantiated for; the numbering is mirrored in mtlfast/_native.py.
#pragma once

namespace mtlfast {
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
}  // namespace mtlfast
