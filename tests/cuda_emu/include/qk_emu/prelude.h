// Force-included (-include) before every CUDA source the emulator compiles as host C++: the CUDA
// keywords become plain C++, and the device API comes from device.h.
//   __global__ / __device__ / __host__   nothing (kernels are ordinary functions run by the scheduler)
//   __shared__                           static thread_local: one copy per block, because a block runs
//                                        on one OS thread at a time and its threads are fibers on it
//   __launch_bounds__, __grid_constant__ nothing
// __CUDACC__ and __CUDA_ARCH__ stay undefined, so inline-PTX paths compile out and their portable
// twins run.
#pragma once

#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __shared__ static thread_local
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) alignas(n)
#define QK_EMU 1

#include "device.h"
#include "launch.h"
#include "runtime_api.h"
