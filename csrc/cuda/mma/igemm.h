// The int8 implicit-GEMM kernel of conv2d_int8 / linear_int8 on the tensor cores (mma.sync m16n8k32 s8),
// put together from the pieces of this folder:
//   tile_loaders.h  im2col rows of the NHWC input and weight rows -> shared memory (16-byte cp.async)
//   pipeline.h      kStages-deep ring of k-tiles, one barrier per k-tile
//   warp_tile.h     ldmatrix fragments of a k-tile, mma into the warp's accumulators
//   epilogue.h      split-K reduction, the CPU kernels' epilogue, coalesced NHWC stores
// igemm_s8_cta is the whole work of one CTA; the kernel that calls it (conv_int8.cu) declares the dynamic
// shared memory (smem_bytes<Cfg>(), 16-byte aligned). Grid: x = M tiles, y = O tiles, z = K splits.
#pragma once

#include "epilogue.h"
#include "pipeline.h"
#include "tile_loaders.h"

namespace qkernels {
namespace mma {

template <class Cfg>
constexpr int smem_bytes() {
  return Cfg::kStages * Cfg::kStageBytes > EpilogueLayout<Cfg>::kSmemBytes ? Cfg::kStages * Cfg::kStageBytes
                                                                            : EpilogueLayout<Cfg>::kSmemBytes;
}

template <class Cfg, class Arch>
QK_DEVICE void igemm_s8_cta(const IgemmParams& p, unsigned char* smem) {
  const int m0 = (int)blockIdx.x * Cfg::kBM, n0 = (int)blockIdx.y * Cfg::kBN;
  // this CTA's k-tiles: split s of p.splits gets [s * k_tiles / splits, (s + 1) * k_tiles / splits)
  const int kt0 = (int)((int64_t)blockIdx.z * p.k_tiles / p.splits);
  const int kt1 = (int)((int64_t)(blockIdx.z + 1) * p.k_tiles / p.splits);
  ActivationTileLoader<Cfg, Arch> a_tiles(p.g, p.x, m0, kt0);
  WeightTileLoader<Cfg, Arch> b_tiles(p.g, p.w, n0, kt0);
  WarpTile<Cfg, Arch> warp(p.g.M - m0, p.g.O - n0);
  multistage_loop<Cfg::kStages, Arch>(
      kt1 - kt0,
      [&](int stage) {
        unsigned char* s = smem + stage * Cfg::kStageBytes;
        a_tiles.load(p.g, s);
        b_tiles.load(p.g, s + Cfg::kBM * SwizzledTile::kRowBytes);
      },
      [&](int stage) {
        const unsigned char* s = smem + stage * Cfg::kStageBytes;
        warp.multiply(s, s + Cfg::kBM * SwizzledTile::kRowBytes);
      });
  store_output_tile(warp, p, m0, n0, smem);
}

}  // namespace mma
}  // namespace qkernels
