// The multi-stage cp.async main loop: k-tiles are loaded kStages - 1 ahead of the one being multiplied,
// into a ring of kStages shared-memory stages, with one barrier per k-tile.
//
// Invariants: before iteration kt, kStages - 1 + kt groups are committed (one per load slot, empty when
// past the end, so the count never depends on the data); wait<kStages - 2> therefore leaves k-tile kt
// landed for this thread, and the barrier after it (1) makes every thread's copies of stage kt % kStages
// visible to all and (2) tells that every warp is done with k-tile kt - 1, whose stage the load issued
// next (k-tile kt + kStages - 1) reuses. When the loop ends nothing is in flight and every warp is past its
// last multiply, so the stages may be reused (the epilogue stages its output there).
#pragma once

#include "cp_async.h"

namespace qkernels {
namespace mma {

// load(stage): issue the copies of the next k-tile (in order) into `stage`; compute(stage): use it.
template <int kStages, class Arch, class Load, class Compute>
QK_DEVICE void multistage_loop(int k_tiles, Load&& load, Compute&& compute) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load(s);
    cp_async_commit<Arch>();
  }
  int read = 0, write = kStages - 1;
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<Arch, kStages - 2>();
    __syncthreads();
    if (kt + kStages - 1 < k_tiles) load(write);
    cp_async_commit<Arch>();
    compute(read);
    read = read == kStages - 1 ? 0 : read + 1;
    write = write == kStages - 1 ? 0 : write + 1;
  }
  cp_async_wait<Arch, 0>();
  __syncthreads();
}

}  // namespace mma
}  // namespace qkernels
