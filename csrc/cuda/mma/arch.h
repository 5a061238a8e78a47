// Which implementation a warp-level piece (mma, ldmatrix, cp.async) uses, chosen at compile time by a tag:
//   Hw    the instruction itself, as inline PTX, when compiled for the device (__CUDA_ARCH__); where
//         __CUDA_ARCH__ is undefined (the project's CUDA emulator, nvcc's host pass) it is the twin.
//   Twin  always the portable twin: plain CUDA (warp shuffles, loads, stores) with the instruction's exact
//         semantics. The emulator runs it against the CPU kernels; on a GPU a kernel instantiated with Twin
//         is compared with the one instantiated with Hw.
// Every piece assumes one-dimensional thread blocks whose size is a multiple of 32 (lane = threadIdx.x % 32).
#pragma once

#include <cstdint>
#include <type_traits>

#define QK_DEVICE __device__ __forceinline__

namespace qkernels {
namespace mma {

struct Hw {};
struct Twin {};

// True where the inline PTX of a piece is compiled: a device pass with the Hw tag.
template <class Arch>
constexpr bool uses_ptx() {
#if defined(__CUDA_ARCH__)
  return std::is_same<Arch, Hw>::value;
#else
  return false;
#endif
}

QK_DEVICE int lane_id() { return (int)(threadIdx.x & 31u); }

constexpr unsigned kFullWarp = 0xffffffffu;

}  // namespace mma
}  // namespace qkernels
