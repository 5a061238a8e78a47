// CTA-level loaders of one k-tile (64 bytes of k) of each GEMM operand from global into a shared-memory
// stage with 16-byte cp.async: ActivationTileLoader gathers the kBM patch rows of the implicit im2col
// (never materialised), WeightTileLoader the kBN weight rows. Padding, rows past M or O and k past K are
// zero-filled by cp.async itself. Each thread owns fixed rows and one fixed 16-byte chunk column
// (threadIdx % 4), so its per-row index math is done once and each k-tile only advances (ki, kj, c).
#pragma once

#include "cp_async.h"
#include "igemm_params.h"
#include "tile_config.h"

namespace qkernels {
namespace mma {

template <class Cfg, class Arch>
struct ActivationTileLoader {
  static constexpr int kChunks = Cfg::kBM * 4;
  static constexpr int kPerThread = (kChunks + Cfg::kThreads - 1) / Cfg::kThreads;
  static_assert(Cfg::kThreads % 4 == 0, "a thread keeps one chunk column");

  const int8_t* x;
  int image[kPerThread];  // offset of the row's image n; -1: row past M (or not this thread's)
  int ih0[kPerThread], iw0[kPerThread];
  int smem[kPerThread];
  int c, ki, kj;  // where this thread's chunk of the next k-tile starts

  QK_DEVICE ActivationTileLoader(const ConvGeometry& g, const int8_t* x_, int m0, int k_tile) : x(x_) {
    const int tid = (int)threadIdx.x, chunk = tid % 4;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int idx = tid + i * Cfg::kThreads, row = idx / 4, m = m0 + row;
      image[i] = -1, ih0[i] = 0, iw0[i] = 0;
      smem[i] = SwizzledTile::offset(row, chunk);
      if (idx < kChunks && m < g.M) {
        const int ow = m % g.OW, t = m / g.OW, oh = t % g.OH, n = t / g.OH;
        image[i] = n * g.H * g.W * g.C;
        ih0[i] = oh * g.sh - g.ph;
        iw0[i] = ow * g.sw - g.pw;
      }
    }
    const int k = k_tile * Cfg::kBK + 16 * chunk, tap = k / g.C;
    c = k % g.C, ki = tap / g.kw, kj = tap % g.kw;
  }

  QK_DEVICE void load(const ConvGeometry& g, unsigned char* stage) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      if (kPerThread * Cfg::kThreads > kChunks && (int)threadIdx.x + i * Cfg::kThreads >= kChunks) continue;
      const int ih = ih0[i] + ki * g.dh, iw = iw0[i] + kj * g.dw;
      const bool valid = image[i] >= 0 && ki < g.kh && (unsigned)ih < (unsigned)g.H && (unsigned)iw < (unsigned)g.W;
      const int8_t* src = valid ? x + image[i] + (ih * g.W + iw) * g.C + c : x;
      cp_async_16<Arch>(stage + smem[i], src, valid);
    }
    c += Cfg::kBK;
    while (c >= g.C) {  // at most once when C >= 64
      c -= g.C;
      if (++kj == g.kw) kj = 0, ++ki;
    }
  }
};

template <class Cfg, class Arch>
struct WeightTileLoader {
  static constexpr int kChunks = Cfg::kBN * 4;
  static constexpr int kPerThread = (kChunks + Cfg::kThreads - 1) / Cfg::kThreads;

  const int8_t* w;
  int row[kPerThread];  // offset of the weight row; -1: past O (or not this thread's)
  int smem[kPerThread];
  int k;                // of this thread's chunk in the next k-tile

  QK_DEVICE WeightTileLoader(const ConvGeometry& g, const int8_t* w_, int n0, int k_tile) : w(w_) {
    const int tid = (int)threadIdx.x, chunk = tid % 4;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int idx = tid + i * Cfg::kThreads, r = idx / 4, n = n0 + r;
      smem[i] = SwizzledTile::offset(r, chunk);
      row[i] = idx < kChunks && n < g.O ? n * g.K : -1;
    }
    k = k_tile * Cfg::kBK + 16 * chunk;
  }

  QK_DEVICE void load(const ConvGeometry& g, unsigned char* stage) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      if (kPerThread * Cfg::kThreads > kChunks && (int)threadIdx.x + i * Cfg::kThreads >= kChunks) continue;
      const bool valid = row[i] >= 0 && k < g.K;
      cp_async_16<Arch>(stage + smem[i], valid ? w + row[i] + k : w, valid);
    }
    k += Cfg::kBK;
  }
};

}  // namespace mma
}  // namespace qkernels
