// Warp and block reductions of the fake-quant kernels. Maxima are taken over float bit patterns:
// the values reduced are finite |x| (non-negative), which order like their bits, so an integer max
// (and one integer atomicMax per block) gives the float max exactly, whatever the order.
#pragma once
#include <cstdint>

namespace qkernels {
namespace cuda_reduce {

constexpr unsigned kFullWarp = 0xffffffffu;

// Max over the 32 lanes, in every lane (butterfly).
__device__ __forceinline__ unsigned warp_max(unsigned v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(kFullWarp, v, off));
  return v;
}

// OR over aligned groups of `group` lanes (a power of two up to 32), in every lane of the group.
__device__ __forceinline__ unsigned group_or(unsigned v, int group) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    if (off < group) v |= __shfl_xor_sync(kFullWarp, v, off);
  return v;
}

// Max over the whole block (blockDim.x * blockDim.y a multiple of 32, at most 1024), returned to every
// thread. Every thread of the block must call it (it holds two barriers), so the slots can be reused
// by the next call.
__device__ __forceinline__ unsigned block_max(unsigned v) {
  __shared__ unsigned warp_slots[32];
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int warps = (blockDim.x * blockDim.y) >> 5;
  v = warp_max(v);
  if ((tid & 31) == 0) warp_slots[tid >> 5] = v;
  __syncthreads();
  v = 0;
  for (int w = 0; w < warps; ++w) v = max(v, warp_slots[w]);  // a broadcast read: every lane, same word
  __syncthreads();
  return v;
}

}  // namespace cuda_reduce
}  // namespace qkernels
