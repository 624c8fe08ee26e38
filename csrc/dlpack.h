// The DLPack structs mtlfast._C reads, from dmlc/dlpack v0.8 (include/dlpack/dlpack.h,
// https://github.com/dmlc/dlpack), Copyright (c) 2017 by Contributors, Apache License 2.0.
//
// Only what a consumer of a legacy "dltensor" capsule needs is kept (the versioned structs of
// DLPack 1.x are left out: torch._C._to_dlpack still produces the legacy capsule). These layouts
// are an ABI shared with every producer: field order, types and enum values must never change.
// Vendored rather than taken from torch's include tree so that csrc/ has no PyTorch headers
// (DESIGN.md).
#pragma once
#include <cstdint>

extern "C" {

typedef enum {
  kDLCPU = 1,
  kDLCUDA = 2,
  kDLCUDAHost = 3,
  kDLOpenCL = 4,
  kDLVulkan = 7,
  kDLMetal = 8,
  kDLVPI = 9,
  kDLROCM = 10,
  kDLROCMHost = 11,
  kDLExtDev = 12,
  kDLCUDAManaged = 13,
  kDLOneAPI = 14,
  kDLWebGPU = 15,
  kDLHexagon = 16,
} DLDeviceType;

typedef struct {
  DLDeviceType device_type;
  int32_t device_id;
} DLDevice;

typedef enum {
  kDLInt = 0U,
  kDLUInt = 1U,
  kDLFloat = 2U,
  kDLOpaqueHandle = 3U,
  kDLBfloat = 4U,
  kDLComplex = 5U,
  kDLBool = 6U,
} DLDataTypeCode;

typedef struct {
  uint8_t code;    // a DLDataTypeCode
  uint8_t bits;
  uint16_t lanes;  // 1 for scalars
} DLDataType;

typedef struct {
  void* data;            // data + byte_offset is the first element
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;        // ndim sizes
  int64_t* strides;      // ndim strides in elements; NULL means compact row-major
  uint64_t byte_offset;
} DLTensor;

typedef struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(struct DLManagedTensor* self);
} DLManagedTensor;

}  // extern "C"
