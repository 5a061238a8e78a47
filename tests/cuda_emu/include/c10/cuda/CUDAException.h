// Emulator stand-in for c10/cuda/CUDAException.h: the same two macros, raising c10::Error with the
// CUDA runtime's message (and the emulator's detail, when it has one).
#pragma once
#include <c10/util/Exception.h>

#include <string>

#include "qk_emu/runtime_api.h"

namespace qk_emu {
std::string last_error_detail();
}

#define C10_CUDA_CHECK(EXPR)                                                                           \
  do {                                                                                                 \
    const cudaError_t qk_emu_err = (EXPR);                                                             \
    TORCH_CHECK(qk_emu_err == cudaSuccess, "CUDA error: ", cudaGetErrorString(qk_emu_err), " (",      \
                cudaGetErrorName(qk_emu_err), ")", ::qk_emu::last_error_detail());                     \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
