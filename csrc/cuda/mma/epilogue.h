// The end of an int8 implicit-GEMM CTA: its int32 accumulators become the layer's output.
//
// Split-K (splits > 1): the CTAs of one output tile each hold a partial sum over their share of the
// k-tiles. Integer addition is exact and associative, so they add them with atomics in any order and the
// result is the same bit for bit: straight into the output for int32 output; otherwise into a zeroed
// int32 workspace, after which each CTA counts itself in on the tile's counter and the last one to arrive
// reads the sums back (bypassing L1) and runs the epilogue below. No CTA ever waits for another.
//
// The epilogue is the CPU kernels' (int8_common.h): v = act(fma(float(acc), scale, bias)), rounded half away
// and saturated for int8 output, so both devices agree bit for bit. Values are staged in shared memory
// (rows padded so the fragments' stores do not conflict) and written to the NHWC output row by row in
// 16-byte stores, element by element where a row ends inside a chunk or rows are not 16-byte aligned.
#pragma once

#include "igemm_params.h"
#include "int8_common.h"
#include "warp_tile.h"

namespace qkernels {
namespace mma {

template <class Cfg>
struct EpilogueLayout {
  static constexpr int row_bytes(int elem) { return Cfg::kBN * elem + (elem == 1 ? 16 : 32); }
  static constexpr int kSmemBytes = Cfg::kBM * row_bytes(4);
};

// (row, column) inside the CTA tile of accumulator element e of fragment (i, j).
template <class Cfg, class Arch>
QK_DEVICE int acc_row(const WarpTile<Cfg, Arch>& w, int i, int e) { return w.row0 + 16 * i + frag_c_row(lane_id(), e); }
template <class Cfg, class Arch>
QK_DEVICE int acc_col(const WarpTile<Cfg, Arch>& w, int j, int e) { return w.col0 + 8 * j + frag_c_col(lane_id(), e); }

// Returns false when this CTA leaves the epilogue to another (split-K, not the last to arrive).
template <class Cfg, class Arch>
QK_DEVICE bool reduce_split_k(WarpTile<Cfg, Arch>& w, const IgemmParams& p, int m0, int n0) {
  const ConvGeometry& g = p.g;
  int32_t* sums = p.out_kind == kOutInt32 ? static_cast<int32_t*>(p.out) : p.workspace;
  if (w.active) {
#pragma unroll
    for (int i = 0; i < Cfg::kMI; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::kNI; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int m = m0 + acc_row(w, i, e), n = n0 + acc_col(w, j, e);
          if (m < g.M && n < g.O) atomicAdd(&sums[m * g.O + n], w.acc[i][j].x[e]);
        }
  }
  if (p.out_kind == kOutInt32) return false;
  __shared__ int last;
  __threadfence();  // this CTA's sums before its arrival
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&p.tile_counters[blockIdx.y * gridDim.x + blockIdx.x], 1) == p.splits - 1;
  __syncthreads();
  if (!last) return false;
  __threadfence();  // the others' sums after their arrivals
  if (w.active) {
#pragma unroll
    for (int i = 0; i < Cfg::kMI; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::kNI; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int m = m0 + acc_row(w, i, e), n = n0 + acc_col(w, j, e);
          if (m < g.M && n < g.O) w.acc[i][j].x[e] = __ldcg(&sums[m * g.O + n]);
        }
  }
  return true;
}

template <class Cfg, class Arch>
QK_DEVICE void store_output_tile(WarpTile<Cfg, Arch>& w, const IgemmParams& p, int m0, int n0, unsigned char* smem) {
  const ConvGeometry& g = p.g;
  if (p.splits > 1 && !reduce_split_k(w, p, m0, n0)) return;
  const int elem = p.out_kind == kOutInt8 ? 1 : 4;
  const int row_bytes = EpilogueLayout<Cfg>::row_bytes(elem);
  if (w.active) {
    float scale[Cfg::kNI][2], bias[Cfg::kNI][2];
#pragma unroll
    for (int j = 0; j < Cfg::kNI; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int n = n0 + acc_col(w, j, h);
        const bool in = n < g.O;
        scale[j][h] = in ? p.scale[p.per_channel_scale ? n : 0] : 0.f;
        bias[j][h] = in && p.bias != nullptr ? p.bias[n] : 0.f;
      }
#pragma unroll
    for (int i = 0; i < Cfg::kMI; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::kNI; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r) {  // rows g and g + 8: elements 2r, 2r + 1 are adjacent columns
          const int row = acc_row(w, i, 2 * r), col = acc_col(w, j, 2 * r);
          unsigned char* dst = smem + row * row_bytes + col * elem;
          const int32_t a0 = w.acc[i][j].x[2 * r], a1 = w.acc[i][j].x[2 * r + 1];
          if (p.out_kind == kOutInt32) {
            *reinterpret_cast<int2*>(dst) = make_int2(a0, a1);
          } else {
            const float v0 = int8_epilogue_value(a0, scale[j][0], bias[j][0], p.act);
            const float v1 = int8_epilogue_value(a1, scale[j][1], bias[j][1], p.act);
            if (p.out_kind == kOutInt8)
              *reinterpret_cast<char2*>(dst) = make_char2((signed char)saturate_int8(v0), (signed char)saturate_int8(v1));
            else
              *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
          }
        }
  }
  __syncthreads();
  const int per_chunk = 16 / elem, chunks_per_row = Cfg::kBN / per_chunk;
  const bool rows_aligned = (g.O * elem) % 16 == 0;
  for (int idx = (int)threadIdx.x; idx < Cfg::kBM * chunks_per_row; idx += Cfg::kThreads) {
    const int r = idx / chunks_per_row, ch = idx % chunks_per_row;
    const int m = m0 + r, n = n0 + ch * per_chunk;
    if (m >= g.M || n >= g.O) continue;
    const unsigned char* src = smem + r * row_bytes + ch * 16;
    unsigned char* dst = static_cast<unsigned char*>(p.out) + ((int64_t)m * g.O + n) * elem;
    if (rows_aligned && n + per_chunk <= g.O) {
      *reinterpret_cast<int4*>(dst) = *reinterpret_cast<const int4*>(src);
    } else {
      const int count = (g.O - n < per_chunk ? g.O - n : per_chunk) * elem;
      for (int b = 0; b < count; ++b) dst[b] = src[b];
    }
  }
}

}  // namespace mma
}  // namespace qkernels
