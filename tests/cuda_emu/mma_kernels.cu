// Kernels that drive the warp-level pieces of csrc/cuda/mma one at a time (torch.ops.qk_emu_mma.*), for
// tests/cuda_emu/test_mma_*.py: the tests build the inputs from a Python model of the PTX ISA's layout
// tables and check what comes back. `arch` selects the implementation: 0 = Hw (inline PTX on a GPU; the
// twin where __CUDA_ARCH__ is undefined, as here), 1 = Twin. Plain CUDA: built with nvcc on a GPU, the
// same ops compare the instructions with their twins.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "mma/ldmatrix.h"
#include "mma/mma_sync.h"
#include "mma/pipeline.h"
#include "mma/tile_config.h"

namespace {

using namespace qkernels::mma;

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

void check_int32(const at::Tensor& t, std::initializer_list<int64_t> sizes, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt && t.is_contiguous() && t.sizes() == at::IntArrayRef(sizes), name,
              " must be a contiguous int32 tensor of shape ", at::IntArrayRef(sizes), ", got ", t.sizes());
}

// --- mma: one warp, fragments in and out as [..][32 lanes][registers] ---------------------------------

template <class Arch, int MI, int NI>
__global__ void mma_tile_kernel(const int32_t* a, const int32_t* b, const int32_t* c, int32_t* d) {
  const int lane = (int)threadIdx.x;
  FragA fa[MI];
  FragB fb[NI];
  FragC acc[MI][NI];
  for (int i = 0; i < MI; ++i)
    for (int r = 0; r < 4; ++r) fa[i].x[r] = (uint32_t)a[(i * 32 + lane) * 4 + r];
  for (int j = 0; j < NI; ++j)
    for (int r = 0; r < 2; ++r) fb[j].x[r] = (uint32_t)b[(j * 32 + lane) * 2 + r];
  for (int i = 0; i < MI; ++i)
    for (int j = 0; j < NI; ++j)
      for (int e = 0; e < 4; ++e) acc[i][j].x[e] = c[((i * NI + j) * 32 + lane) * 4 + e];
  if (MI == 1 && NI == 1)
    mma_m16n8k32<Arch>(acc[0][0], fa[0], fb[0], acc[0][0]);
  else
    mma_tile<Arch>(acc, fa, fb);
  for (int i = 0; i < MI; ++i)
    for (int j = 0; j < NI; ++j)
      for (int e = 0; e < 4; ++e) d[((i * NI + j) * 32 + lane) * 4 + e] = acc[i][j].x[e];
}

template <class Arch, int MI, int NI>
void launch_mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, at::Tensor& d) {
  mma_tile_kernel<Arch, MI, NI><<<1, 32, 0, stream()>>>(a.data_ptr<int32_t>(), b.data_ptr<int32_t>(),
                                                        c.data_ptr<int32_t>(), d.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// a [MI][32][4], b [NI][32][2], c [MI][NI][32][4] -> d like c. (MI, NI) in {(1, 1), (2, 4), (3, 2)}.
at::Tensor mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, int64_t arch) {
  const int64_t mi = a.size(0), ni = b.size(0);
  check_int32(a, {mi, 32, 4}, "a");
  check_int32(b, {ni, 32, 2}, "b");
  check_int32(c, {mi, ni, 32, 4}, "c");
  at::Tensor d = at::empty_like(c);
  const bool twin = arch == 1;
#define QK_MMA_CASE(M, N)                                                \
  if (mi == M && ni == N) {                                              \
    twin ? launch_mma<Twin, M, N>(a, b, c, d) : launch_mma<Hw, M, N>(a, b, c, d); \
    return d;                                                            \
  }
  QK_MMA_CASE(1, 1)
  QK_MMA_CASE(2, 4)
  QK_MMA_CASE(3, 2)
#undef QK_MMA_CASE
  TORCH_CHECK(false, "mma: (MI, NI) must be (1, 1), (2, 4) or (3, 2), got (", mi, ", ", ni, ")");
}

// --- ldmatrix.x4: shared memory image in, each lane's row offset, registers out ------------------------

template <class Arch>
__global__ void ldmatrix_kernel(const uint8_t* image, int bytes, const int32_t* row_offset, int32_t* out) {
  extern __shared__ __align__(16) unsigned char lds[];
  for (int i = (int)threadIdx.x; i < bytes; i += 32) lds[i] = image[i];
  __syncthreads();
  uint32_t r[4];
  ldmatrix_x4<Arch>(r, lds + row_offset[threadIdx.x]);
  for (int i = 0; i < 4; ++i) out[threadIdx.x * 4 + i] = (int32_t)r[i];
}

at::Tensor ldmatrix(const at::Tensor& image, const at::Tensor& row_offset, int64_t arch) {
  TORCH_CHECK(image.scalar_type() == at::kByte && image.dim() == 1 && image.is_contiguous() && image.numel() <= 4096,
              "ldmatrix: image must be a contiguous uint8 vector of at most 4096 bytes");
  check_int32(row_offset, {32}, "row_offset");
  at::Tensor out = at::empty({32, 4}, row_offset.options());
  const int bytes = (int)image.numel();
  if (arch == 1)
    ldmatrix_kernel<Twin><<<1, 32, bytes, stream()>>>(image.data_ptr<uint8_t>(), bytes, row_offset.data_ptr<int32_t>(),
                                                       out.data_ptr<int32_t>());
  else
    ldmatrix_kernel<Hw><<<1, 32, bytes, stream()>>>(image.data_ptr<uint8_t>(), bytes, row_offset.data_ptr<int32_t>(),
                                                     out.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// --- cp.async: each of `threads` threads issues `groups` groups of one 16-byte copy each ---------------
// Thread t, group q copies source chunk src_chunk[t][q] (or zeros when it is negative) to shared chunk
// q * threads + t. Then: seen_before[t] = what thread t reads at its chunks right after the commits, with no
// wait; wait<kept>; seen_after[t] = what it reads at its chunks then (no barrier: its own copies only).

template <class Arch, int kKept>
__global__ void cp_async_kernel(const uint8_t* src, const int32_t* src_chunk, int groups, uint8_t* seen_before,
                                uint8_t* seen_after) {
  extern __shared__ __align__(16) unsigned char cps[];
  const int t = (int)threadIdx.x, threads = (int)blockDim.x;
  for (int q = 0; q < groups; ++q) {
    const int s = src_chunk[t * groups + q];
    cp_async_16<Arch>(cps + 16 * (q * threads + t), src + 16 * (s < 0 ? 0 : s), s >= 0);
    cp_async_commit<Arch>();
  }
  for (int q = 0; q < groups; ++q)
    for (int b = 0; b < 16; ++b) seen_before[(t * groups + q) * 16 + b] = cps[16 * (q * threads + t) + b];
  cp_async_wait<Arch, kKept>();
  for (int q = 0; q < groups; ++q)
    for (int b = 0; b < 16; ++b) seen_after[(t * groups + q) * 16 + b] = cps[16 * (q * threads + t) + b];
  cp_async_wait<Arch, 0>();
}

std::tuple<at::Tensor, at::Tensor> cp_async(const at::Tensor& src, const at::Tensor& src_chunk, int64_t kept,
                                            int64_t arch) {
  TORCH_CHECK(src.scalar_type() == at::kByte && src.dim() == 1 && src.is_contiguous() && src.numel() % 16 == 0 &&
                  src.numel() > 0, "cp_async: src must be a contiguous uint8 vector of whole 16-byte chunks");
  TORCH_CHECK(src_chunk.scalar_type() == at::kInt && src_chunk.dim() == 2 && src_chunk.is_contiguous() &&
                  src_chunk.size(0) >= 1 && src_chunk.size(0) <= 256 && src_chunk.size(1) >= 1 && src_chunk.size(1) <= 4,
              "cp_async: src_chunk must be int32 [threads <= 256][groups <= 4]");
  TORCH_CHECK(src_chunk.max().item<int>() < src.numel() / 16, "cp_async: src_chunk names a chunk past src");
  TORCH_CHECK(kept >= 0 && kept <= 2, "cp_async: kept must be 0, 1 or 2");
  const int threads = (int)src_chunk.size(0), groups = (int)src_chunk.size(1);
  at::Tensor before = at::empty({threads, groups, 16}, src.options()), after = at::empty_like(before);
  const size_t smem = 16 * (size_t)threads * groups;
  auto args = [&](auto kernel) {
    kernel<<<1, threads, smem, stream()>>>(src.data_ptr<uint8_t>(), src_chunk.data_ptr<int32_t>(), groups,
                                           before.data_ptr<uint8_t>(), after.data_ptr<uint8_t>());
  };
  if (arch == 1) {
    if (kept == 0) args(cp_async_kernel<Twin, 0>);
    if (kept == 1) args(cp_async_kernel<Twin, 1>);
    if (kept == 2) args(cp_async_kernel<Twin, 2>);
  } else {
    if (kept == 0) args(cp_async_kernel<Hw, 0>);
    if (kept == 1) args(cp_async_kernel<Hw, 1>);
    if (kept == 2) args(cp_async_kernel<Hw, 2>);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {before, after};
}

// --- the multistage pipeline: k-tiles of 16 bytes per thread through kStages stages -------------------
// Thread t copies its chunk of k-tile kt (tiles[kt][t]) into the stage; compute reads the chunk of thread
// (t + 1) % threads (so the barrier matters) and adds (kt + 1) * (sum of its bytes + 1000 * stage) to
// sums[t]: the tiles' order and the ring position both show in the result.

template <class Arch, int kStages>
__global__ void pipeline_kernel(const uint8_t* tiles, int k_tiles, int64_t* sums) {
  extern __shared__ __align__(16) unsigned char ring[];
  const int t = (int)threadIdx.x, threads = (int)blockDim.x, next = (t + 1) % threads;
  int loaded = 0, used = 0;
  int64_t sum = 0;
  multistage_loop<kStages, Arch>(
      k_tiles,
      [&](int stage) {
        cp_async_16<Arch>(ring + 16 * (stage * threads + t), tiles + 16 * ((int64_t)loaded * threads + t), true);
        ++loaded;
      },
      [&](int stage) {
        int s = 0;
        for (int b = 0; b < 16; ++b) s += ring[16 * (stage * threads + next) + b];
        ++used;
        sum += (int64_t)used * (s + 1000 * stage);
      });
  sums[t] = sum;
}

at::Tensor pipeline(const at::Tensor& tiles, int64_t stages, int64_t arch) {
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.dim() == 3 && tiles.size(2) == 16 && tiles.is_contiguous() &&
                  tiles.size(1) >= 1 && tiles.size(1) <= 256,
              "pipeline: tiles must be contiguous uint8 [k_tiles][threads <= 256][16]");
  const int k_tiles = (int)tiles.size(0), threads = (int)tiles.size(1);
  at::Tensor sums = at::zeros({threads}, tiles.options().dtype(at::kLong));
  const uint8_t* src = tiles.numel() ? tiles.data_ptr<uint8_t>() : nullptr;
  const size_t smem = 16 * (size_t)threads * stages;
#define QK_PIPE_CASE(S)                                                                                 \
  if (stages == S) {                                                                                   \
    if (arch == 1)                                                                                     \
      pipeline_kernel<Twin, S><<<1, threads, smem, stream()>>>(src, k_tiles, sums.data_ptr<int64_t>()); \
    else                                                                                               \
      pipeline_kernel<Hw, S><<<1, threads, smem, stream()>>>(src, k_tiles, sums.data_ptr<int64_t>());   \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                    \
    return sums;                                                                                       \
  }
  QK_PIPE_CASE(2)
  QK_PIPE_CASE(3)
  QK_PIPE_CASE(4)
#undef QK_PIPE_CASE
  TORCH_CHECK(false, "pipeline: stages must be 2, 3 or 4, got ", stages);
}

// --- the shared-memory swizzle of a k-tile ---------------------------------------------------------------
// Computed by a kernel: SwizzledTile::offset is device code, as the GEMM uses it.

__global__ void swizzle_kernel(const int32_t* rows, int n, int32_t* out) {
  for (int i = (int)threadIdx.x; i < 4 * n; i += (int)blockDim.x) out[i] = SwizzledTile::offset(rows[i / 4], i % 4);
}

// [n][4]: the byte offset of logical chunk c of row rows[i] in a stage.
at::Tensor swizzled_offsets(const at::Tensor& rows) {
  TORCH_CHECK(rows.scalar_type() == at::kInt && rows.dim() == 1 && rows.is_contiguous() && rows.numel() >= 1 &&
                  rows.numel() <= 4096,
              "swizzled_offsets: rows must be a contiguous int32 vector of 1..4096 row indices");
  at::Tensor out = at::empty({rows.numel(), 4}, rows.options());
  swizzle_kernel<<<1, 128, 0, stream()>>>(rows.data_ptr<int32_t>(), (int)rows.numel(), out.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

// The op namespace: qk_emu_mma on the emulator; another (-DQK_MMA_LIB=...) when built with nvcc beside it.
#ifndef QK_MMA_LIB
#define QK_MMA_LIB qk_emu_mma
#endif
#define QK_MMA_DEFINE(ns, m) TORCH_LIBRARY(ns, m)
#define QK_MMA_IMPL(ns, m) TORCH_LIBRARY_IMPL(ns, CUDA, m)

QK_MMA_DEFINE(QK_MMA_LIB, m) {
  m.def("mma(Tensor a, Tensor b, Tensor c, int arch) -> Tensor");
  m.def("ldmatrix(Tensor image, Tensor row_offset, int arch) -> Tensor");
  m.def("cp_async(Tensor src, Tensor src_chunk, int kept, int arch) -> (Tensor, Tensor)");
  m.def("pipeline(Tensor tiles, int stages, int arch) -> Tensor");
  m.def("swizzled_offsets(Tensor rows) -> Tensor");
}

QK_MMA_IMPL(QK_MMA_LIB, m) {
  m.impl("mma", &mma);
  m.impl("ldmatrix", &ldmatrix);
  m.impl("cp_async", &cp_async);
  m.impl("pipeline", &pipeline);
  m.impl("swizzled_offsets", &swizzled_offsets);
}
