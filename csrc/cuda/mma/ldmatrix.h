// ldmatrix.sync.aligned.m8n8.x4.shared.b16 (PTX ISA, "ldmatrix"): four 8x8 matrices of 16-bit elements,
// i.e. four blocks of 8 rows x 16 bytes, from shared memory. Lanes 8i..8i+7 give the addresses of rows
// 0..7 of matrix i (each 16-byte aligned); lane l receives in register i the 4 bytes at byte offset
// 4 (l % 4) of row l / 4 of matrix i. For int8 data that is exactly an m16n8k32 A fragment (matrices:
// rows 0-7 / 8-15 x k 0-15 / 16-31) or two B fragments (fragments.h).
//
// Twin: each lane fetches the row address it needs from the lane that gives it (a 64-bit shuffle) and
// loads its 4 bytes.
#pragma once

#include "arch.h"

namespace qkernels {
namespace mma {

template <class Arch>
QK_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* my_row) {
#if defined(__CUDA_ARCH__)
  if constexpr (uses_ptx<Arch>()) {
    const uint32_t addr = (uint32_t)__cvta_generic_to_shared(my_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
    return;
  }
#endif
  const int lane = lane_id();
  const unsigned long long mine = (unsigned long long)(uintptr_t)my_row;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const unsigned long long row = __shfl_sync(kFullWarp, mine, 8 * i + lane / 4);
    r[i] = *reinterpret_cast<const uint32_t*>(reinterpret_cast<const unsigned char*>((uintptr_t)row) + 4 * (lane % 4));
  }
}

}  // namespace mma
}  // namespace qkernels
