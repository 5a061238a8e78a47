// cp.async (PTX ISA, "cp.async", "cp.async.commit_group", "cp.async.wait_group"): 16 bytes from global to
// shared memory without passing through registers, zero-filled when the source is invalid (src-size 0),
// so padding and out-of-range rows need no separate stores. Copies issued by a thread form a group at
// each commit; wait<N> returns once at most the N most recent groups of that thread are still in flight.
// Other threads see the data only after a barrier that follows the wait (pipeline.h does both).
//
// Twin: a 16-byte load and store (or a store of zeros) when issued; commit and wait do nothing. Under the
// project's CUDA emulator the copies are handed to its model of asynchronous copies (qk_emu/async_copy.h),
// which lands them only when the issuing thread waits for their group (or at once, QK_EMU_CP_ASYNC=issue),
// so a stage read before its wait or overwritten while another warp reads it shows up as a wrong result.
#pragma once

#include "arch.h"

#if defined(QK_EMU)
#include "qk_emu/async_copy.h"
#endif

namespace qkernels {
namespace mma {

// 16 bytes from `src` (16-byte aligned, global) to `dst` (16-byte aligned, shared); zeros when !valid
// (src is then not read, but must still be a valid address for the instruction).
template <class Arch>
QK_DEVICE void cp_async_16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__)
  if constexpr (uses_ptx<Arch>()) {
    const uint32_t addr = (uint32_t)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
    return;
  }
#endif
#if defined(QK_EMU)
  ::qk_emu::cp_async(dst, src, 16, valid ? 16 : 0);
#else
  int4 v = make_int4(0, 0, 0, 0);
  if (valid) v = *reinterpret_cast<const int4*>(src);
  *reinterpret_cast<int4*>(dst) = v;
#endif
}

template <class Arch>
QK_DEVICE void cp_async_commit() {
#if defined(__CUDA_ARCH__)
  if constexpr (uses_ptx<Arch>()) {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    return;
  }
#endif
#if defined(QK_EMU)
  ::qk_emu::cp_async_commit();
#endif
}

template <class Arch, int N>
QK_DEVICE void cp_async_wait() {
#if defined(__CUDA_ARCH__)
  if constexpr (uses_ptx<Arch>()) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");  // later shared loads stay after it
    return;
  }
#endif
#if defined(QK_EMU)
  ::qk_emu::cp_async_wait(N);
#endif
}

}  // namespace mma
}  // namespace qkernels
