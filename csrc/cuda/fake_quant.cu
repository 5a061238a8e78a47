// CUDA kernels of the fake-quantize family and the quantizer state updates. Same math as the CPU
// kernels (quant_math.h), so both backends agree bit for bit. Scales stay on the device: a reduction
// writes them and the quantize pass reads them, so no op here synchronises with the host.
//
// Every pass is memory-bound, so the kernels are built around moving bytes:
// - 16-byte slots (vector_io.cuh), several in flight per thread, over x's memory in storage order: a
//   dense input of any strides (channels_last activations, transposed weights) is read where it lies,
//   and the output takes its strides; only a non-dense view is copied first.
// - Per-tensor ops: one launch up to kSmall elements (a single block reduces, then quantizes), two
//   above (per-block partial maxima, then a quantize pass whose every block finishes the partials):
//   the fewest a global reduction followed by a pass that depends on it allows.
// - Channel-wise ops: x's memory as a matrix of rows x columns with one channel per row (long rows,
//   e.g. conv and linear weights along axis 0) or per column (short rows, e.g. channels_last or the
//   last axis); a 2-D grid of column chunks x rows, parameters computed once per row (or per column),
//   and one atomic per block and row (or column) for the scales.
// - The clip-STE mask (1 bit per element, in x's memory order) is packed in the quantize pass, one
//   32-bit word per 32 elements, assembled across lanes with shuffles.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <type_traits>

#include "block_reduce.cuh"
#include "checks.h"
#include "quant_math.h"
#include "vector_io.cuh"

namespace qkernels {
namespace {

using cuda_io::Dt;
using cuda_io::Slot;
using cuda_io::Storage;
using cuda_io::slot_width;
using cuda_io::to_float;
using cuda_reduce::block_max;

constexpr int kThreads = 256;         // threads of a grid block
constexpr int kMaxBlockThreads = 1024;
constexpr int kUnroll = 4;            // 16-byte slots in flight per thread
constexpr int64_t kSmall = 1 << 15;   // elements up to which one block does a whole op in one launch
constexpr int kBlocksPerSm = 4;       // grid-stride grids: 4 x 256 threads per SM, 64 KB of loads in flight
constexpr int64_t kRowMin = 128;      // channel-wise: rows at least this long take one channel per row

// --- device properties, cached per device index (the driver is asked once per device) --------------

int sm_count() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static std::array<std::atomic<int>, 64> cache{};
  const bool cached = device >= 0 && device < (int)cache.size();
  if (cached) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (cached) cache[device].store(sms, std::memory_order_relaxed);
  return sms;
}

int max_grid_blocks() { return sm_count() * kBlocksPerSm; }

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t pow2_at_least(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Blocks of a grid-stride pass over `slots` 16-byte slots: enough for one wave, no more than needed.
int grid_blocks(int64_t slots) {
  return (int)std::max<int64_t>(1, std::min<int64_t>(ceil_div(slots, kThreads * kUnroll), max_grid_blocks()));
}

// Threads of a single block handling n elements alone: a few slots each, whole warps.
int single_block_threads(int64_t n, int V) {
  return (int)std::min<int64_t>(kMaxBlockThreads, std::max<int64_t>(128, pow2_at_least(ceil_div(n, V * kUnroll))));
}

// --- dtype dispatch: float32, float16, bfloat16 only (what check_float_input admits) ---------------

template <typename F>
void dispatch_dtype(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: return f(std::integral_constant<Dt, Dt::kF32>{});
    case at::kHalf: return f(std::integral_constant<Dt, Dt::kF16>{});
    case at::kBFloat16: return f(std::integral_constant<Dt, Dt::kBF16>{});
    default: TORCH_CHECK(false, "qkernels: ", what, ": unsupported dtype ", t);
  }
}

template <Dt D>
const Storage<D>* data(const at::Tensor& t) {
  return static_cast<const Storage<D>*>(t.data_ptr());
}
template <Dt D>
Storage<D>* mutable_data(at::Tensor& t) {
  return static_cast<Storage<D>*>(t.data_ptr());
}

// --- device building blocks -------------------------------------------------------------------------

__device__ __forceinline__ unsigned abs_bits(float v) { return __float_as_uint(finite_abs(v)); }

// Max bits of finite |x| over this thread's share (thread t of nt) of x[0, n): a scalar prologue up to
// the first 16-byte boundary, kUnroll aligned slots in flight, one more slot at a time, a scalar epilogue.
template <Dt D>
__device__ __forceinline__ unsigned thread_abs_max(const Storage<D>* __restrict__ x, int64_t n, int64_t t, int64_t nt) {
  constexpr int V = slot_width<D>();
  const int64_t to_boundary = (int64_t)(((16u - ((unsigned)(uintptr_t)x & 15u)) & 15u) / sizeof(Storage<D>));
  const int64_t head = n < to_boundary ? n : to_boundary;
  const int64_t slots = (n - head) / V;
  const Storage<D>* body = x + head;
  unsigned m = 0;
  if (t < head) m = abs_bits(to_float<D>(x[t]));
  int64_t i = t;
  for (; i + (kUnroll - 1) * nt < slots; i += kUnroll * nt) {
    Slot<D> f[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) f[u] = cuda_io::load_aligned<D>(body + (i + u * nt) * V);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int j = 0; j < V; ++j) m = max(m, abs_bits(f[u].get(j)));
  }
  for (; i < slots; i += nt) {
    const Slot<D> f = cuda_io::load_aligned<D>(body + i * V);
#pragma unroll
    for (int j = 0; j < V; ++j) m = max(m, abs_bits(f.get(j)));
  }
  const int64_t tail = head + slots * V;
  if (t < n - tail) m = max(m, abs_bits(to_float<D>(x[tail + t])));
  return m;
}

// The scale from per-block partial maxima, in every thread of the block.
__device__ __forceinline__ float finish_partials(const unsigned* __restrict__ partials, int count) {
  unsigned m = 0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) m = max(m, __ldcg(partials + i));
  return __uint_as_float(block_max(m));
}

// Elements [e, e + V) of n that exist.
template <int V>
__device__ __forceinline__ int slot_count(int64_t e, int64_t n) {
  return e >= n ? 0 : (n - e >= V ? V : (int)(n - e));
}

// The quantize pass over x[0, n) by warps `warp` (of `warps`): each lane kUnroll slots per step, the
// warp's slots consecutive so every load and store is a whole 512-byte line per instruction. With kMask,
// the clip-STE mask bit of element i (|x_i| <= s, as fake_quant_clip_grad decides) goes to bit i % 32 of
// mask[i / 32]: the lanes whose slots make up a word OR their bits together and the first one writes it.
template <Dt D, typename Out, bool kCodes, bool kMask>
__device__ __forceinline__ void quantize_tiles(const Storage<D>* __restrict__ x, Out* __restrict__ out,
                                               uint32_t* __restrict__ mask, int64_t n, float s, int bin,
                                               int64_t warp, int64_t warps) {
  constexpr int V = slot_width<D>();
  constexpr int kGroup = 32 / V;  // lanes per mask word
  const QuantParams p = make_params(s, bin);
  const int lane = threadIdx.x & 31;
  const int64_t slots = (n + V - 1) / V;
  for (int64_t t = warp * (32 * kUnroll); t < slots; t += warps * (32 * kUnroll)) {  // warp-uniform
    Slot<D> f[kUnroll];
    int count[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = (t + u * 32 + lane) * V;
      count[u] = slot_count<V>(e, n);
      f[u] = cuda_io::load_slot<D>(x + e, count[u]);  // count 0: reads nothing
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = (t + u * 32 + lane) * V;
      if constexpr (kMask) {
        unsigned bits = 0;  // taken before the slot is overwritten below
#pragma unroll
        for (int j = 0; j < V; ++j) bits |= (j < count[u] && fabsf(f[u].get(j)) <= s) ? 1u << j : 0u;
        bits = cuda_reduce::group_or(bits << ((lane % kGroup) * V), kGroup);
        if (lane % kGroup == 0 && count[u] > 0) mask[e / 32] = bits;
      }
      if (count[u] > 0) {
        if constexpr (kCodes) {
          int c[V];
#pragma unroll
          for (int j = 0; j < V; ++j) c[j] = quant_code_int(f[u].get(j), p);
          cuda_io::store_codes<Out, V>(out + e, c, count[u]);
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) f[u].set(j, fake_quant(f[u].get(j), p));
          cuda_io::store_slot<D>(out + e, f[u], count[u]);
        }
      }
    }
  }
}

// Where the quantize pass gets its scale: a finished one, or the reduction's per-block partials, which
// every block finishes itself (block 0 also stores the result as the op's scale output).
struct ScaleIn {
  const float* scale;
  const unsigned* partials;
  int count;
  float* scale_out;
};

// --- per-tensor kernels ---------------------------------------------------------------------------

// Per-block partial maxima of finite |x| (as float bits); with one block, the finished scale.
template <Dt D>
__global__ void __launch_bounds__(kMaxBlockThreads)
    abs_max_partial_kernel(const Storage<D>* __restrict__ x, int64_t n, unsigned* __restrict__ partials) {
  const unsigned m = block_max(thread_abs_max<D>(x, n, blockIdx.x * (int64_t)blockDim.x + threadIdx.x,
                                                 (int64_t)gridDim.x * blockDim.x));
  if (threadIdx.x == 0) partials[blockIdx.x] = m;
}

__global__ void __launch_bounds__(kThreads) abs_max_finish_kernel(const unsigned* __restrict__ partials, int count,
                                                                  float* __restrict__ out) {
  const float s = finish_partials(partials, count);
  if (threadIdx.x == 0) *out = s;
}

template <Dt D, typename Out, bool kCodes, bool kMask>
__global__ void __launch_bounds__(kThreads)
    quantize_kernel(const Storage<D>* __restrict__ x, Out* __restrict__ out, uint32_t* __restrict__ mask, int64_t n,
                    ScaleIn in, int bin) {
  float s;
  if (in.partials != nullptr) {
    s = finish_partials(in.partials, in.count);
    if (blockIdx.x == 0 && threadIdx.x == 0 && in.scale_out != nullptr) *in.scale_out = s;
  } else {
    s = __ldg(in.scale);
  }
  quantize_tiles<D, Out, kCodes, kMask>(x, out, mask, n, s, bin, (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5,
                                        ((int64_t)gridDim.x * blockDim.x) >> 5);
}

// A whole dynamic per-tensor op in one block: reduce, then quantize what the block has just read.
template <Dt D, typename Out, bool kCodes, bool kMask>
__global__ void __launch_bounds__(kMaxBlockThreads)
    abs_max_quantize_small_kernel(const Storage<D>* __restrict__ x, Out* __restrict__ out, uint32_t* __restrict__ mask,
                                  int64_t n, float* __restrict__ scale_out, int bin) {
  const float s = __uint_as_float(block_max(thread_abs_max<D>(x, n, threadIdx.x, blockDim.x)));
  if (threadIdx.x == 0) *scale_out = s;
  quantize_tiles<D, Out, kCodes, kMask>(x, out, mask, n, s, bin, threadIdx.x >> 5, blockDim.x >> 5);
}

// Gradient passes: out = grad where the element passes, else 0, the grad's bits unchanged. Thread t
// moves slots t, t + nt, ... kUnroll at a time (each step a run of consecutive slots per warp).
template <Dt D, typename Keep>
__device__ __forceinline__ void gate_gradient(const Storage<D>* __restrict__ g, Storage<D>* __restrict__ out, int64_t n,
                                              Keep&& keep) {
  constexpr int V = slot_width<D>();
  const int64_t slots = (n + V - 1) / V, nt = (int64_t)gridDim.x * blockDim.x;
  for (int64_t k0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k0 < slots; k0 += kUnroll * nt) {
    Slot<D> r[kUnroll];
    unsigned bits[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = (k0 + u * nt) * V;
      const int count = slot_count<V>(e, n);
      if (count > 0) {
        r[u] = cuda_io::load_slot<D>(g + e, count);
        bits[u] = keep(e, count);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = (k0 + u * nt) * V;
      const int count = slot_count<V>(e, n);
      if (count > 0) {
#pragma unroll
        for (int j = 0; j < V; ++j)
          if (!((bits[u] >> j) & 1u)) r[u].set_bits(j, Storage<D>(0));
        cuda_io::store_slot<D>(out + e, r[u], count);
      }
    }
  }
}

template <Dt D>
__global__ void __launch_bounds__(kThreads)
    clip_grad_kernel(const Storage<D>* __restrict__ g, const Storage<D>* __restrict__ x, Storage<D>* __restrict__ out,
                     int64_t n, const float* __restrict__ scale) {
  const float s = __ldg(scale);
  gate_gradient<D>(g, out, n, [&](int64_t e, int count) {
    const Slot<D> xv = cuda_io::load_slot<D>(x + e, count);
    unsigned bits = 0;
#pragma unroll
    for (int j = 0; j < slot_width<D>(); ++j) bits |= fabsf(xv.get(j)) <= s ? 1u << j : 0u;  // false for NaN
    return bits;
  });
}

template <Dt D>
__global__ void __launch_bounds__(kThreads)
    mask_grad_kernel(const Storage<D>* __restrict__ g, const uint32_t* __restrict__ mask, Storage<D>* __restrict__ out,
                     int64_t n) {
  // e is a multiple of V, which divides 32: a slot's V bits lie in one word
  gate_gradient<D>(g, out, n, [&](int64_t e, int) { return __ldg(mask + e / 32) >> (e % 32); });
}

// --- quantizer state updates (one block: the batch abs max, then the state machine) ----------------

// The batch abs max: reduced here from x (small inputs), or finished from a reduction's partials.
template <Dt D>
__device__ __forceinline__ float batch_abs_max(const Storage<D>* x, int64_t n, const unsigned* partials, int count) {
  if (partials != nullptr) return finish_partials(partials, count);
  return __uint_as_float(block_max(thread_abs_max<D>(x, n, threadIdx.x, blockDim.x)));
}

template <Dt D>
__global__ void __launch_bounds__(kMaxBlockThreads)
    range_abs_max_update_kernel(const Storage<D>* __restrict__ x, int64_t n, const unsigned* __restrict__ partials,
                                int count, float* __restrict__ scale, float* __restrict__ window,
                                int64_t* __restrict__ step, int64_t window_size) {
  __shared__ int rescan;
  __shared__ int64_t valid;
  const float cur = batch_abs_max<D>(x, n, partials, count);
  if (threadIdx.x == 0) {
    int64_t v = 0;
    rescan = range_abs_max_step(cur, window, step, window_size, scale, &v) ? 1 : 0;
    valid = v;
  }
  __syncthreads();
  if (!rescan) return;  // block-uniform
  unsigned m = 0;       // window entries are abs maxima (>= 0): their bits order like the values
  for (int64_t i = threadIdx.x; i < valid; i += blockDim.x) m = max(m, __float_as_uint(window[i]));
  m = block_max(m);
  if (threadIdx.x == 0) *scale = __uint_as_float(m);
}

template <Dt D>
__global__ void __launch_bounds__(kMaxBlockThreads)
    moving_average_update_kernel(const Storage<D>* __restrict__ x, int64_t n, const unsigned* __restrict__ partials,
                                 int count, float rate, float* __restrict__ scale, float* __restrict__ accum,
                                 float* __restrict__ state) {
  const float cur = batch_abs_max<D>(x, n, partials, count);
  if (threadIdx.x == 0) moving_average_step(cur, rate, accum, state, scale);
}

// --- channel-wise kernels ---------------------------------------------------------------------------

// x's memory as rows x cols. by_column == false: row r is channel r % channels (rows of `inner`
// elements); by_column == true: column j is channel j / inner (rows of channels * inner elements).
// A block is tx x ty threads (tx * ty == kThreads, tx a power of two); each thread moves `items` slots
// per step: along its row (by row), or down its column (by column).
struct ChannelGrid {
  int64_t rows, cols, channels, inner;
  int tx, ty, items;
  dim3 grid;
};

// Channel maxima (float bits, into zeroed `scale_bits`) over the tiles of block (bx, by) of (nbx, nby).
template <Dt D, bool kByColumn>
__device__ __forceinline__ void channel_max_tiles(const Storage<D>* __restrict__ x, unsigned* __restrict__ scale_bits,
                                                  const ChannelGrid& g, int64_t bx, int64_t nbx, int64_t by,
                                                  int64_t nby) {
  constexpr int V = slot_width<D>();
  const int tx = g.tx, ty = g.ty, xi = threadIdx.x, yi = threadIdx.y, tid = xi + yi * tx;
  const int64_t slots = (g.cols + V - 1) / V;
  if constexpr (!kByColumn) {
    __shared__ unsigned warp_slots[kThreads / 32];
    for (int64_t r0 = by * ty; r0 < g.rows; r0 += nby * ty) {  // block-uniform: barriers inside
      const int64_t r = r0 + yi;
      unsigned m = 0;
      if (r < g.rows) {
        const Storage<D>* row = x + r * g.cols;
        for (int64_t c0 = bx * tx * g.items; c0 < slots; c0 += nbx * tx * g.items) {
          Slot<D> f[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int64_t sl = c0 + u * tx + xi;
            const int count = u < g.items ? slot_count<V>(sl * V, g.cols) : 0;
            f[u] = cuda_io::load_slot<D>(row + sl * V, count);  // count 0: zeros
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u)
#pragma unroll
            for (int j = 0; j < V; ++j) m = max(m, abs_bits(f[u].get(j)));
        }
      }
      // the tx (>= 32) threads of row yi are whole warps: warp max, then one atomic per block and row
      m = cuda_reduce::warp_max(m);
      if ((tid & 31) == 0) warp_slots[tid >> 5] = m;
      __syncthreads();
      if (xi == 0 && r < g.rows) {
        unsigned mm = 0;
        for (int w = 0; w < tx / 32; ++w) mm = max(mm, warp_slots[yi * (tx / 32) + w]);
        if (mm != 0) atomicMax(scale_bits + r % g.channels, mm);
      }
      __syncthreads();
    }
  } else {
    __shared__ unsigned column_max[kThreads * V];  // [ty][tx * V]
    for (int64_t c0 = bx * tx; c0 < slots; c0 += nbx * tx) {  // block-uniform: barriers inside
      const int64_t sl = c0 + xi;
      const int count = slot_count<V>(sl * V, g.cols);
      unsigned m[V] = {};
      for (int64_t r0 = by * ty * g.items; r0 < g.rows; r0 += nby * ty * g.items) {
        Slot<D> f[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t r = r0 + u * ty + yi;
          const int c = (u < g.items && r < g.rows) ? count : 0;
          f[u] = cuda_io::load_slot<D>(x + r * g.cols + sl * V, c);  // c 0: zeros
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
          for (int j = 0; j < V; ++j) m[j] = max(m[j], abs_bits(f[u].get(j)));
      }
#pragma unroll
      for (int j = 0; j < V; ++j) column_max[yi * (tx * V) + xi * V + j] = m[j];
      __syncthreads();
      for (int col = tid; col < tx * V; col += kThreads) {  // one atomic per block and column
        unsigned mm = 0;
        for (int y = 0; y < ty; ++y) mm = max(mm, column_max[y * (tx * V) + col]);
        const int64_t j = c0 * V + col;
        if (mm != 0 && j < g.cols) atomicMax(scale_bits + j / g.inner, mm);
      }
      __syncthreads();
    }
  }
}

template <typename Out, bool kCodes, Dt D>
__device__ __forceinline__ void quantize_slot(Slot<D> f, const QuantParams* p, Storage<D>* out_fake, Out* out_codes,
                                              int count) {
  constexpr int V = slot_width<D>();
  if constexpr (kCodes) {
    int c[V];
#pragma unroll
    for (int j = 0; j < V; ++j) c[j] = quant_code_int(f.get(j), p[j]);
    cuda_io::store_codes<Out, V>(out_codes, c, count);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) f.set(j, fake_quant(f.get(j), p[j]));
    cuda_io::store_slot<D>(out_fake, f, count);
  }
}

// Quantize pass over the tiles of block (bx, by) of (nbx, nby), with the scales the reduction left.
template <Dt D, typename Out, bool kCodes, bool kByColumn>
__device__ __forceinline__ void channel_quantize_tiles(const Storage<D>* __restrict__ x, Out* __restrict__ out,
                                                       const float* __restrict__ scales, const ChannelGrid& g, int bin,
                                                       int64_t bx, int64_t nbx, int64_t by, int64_t nby) {
  constexpr int V = slot_width<D>();
  const int tx = g.tx, ty = g.ty, xi = threadIdx.x, yi = threadIdx.y;
  const int64_t slots = (g.cols + V - 1) / V;
  QuantParams p[V];
  if constexpr (!kByColumn) {
    for (int64_t r = by * ty + yi; r < g.rows; r += nby * ty) {
      p[0] = make_params(__ldcg(scales + r % g.channels), bin);  // once per row
#pragma unroll
      for (int j = 1; j < V; ++j) p[j] = p[0];
      const int64_t base = r * g.cols;
      for (int64_t c0 = bx * tx * g.items; c0 < slots; c0 += nbx * tx * g.items) {
        Slot<D> f[kUnroll];
        int count[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t sl = c0 + u * tx + xi;
          count[u] = u < g.items ? slot_count<V>(sl * V, g.cols) : 0;
          f[u] = cuda_io::load_slot<D>(x + base + sl * V, count[u]);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t e = base + (c0 + u * tx + xi) * V;
          if (count[u] > 0)
            quantize_slot<Out, kCodes, D>(f[u], p, reinterpret_cast<Storage<D>*>(out) + e, out + e, count[u]);
        }
      }
    }
  } else {
    for (int64_t sl = bx * tx + xi; sl < slots; sl += nbx * tx) {
      const int64_t j0 = sl * V;
      const int count = slot_count<V>(j0, g.cols);
      int64_t ch = j0 / g.inner, rem = j0 % g.inner;  // once per column slot, then for all its rows
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (j == 0 || rem == 0)
          p[j] = j < count ? make_params(__ldcg(scales + ch), bin) : make_params(0.f, bin);
        else
          p[j] = p[j - 1];
        if (++rem == g.inner) {
          rem = 0;
          ++ch;
        }
      }
      for (int64_t r0 = by * ty * g.items; r0 < g.rows; r0 += nby * ty * g.items) {
        Slot<D> f[kUnroll];
        int c[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t r = r0 + u * ty + yi;
          c[u] = (u < g.items && r < g.rows) ? count : 0;
          f[u] = cuda_io::load_slot<D>(x + r * g.cols + j0, c[u]);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t e = (r0 + u * ty + yi) * g.cols + j0;
          if (c[u] > 0) quantize_slot<Out, kCodes, D>(f[u], p, reinterpret_cast<Storage<D>*>(out) + e, out + e, c[u]);
        }
      }
    }
  }
}

template <Dt D, bool kByColumn>
__global__ void __launch_bounds__(kThreads)
    channel_abs_max_kernel(const Storage<D>* __restrict__ x, unsigned* __restrict__ scale_bits, ChannelGrid g) {
  channel_max_tiles<D, kByColumn>(x, scale_bits, g, blockIdx.x, gridDim.x, blockIdx.y, gridDim.y);
}

template <Dt D, typename Out, bool kCodes, bool kByColumn>
__global__ void __launch_bounds__(kThreads)
    channel_quantize_kernel(const Storage<D>* __restrict__ x, Out* __restrict__ out, const float* __restrict__ scales,
                            ChannelGrid g, int bin) {
  channel_quantize_tiles<D, Out, kCodes, kByColumn>(x, out, scales, g, bin, blockIdx.x, gridDim.x, blockIdx.y,
                                                    gridDim.y);
}

// A whole channel-wise op in one block: zero the scales, reduce, then quantize.
template <Dt D, typename Out, bool kCodes, bool kByColumn>
__global__ void __launch_bounds__(kThreads)
    channel_small_kernel(const Storage<D>* __restrict__ x, Out* __restrict__ out, float* __restrict__ scales,
                         ChannelGrid g, int bin) {
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  unsigned* scale_bits = reinterpret_cast<unsigned*>(scales);
  for (int64_t c = tid; c < g.channels; c += kThreads) scale_bits[c] = 0u;
  __syncthreads();
  channel_max_tiles<D, kByColumn>(x, scale_bits, g, 0, 1, 0, 1);
  __syncthreads();  // the block's atomics are visible to the block after the barrier
  channel_quantize_tiles<D, Out, kCodes, kByColumn>(x, out, scales, g, bin, 0, 1, 0, 1);
}

// --- host side --------------------------------------------------------------------------------------

at::Tensor new_output(const at::Tensor& xd, int64_t bits, bool codes) {
  // empty_like keeps a dense input's strides: the output is written in x's memory order.
  return codes ? at::empty_like(xd, xd.options().dtype(code_dtype(bits))) : at::empty_like(xd);
}

at::Tensor new_mask(const at::Tensor& xd, bool clip_grad) {
  return at::empty({clip_grad ? mask_words(xd.numel()) : 0}, xd.options().dtype(at::kInt));
}

// Per-block partial maxima of a tensor above kSmall elements.
struct Partials {
  at::Tensor buf;
  int count;
};

template <Dt D>
Partials partial_abs_max(const at::Tensor& xd) {
  const int64_t n = xd.numel();
  const int blocks = grid_blocks(ceil_div(n, slot_width<D>()));
  Partials p{at::empty({blocks}, xd.options().dtype(at::kInt)), blocks};
  abs_max_partial_kernel<D><<<blocks, kThreads, 0, stream()>>>(data<D>(xd), n, static_cast<unsigned*>(p.buf.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return p;
}

// max|x| (finite values) into the float32 element at `out`: one launch up to kSmall elements, two above.
void abs_max_into(const at::Tensor& xd, float* out) {
  const int64_t n = xd.numel();
  if (n == 0) {
    C10_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(float), stream()));
    return;
  }
  dispatch_dtype(xd.scalar_type(), "abs_max", [&](auto d) {
    constexpr Dt D = decltype(d)::value;
    if (n <= kSmall) {
      abs_max_partial_kernel<D><<<1, single_block_threads(n, slot_width<D>()), 0, stream()>>>(
          data<D>(xd), n, reinterpret_cast<unsigned*>(out));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const Partials p = partial_abs_max<D>(xd);
    abs_max_finish_kernel<<<1, kThreads, 0, stream()>>>(static_cast<const unsigned*>(p.buf.data_ptr()), p.count, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <Dt D, typename Out, bool kCodes, bool kMask>
void launch_quantize(const at::Tensor& xd, Out* out, uint32_t* mask, const ScaleIn& in, int bin) {
  const int64_t n = xd.numel();
  quantize_kernel<D, Out, kCodes, kMask><<<grid_blocks(ceil_div(n, slot_width<D>())), kThreads, 0, stream()>>>(
      data<D>(xd), out, mask, n, in, bin);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls f(out pointer, codes flag, mask flag) with the output's element type and the template flags.
template <Dt D, typename F>
void with_output(at::Tensor& out, bool codes, bool masked, F&& f) {
  if (!codes) {
    if (masked)
      f(mutable_data<D>(out), std::false_type{}, std::true_type{});
    else
      f(mutable_data<D>(out), std::false_type{}, std::false_type{});
  } else if (out.scalar_type() == at::kChar) {
    f(out.data_ptr<int8_t>(), std::true_type{}, std::false_type{});
  } else {
    f(out.data_ptr<int16_t>(), std::true_type{}, std::false_type{});
  }
}

uint32_t* mask_data(at::Tensor& mask) {
  return mask.numel() ? reinterpret_cast<uint32_t*>(mask.data_ptr<int32_t>()) : nullptr;
}

at::Tensor abs_max_cuda(const at::Tensor& x) {
  check_float_input(x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dense_input(x);
  at::Tensor scale = at::empty({}, xd.options().dtype(at::kFloat));
  abs_max_into(xd, scale.data_ptr<float>());
  return scale;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> abs_max_quant(const at::Tensor& x, int64_t bits, bool codes,
                                                             bool clip_grad) {
  check_float_input(x, "x");
  check_bits(bits);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dense_input(x);
  const int64_t n = xd.numel();
  at::Tensor scale = at::empty({}, xd.options().dtype(at::kFloat));
  at::Tensor out = new_output(xd, bits, codes);
  at::Tensor mask = new_mask(xd, clip_grad);
  if (n == 0) {
    C10_CUDA_CHECK(cudaMemsetAsync(scale.data_ptr<float>(), 0, sizeof(float), stream()));
    return {out, scale, mask};
  }
  const int bin = bin_count(bits);
  float* scale_ptr = scale.data_ptr<float>();
  uint32_t* mask_ptr = mask_data(mask);
  dispatch_dtype(xd.scalar_type(), "quantize", [&](auto d) {
    constexpr Dt D = decltype(d)::value;
    with_output<D>(out, codes, clip_grad, [&](auto* o, auto kc, auto km) {
      using Out = std::remove_pointer_t<decltype(o)>;
      constexpr bool kCodes = decltype(kc)::value, kMask = decltype(km)::value;
      if (n <= kSmall) {
        abs_max_quantize_small_kernel<D, Out, kCodes, kMask>
            <<<1, single_block_threads(n, slot_width<D>()), 0, stream()>>>(data<D>(xd), o, mask_ptr, n, scale_ptr, bin);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        const Partials p = partial_abs_max<D>(xd);
        launch_quantize<D, Out, kCodes, kMask>(
            xd, o, mask_ptr, ScaleIn{nullptr, static_cast<const unsigned*>(p.buf.data_ptr()), p.count, scale_ptr}, bin);
      }
    });
  });
  return {out, scale, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_abs_max_cuda(const at::Tensor& x, int64_t bits,
                                                                       bool clip_grad) {
  return abs_max_quant(x, bits, false, clip_grad);
}

std::tuple<at::Tensor, at::Tensor> quantize_abs_max_cuda(const at::Tensor& x, int64_t bits) {
  auto r = abs_max_quant(x, bits, true, false);
  return {std::get<0>(r), std::get<1>(r)};
}

std::tuple<at::Tensor, at::Tensor> with_scale_quant(const at::Tensor& x, const at::Tensor& scale, int64_t bits,
                                                    bool codes, bool clip_grad) {
  check_float_input(x, "x");
  check_bits(bits);
  check_scalar_scale(scale, x, "scale");
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dense_input(x);
  const at::Tensor sc = scale.contiguous();
  at::Tensor out = new_output(xd, bits, codes);
  at::Tensor mask = new_mask(xd, clip_grad);
  if (xd.numel() == 0) return {out, mask};
  const int bin = bin_count(bits);
  uint32_t* mask_ptr = mask_data(mask);
  dispatch_dtype(xd.scalar_type(), "quantize", [&](auto d) {
    constexpr Dt D = decltype(d)::value;
    with_output<D>(out, codes, clip_grad, [&](auto* o, auto kc, auto km) {
      using Out = std::remove_pointer_t<decltype(o)>;
      launch_quantize<D, Out, decltype(kc)::value, decltype(km)::value>(
          xd, o, mask_ptr, ScaleIn{sc.data_ptr<float>(), nullptr, 0, nullptr}, bin);
    });
  });
  return {out, mask};
}

std::tuple<at::Tensor, at::Tensor> fake_quant_with_scale_cuda(const at::Tensor& x, const at::Tensor& scale, int64_t bits,
                                                              bool clip_grad) {
  return with_scale_quant(x, scale, bits, false, clip_grad);
}

at::Tensor quantize_with_scale_cuda(const at::Tensor& x, const at::Tensor& scale, int64_t bits) {
  return std::get<0>(with_scale_quant(x, scale, bits, true, false));
}

// Block shape, slots per thread and grid of a channel-wise pass (see ChannelGrid).
ChannelGrid channel_grid(const ChannelLayout& l, int V, bool& by_column) {
  ChannelGrid g;
  by_column = l.inner < kRowMin;
  g.channels = l.channels;
  g.inner = l.inner;
  g.rows = by_column ? l.outer : l.outer * l.channels;
  g.cols = by_column ? l.channels * l.inner : l.inner;
  const int64_t slots = ceil_div(g.cols, V);
  int64_t gx, gy;
  if (!by_column) {
    g.tx = (int)std::min<int64_t>(kThreads, std::max<int64_t>(32, pow2_at_least(slots)));
    g.ty = kThreads / g.tx;
    g.items = (int)std::min<int64_t>(kUnroll, ceil_div(slots, g.tx));
    gx = ceil_div(slots, (int64_t)g.tx * g.items);
    gy = ceil_div(g.rows, g.ty);
  } else {
    g.tx = (int)std::min<int64_t>(kThreads, pow2_at_least(slots));
    g.ty = kThreads / g.tx;
    g.items = (int)std::min<int64_t>(kUnroll, ceil_div(g.rows, g.ty));
    gx = ceil_div(slots, g.tx);
    gy = ceil_div(g.rows, (int64_t)g.ty * g.items);
  }
  const int64_t target = max_grid_blocks();
  gx = std::max<int64_t>(1, std::min<int64_t>(gx, target));
  gy = std::max<int64_t>(1, std::min<int64_t>({gy, (int64_t)65535, std::max<int64_t>(1, target / gx)}));
  g.grid = dim3((unsigned)gx, (unsigned)gy);
  return g;
}

std::tuple<at::Tensor, at::Tensor> channel_wise_quant(const at::Tensor& x, int64_t bits, int64_t axis, bool codes) {
  check_float_input(x, "x");
  check_bits(bits);
  axis = wrap_axis(axis, x);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dense_input(x);
  const ChannelLayout layout = memory_channel_layout(xd, axis);
  at::Tensor scales = at::empty({layout.channels}, xd.options().dtype(at::kFloat));
  at::Tensor out = new_output(xd, bits, codes);
  if (layout.channels == 0) return {out, scales};
  float* sp = scales.data_ptr<float>();
  const int64_t n = xd.numel();
  if (n == 0) {
    C10_CUDA_CHECK(cudaMemsetAsync(sp, 0, layout.channels * sizeof(float), stream()));
    return {out, scales};
  }
  const int bin = bin_count(bits);
  dispatch_dtype(xd.scalar_type(), "channel-wise quantize", [&](auto d) {
    constexpr Dt D = decltype(d)::value;
    bool by_column = false;
    const ChannelGrid g = channel_grid(layout, slot_width<D>(), by_column);
    const dim3 block(g.tx, g.ty);
    with_output<D>(out, codes, false, [&](auto* o, auto kc, auto) {
      using Out = std::remove_pointer_t<decltype(o)>;
      constexpr bool kCodes = decltype(kc)::value;
      auto run = [&](auto kb) {
        constexpr bool kByColumn = decltype(kb)::value;
        if (n <= kSmall) {
          channel_small_kernel<D, Out, kCodes, kByColumn><<<1, block, 0, stream()>>>(data<D>(xd), o, sp, g, bin);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
        C10_CUDA_CHECK(cudaMemsetAsync(sp, 0, layout.channels * sizeof(float), stream()));
        channel_abs_max_kernel<D, kByColumn><<<g.grid, block, 0, stream()>>>(data<D>(xd), reinterpret_cast<unsigned*>(sp), g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        channel_quantize_kernel<D, Out, kCodes, kByColumn><<<g.grid, block, 0, stream()>>>(data<D>(xd), o, sp, g, bin);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (by_column)
        run(std::true_type{});
      else
        run(std::false_type{});
    });
  });
  return {out, scales};
}

std::tuple<at::Tensor, at::Tensor> fake_channel_wise_quant_abs_max_cuda(const at::Tensor& x, int64_t bits, int64_t axis,
                                                                       bool /*clip_grad: autograd saves x*/) {
  return channel_wise_quant(x, bits, axis, false);
}

std::tuple<at::Tensor, at::Tensor> quantize_channel_wise_abs_max_cuda(const at::Tensor& x, int64_t bits, int64_t axis) {
  return channel_wise_quant(x, bits, axis, true);
}

at::Tensor fake_quant_clip_grad_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale) {
  check_clip_grad_args(grad, x, scale);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dense_input(x);
  const at::Tensor gd = in_layout_of(grad, xd);
  const at::Tensor sc = scale.contiguous();
  at::Tensor out = at::empty_like(xd);
  const int64_t n = xd.numel();
  if (n == 0) return out;
  dispatch_dtype(xd.scalar_type(), "fake_quant_clip_grad", [&](auto d) {
    constexpr Dt D = decltype(d)::value;
    clip_grad_kernel<D><<<grid_blocks(ceil_div(n, slot_width<D>())), kThreads, 0, stream()>>>(
        data<D>(gd), data<D>(xd), mutable_data<D>(out), n, sc.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor fake_quant_mask_grad_cuda(const at::Tensor& grad, const at::Tensor& mask) {
  check_mask_grad_args(grad, mask);
  c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor gd = dense_input(grad);
  const at::Tensor md = mask.contiguous();
  at::Tensor out = at::empty_like(gd);
  const int64_t n = gd.numel();
  if (n == 0) return out;
  dispatch_dtype(gd.scalar_type(), "fake_quant_mask_grad", [&](auto d) {
    constexpr Dt D = decltype(d)::value;
    mask_grad_kernel<D><<<grid_blocks(ceil_div(n, slot_width<D>())), kThreads, 0, stream()>>>(
        data<D>(gd), reinterpret_cast<const uint32_t*>(md.data_ptr<int32_t>()), mutable_data<D>(out), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// The state kernels reduce x themselves up to kSmall elements (one launch), else finish partials (two).
template <typename Launch>
void with_batch_source(const at::Tensor& xd, Launch&& launch) {
  const int64_t n = xd.numel();
  dispatch_dtype(xd.scalar_type(), "state update", [&](auto d) {
    constexpr Dt D = decltype(d)::value;
    if (n <= kSmall) {
      launch(d, data<D>(xd), n, static_cast<const unsigned*>(nullptr), 0, single_block_threads(n, slot_width<D>()));
    } else {
      const Partials p = partial_abs_max<D>(xd);
      launch(d, static_cast<const Storage<D>*>(nullptr), n, static_cast<const unsigned*>(p.buf.data_ptr()), p.count,
             kThreads);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void range_abs_max_update_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& window,
                               const at::Tensor& step, int64_t window_size) {
  check_range_abs_max_state(x, scale, window, step, window_size);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dense_input(x);
  with_batch_source(xd, [&](auto d, auto* xp, int64_t n, const unsigned* partials, int count, int threads) {
    constexpr Dt D = decltype(d)::value;
    range_abs_max_update_kernel<D><<<1, threads, 0, stream()>>>(xp, n, partials, count, scale.data_ptr<float>(),
                                                              window.data_ptr<float>(), step.data_ptr<int64_t>(),
                                                              window_size);
  });
}

void moving_average_abs_max_update_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& accum,
                                        const at::Tensor& state, double moving_rate) {
  check_moving_average_state(x, scale, accum, state, moving_rate);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dense_input(x);
  with_batch_source(xd, [&](auto d, auto* xp, int64_t n, const unsigned* partials, int count, int threads) {
    constexpr Dt D = decltype(d)::value;
    moving_average_update_kernel<D><<<1, threads, 0, stream()>>>(xp, n, partials, count, (float)moving_rate,
                                                               scale.data_ptr<float>(), accum.data_ptr<float>(),
                                                               state.data_ptr<float>());
  });
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
  m.impl("fake_quant_mask_grad", &fake_quant_mask_grad_cuda);
  m.impl("range_abs_max_update_", &range_abs_max_update_cuda);
  m.impl("moving_average_abs_max_update_", &moving_average_abs_max_update_cuda);
}

}  // namespace qkernels
