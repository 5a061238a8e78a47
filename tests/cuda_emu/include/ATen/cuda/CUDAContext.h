// Emulator stand-in for ATen/cuda/CUDAContext.h: the current stream and the emulated device's
// properties (SM count from QK_EMU_SM_COUNT).
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "qk_emu/runtime_api.h"

namespace at {
namespace cuda {
using c10::cuda::getCurrentCUDAStream;
cudaDeviceProp* getCurrentDeviceProperties();
cudaDeviceProp* getDeviceProperties(c10::DeviceIndex device);
inline c10::DeviceIndex current_device() {
  int d = 0;
  cudaGetDevice(&d);
  return (c10::DeviceIndex)d;
}
}  // namespace cuda
}  // namespace at
