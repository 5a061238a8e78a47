// CUDA kernels of the fake-quantize family and the quantizer state updates. Same math as the CPU
// kernels (quant_math.h). Scales stay on the device: a reduction writes them and the quantize pass
// reads them, so no op here synchronises with the host.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "quant_math.h"

namespace qkernels {
namespace {

constexpr int kThreads = 256;

int max_blocks() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms * 8;
}

int grid_for(int64_t n) {
  int64_t blocks = (n + kThreads - 1) / kThreads;
  return (int)std::max<int64_t>(1, std::min<int64_t>(blocks, max_blocks()));
}

__device__ __forceinline__ unsigned float_bits(float f) { return __float_as_uint(f); }

// Block-wide max of non-negative float bit patterns, then one atomicMax per block.
__device__ __forceinline__ void block_max_to(unsigned local, unsigned* out) {
  __shared__ unsigned warp_max[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) local = max(local, __shfl_down_sync(0xffffffffu, local, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_max[warp] = local;
  __syncthreads();
  if (warp == 0) {
    local = lane < (int)(blockDim.x / 32) ? warp_max[lane] : 0u;
    for (int off = 16; off > 0; off >>= 1) local = max(local, __shfl_down_sync(0xffffffffu, local, off));
    if (lane == 0) atomicMax(out, local);
  }
}

template <typename T>
__global__ void abs_max_kernel(const T* __restrict__ x, int64_t n, unsigned* __restrict__ out_bits) {
  unsigned local = 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    local = max(local, float_bits(finite_abs(static_cast<float>(x[i]))));
  block_max_to(local, out_bits);
}

// Blocks stride over the rows of `inner` elements of x viewed as [outer, channels, inner], so any number
// of rows fits in the grid.
template <typename T>
__global__ void channel_abs_max_kernel(const T* __restrict__ x, int64_t rows, int64_t channels, int64_t inner,
                                       unsigned* __restrict__ out_bits) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* src = x + row * inner;
    unsigned local = 0;
    for (int64_t i = threadIdx.x; i < inner; i += blockDim.x)
      local = max(local, float_bits(finite_abs(static_cast<float>(src[i]))));
    block_max_to(local, out_bits + row % channels);
    __syncthreads();  // block_max_to's shared slots are reused by the next row
  }
}

// Quantize pass: scale index = (i / inner) % channels (a single scale when channels == 1).
template <typename T, typename Out, bool kCodes>
__global__ void quantize_kernel(const T* __restrict__ x, Out* __restrict__ out, int64_t n, const float* __restrict__ scales,
                                int64_t channels, int64_t inner, int bin) {
  const QuantParams single = make_params(scales[0], bin);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const QuantParams p = channels == 1 ? single : make_params(scales[(i / inner) % channels], bin);
    const float v = static_cast<float>(x[i]);
    if constexpr (kCodes)
      out[i] = static_cast<Out>(quant_code_int(v, p));
    else
      out[i] = static_cast<Out>(fake_quant(v, p));
  }
}

template <typename T>
__global__ void clip_grad_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ out, int64_t n,
                                 const float* __restrict__ scale) {
  const float s = *scale;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = fabsf(static_cast<float>(x[i])) <= s ? g[i] : static_cast<T>(0.f);
}

__global__ void range_abs_max_update_kernel(const unsigned* __restrict__ cur_bits, float* __restrict__ scale,
                                            float* __restrict__ window, int64_t* __restrict__ step,
                                            int64_t window_size) {
  __shared__ bool rescan;
  __shared__ int64_t valid;
  __shared__ float partial[kThreads];
  if (threadIdx.x == 0) {
    int64_t v = 0;
    rescan = range_abs_max_step(__uint_as_float(*cur_bits), window, step, window_size, scale, &v);
    valid = v;
  }
  __syncthreads();
  if (!rescan) return;
  float m = 0.f;
  for (int64_t i = threadIdx.x; i < valid; i += blockDim.x) m = fmaxf(m, window[i]);
  partial[threadIdx.x] = m;
  __syncthreads();
  for (int off = blockDim.x / 2; off > 0; off >>= 1) {
    if ((int)threadIdx.x < off) partial[threadIdx.x] = fmaxf(partial[threadIdx.x], partial[threadIdx.x + off]);
    __syncthreads();
  }
  if (threadIdx.x == 0) *scale = partial[0];
}

__global__ void moving_average_update_kernel(const unsigned* __restrict__ cur_bits, float rate, float* __restrict__ scale,
                                             float* __restrict__ accum, float* __restrict__ state) {
  moving_average_step(__uint_as_float(*cur_bits), rate, accum, state, scale);
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// Writes max|x| (finite values) into the float32 element at `out`.
void launch_abs_max(const at::Tensor& xc, float* out) {
  C10_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(float), stream()));
  const int64_t n = xc.numel();
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "qkernels_abs_max", [&] {
    abs_max_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream()>>>(xc.data_ptr<scalar_t>(), n,
                                                                      reinterpret_cast<unsigned*>(out));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_quantize(const at::Tensor& xc, at::Tensor& out, const float* scales, int64_t channels, int64_t inner,
                     int64_t bits, bool codes) {
  const int64_t n = xc.numel();
  if (n == 0) return;
  const int bin = bin_count(bits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "qkernels_quantize", [&] {
    const scalar_t* x = xc.data_ptr<scalar_t>();
    if (!codes)
      quantize_kernel<scalar_t, scalar_t, false><<<grid_for(n), kThreads, 0, stream()>>>(
          x, out.data_ptr<scalar_t>(), n, scales, channels, inner, bin);
    else if (out.scalar_type() == at::kChar)
      quantize_kernel<scalar_t, int8_t, true><<<grid_for(n), kThreads, 0, stream()>>>(
          x, out.data_ptr<int8_t>(), n, scales, channels, inner, bin);
    else
      quantize_kernel<scalar_t, int16_t, true><<<grid_for(n), kThreads, 0, stream()>>>(
          x, out.data_ptr<int16_t>(), n, scales, channels, inner, bin);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor new_output(const at::Tensor& xc, int64_t bits, bool codes) {
  return codes ? at::empty(xc.sizes(), xc.options().dtype(code_dtype(bits))) : at::empty_like(xc);
}

at::Tensor abs_max_cuda(const at::Tensor& x) {
  check_float_input(x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xc = x.contiguous();
  at::Tensor scale = at::empty({}, xc.options().dtype(at::kFloat));
  launch_abs_max(xc, scale.data_ptr<float>());
  return scale;
}

std::tuple<at::Tensor, at::Tensor> abs_max_quant(const at::Tensor& x, int64_t bits, bool codes) {
  check_float_input(x, "x");
  check_bits(bits);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xc = x.contiguous();
  at::Tensor scale = at::empty({}, xc.options().dtype(at::kFloat));
  launch_abs_max(xc, scale.data_ptr<float>());
  at::Tensor out = new_output(xc, bits, codes);
  launch_quantize(xc, out, scale.data_ptr<float>(), 1, 1, bits, codes);
  return {out, scale};
}

std::tuple<at::Tensor, at::Tensor> fake_quant_abs_max_cuda(const at::Tensor& x, int64_t bits, bool /*clip_grad*/) {
  return abs_max_quant(x, bits, false);
}

std::tuple<at::Tensor, at::Tensor> quantize_abs_max_cuda(const at::Tensor& x, int64_t bits) {
  return abs_max_quant(x, bits, true);
}

at::Tensor with_scale_quant(const at::Tensor& x, const at::Tensor& scale, int64_t bits, bool codes) {
  check_float_input(x, "x");
  check_bits(bits);
  check_scalar_scale(scale, x, "scale");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xc = x.contiguous();
  at::Tensor sc = scale.contiguous();
  at::Tensor out = new_output(xc, bits, codes);
  launch_quantize(xc, out, sc.data_ptr<float>(), 1, 1, bits, codes);
  return out;
}

at::Tensor fake_quant_with_scale_cuda(const at::Tensor& x, const at::Tensor& scale, int64_t bits, bool /*clip_grad*/) {
  return with_scale_quant(x, scale, bits, false);
}

at::Tensor quantize_with_scale_cuda(const at::Tensor& x, const at::Tensor& scale, int64_t bits) {
  return with_scale_quant(x, scale, bits, true);
}

std::tuple<at::Tensor, at::Tensor> channel_wise_quant(const at::Tensor& x, int64_t bits, int64_t axis, bool codes) {
  check_float_input(x, "x");
  check_bits(bits);
  axis = wrap_axis(axis, x);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xc = x.contiguous();
  const ChannelLayout layout = channel_layout(xc, axis);
  const int64_t outer = layout.outer, channels = layout.channels, inner = layout.inner;
  at::Tensor scales = at::empty({channels}, xc.options().dtype(at::kFloat));
  at::Tensor out = new_output(xc, bits, codes);
  if (channels == 0) return {out, scales};
  C10_CUDA_CHECK(cudaMemsetAsync(scales.data_ptr<float>(), 0, channels * sizeof(float), stream()));
  const int64_t rows = outer * channels;
  if (rows > 0 && inner > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "qkernels_channel_abs_max", [&] {
      const unsigned blocks = (unsigned)std::min<int64_t>(rows, (int64_t)max_blocks() * 8);
      channel_abs_max_kernel<scalar_t><<<blocks, kThreads, 0, stream()>>>(
          xc.data_ptr<scalar_t>(), rows, channels, inner, reinterpret_cast<unsigned*>(scales.data_ptr<float>()));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launch_quantize(xc, out, scales.data_ptr<float>(), channels, inner, bits, codes);
  return {out, scales};
}

std::tuple<at::Tensor, at::Tensor> fake_channel_wise_quant_abs_max_cuda(const at::Tensor& x, int64_t bits, int64_t axis,
                                                                       bool /*clip_grad*/) {
  return channel_wise_quant(x, bits, axis, false);
}

std::tuple<at::Tensor, at::Tensor> quantize_channel_wise_abs_max_cuda(const at::Tensor& x, int64_t bits, int64_t axis) {
  return channel_wise_quant(x, bits, axis, true);
}

at::Tensor fake_quant_clip_grad_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale) {
  check_clip_grad_args(grad, x, scale);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor gc = grad.contiguous(), xc = x.contiguous(), sc = scale.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "qkernels_clip_grad", [&] {
    clip_grad_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream()>>>(gc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
                                                                        out.data_ptr<scalar_t>(), n, sc.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void range_abs_max_update_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& window,
                               const at::Tensor& step, int64_t window_size) {
  check_range_abs_max_state(x, scale, window, step, window_size);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor cur = abs_max_cuda(x);
  range_abs_max_update_kernel<<<1, kThreads, 0, stream()>>>(reinterpret_cast<const unsigned*>(cur.data_ptr<float>()),
                                                             scale.data_ptr<float>(), window.data_ptr<float>(),
                                                             step.data_ptr<int64_t>(), window_size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void moving_average_abs_max_update_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& accum,
                                        const at::Tensor& state, double moving_rate) {
  check_moving_average_state(x, scale, accum, state, moving_rate);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor cur = abs_max_cuda(x);
  moving_average_update_kernel<<<1, 1, 0, stream()>>>(reinterpret_cast<const unsigned*>(cur.data_ptr<float>()),
                                                       (float)moving_rate, scale.data_ptr<float>(),
                                                       accum.data_ptr<float>(), state.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(qkernels, CUDA, m) {
  m.impl("abs_max", &abs_max_cuda);
  m.impl("fake_quant_abs_max", &fake_quant_abs_max_cuda);
  m.impl("quantize_abs_max", &quantize_abs_max_cuda);
  m.impl("fake_quant_with_scale", &fake_quant_with_scale_cuda);
  m.impl("quantize_with_scale", &quantize_with_scale_cuda);
  m.impl("fake_channel_wise_quant_abs_max", &fake_channel_wise_quant_abs_max_cuda);
  m.impl("quantize_channel_wise_abs_max", &quantize_channel_wise_abs_max_cuda);
  m.impl("fake_quant_clip_grad", &fake_quant_clip_grad_cuda);
  m.impl("range_abs_max_update_", &range_abs_max_update_cuda);
  m.impl("moving_average_abs_max_update_", &moving_average_abs_max_update_cuda);
}

}  // namespace qkernels
