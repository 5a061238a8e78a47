// One warp's share of a CTA tile: kWarpM x kWarpN outputs as kMI x kNI m16n8k32 accumulator fragments.
// For each k-tile in shared memory (two k32 steps) it loads its A fragments (one ldmatrix.x4 per m16
// block) and B fragments (one ldmatrix.x4 per two n8 blocks) from the swizzled stage and multiplies.
#pragma once

#include "ldmatrix.h"
#include "mma_sync.h"
#include "tile_config.h"

namespace qkernels {
namespace mma {

template <class Cfg, class Arch>
struct WarpTile {
  static constexpr int kMI = Cfg::kMI, kNI = Cfg::kNI;

  FragC acc[kMI][kNI];
  int row0, col0;  // of this warp's tile inside the CTA tile
  int a_row[kMI], a_chunk, b_row[kNI / 2], b_chunk;
  bool active;  // the warp tile holds outputs (rows < M and channels < O)

  QK_DEVICE WarpTile(int rows_left, int cols_left) {
    const int warp = (int)threadIdx.x / 32, lane = lane_id();
    row0 = (warp / Cfg::kWarpsN) * Cfg::kWarpM;
    col0 = (warp % Cfg::kWarpsN) * Cfg::kWarpN;
    active = row0 < rows_left && col0 < cols_left;
    // ldmatrix row addresses (ldmatrix.h): A matrices (rows 0-7 | 8-15) x (k 0-15 | 16-31) in lane
    // groups of 8; B matrices (n 0-7, k 0-15 | 16-31), then (n 8-15, ...)
#pragma unroll
    for (int i = 0; i < kMI; ++i) a_row[i] = row0 + 16 * i + lane % 8 + 8 * ((lane / 8) % 2);
    a_chunk = lane / 16;
#pragma unroll
    for (int j = 0; j < kNI / 2; ++j) b_row[j] = col0 + 16 * j + lane % 8 + 8 * (lane / 16);
    b_chunk = (lane / 8) % 2;
#pragma unroll
    for (int i = 0; i < kMI; ++i)
#pragma unroll
      for (int j = 0; j < kNI; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j].x[e] = 0;
  }

  // acc += A(stage) * B(stage)^T over one k-tile of 64 bytes.
  QK_DEVICE void multiply(const unsigned char* stage_a, const unsigned char* stage_b) {
    if (!active) return;  // warp-uniform
#pragma unroll
    for (int kk = 0; kk < Cfg::kBK / kMmaK; ++kk) {
      FragA a[kMI];
      FragB b[kNI];
#pragma unroll
      for (int i = 0; i < kMI; ++i)
        ldmatrix_x4<Arch>(a[i].x, stage_a + SwizzledTile::offset(a_row[i], 2 * kk + a_chunk));
#pragma unroll
      for (int j = 0; j < kNI / 2; ++j) {
        uint32_t r[4];
        ldmatrix_x4<Arch>(r, stage_b + SwizzledTile::offset(b_row[j], 2 * kk + b_chunk));
        b[2 * j].x[0] = r[0], b[2 * j].x[1] = r[1];
        b[2 * j + 1].x[0] = r[2], b[2 * j + 1].x[1] = r[3];
      }
      mma_tile<Arch>(acc, a, b);
    }
  }
};

}  // namespace mma
}  // namespace qkernels
