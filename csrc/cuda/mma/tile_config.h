// The shapes of the int8 implicit GEMM (igemm.h): a CTA computes kBM output pixels x kBN output channels,
// its warps (kWarpsM x kWarpsN) kMI x kNI m16n8k32 tiles each, over k-tiles of kBK = 64 bytes of the patch
// held in kStages shared-memory stages. The k-tile of each operand is a SwizzledTile (rows of 64 bytes).
#pragma once

#include "fragments.h"

namespace qkernels {
namespace mma {

template <int BM, int BN, int WarpsM, int WarpsN, int Stages>
struct TileConfig {
  static constexpr int kBM = BM, kBN = BN, kBK = 64;
  static constexpr int kWarpsM = WarpsM, kWarpsN = WarpsN, kStages = Stages;
  static constexpr int kThreads = 32 * WarpsM * WarpsN;
  static constexpr int kWarpM = BM / WarpsM, kWarpN = BN / WarpsN;
  static constexpr int kMI = kWarpM / kMmaM, kNI = kWarpN / kMmaN;
  static constexpr int kStageBytes = (BM + BN) * kBK;  // A rows, then B rows
  static_assert(kWarpM % kMmaM == 0 && kWarpN % (2 * kMmaN) == 0, "warp tiles are whole m16 x n16 blocks");
  static_assert(Stages >= 2, "a pipeline needs two stages at least");
};

// A k-tile of one operand in shared memory: rows of 64 bytes, i.e. four 16-byte chunks (the unit of
// cp.async and of an ldmatrix row). Chunk c of row r is stored in chunk slot c ^ ((r / 2) % 4): the eight
// rows an ldmatrix reads at one logical chunk then fall on eight different 16-byte bank groups (without
// the swizzle rows r and r + 2 share banks, a 4-way conflict), and a warp's 16-byte cp.async stores of
// eight consecutive rows still cover 512 contiguous bytes.
struct SwizzledTile {
  static constexpr int kRowBytes = 64;
  QK_DEVICE static int offset(int row, int chunk) { return row * kRowBytes + ((chunk ^ ((row >> 1) & 3)) << 4); }
};

}  // namespace mma
}  // namespace qkernels
