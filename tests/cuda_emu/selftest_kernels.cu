// Kernels that pin down the emulator's semantics, one op each (torch.ops.qk_emu_selftest.*), checked
// by test_emulator.py against models of what CUDA specifies. Plain CUDA: the same file builds with
// nvcc, so on a GPU the same checks can run on hardware.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// --- coordinates ------------------------------------------------------------------------------------

// out[linear thread of the grid] = blockIdx xyz, threadIdx xyz, blockDim xyz, gridDim xyz
__global__ void indices_kernel(int* out) {
  const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  int* o = out + 12 * (block * (blockDim.x * blockDim.y * blockDim.z) + thread);
  o[0] = blockIdx.x, o[1] = blockIdx.y, o[2] = blockIdx.z;
  o[3] = threadIdx.x, o[4] = threadIdx.y, o[5] = threadIdx.z;
  o[6] = blockDim.x, o[7] = blockDim.y, o[8] = blockDim.z;
  o[9] = gridDim.x, o[10] = gridDim.y, o[11] = gridDim.z;
}

at::Tensor indices(int64_t gx, int64_t gy, int64_t gz, int64_t bx, int64_t by, int64_t bz) {
  at::Tensor out = at::full({gx * gy * gz * bx * by * bz, 12}, -1, at::TensorOptions().dtype(at::kInt));
  indices_kernel<<<dim3(gx, gy, gz), dim3(bx, by, bz), 0, stream()>>>(out.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// --- shared memory and stacks ---------------------------------------------------------------------------

// Each block rotates its row through shared memory: out[b][t] = x[b][(t + 1) % n] + 1000 * b.
__global__ void shared_rotate_kernel(const float* x, float* out, int n) {
  __shared__ float row[1024];
  const int t = threadIdx.x, b = blockIdx.x;
  row[t] = x[b * n + t];
  __syncthreads();
  out[b * n + t] = row[(t + 1) % n] + 1000.f * b;
}

at::Tensor shared_rotate(const at::Tensor& x) {
  at::Tensor xc = x.contiguous(), out = at::empty_like(xc);
  shared_rotate_kernel<<<(unsigned)xc.size(0), (unsigned)xc.size(1), 0, stream()>>>(xc.data_ptr<float>(),
                                                                                      out.data_ptr<float>(), (int)xc.size(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Dynamic shared memory: the same rotation through `extern __shared__`.
__global__ void dynamic_rotate_kernel(const float* x, float* out, int n) {
  extern __shared__ float dyn[];
  const int t = threadIdx.x, b = blockIdx.x;
  dyn[t] = x[b * n + t];
  __syncthreads();
  out[b * n + t] = dyn[(t + 1) % n] + 1000.f * b;
}

at::Tensor dynamic_rotate(const at::Tensor& x) {
  at::Tensor xc = x.contiguous(), out = at::empty_like(xc);
  const int n = (int)xc.size(1);
  dynamic_rotate_kernel<<<(unsigned)xc.size(0), (unsigned)n, n * sizeof(float), stream()>>>(
      xc.data_ptr<float>(), out.data_ptr<float>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Every thread keeps a local array across barriers; with shared stacks the sums would mix.
__global__ void own_stack_kernel(int64_t* out) {
  int local[64];
  const int t = threadIdx.x + blockDim.x * blockIdx.x;
  for (int i = 0; i < 64; ++i) local[i] = t * 1000 + i;
  __syncthreads();
  for (int i = 0; i < 64; ++i) local[i] += 1;
  __syncthreads();
  long long s = 0;
  for (int i = 0; i < 64; ++i) s += local[i];
  out[t] = s;
}

at::Tensor own_stack(int64_t blocks, int64_t threads) {
  at::Tensor out = at::zeros({blocks * threads}, at::TensorOptions().dtype(at::kLong));
  own_stack_kernel<<<(unsigned)blocks, (unsigned)threads, 0, stream()>>>(out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Static shared memory a block reads before writing: what the previous block left (0 on a fresh one).
__global__ void shared_leftover_kernel(int* out) {
  __shared__ int cell;
  out[blockIdx.x] = cell;
  __syncthreads();
  if (threadIdx.x == 0) cell = 100 + blockIdx.x;
}

at::Tensor shared_leftover(int64_t blocks) {
  at::Tensor out = at::full({blocks}, -1, at::TensorOptions().dtype(at::kInt));
  shared_leftover_kernel<<<(unsigned)blocks, 32, 0, stream()>>>(out.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// --- barriers ----------------------------------------------------------------------------------------------

// out[t] = (count, and, or) of pred over the block
__global__ void sync_reduce_kernel(const int* pred, int* out) {
  const int t = threadIdx.x;
  const int p = pred[t];
  const int c = __syncthreads_count(p);
  const int a = __syncthreads_and(p);
  const int o = __syncthreads_or(p);
  out[3 * t] = c, out[3 * t + 1] = a, out[3 * t + 2] = o;
}

at::Tensor sync_reduce(const at::Tensor& pred) {
  at::Tensor pc = pred.contiguous(), out = at::empty({pc.numel(), 3}, pc.options());
  sync_reduce_kernel<<<1, (unsigned)pc.numel(), 0, stream()>>>(pc.data_ptr<int>(), out.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Each lane writes its slot, __syncwarp, then reads its neighbour's: out[t] = 10 * ((lane+1) % 32) + warp.
__global__ void syncwarp_exchange_kernel(int* out) {
  __shared__ int slot[1024];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  slot[t] = 10 * lane + warp;
  __syncwarp();
  out[t] = slot[warp * 32 + (lane + 1) % 32];
}

at::Tensor syncwarp_exchange(int64_t threads) {
  at::Tensor out = at::full({threads}, -1, at::TensorOptions().dtype(at::kInt));
  syncwarp_exchange_kernel<<<1, (unsigned)threads, 0, stream()>>>(out.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// --- warp intrinsics -----------------------------------------------------------------------------------------

// Lanes in `mask` call the shuffle `kind` (0 idx, 1 up, 2 down, 3 xor) with their own value and arg;
// the others write -1. One block of `threads` threads (several warps).
__global__ void shuffle_kernel(const int* values, const int* args, int* out, int kind, int width, unsigned mask) {
  const int t = threadIdx.x, lane = t % 32;
  if (!(mask & (1u << lane))) {
    out[t] = -1;
    return;
  }
  const int v = values[t], a = args[t];
  int r;
  if (kind == 0)
    r = __shfl_sync(mask, v, a, width);
  else if (kind == 1)
    r = __shfl_up_sync(mask, v, (unsigned)a, width);
  else if (kind == 2)
    r = __shfl_down_sync(mask, v, (unsigned)a, width);
  else
    r = __shfl_xor_sync(mask, v, a, width);
  out[t] = r;
}

at::Tensor shuffle(const at::Tensor& values, const at::Tensor& args, int64_t kind, int64_t width, int64_t mask) {
  at::Tensor v = values.contiguous(), a = args.contiguous(), out = at::empty_like(v);
  shuffle_kernel<<<1, (unsigned)v.numel(), 0, stream()>>>(v.data_ptr<int>(), a.data_ptr<int>(), out.data_ptr<int>(),
                                                          (int)kind, (int)width, (unsigned)mask);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// 64-bit and 16-bit operands go through the same exchange.
__global__ void shuffle_wide_kernel(const double* d, double* od, const __half* h, __half* oh) {
  const int t = threadIdx.x;
  od[t] = __shfl_xor_sync(0xffffffffu, d[t], 5);
  oh[t] = __shfl_down_sync(0xffffffffu, h[t], 3);
}

std::tuple<at::Tensor, at::Tensor> shuffle_wide(const at::Tensor& d, const at::Tensor& h) {
  at::Tensor dc = d.contiguous(), hc = h.contiguous(), od = at::empty_like(dc), oh = at::empty_like(hc);
  shuffle_wide_kernel<<<1, 32, 0, stream()>>>(dc.data_ptr<double>(), od.data_ptr<double>(),
                                              reinterpret_cast<const __half*>(hc.data_ptr<at::Half>()),
                                              reinterpret_cast<__half*>(oh.data_ptr<at::Half>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {od, oh};
}

// Lanes in mask: out[t] = (ballot, any, all, reduce_add, reduce_min signed, reduce_max unsigned,
// reduce_and, reduce_or, reduce_xor, match_any, match_all, match_all pred).
__global__ void vote_kernel(const int* values, int* out, unsigned mask) {
  const int t = threadIdx.x, lane = t % 32;
  int* o = out + 12 * t;
  if (!(mask & (1u << lane))) {
    for (int i = 0; i < 12; ++i) o[i] = -1;
    return;
  }
  const int v = values[t];
  o[0] = (int)__ballot_sync(mask, v & 1);
  o[1] = __any_sync(mask, v & 1);
  o[2] = __all_sync(mask, v & 1);
  o[3] = (int)__reduce_add_sync(mask, (unsigned)v);
  o[4] = __reduce_min_sync(mask, v);
  o[5] = (int)__reduce_max_sync(mask, (unsigned)v);
  o[6] = (int)__reduce_and_sync(mask, (unsigned)v);
  o[7] = (int)__reduce_or_sync(mask, (unsigned)v);
  o[8] = (int)__reduce_xor_sync(mask, (unsigned)v);
  o[9] = (int)__match_any_sync(mask, v >> 4);
  int pred = 0;
  o[10] = (int)__match_all_sync(mask, v >> 8, &pred);
  o[11] = pred;
}

at::Tensor vote(const at::Tensor& values, int64_t mask) {
  at::Tensor v = values.contiguous(), out = at::empty({v.numel(), 12}, v.options());
  vote_kernel<<<1, (unsigned)v.numel(), 0, stream()>>>(v.data_ptr<int>(), out.data_ptr<int>(), (unsigned)mask);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// --- atomics -----------------------------------------------------------------------------------------------------

struct AtomicCells {
  int add_i, max_i, min_i, cas_i, exch_i;
  unsigned add_u, max_u, min_u, inc_u;
  unsigned long long add_ull, max_ull, min_ull, cas_ull;
  float add_f, exch_f;
};

// Every thread of the grid hits each cell once; `olds` gets each thread's atomicExch old value.
__global__ void atomics_kernel(AtomicCells* c, int* olds) {
  const int t = threadIdx.x + blockDim.x * blockIdx.x;
  atomicAdd(&c->add_i, t % 7 - 3);
  atomicMax(&c->max_i, t * 13 % 101 - 50);
  atomicMin(&c->min_i, t * 13 % 101 - 50);
  int old = c->cas_i, assumed;  // lock-free increment through CAS
  do {
    assumed = old;
    old = atomicCAS(&c->cas_i, assumed, assumed + 2);
  } while (old != assumed);
  olds[t] = atomicExch(&c->exch_i, t);
  atomicAdd(&c->add_u, (unsigned)(t + 1));
  atomicMax(&c->max_u, (unsigned)(t * 7919u % 1000u));
  atomicMin(&c->min_u, (unsigned)(t * 7919u % 1000u + 5u));
  atomicInc(&c->inc_u, 9u);
  atomicAdd(&c->add_ull, (unsigned long long)t << 33);
  atomicMax(&c->max_ull, (unsigned long long)t << 40);
  atomicMin(&c->min_ull, ((unsigned long long)t + 3ull) << 40);
  unsigned long long o64 = c->cas_ull, a64;
  do {
    a64 = o64;
    o64 = atomicCAS(&c->cas_ull, a64, a64 + (1ull << 35));
  } while (o64 != a64);
  atomicAdd(&c->add_f, 0.5f);
  atomicExch(&c->exch_f, (float)t);
}

// Returns the cells as int64 (floats as their values) and the exchange olds.
std::tuple<at::Tensor, at::Tensor> atomics(int64_t blocks, int64_t threads) {
  at::Tensor cells = at::zeros({(int64_t)sizeof(AtomicCells)}, at::TensorOptions().dtype(at::kByte));
  AtomicCells* c = reinterpret_cast<AtomicCells*>(cells.data_ptr());
  c->exch_i = -1;
  c->min_i = 1 << 30;
  c->min_u = 0xffffffffu;
  c->min_ull = ~0ull;
  c->exch_f = -1.f;
  at::Tensor olds = at::full({blocks * threads}, -7, at::TensorOptions().dtype(at::kInt));
  atomics_kernel<<<(unsigned)blocks, (unsigned)threads, 0, stream()>>>(c, olds.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor r = at::empty({15}, at::TensorOptions().dtype(at::kDouble));
  double* o = r.data_ptr<double>();
  const double v[15] = {(double)c->add_i, (double)c->max_i, (double)c->min_i, (double)c->cas_i, (double)c->exch_i,
                        (double)c->add_u, (double)c->max_u, (double)c->min_u, (double)c->inc_u, (double)c->add_ull,
                        (double)c->max_ull, (double)c->min_ull, (double)c->cas_ull, (double)c->add_f, (double)c->exch_f};
  for (int i = 0; i < 15; ++i) o[i] = v[i];
  return {r, olds};
}

// --- integer and float intrinsics ------------------------------------------------------------------------------

__global__ void intrinsics_kernel(const int* a, const int* b, const int* c, const float* f, int* out, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    int* o = out + 8 * i;
    o[0] = __dp4a(a[i], b[i], c[i]);
    o[1] = (int)__dp4a((unsigned)a[i], (unsigned)b[i], (unsigned)c[i]);
    o[2] = (int)__float_as_uint(f[i]);
    o[3] = __float_as_int(__uint_as_float((unsigned)a[i])) == a[i];
    o[4] = __float_as_int(__int_as_float(b[i])) == b[i];
    o[5] = __popc((unsigned)a[i]);
    o[6] = (int)__byte_perm((unsigned)a[i], (unsigned)b[i], 0x5140u);
    o[7] = __float2int_rn(f[i]);
  }
}

at::Tensor intrinsics(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const at::Tensor& f) {
  const int n = (int)a.numel();
  at::Tensor out = at::empty({n, 8}, a.options());
  intrinsics_kernel<<<3, 64, 0, stream()>>>(a.data_ptr<int>(), b.data_ptr<int>(), c.data_ptr<int>(), f.data_ptr<float>(),
                                            out.data_ptr<int>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Vector types: loads through char4 / int4 / float4 and the make_* helpers.
__global__ void vectors_kernel(const signed char* bytes, const float* floats, int* out) {
  const char4 c = reinterpret_cast<const char4*>(bytes)[threadIdx.x];
  const float4 f = reinterpret_cast<const float4*>(floats)[threadIdx.x];
  const int4 i = make_int4(c.x + c.y, c.z - c.w, (int)f.x + (int)f.w, (int)(f.y * f.z));
  reinterpret_cast<int4*>(out)[threadIdx.x] = i;
}

at::Tensor vectors(const at::Tensor& bytes, const at::Tensor& floats) {
  const int n = (int)(bytes.numel() / 4);
  at::Tensor out = at::empty({n, 4}, at::TensorOptions().dtype(at::kInt));
  vectors_kernel<<<1, (unsigned)n, 0, stream()>>>(reinterpret_cast<const signed char*>(bytes.data_ptr<int8_t>()),
                                                  floats.data_ptr<float>(), out.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::vector<int64_t> vector_layouts() {
  return {sizeof(char4), alignof(char4), sizeof(short2), alignof(short2), sizeof(int2), alignof(int2),
          sizeof(int4), alignof(int4), sizeof(float2), alignof(float2), sizeof(float4), alignof(float4),
          sizeof(uchar4), alignof(uchar4), sizeof(longlong2), alignof(longlong2), sizeof(__half), sizeof(__half2)};
}

// float -> half / bfloat16 bits (round to nearest even) and back to float.
__global__ void half_kernel(const float* x, short* h, short* b, float* hf, float* bf, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const __half hv = __float2half_rn(x[i]);
    const __nv_bfloat16 bv = __float2bfloat16_rn(x[i]);
    h[i] = (short)__half_as_ushort(hv);
    b[i] = (short)__bfloat16_as_ushort(bv);
    hf[i] = __half2float(hv);
    bf[i] = __bfloat162float(bv);
  }
}

std::vector<at::Tensor> half_conversions(const at::Tensor& x) {
  at::Tensor xc = x.contiguous();
  const int n = (int)xc.numel();
  auto s = at::TensorOptions().dtype(at::kShort);
  at::Tensor h = at::empty({n}, s), b = at::empty({n}, s), hf = at::empty_like(xc), bf = at::empty_like(xc);
  half_kernel<<<4, 128, 0, stream()>>>(xc.data_ptr<float>(), h.data_ptr<int16_t>(), b.data_ptr<int16_t>(),
                                       hf.data_ptr<float>(), bf.data_ptr<float>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {h, b, hf, bf};
}

// out = (a*b + c as written: contracted into an FMA, as nvcc does; __fadd_rn(__fmul_rn(a, b), c): never)
__global__ void contraction_kernel(const float* a, const float* b, const float* c, float* fused, float* separate, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    fused[i] = a[i] * b[i] + c[i];
    separate[i] = __fadd_rn(__fmul_rn(a[i], b[i]), c[i]);
  }
}

std::tuple<at::Tensor, at::Tensor> contraction(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  at::Tensor f = at::empty_like(a), s = at::empty_like(a);
  const int n = (int)a.numel();
  contraction_kernel<<<(n + 63) / 64, 64, 0, stream()>>>(a.data_ptr<float>(), b.data_ptr<float>(), c.data_ptr<float>(),
                                                         f.data_ptr<float>(), s.data_ptr<float>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {f, s};
}

// --- grid-stride loops and launch order -----------------------------------------------------------------------------

__global__ void grid_stride_kernel(const float* x, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = 2.f * x[i] + 1.f;
}

at::Tensor grid_stride(const at::Tensor& x, int64_t blocks, int64_t threads) {
  at::Tensor xc = x.contiguous(), out = at::full_like(xc, -1.f);
  grid_stride_kernel<<<(unsigned)blocks, (unsigned)threads, 0, stream()>>>(xc.data_ptr<float>(), out.data_ptr<float>(),
                                                                           xc.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// out[block][thread] = the order in which threads started (a ticket), and blocks[block] = block order.
__global__ void order_kernel(int* out, int* block_out, int* counter) {
  const int t = atomicAdd(&counter[0], 1);
  __shared__ int block_ticket;
  if (threadIdx.x == 0) block_ticket = atomicAdd(&counter[1], 1);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = t - block_ticket * (int)blockDim.x;
  if (threadIdx.x == 0) block_out[blockIdx.x] = block_ticket;
}

std::tuple<at::Tensor, at::Tensor> order_trace(int64_t blocks, int64_t threads) {
  auto opt = at::TensorOptions().dtype(at::kInt);
  at::Tensor out = at::full({blocks, threads}, -1, opt), bo = at::full({blocks}, -1, opt), counter = at::zeros({2}, opt);
  order_kernel<<<(unsigned)blocks, (unsigned)threads, 0, stream()>>>(out.data_ptr<int>(), bo.data_ptr<int>(),
                                                                      counter.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, bo};
}

// --- launch configuration errors and device attributes ---------------------------------------------------------------

__global__ void noop_kernel(int* p) {
  if (p != nullptr && threadIdx.x == 0) atomicAdd(p, 1);
}

// Launches noop with a configuration picked by `which`; returns (cudaGetLastError after the launch,
// how many blocks ran). 0 fine, 1 zero blocks, 2 1025 threads, 3 grid.y 65536, 4 grid.z 65536,
// 5 64 KiB dynamic shared memory without opting in, 6 the same after cudaFuncSetAttribute, 7 block.z 65.
std::vector<int64_t> launch_config(int64_t which) {
  at::Tensor ran = at::zeros({1}, at::TensorOptions().dtype(at::kInt));
  int* p = ran.data_ptr<int>();
  switch (which) {
    case 0: noop_kernel<<<2, 32, 0, stream()>>>(p); break;
    case 1: noop_kernel<<<0, 32, 0, stream()>>>(p); break;
    case 2: noop_kernel<<<1, 1025, 0, stream()>>>(p); break;
    case 3: noop_kernel<<<dim3(1, 65536, 1), 32, 0, stream()>>>(p); break;
    case 4: noop_kernel<<<dim3(1, 1, 65536), 32, 0, stream()>>>(p); break;
    case 5: noop_kernel<<<1, 32, 64 * 1024, stream()>>>(p); break;
    case 6:
      C10_CUDA_CHECK(cudaFuncSetAttribute(noop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024));
      noop_kernel<<<1, 32, 64 * 1024, stream()>>>(p);
      C10_CUDA_CHECK(cudaFuncSetAttribute(noop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 48 * 1024));
      break;
    case 7: noop_kernel<<<1, dim3(1, 1, 65), 0, stream()>>>(p); break;
    default: TORCH_CHECK(false, "unknown case ", which);
  }
  const cudaError_t e = cudaGetLastError();
  return {(int64_t)e, (int64_t)ran.item<int>()};
}

// The same bad launch through C10_CUDA_KERNEL_LAUNCH_CHECK, which must raise with the CUDA message.
void launch_check_raises() {
  noop_kernel<<<1, 2048, 0, stream()>>>(nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<int64_t> device_attributes() {
  int device = -1, sms = -1, warp = -1, major = -1, smem = -1;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&warp, cudaDevAttrWarpSize, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return {device, sms, warp, major, smem};
}

// --- faults the emulator must report ---------------------------------------------------------------------------------

__global__ void fault_kernel(int which, int* out) {
  const int t = threadIdx.x;
  if (which == 0) {  // threads wait at two different barriers
    if (t % 2 == 0) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  } else if (which == 1) {  // warp 0 shuffles, but its lane 5 (and every other warp) waits at a barrier
    if (t == 5) __syncthreads();
    else if (t < 32) out[t] = __shfl_sync(0xffffffffu, t, 0);
    else __syncthreads();
  } else if (which == 2) {  // a lane reads a lane outside the mask
    if (t < 16) out[t] = __shfl_sync(0x0000ffffu, t, 20);
  } else if (which == 3) {  // threads exit before a barrier the others wait at
    if (t >= 16) return;
    __syncthreads();
    out[t] = 1;
  } else if (which == 4) {  // lanes of one mask disagree on the mask
    out[t] = __shfl_sync(t < 8 ? 0xffffffffu : 0xffffff00u, t, 8);
  } else if (which == 5) {
    __trap();
  }
}

void fault(int64_t which, int64_t threads) {
  at::Tensor out = at::zeros({threads}, at::TensorOptions().dtype(at::kInt));
  fault_kernel<<<1, (unsigned)threads, 0, stream()>>>((int)which, out.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Ops without tensor arguments have no backend to dispatch on: they are registered with their schema.
TORCH_LIBRARY(qk_emu_selftest, m) {
  m.def("indices(int gx, int gy, int gz, int bx, int by, int bz) -> Tensor", &indices);
  m.def("shared_rotate(Tensor x) -> Tensor");
  m.def("dynamic_rotate(Tensor x) -> Tensor");
  m.def("own_stack(int blocks, int threads) -> Tensor", &own_stack);
  m.def("shared_leftover(int blocks) -> Tensor", &shared_leftover);
  m.def("sync_reduce(Tensor pred) -> Tensor");
  m.def("syncwarp_exchange(int threads) -> Tensor", &syncwarp_exchange);
  m.def("shuffle(Tensor values, Tensor args, int kind, int width, int mask) -> Tensor");
  m.def("shuffle_wide(Tensor d, Tensor h) -> (Tensor, Tensor)");
  m.def("vote(Tensor values, int mask) -> Tensor");
  m.def("atomics(int blocks, int threads) -> (Tensor, Tensor)", &atomics);
  m.def("intrinsics(Tensor a, Tensor b, Tensor c, Tensor f) -> Tensor");
  m.def("vectors(Tensor bytes, Tensor floats) -> Tensor");
  m.def("vector_layouts() -> int[]", &vector_layouts);
  m.def("half_conversions(Tensor x) -> Tensor[]");
  m.def("contraction(Tensor a, Tensor b, Tensor c) -> (Tensor, Tensor)");
  m.def("grid_stride(Tensor x, int blocks, int threads) -> Tensor");
  m.def("order_trace(int blocks, int threads) -> (Tensor, Tensor)", &order_trace);
  m.def("launch_config(int which) -> int[]", &launch_config);
  m.def("launch_check_raises() -> ()", &launch_check_raises);
  m.def("device_attributes() -> int[]", &device_attributes);
  m.def("fault(int which, int threads) -> ()", &fault);
}

TORCH_LIBRARY_IMPL(qk_emu_selftest, CUDA, m) {
  m.impl("shared_rotate", &shared_rotate);
  m.impl("dynamic_rotate", &dynamic_rotate);
  m.impl("sync_reduce", &sync_reduce);
  m.impl("shuffle", &shuffle);
  m.impl("shuffle_wide", &shuffle_wide);
  m.impl("vote", &vote);
  m.impl("intrinsics", &intrinsics);
  m.impl("vectors", &vectors);
  m.impl("half_conversions", &half_conversions);
  m.impl("contraction", &contraction);
  m.impl("grid_stride", &grid_stride);
}
