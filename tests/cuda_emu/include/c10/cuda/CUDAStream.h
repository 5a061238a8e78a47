// Emulator stand-in for c10/cuda/CUDAStream.h: one (null) stream; launches run synchronously.
#pragma once
#include <c10/core/Device.h>

#include "qk_emu/runtime_api.h"

namespace c10 {
namespace cuda {
class CUDAStream {
 public:
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
  void synchronize() const {}
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return CUDAStream(); }
inline CUDAStream getDefaultCUDAStream(c10::DeviceIndex = -1) { return CUDAStream(); }
}  // namespace cuda
}  // namespace c10
