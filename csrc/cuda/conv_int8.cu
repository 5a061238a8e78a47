// CUDA kernels of conv2d_int8 and linear_int8 (a linear layer is a 1x1 conv over [M, 1, 1, K]):
// - the tensor-core implicit GEMM (mma/igemm.h: mma.sync m16n8k32 s8, cp.async pipeline, split-K) for
//   groups == 1 and C % 16 == 0, in one of three CTA tiles chosen by the problem's size;
// - a tiled depthwise kernel (shared-memory input tile with halo, 4 channels per thread, 16- or 4-byte
//   loads) for groups == C == O with C % 4 == 0;
// - the general kernels for everything else: an implicit GEMM over NHWC patches with __dp4a and a direct
//   depthwise kernel.
// The epilogue is the one of the CPU kernels (int8_common.h, quant_math.h): fma(float(acc), scale, bias),
// activation, then round half away and saturate for int8 output, so CPU and GPU agree bit for bit.
// Scales and biases are read on the device: nothing here synchronises with the host.
//
// Weights: the kernels read conv weights as [O][kh][kw][C/g] (channels-last) and depthwise weights as
// [kh][kw][C]: from the pack of pack_conv2d_int8_weight (made once per layer by Int8Conv2d, again after
// .to(device)) given to conv2d_int8_packed, or in place from a weight stored in that memory layout
// (channels-last; [kh][kw][C] strides), or else permuted on every call.
//
// Test and tuning hooks (read at every call):
//   QKERNELS_CUDA_INT8_KERNEL  auto (default) | mma128x128 | mma64x64 | mma16x128 | mma64x64_twin | general
//     forces a GEMM tile (where the tensor-core path applies), the 64x64 kernel built with the portable
//     twins of mma/ldmatrix/cp.async (mma/arch.h; a GPU test compares it with the PTX one), or the
//     general kernels for every conv (depthwise included);
//   QKERNELS_CUDA_INT8_SPLIT_K  auto (default) | N: CTAs along K per output tile (capped at the k-tiles).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "int8_common.h"
#include "mma/igemm.h"
#include "quant_math.h"

namespace qkernels {
namespace {

// Everything a kernel needs about one conv (a linear layer is a 1x1 conv on a 1x1 map).
struct ConvParams {
  const int8_t* x;  // NHWC
  const int8_t* w;  // GEMM kernel: [O][kh][kw][C/g]; depthwise kernel: [C][kh*kw]
  const float* scale;
  const float* bias;  // nullptr when absent
  void* out;          // NHWC [N*OH*OW][O]
  int64_t N, C, H, W, O, kh, kw, sh, sw, ph, pw, dh, dw, groups, OH, OW;
  int act, out_kind;
  bool per_channel_scale;
};

__device__ __forceinline__ void store_output(const ConvParams& p, int64_t pixel, int64_t oc, int32_t acc) {
  const int64_t idx = pixel * p.O + oc;
  if (p.out_kind == kOutInt32) {
    static_cast<int32_t*>(p.out)[idx] = acc;
    return;
  }
  const float s = p.scale[p.per_channel_scale ? oc : 0];
  const float b = p.bias != nullptr ? p.bias[oc] : 0.f;
  const float v = int8_epilogue_value(acc, s, b, p.act);
  if (p.out_kind == kOutInt8)
    static_cast<int8_t*>(p.out)[idx] = saturate_int8(v);
  else
    static_cast<float*>(p.out)[idx] = v;
}

// --- implicit GEMM, general: a 64-pixel x 64-channel output tile per block, dp4a, K in slices of 32 --

constexpr int kTileM = 64, kTileN = 64, kTileK = 32, kGemmThreads = 256;

// The int8 patch value of output pixel m at patch index k (order kh, kw, c), 0 in the padding.
__device__ __forceinline__ int8_t patch_value(const ConvParams& p, int64_t m, int64_t k, int64_t g, int64_t Cg) {
  const int64_t ow = m % p.OW, t = m / p.OW, oh = t % p.OH, n = t / p.OH;
  const int64_t tap = k / Cg, c = k % Cg, ki = tap / p.kw, kj = tap % p.kw;
  const int64_t ih = oh * p.sh - p.ph + ki * p.dh, iw = ow * p.sw - p.pw + kj * p.dw;
  if (ih < 0 || ih >= p.H || iw < 0 || iw >= p.W) return 0;
  return p.x[((n * p.H + ih) * p.W + iw) * p.C + g * Cg + c];
}

// Four int8 values as one int32 word for __dp4a (byte 0 = lowest k).
__device__ __forceinline__ int pack4(int8_t a, int8_t b, int8_t c, int8_t d) {
  return (int)((uint32_t)(uint8_t)a | ((uint32_t)(uint8_t)b << 8) | ((uint32_t)(uint8_t)c << 16) |
               ((uint32_t)(uint8_t)d << 24));
}

__global__ void __launch_bounds__(kGemmThreads) conv_gemm_kernel(ConvParams p) {
  __shared__ int As[kTileK / 4][kTileM];  // [k/4][pixel]: 4 consecutive k of one pixel per word
  __shared__ int Bs[kTileK / 4][kTileN];  // [k/4][output channel]
  const int64_t g = blockIdx.z;
  const int64_t Cg = p.C / p.groups, Og = p.O / p.groups, K = p.kh * p.kw * Cg;
  const int64_t M = p.N * p.OH * p.OW;
  const int64_t m0 = (int64_t)blockIdx.x * kTileM, n0 = (int64_t)blockIdx.y * kTileN;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  // loaders: thread tid fills row tid/4 of the tile, k in [8*(tid%4), 8*(tid%4)+8)
  const int lrow = tid / 4, lk = (tid % 4) * 8;
  int acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    {
      const int64_t m = m0 + lrow;
      int8_t v[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int64_t k = k0 + lk + i;
        v[i] = (m < M && k < K) ? patch_value(p, m, k, g, Cg) : (int8_t)0;
      }
      As[lk / 4][lrow] = pack4(v[0], v[1], v[2], v[3]);
      As[lk / 4 + 1][lrow] = pack4(v[4], v[5], v[6], v[7]);
      const int64_t n = n0 + lrow;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int64_t k = k0 + lk + i;
        v[i] = (n < Og && k < K) ? p.w[(g * Og + n) * K + k] : (int8_t)0;
      }
      Bs[lk / 4][lrow] = pack4(v[0], v[1], v[2], v[3]);
      Bs[lk / 4 + 1][lrow] = pack4(v[4], v[5], v[6], v[7]);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK / 4; ++kk) {
      int a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = As[kk][ty * 4 + i];
        b[i] = Bs[kk][tx * 4 + i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = __dp4a(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty * 4 + i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx * 4 + j;
      if (n < Og) store_output(p, m, g * Og + n, acc[i][j]);
    }
  }
}

// --- depthwise, general (groups == C == O): one thread per output element, NHWC so channels coalesce -

constexpr int kDwThreads = 256;

__global__ void __launch_bounds__(kDwThreads) depthwise_kernel(ConvParams p) {
  const int64_t total = p.N * p.OH * p.OW * p.C;
  for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = idx % p.C, pixel = idx / p.C;
    const int64_t ow = pixel % p.OW, t = pixel / p.OW, oh = t % p.OH, n = t / p.OH;
    int acc = 0;
    for (int64_t i = 0; i < p.kh; ++i) {
      const int64_t ih = oh * p.sh - p.ph + i * p.dh;
      if (ih < 0 || ih >= p.H) continue;
      for (int64_t j = 0; j < p.kw; ++j) {
        const int64_t iw = ow * p.sw - p.pw + j * p.dw;
        if (iw < 0 || iw >= p.W) continue;
        acc += (int)p.x[((n * p.H + ih) * p.W + iw) * p.C + c] * (int)p.w[c * p.kh * p.kw + i * p.kw + j];
      }
    }
    store_output(p, pixel, c, acc);
  }
}


// --- depthwise, tiled (groups == C == O, C % 4 == 0) ---------------------------------------------------
// A CTA computes an output tile of tile_oh x tile_ow pixels of one image for block_c channels. It first
// copies the input tile it reads (halo included, zeros in the padding) and the block's weights
// ([kh][kw][block_c]) into shared memory with kLoadBytes-wide loads, then each thread computes 4 adjacent
// channels of a share of the tile's pixels from shared memory and stores them as one 4- or 16-byte vector.

struct DepthwiseTileParams {
  const int8_t* x;  // NHWC
  const int8_t* w;  // [kh][kw][C]
  const float* scale;
  const float* bias;
  void* out;  // NHWC
  int N, C, H, W, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw;
  int act, out_kind, per_channel_scale;
  int tile_oh, tile_ow, in_h, in_w, tiles_h, tiles_w, block_c;
};

constexpr int kDwTileThreads = 256;

QK_HD int dw_input_extent(int tile, int stride, int k, int dilation) { return (tile - 1) * stride + (k - 1) * dilation + 1; }
QK_HD int dw_weights_offset(int in_h, int in_w, int block_c) { return (in_h * in_w * block_c + 15) / 16 * 16; }

template <int kLoadBytes>
__global__ void __launch_bounds__(kDwTileThreads) depthwise_tile_kernel(DepthwiseTileParams p) {
  using Vec = std::conditional_t<kLoadBytes == 16, int4, int>;
  extern __shared__ __align__(16) unsigned char dw_smem[];
  int8_t* xs = reinterpret_cast<int8_t*>(dw_smem);  // [in_h][in_w][block_c]
  int8_t* ws = xs + dw_weights_offset(p.in_h, p.in_w, p.block_c);  // [kh * kw][block_c]
  const int tile = (int)blockIdx.x, tid = (int)threadIdx.x;
  const int n = tile / (p.tiles_h * p.tiles_w), th = (tile / p.tiles_w) % p.tiles_h, tw = tile % p.tiles_w;
  const int c0 = (int)blockIdx.y * p.block_c, oh0 = th * p.tile_oh, ow0 = tw * p.tile_ow;
  const int ih0 = oh0 * p.sh - p.ph, iw0 = ow0 * p.sw - p.pw;
  const int vecs = p.block_c / kLoadBytes;
  for (int idx = tid; idx < p.in_h * p.in_w * vecs; idx += kDwTileThreads) {
    const int px = idx / vecs, v = idx % vecs, ih = ih0 + px / p.in_w, iw = iw0 + px % p.in_w;
    const int c = c0 + v * kLoadBytes;
    Vec val{};
    if ((unsigned)ih < (unsigned)p.H && (unsigned)iw < (unsigned)p.W && c < p.C)
      val = *reinterpret_cast<const Vec*>(p.x + ((int64_t)(n * p.H + ih) * p.W + iw) * p.C + c);
    *reinterpret_cast<Vec*>(xs + px * p.block_c + v * kLoadBytes) = val;
  }
  const int taps = p.kh * p.kw, words = p.block_c / 4;
  for (int idx = tid; idx < taps * words; idx += kDwTileThreads) {
    const int tap = idx / words, c = c0 + 4 * (idx % words);
    *reinterpret_cast<int*>(ws + tap * p.block_c + 4 * (idx % words)) =
        c < p.C ? *reinterpret_cast<const int*>(p.w + (int64_t)tap * p.C + c) : 0;
  }
  __syncthreads();
  const int group = tid % words, slot = tid / words, slots = kDwTileThreads / words;
  const int c = c0 + 4 * group;
  if (slot >= slots || c >= p.C) return;  // no barrier follows
  float scale[4], bias[4];
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    scale[b] = p.scale[p.per_channel_scale ? c + b : 0];
    bias[b] = p.bias != nullptr ? p.bias[c + b] : 0.f;
  }
  for (int o = slot; o < p.tile_oh * p.tile_ow; o += slots) {
    const int oy = o / p.tile_ow, ox = o % p.tile_ow, oh = oh0 + oy, ow = ow0 + ox;
    if (oh >= p.OH || ow >= p.OW) continue;
    int acc[4] = {0, 0, 0, 0};
    for (int i = 0; i < p.kh; ++i) {
      const int8_t* xrow = xs + ((oy * p.sh + i * p.dh) * p.in_w + ox * p.sw) * p.block_c + 4 * group;
      const int8_t* wrow = ws + i * p.kw * p.block_c + 4 * group;
      for (int j = 0; j < p.kw; ++j) {
        const int xv = *reinterpret_cast<const int*>(xrow + j * p.dw * p.block_c);
        const int wv = *reinterpret_cast<const int*>(wrow + j * p.block_c);
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[b] += (int)(int8_t)(xv >> (8 * b)) * (int)(int8_t)(wv >> (8 * b));
      }
    }
    const int64_t idx = ((int64_t)(n * p.OH + oh) * p.OW + ow) * p.C + c;
    if (p.out_kind == kOutInt32) {
      *reinterpret_cast<int4*>(static_cast<int32_t*>(p.out) + idx) = make_int4(acc[0], acc[1], acc[2], acc[3]);
      continue;
    }
    float v[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) v[b] = int8_epilogue_value(acc[b], scale[b], bias[b], p.act);
    if (p.out_kind == kOutInt8)
      *reinterpret_cast<char4*>(static_cast<int8_t*>(p.out) + idx) =
          make_char4((signed char)saturate_int8(v[0]), (signed char)saturate_int8(v[1]),
                     (signed char)saturate_int8(v[2]), (signed char)saturate_int8(v[3]));
    else
      *reinterpret_cast<float4*>(static_cast<float*>(p.out) + idx) = make_float4(v[0], v[1], v[2], v[3]);
  }
}

// --- host side ---------------------------------------------------------------------------------------

at::ScalarType out_scalar_type(int out_kind) {
  return out_kind == kOutFloat ? at::kFloat : (out_kind == kOutInt32 ? at::kInt : at::kChar);
}

enum class KernelChoice { kAuto, kMma128x128, kMma64x64, kMma16x128, kMma64x64Twin, kGeneral };

KernelChoice requested_kernel() {
  const char* env = std::getenv("QKERNELS_CUDA_INT8_KERNEL");
  const std::string v = env != nullptr ? env : "";
  if (v.empty() || v == "auto") return KernelChoice::kAuto;
  if (v == "mma128x128") return KernelChoice::kMma128x128;
  if (v == "mma64x64") return KernelChoice::kMma64x64;
  if (v == "mma16x128") return KernelChoice::kMma16x128;
  if (v == "mma64x64_twin") return KernelChoice::kMma64x64Twin;
  if (v == "general") return KernelChoice::kGeneral;
  TORCH_CHECK(false, "qkernels: QKERNELS_CUDA_INT8_KERNEL must be auto, mma128x128, mma64x64, mma16x128, "
              "mma64x64_twin or general, got '", v, "'");
}

int requested_split_k() {  // 0: choose
  const char* env = std::getenv("QKERNELS_CUDA_INT8_SPLIT_K");
  const std::string v = env != nullptr ? env : "";
  if (v.empty() || v == "auto") return 0;
  char* end = nullptr;
  const long n = std::strtol(v.c_str(), &end, 10);
  TORCH_CHECK(end != nullptr && *end == '\0' && n >= 1 && n <= 65535,
              "qkernels: QKERNELS_CUDA_INT8_SPLIT_K must be auto or a number of splits in 1..65535, got '", v, "'");
  return (int)n;
}

constexpr int kMaxDevices = 64;

int device_index() {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  TORCH_CHECK(dev >= 0 && dev < kMaxDevices, "qkernels: CUDA device index ", dev, " is out of range");
  return dev;
}

int sm_count(int dev) {
  static std::atomic<int> cached[kMaxDevices];
  int n = cached[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    cached[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

constexpr int64_t kInt32Limit = int64_t(1) << 31;

// Split-K: enough CTAs to give every SM one when the output tiles alone do not, at least 2 k-tiles each.
int choose_splits(int64_t tiles, int k_tiles, int sms, int requested) {
  if (requested > 0) return std::max(1, std::min(requested, k_tiles));
  if (tiles >= sms) return 1;
  const int64_t want = (sms + tiles - 1) / tiles;
  return (int)std::max<int64_t>(1, std::min<int64_t>({want, k_tiles / 2, 32}));
}

template <class Cfg, class Arch>
__global__ void __launch_bounds__(Cfg::kThreads) igemm_s8_kernel(mma::IgemmParams p) {
  extern __shared__ __align__(16) unsigned char igemm_smem[];
  mma::igemm_s8_cta<Cfg, Arch>(p, igemm_smem);
}

template <class Cfg, class Arch>
void launch_igemm(mma::IgemmParams& p, const at::Tensor& out, int requested_splits, cudaStream_t stream) {
  const int dev = device_index();
  const int64_t tiles_m = (p.g.M + Cfg::kBM - 1) / Cfg::kBM, tiles_n = (p.g.O + Cfg::kBN - 1) / Cfg::kBN;
  p.k_tiles = (p.g.K + Cfg::kBK - 1) / Cfg::kBK;
  p.splits = choose_splits(tiles_m * tiles_n, p.k_tiles, sm_count(dev), requested_splits);
  at::Tensor workspace;
  p.workspace = nullptr, p.tile_counters = nullptr;
  if (p.splits > 1) {
    if (p.out_kind == kOutInt32) {
      C10_CUDA_CHECK(cudaMemsetAsync(p.out, 0, out.numel() * sizeof(int32_t), stream));  // the CTAs add into it
    } else {
      workspace = at::zeros({(int64_t)p.g.M * p.g.O + tiles_m * tiles_n}, out.options().dtype(at::kInt));
      p.workspace = workspace.data_ptr<int32_t>();
      p.tile_counters = p.workspace + (int64_t)p.g.M * p.g.O;
    }
  }
  constexpr int smem = mma::smem_bytes<Cfg>();
  if (smem > 48 * 1024) {  // above the default limit: allowed once per device and kernel
    static std::atomic<bool> allowed[kMaxDevices];
    if (!allowed[dev].load(std::memory_order_acquire)) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(igemm_s8_kernel<Cfg, Arch>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      allowed[dev].store(true, std::memory_order_release);
    }
  }
  const dim3 grid((unsigned)tiles_m, (unsigned)tiles_n, (unsigned)p.splits);
  igemm_s8_kernel<Cfg, Arch><<<grid, Cfg::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

using Tile128x128 = mma::TileConfig<128, 128, 2, 4, 4>;
using Tile64x64 = mma::TileConfig<64, 64, 2, 2, 4>;
using Tile16x128 = mma::TileConfig<16, 128, 1, 4, 4>;

// The tensor-core path: returns false (nothing launched) when it does not apply.
bool launch_tensor_core_gemm(const Int8ConvShape& s, const at::Tensor& xc, const at::Tensor& wc, const at::Tensor& out,
                             const float* scale, const float* bias, KernelChoice choice) {
  const int64_t M = s.N * s.OH * s.OW, K = s.kh * s.kw * s.C;
  if (choice == KernelChoice::kGeneral || s.groups != 1 || s.C % 16 != 0 || s.C == 0 || !aligned16(xc.data_ptr()) ||
      !aligned16(wc.data_ptr()) || xc.numel() >= kInt32Limit || wc.numel() >= kInt32Limit ||
      M * s.O >= kInt32Limit || K >= kInt32Limit || s.O > 65535 * 64)  // grid.y: O tiles of 64 or more
    return false;
  mma::IgemmParams p;
  p.x = xc.data_ptr<int8_t>();
  p.w = wc.data_ptr<int8_t>();
  p.g = mma::ConvGeometry{(int)s.N, (int)s.H, (int)s.W, (int)s.C, (int)s.OH, (int)s.OW, (int)s.O,
                          (int)s.kh, (int)s.kw, (int)s.sh, (int)s.sw, (int)s.ph, (int)s.pw, (int)s.dh, (int)s.dw,
                          (int)M, (int)K};
  p.scale = scale;
  p.bias = bias;
  p.out = out.data_ptr();
  p.act = s.act, p.out_kind = s.out_kind, p.per_channel_scale = s.per_channel_scale;
  const int splits = requested_split_k();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (choice == KernelChoice::kAuto) {
    const int64_t big_tiles = ((M + 127) / 128) * ((s.O + 127) / 128);
    choice = M <= 16 ? KernelChoice::kMma16x128
                     : (s.O > 64 && big_tiles >= sm_count(device_index()) ? KernelChoice::kMma128x128
                                                                          : KernelChoice::kMma64x64);
  }
  switch (choice) {
    case KernelChoice::kMma128x128: launch_igemm<Tile128x128, mma::Hw>(p, out, splits, stream); break;
    case KernelChoice::kMma16x128: launch_igemm<Tile16x128, mma::Hw>(p, out, splits, stream); break;
    case KernelChoice::kMma64x64Twin: launch_igemm<Tile64x64, mma::Twin>(p, out, splits, stream); break;
    default: launch_igemm<Tile64x64, mma::Hw>(p, out, splits, stream); break;
  }
  return true;
}

// The tiled depthwise kernel: returns false when it does not apply (C % 4 != 0, misaligned or too large
// tensors, a kernel whose input tile does not fit in shared memory).
bool launch_depthwise_tiled(const Int8ConvShape& s, const at::Tensor& xc, const at::Tensor& wt, const at::Tensor& out,
                            const float* scale, const float* bias) {
  const bool vec16 = s.C % 16 == 0 && aligned16(xc.data_ptr());
  if (s.C % 4 != 0 || reinterpret_cast<uintptr_t>(xc.data_ptr()) % 4 != 0 ||
      reinterpret_cast<uintptr_t>(wt.data_ptr()) % 4 != 0 || xc.numel() >= kInt32Limit || out.numel() >= kInt32Limit)
    return false;
  DepthwiseTileParams p;
  p.x = xc.data_ptr<int8_t>();
  p.w = wt.data_ptr<int8_t>();
  p.scale = scale, p.bias = bias, p.out = out.data_ptr();
  p.N = (int)s.N, p.C = (int)s.C, p.H = (int)s.H, p.W = (int)s.W, p.OH = (int)s.OH, p.OW = (int)s.OW;
  p.kh = (int)s.kh, p.kw = (int)s.kw, p.sh = (int)s.sh, p.sw = (int)s.sw, p.ph = (int)s.ph, p.pw = (int)s.pw;
  p.dh = (int)s.dh, p.dw = (int)s.dw;
  p.act = s.act, p.out_kind = s.out_kind, p.per_channel_scale = s.per_channel_scale;
  p.block_c = (int)std::min<int64_t>(s.C, 64);
  // an output tile of up to 8 x 16 pixels, halved until its input tile fits in 40 KiB
  p.tile_oh = (int)std::min<int64_t>(s.OH, 8), p.tile_ow = (int)std::min<int64_t>(s.OW, 16);
  auto smem = [&]() {
    p.in_h = dw_input_extent(p.tile_oh, p.sh, p.kh, p.dh), p.in_w = dw_input_extent(p.tile_ow, p.sw, p.kw, p.dw);
    return (int64_t)dw_weights_offset(p.in_h, p.in_w, p.block_c) + (int64_t)p.kh * p.kw * p.block_c;
  };
  while (smem() > 40 * 1024 && (p.tile_oh > 1 || p.tile_ow > 1)) {
    if (p.tile_ow >= p.tile_oh) p.tile_ow = (p.tile_ow + 1) / 2;
    else p.tile_oh = (p.tile_oh + 1) / 2;
  }
  const int64_t bytes = smem();
  if (bytes > 40 * 1024) return false;
  p.tiles_h = (int)((s.OH + p.tile_oh - 1) / p.tile_oh), p.tiles_w = (int)((s.OW + p.tile_ow - 1) / p.tile_ow);
  const int64_t tiles = s.N * p.tiles_h * p.tiles_w, cblocks = (s.C + p.block_c - 1) / p.block_c;
  if (tiles >= kInt32Limit || cblocks > 65535) return false;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid((unsigned)tiles, (unsigned)cblocks);
  if (vec16)
    depthwise_tile_kernel<16><<<grid, kDwTileThreads, (size_t)bytes, stream>>>(p);
  else
    depthwise_tile_kernel<4><<<grid, kDwTileThreads, (size_t)bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

void launch_general(ConvParams& p, bool depthwise) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (depthwise) {
    const int64_t total = p.N * p.OH * p.OW * p.C;
    const int64_t blocks = std::min<int64_t>((total + kDwThreads - 1) / kDwThreads, 65535 * 8);
    depthwise_kernel<<<(unsigned)blocks, kDwThreads, 0, stream>>>(p);
  } else {
    const int64_t M = p.N * p.OH * p.OW, Og = p.O / p.groups;
    TORCH_CHECK((Og + kTileN - 1) / kTileN <= 65535 && p.groups <= 65535,
                "qkernels: conv2d_int8 on CUDA supports at most 65535*64 output channels per group and 65535 groups");
    dim3 grid((unsigned)((M + kTileM - 1) / kTileM), (unsigned)((Og + kTileN - 1) / kTileN), (unsigned)p.groups);
    conv_gemm_kernel<<<grid, kGemmThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

ConvParams general_params(const Int8ConvShape& s, const at::Tensor& xc, const at::Tensor& wc, const at::Tensor& out,
                          const float* scale, const float* bias) {
  ConvParams p;
  p.x = xc.data_ptr<int8_t>();
  p.w = wc.data_ptr<int8_t>();
  p.N = s.N, p.C = s.C, p.H = s.H, p.W = s.W, p.O = s.O, p.kh = s.kh, p.kw = s.kw;
  p.sh = s.sh, p.sw = s.sw, p.ph = s.ph, p.pw = s.pw, p.dh = s.dh, p.dw = s.dw, p.groups = s.groups;
  p.OH = s.OH, p.OW = s.OW;
  p.scale = scale, p.bias = bias, p.per_channel_scale = s.per_channel_scale;
  p.out = out.data_ptr();
  p.act = s.act, p.out_kind = s.out_kind;
  return p;
}

// Packed weights (pack_conv2d_int8_weight): the weight copied once into the layout the kernels read,
// [O][kh][kw][C/g] for the GEMMs and [kh][kw][C] for depthwise convs, as a 1-D int8 tensor. Its size says
// which: a depthwise pack holds 16 bytes of padding first (its data stays 16-byte aligned), so a pack made
// for the other kind, another shape or another device never fits and is ignored (the weight is then laid
// out per call, as without a pack).
constexpr int64_t kDepthwisePackPadding = 16;

bool is_depthwise_weight(const at::Tensor& weight, int64_t groups) {
  return weight.size(1) == 1 && weight.size(0) == groups;
}

int64_t packed_numel(const at::Tensor& weight, int64_t groups) {
  return weight.numel() + (is_depthwise_weight(weight, groups) ? kDepthwisePackPadding : 0);
}

at::Tensor pack_conv2d_int8_weight_cuda(const at::Tensor& weight, int64_t groups) {
  TORCH_CHECK(weight.scalar_type() == at::kChar, "qkernels: pack_conv2d_int8_weight: weight must be int8, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() == 4, "qkernels: pack_conv2d_int8_weight: weight must be 4-D [O, C/groups, kh, kw], got shape ",
              weight.sizes());
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0, "qkernels: pack_conv2d_int8_weight: groups (", groups,
              ") must divide the output channels (", weight.size(0), ")");
  c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor packed = at::empty({packed_numel(weight, groups)}, weight.options());
  const int64_t O = weight.size(0), Cg = weight.size(1), kh = weight.size(2), kw = weight.size(3);
  if (is_depthwise_weight(weight, groups))
    packed.narrow(0, kDepthwisePackPadding, weight.numel()).view({kh, kw, O}).copy_(weight.select(1, 0).permute({1, 2, 0}));
  else
    packed.view({O, kh, kw, Cg}).copy_(weight.permute({0, 2, 3, 1}));
  return packed;
}

// `packed`: a pack of this weight (see above), or undefined.
at::Tensor conv2d_int8_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups, const at::Tensor& scale, at::ScalarType out_dtype,
                            c10::string_view activation) {
  const Int8ConvShape s =
      check_conv2d_int8(x, weight, bias, stride, padding, dilation, groups, scale, out_dtype, activation);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({s.N, s.O, s.OH, s.OW},
                             x.options().dtype(out_scalar_type(s.out_kind)).memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const KernelChoice choice = requested_kernel();
  const bool depthwise = s.groups == s.C && s.groups == s.O;
  const bool use_pack = packed.defined() && packed.device() == weight.device() && packed.scalar_type() == at::kChar &&
                        packed.dim() == 1 && packed.is_contiguous() && packed.numel() == packed_numel(weight, groups);
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor scale_c = scale.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const float* sp = scale_c.data_ptr<float>();
  const float* bp = bias.has_value() ? bias_c.data_ptr<float>() : nullptr;
  if (depthwise && choice != KernelChoice::kGeneral) {
    // [kh][kw][C]: the pack, or the weight itself when it is stored that way, else a copy
    const at::Tensor wt = use_pack ? packed.narrow(0, kDepthwisePackPadding, weight.numel())
                                   : weight.permute({2, 3, 1, 0}).contiguous();
    if (launch_depthwise_tiled(s, xc, wt, out, sp, bp)) return out;
  }
  // [O][kh][kw][C/g]: the pack, or the weight itself when it is channels-last, else a copy. The general
  // depthwise kernel reads [C][kh*kw], the weight's own layout (C/g = 1).
  const at::Tensor wc = depthwise ? weight.contiguous()
                                  : (use_pack ? packed : weight.contiguous(at::MemoryFormat::ChannelsLast));
  if (!depthwise && launch_tensor_core_gemm(s, xc, wc, out, sp, bp, choice)) return out;
  ConvParams p = general_params(s, xc, wc, out, sp, bp);
  launch_general(p, depthwise);
  return out;
}

at::Tensor conv2d_int8_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            const at::Tensor& scale, at::ScalarType out_dtype, c10::string_view activation) {
  return conv2d_int8_impl(x, weight, at::Tensor(), bias, stride, padding, dilation, groups, scale, out_dtype, activation);
}

at::Tensor conv2d_int8_packed_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed,
                                   const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                   const at::Tensor& scale, at::ScalarType out_dtype, c10::string_view activation) {
  return conv2d_int8_impl(x, weight, packed, bias, stride, padding, dilation, groups, scale, out_dtype, activation);
}

at::Tensor linear_int8_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& scale, at::ScalarType out_dtype, c10::string_view activation) {
  const Int8LinearShape ls = check_linear_int8(x, weight, bias, scale, out_dtype, activation);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(linear_int8_out_sizes(x, ls.O), x.options().dtype(out_scalar_type(ls.out_kind)));
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous(), scale_c = scale.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const float* sp = scale_c.data_ptr<float>();
  const float* bp = bias.has_value() ? bias_c.data_ptr<float>() : nullptr;
  // [M, K] x [O, K]^T as a 1x1 conv over M pixels of a 1x1 map
  Int8ConvShape s;
  s.N = ls.M, s.C = ls.K, s.H = 1, s.W = 1, s.O = ls.O, s.kh = 1, s.kw = 1;
  s.sh = 1, s.sw = 1, s.ph = 0, s.pw = 0, s.dh = 1, s.dw = 1, s.groups = 1, s.OH = 1, s.OW = 1;
  s.act = ls.act, s.out_kind = ls.out_kind, s.per_channel_scale = ls.per_channel_scale, s.has_bias = ls.has_bias;
  if (launch_tensor_core_gemm(s, xc, wc, out, sp, bp, requested_kernel())) return out;
  ConvParams p = general_params(s, xc, wc, out, sp, bp);
  launch_general(p, false);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qkernels, CUDA, m) {
  m.impl("conv2d_int8", &conv2d_int8_cuda);
  m.impl("linear_int8", &linear_int8_cuda);
  m.impl("conv2d_int8_packed", &conv2d_int8_packed_cuda);
  m.impl("pack_conv2d_int8_weight", &pack_conv2d_int8_weight_cuda);
}

}  // namespace qkernels
