// What the int8 implicit-GEMM kernel (igemm.h) is told about one conv or linear layer. All sizes are
// 32-bit: the host sends only tensors with fewer than 2^31 elements here.
//
// The GEMM: rows m = output pixels (n, oh, ow) of the NHWC output, M = N * OH * OW; columns = output
// channels O; k = (ki, kj, c) over the kh x kw taps and C input channels, K = kh * kw * C, with C % 16 == 0
// so that every 16-byte chunk of a patch row lies inside one tap. A[m][k] is the input pixel under tap
// (ki, kj) (0 in the padding), B[o][k] the weight [O][kh][kw][C] (channels-last). A linear layer is a 1x1
// conv on a 1x1 map.
#pragma once

#include <cstdint>

namespace qkernels {
namespace mma {

struct ConvGeometry {
  int N, H, W, C;  // input, NHWC
  int OH, OW, O;   // output, NHWC: [M][O]
  int kh, kw, sh, sw, ph, pw, dh, dw;
  int M, K;
};

struct IgemmParams {
  const int8_t* x;  // NHWC
  const int8_t* w;  // [O][K]
  ConvGeometry g;
  const float* scale;  // [O] when per_channel_scale, else [1]
  const float* bias;   // [O] or nullptr
  void* out;           // [M][O] of float, int8 or int32 (out_kind, int8_common.h)
  int act, out_kind, per_channel_scale;
  int k_tiles;  // ceil(K / 64)
  int splits;   // CTAs along K per output tile (gridDim.z); > 1: split-K, see epilogue.h
  // split-K with float / int8 output: int32 partial sums [M][O] and one arrival counter per output tile,
  // both zero at the launch
  int32_t* workspace;
  int32_t* tile_counters;
};

}  // namespace mma
}  // namespace qkernels
