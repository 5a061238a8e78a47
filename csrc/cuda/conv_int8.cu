// CUDA kernels of conv2d_int8 and linear_int8. Deliberately simple (they could not be run where they
// were written): an implicit-GEMM kernel over NHWC patches with __dp4a for every conv and for linear
// (a linear layer is a 1x1 conv over [M, 1, 1, K]), and a direct kernel for depthwise convs. The
// epilogue is the one of the CPU kernels (int8_common.h, quant_math.h): fma(float(acc), scale, bias),
// activation, then round half away and saturate for int8 output, so CPU and GPU agree bit for bit.
// Scales and biases are read on the device: nothing here synchronises with the host.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "int8_common.h"
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

// --- implicit GEMM: a 64-pixel x 64-channel output tile per block, K in slices of 32 ---------------

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

// --- depthwise (groups == C == O): one thread per output element, NHWC so channels coalesce ---------

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

// --- host side ---------------------------------------------------------------------------------------

at::ScalarType out_scalar_type(int out_kind) {
  return out_kind == kOutFloat ? at::kFloat : (out_kind == kOutInt32 ? at::kInt : at::kChar);
}

void launch(ConvParams& p, bool depthwise) {
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

void set_epilogue(ConvParams& p, const at::Tensor& scale, const std::optional<at::Tensor>& bias, at::Tensor& out,
                  at::Tensor& scale_c, at::Tensor& bias_c, int act, int out_kind, bool per_channel) {
  scale_c = scale.contiguous();
  p.scale = scale_c.data_ptr<float>();
  p.per_channel_scale = per_channel;
  p.bias = nullptr;
  if (bias.has_value()) {
    bias_c = bias->contiguous();
    p.bias = bias_c.data_ptr<float>();
  }
  p.out = out.data_ptr();
  p.act = act;
  p.out_kind = out_kind;
}

at::Tensor conv2d_int8_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            const at::Tensor& scale, at::ScalarType out_dtype, c10::string_view activation) {
  const Int8ConvShape s =
      check_conv2d_int8(x, weight, bias, stride, padding, dilation, groups, scale, out_dtype, activation);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({s.N, s.O, s.OH, s.OW},
                             x.options().dtype(out_scalar_type(s.out_kind)).memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const bool depthwise = s.groups == s.C && s.groups == s.O;
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  // GEMM rows in patch order [O][kh][kw][C/g]; depthwise reads [C][kh*kw] as stored
  const at::Tensor wc = depthwise ? weight.contiguous() : weight.permute({0, 2, 3, 1}).contiguous();
  at::Tensor scale_c, bias_c;
  ConvParams p;
  p.x = xc.data_ptr<int8_t>();
  p.w = wc.data_ptr<int8_t>();
  p.N = s.N, p.C = s.C, p.H = s.H, p.W = s.W, p.O = s.O, p.kh = s.kh, p.kw = s.kw;
  p.sh = s.sh, p.sw = s.sw, p.ph = s.ph, p.pw = s.pw, p.dh = s.dh, p.dw = s.dw, p.groups = s.groups;
  p.OH = s.OH, p.OW = s.OW;
  set_epilogue(p, scale, bias, out, scale_c, bias_c, s.act, s.out_kind, s.per_channel_scale);
  launch(p, depthwise);
  return out;
}

at::Tensor linear_int8_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& scale, at::ScalarType out_dtype, c10::string_view activation) {
  const Int8LinearShape s = check_linear_int8(x, weight, bias, scale, out_dtype, activation);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(linear_int8_out_sizes(x, s.O), x.options().dtype(out_scalar_type(s.out_kind)));
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor scale_c, bias_c;
  ConvParams p;
  p.x = xc.data_ptr<int8_t>();
  p.w = wc.data_ptr<int8_t>();
  // [M, K] x [O, K]^T as a 1x1 conv over M pixels of a 1x1 map
  p.N = s.M, p.C = s.K, p.H = 1, p.W = 1, p.O = s.O, p.kh = 1, p.kw = 1;
  p.sh = 1, p.sw = 1, p.ph = 0, p.pw = 0, p.dh = 1, p.dw = 1, p.groups = 1, p.OH = 1, p.OW = 1;
  set_epilogue(p, scale, bias, out, scale_c, bias_c, s.act, s.out_kind, s.per_channel_scale);
  launch(p, false);
  return out;
}

// The packed-weight ops (csrc/ops.cpp): these kernels have no packed weight layout yet, so packing gives an
// empty tensor and conv2d_int8_packed is conv2d_int8 (whose result it is by definition).
at::Tensor conv2d_int8_packed_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& /*packed*/,
                                   const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                   const at::Tensor& scale, at::ScalarType out_dtype, c10::string_view activation) {
  return conv2d_int8_cuda(x, weight, bias, stride, padding, dilation, groups, scale, out_dtype, activation);
}

at::Tensor pack_conv2d_int8_weight_cuda(const at::Tensor& weight, int64_t /*groups*/) {
  return at::empty({0}, weight.options().dtype(at::kChar));
}

}  // namespace

TORCH_LIBRARY_IMPL(qkernels, CUDA, m) {
  m.impl("conv2d_int8", &conv2d_int8_cuda);
  m.impl("linear_int8", &linear_int8_cuda);
  m.impl("conv2d_int8_packed", &conv2d_int8_packed_cuda);
  m.impl("pack_conv2d_int8_weight", &pack_conv2d_int8_weight_cuda);
}

}  // namespace qkernels
