// Host-side helpers shared by the CUDA ops: device attributes, opt-in shared memory,
// the architectures this library has kernels for, and the 16-byte alignment of the rows
// the kernels move in 16-byte chunks.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <atomic>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <utility>

#include "ops.h"

namespace skipdit::cuda {

constexpr int kMaxDevices = 64;

// An attribute of a device, cached per device (device ids >= kMaxDevices, or negative
// ones, are asked every time).
template <cudaDeviceAttr kAttr>
int device_attribute(int device) {
  static std::atomic<int> cached[kMaxDevices];
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable) {
    const int v = cached[device].load(std::memory_order_relaxed);
    if (v != 0) return v;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, kAttr, device));
  if (cacheable) cached[device].store(v, std::memory_order_relaxed);
  return v;
}

inline int sm_count(int device) {
  return device_attribute<cudaDevAttrMultiProcessorCount>(device);
}

// What the limit functions of the ops (cuda_limits) need to know about a device.
inline CudaDeviceInfo device_info(int device) {
  return {device_attribute<cudaDevAttrComputeCapabilityMajor>(device),
          device_attribute<cudaDevAttrComputeCapabilityMinor>(device),
          device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device)};
}

// Lets `kernel` use `bytes` of dynamic shared memory per block on `device` (the current
// device), raising its limit when a launch needs more than before, and asks for the
// largest shared-memory carveout, so that the occupancy a kernel was sized for is not
// capped by the L1 split (the kernels stream through shared memory with cp.async.cg,
// which bypasses L1). Errors, naming op, when the device allows less per block.
inline void opt_in_smem(const void* kernel, int bytes, int device, const char* op) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> configured;
  std::lock_guard<std::mutex> lock(mu);
  int& have = configured[{kernel, device}];
  if (have >= bytes) return;
  const int optin = device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device);
  TORCH_CHECK(optin >= bytes, op, " (cuda): needs ", bytes,
              " bytes of shared memory per block, the device allows ", optin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  if (have == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                        cudaSharedmemCarveoutMaxShared));
  }
  have = bytes;
}

// "" when this build has kernels a device of compute capability (major, minor) runs:
// a cubin of the same major version and no larger minor one (an "a" cubin only on its
// own capability), or PTX of a capability not above the device's. SKIPDIT_CUDA_ARCHS
// is CMake's list, e.g. "80-real,90a-real".
inline std::string arch_reason(int major, int minor) {
  std::stringstream archs(SKIPDIT_CUDA_ARCHS);
  std::string a;
  const int cc = 10 * major + minor;
  while (std::getline(archs, a, ',')) {
    const size_t dash = a.find('-');
    const std::string num = a.substr(0, dash);
    const std::string kind = dash == std::string::npos ? "" : a.substr(dash + 1);
    const bool arch_specific = !num.empty() && (num.back() == 'a' || num.back() == 'f');
    const int v = std::stoi(arch_specific ? num.substr(0, num.size() - 1) : num);
    if (kind == "virtual") {
      if (v <= cc) return "";
    } else if (arch_specific ? v == cc : (v / 10 == major && v % 10 <= minor)) {
      return "";
    }
  }
  std::ostringstream why;
  why << "the library has no CUDA kernels for compute capability " << major << "." << minor
      << " (built for " << SKIPDIT_CUDA_ARCHS << ")";
  return why.str();
}

// The device checks every CUDA kernel of this library shares: compute capability >= 8.0
// (cp.async, bf16 mma.sync), a kernel image in this build, and smem_need bytes of
// shared memory per block ("" when the device passes; dev.cc_major < 0: unknown, no
// checks). `what` names the kernel in the message, `need_for` qualifies smem_need.
inline std::string device_reason(const CudaDeviceInfo& dev, const std::string& what,
                                 int64_t smem_need, const std::string& need_for = "") {
  if (dev.cc_major < 0) return "";
  if (dev.cc_major < 8) {
    return what + " needs compute capability >= 8.0, device has " + std::to_string(dev.cc_major) +
           "." + std::to_string(dev.cc_minor);
  }
  std::string why = arch_reason(dev.cc_major, dev.cc_minor);
  if (!why.empty()) return why;
  if (dev.smem_optin >= 0 && dev.smem_optin < smem_need) {
    return what + " needs " + std::to_string(smem_need) + " bytes of shared memory per block" +
           need_for + ", the device allows " + std::to_string(dev.smem_optin);
  }
  return "";
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether every row of t (last dim contiguous) starts 16-byte aligned: the data pointer
// and every leading stride of a dim longer than 1.
inline bool rows_aligned16(const at::Tensor& t) {
  if (!aligned16(t.const_data_ptr())) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && (t.stride(d) * t.element_size()) % 16 != 0) return false;
  }
  return true;
}

// t, or a fresh contiguous copy of it (row-aligned, for rows of a multiple of 16 bytes)
// when its rows are not 16-byte aligned. (A contiguous view at an odd offset is copied
// too: t.contiguous() would return it as it is.)
inline at::Tensor with_aligned_rows(const at::Tensor& t) {
  return rows_aligned16(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

}  // namespace skipdit::cuda
