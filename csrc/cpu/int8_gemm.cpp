// int8 GEMM for conv2d_int8 / linear_int8 on CPU: C = P * Q^T (+ fused epilogue), with one kernel per
// instruction set, picked at run time (GCC target attributes, no global -march):
//   AMX-INT8      tdpbssd on 16x64 tiles (shorter when K < 64), signed x signed, 32x32 output blocks;
//   AVX512-VNNI   vpdpbusd (u8 x s8) on 6x64 blocks: P is stored as x+128 (xor 0x80) and
//                 128 * sum_k Q[c][k] is subtracted per column (exact modulo 2^32, hence exact);
//   AVX-VNNI      the same on 256-bit registers, 6x16 blocks;
//   AVX2          vpmaddubsw kernels of their own, in int8_gemm_avx2.cpp;
//   portable      plain C++ on the same packed layout.
// Q is packed in the VNNI/AMX "B" layout: blocks of 16 Q rows, each [Kp/4][16][4] bytes (four
// consecutive k of one row form a 32-bit lane), per call or once ahead of the calls (a conv layer's
// weights: int8_pack_q, int8_gemm_packed). P is packed per task in row panels [rows][Kp].
#include "cpu/int8_gemm.h"
#include "cpu/int8_gemm_avx2.h"


#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "cpu/simd.h"

#define QK_TARGET_VNNI512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))
#define QK_TARGET_AVXVNNI __attribute__((target("avx2,fma,avxvnni")))
#define QK_TARGET_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,amx-tile,amx-int8")))

namespace qkernels {
namespace {

// --- instruction set selection --------------------------------------------------------------------

// Linux hands out the AMX tile state only on request, once per process.
bool amx_permitted() {
  static const bool ok = [] {
#if defined(__linux__) && defined(SYS_arch_prctl)
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return ok;
}

Int8Isa best_isa() {
  static const Int8Isa isa = [] {
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx512 && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") && amx_permitted())
      return Int8Isa::kAmx;
    if (avx512 && __builtin_cpu_supports("avx512vnni")) return Int8Isa::kAvx512Vnni;
    if (avx2 && __builtin_cpu_supports("avxvnni")) return Int8Isa::kAvxVnni;
    if (avx2) return Int8Isa::kAvx2;
    return Int8Isa::kPortable;
  }();
  return isa;
}

Int8Isa isa_cap() {
  const char* env = std::getenv("QKERNELS_INT8_ISA");
  if (env == nullptr || *env == 0) return Int8Isa::kAmx;
  for (int i = 0; i <= (int)Int8Isa::kAmx; ++i)
    if (std::strcmp(env, int8_isa_name((Int8Isa)i)) == 0) return (Int8Isa)i;
  TORCH_CHECK(false, "qkernels: QKERNELS_INT8_ISA must be one of portable, avx2, avx_vnni, avx512_vnni, amx; got '",
              env, "'");
}

// --- epilogue rows ---------------------------------------------------------------------------------

template <int KIND>
QK_INLINE void store_value(void* out, int64_t i, int32_t acc, float v) {
  if (KIND == kOutInt32)
    static_cast<int32_t*>(out)[i] = acc;
  else if (KIND == kOutInt8)
    static_cast<int8_t*>(out)[i] = saturate_int8(v);
  else
    static_cast<float*>(out)[i] = v;
}

// out[j * ostride] = epilogue(acc[j]) with channel parameters s[j * pstep], b[j * pstep].
template <int KIND, int ACT>
QK_INLINE void epilogue_row_body(const int32_t* acc, int64_t n, const float* s, const float* b, int64_t pstep,
                                 void* out, int64_t ostride) {
  if (ostride == 1 && pstep == 1) {  // the common, contiguous case: vectorises
    for (int64_t j = 0; j < n; ++j) store_value<KIND>(out, j, acc[j], int8_epilogue_value(acc[j], s[j], b[j], ACT));
  } else {
    for (int64_t j = 0; j < n; ++j)
      store_value<KIND>(out, j * ostride, acc[j], int8_epilogue_value(acc[j], s[j * pstep], b[j * pstep], ACT));
  }
}

template <int KIND>
QK_INLINE void epilogue_row_kind(const int32_t* acc, int64_t n, const float* s, const float* b, int64_t pstep, int act,
                                 void* out, int64_t ostride) {
  switch (act) {
    case kActRelu: return epilogue_row_body<KIND, kActRelu>(acc, n, s, b, pstep, out, ostride);
    case kActRelu6: return epilogue_row_body<KIND, kActRelu6>(acc, n, s, b, pstep, out, ostride);
    default: return epilogue_row_body<KIND, kActNone>(acc, n, s, b, pstep, out, ostride);
  }
}

QK_INLINE void epilogue_row_any(const int32_t* acc, int64_t n, const float* s, const float* b, int64_t pstep, int act,
                                int kind, void* out, int64_t ostride) {
  switch (kind) {
    case kOutInt32: return epilogue_row_kind<kOutInt32>(acc, n, s, b, pstep, kActNone, out, ostride);
    case kOutInt8: return epilogue_row_kind<kOutInt8>(acc, n, s, b, pstep, act, out, ostride);
    default: return epilogue_row_kind<kOutFloat>(acc, n, s, b, pstep, act, out, ostride);
  }
}

template <int KIND, int ACT>
QK_TARGET_AVX512 QK_INLINE void epilogue_contiguous_avx512(const int32_t* acc, int64_t n, const float* s, const float* b,
                                                          void* out) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
    epilogue16_avx512<KIND, ACT>(_mm512_maskz_loadu_epi32(m, acc + j), s + j, b + j, m, out, j);
  }
}

template <int KIND>
QK_TARGET_AVX512 QK_INLINE void epilogue_contiguous_kind(const int32_t* acc, int64_t n, const float* s, const float* b,
                                                        int act, void* out) {
  switch (act) {
    case kActRelu: return epilogue_contiguous_avx512<KIND, kActRelu>(acc, n, s, b, out);
    case kActRelu6: return epilogue_contiguous_avx512<KIND, kActRelu6>(acc, n, s, b, out);
    default: return epilogue_contiguous_avx512<KIND, kActNone>(acc, n, s, b, out);
  }
}

QK_TARGET_AVX512 void epilogue_row_avx512(const int32_t* acc, int64_t n, const float* s, const float* b, int64_t pstep,
                                          int act, int kind, void* out, int64_t ostride) {
  if (ostride == 1 && pstep == 1) {
    switch (kind) {
      case kOutInt32: return epilogue_contiguous_kind<kOutInt32>(acc, n, s, b, act, out);
      case kOutInt8: return epilogue_contiguous_kind<kOutInt8>(acc, n, s, b, act, out);
      default: return epilogue_contiguous_kind<kOutFloat>(acc, n, s, b, act, out);
    }
  }
  epilogue_row_any(acc, n, s, b, pstep, act, kind, out, ostride);
}
QK_TARGET_AVX2 void epilogue_row_avx2(const int32_t* acc, int64_t n, const float* s, const float* b, int64_t pstep,
                                      int act, int kind, void* out, int64_t ostride) {
  epilogue_row_any(acc, n, s, b, pstep, act, kind, out, ostride);
}
void epilogue_row_base(const int32_t* acc, int64_t n, const float* s, const float* b, int64_t pstep, int act, int kind,
                       void* out, int64_t ostride) {
  epilogue_row_any(acc, n, s, b, pstep, act, kind, out, ostride);
}

// x + 128 as uint8, in place: the u8 operand of vpdpbusd.
QK_TARGET_AVX512 void flip_sign_bits_avx512(int8_t* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = (int8_t)((uint8_t)p[i] ^ 0x80u);
}
QK_TARGET_AVX2 void flip_sign_bits_avx2(int8_t* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = (int8_t)((uint8_t)p[i] ^ 0x80u);
}
void flip_sign_bits(int8_t* p, int64_t n) {
  if (cpu_isa() == Isa::kAvx512) return flip_sign_bits_avx512(p, n);
  if (cpu_isa() == Isa::kAvx2) return flip_sign_bits_avx2(p, n);
  for (int64_t i = 0; i < n; ++i) p[i] = (int8_t)((uint8_t)p[i] ^ 0x80u);
}

// --- packing ---------------------------------------------------------------------------------------

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

constexpr int64_t kBlock = 16;  // Q rows per packed block (one 512-bit register of int32 lanes)

// Memory for packed Q, kept by each calling thread between products: a fresh megabyte per call (the
// weights of a 1024->1024 1x1 conv) costs hundreds of page faults, a sizeable part of the product.
// Products above kMaxKeptBytes get their own tensor, so one huge product does not pin its memory.
constexpr int64_t kMaxKeptBytes = 8 << 20;

int8_t* packing_memory(int64_t bytes, at::Tensor& own) {
  if (bytes > kMaxKeptBytes) {
    own = at::empty({bytes}, at::TensorOptions().dtype(at::kChar));
    return own.data_ptr<int8_t>();
  }
  thread_local std::vector<int8_t> kept;
  if ((int64_t)kept.size() < bytes + 64) kept.resize(bytes + 64);
  return kept.data() + (64 - reinterpret_cast<uintptr_t>(kept.data()) % 64) % 64;  // tile loads like alignment
}

struct PackedQ {
  at::Tensor storage;  // set when the product has its own memory (see packing_memory)
  const int8_t* data = nullptr;
  const int32_t* corr = nullptr;  // 128 * sum_k Q[c][k], padded to whole blocks
  int64_t rows = 0, blocks = 0, Kp = 0;
  int64_t block_bytes() const { return Kp * kBlock; }
};

int64_t packed_kp(Int8Isa isa, int64_t K) {
  return round_up(std::max<int64_t>(K, 1), isa == Int8Isa::kAmx && K >= 64 ? 64 : 4);
}

// The u8 x s8 kernels need the corrections; AMX and portable multiply signed x signed.
bool biased_isa(Int8Isa isa) { return isa == Int8Isa::kAvx512Vnni || isa == Int8Isa::kAvxVnni; }

// Bytes of the packed blocks (padded to 64) and of the corrections after them.
int64_t packed_data_bytes(int64_t rows, int64_t Kp) { return round_up((rows + kBlock - 1) / kBlock * Kp * kBlock, 64); }
int64_t packed_corr_bytes(int64_t rows) { return (rows + kBlock - 1) / kBlock * kBlock * 4; }

// Packs Q into data ([blocks][Kp/4][16][4]) and, with_corr, the corrections into corr (else zeros).
void pack_q_into(Int8RowSource Q, int64_t rows, int64_t K, int64_t Kp, bool with_corr, int8_t* data, int32_t* corr) {
  const int64_t blocks = (rows + kBlock - 1) / kBlock, block_bytes = Kp * kBlock;
  // Up to a megabyte (every MobileNet-SSD weight matrix) is packed by the calling thread: a parallel
  // region of its own costs a second fork/join per product, and on a loaded machine each join can
  // wait a whole scheduler slice for a descheduled thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(block_bytes, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<int8_t> tmp(kBlock * std::max<int64_t>(Kp, 1));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kBlock, n = std::min(kBlock, rows - r0);
      std::fill(tmp.begin(), tmp.end(), 0);
      Q(r0, n, tmp.data(), Kp);
      for (int64_t i = 0; i < kBlock; ++i) {
        int32_t sum = 0;
        if (with_corr)
          for (int64_t k = 0; k < K; ++k) sum += tmp[i * Kp + k];
        corr[r0 + i] = 128 * sum;
      }
      // [16 rows][Kp/4] dwords -> [Kp/4][16 rows]
      int8_t* dst = data + blk * block_bytes;
      const int64_t kp4 = Kp / 4;
      for (int64_t i = 0; i < kBlock; ++i)
        for (int64_t k4 = 0; k4 < kp4; ++k4) {
          int32_t v;
          std::memcpy(&v, tmp.data() + (i * kp4 + k4) * 4, 4);
          std::memcpy(dst + (k4 * kBlock + i) * 4, &v, 4);
        }
    }
  });
}

PackedQ packed_view(const int8_t* data, const int32_t* corr, int64_t rows, int64_t Kp) {
  PackedQ q;
  q.rows = rows;
  q.blocks = (rows + kBlock - 1) / kBlock;
  q.Kp = Kp;
  q.data = data;
  q.corr = corr;
  return q;
}

// Q packed for this call, in memory kept by the calling thread (see packing_memory).
PackedQ pack_q(Int8Isa isa, Int8RowSource Q, int64_t rows, int64_t K) {
  const int64_t Kp = packed_kp(isa, K), data_bytes = packed_data_bytes(rows, Kp);
  at::Tensor storage;
  int8_t* data = packing_memory(data_bytes + packed_corr_bytes(rows), storage);
  int32_t* corr = reinterpret_cast<int32_t*>(data + data_bytes);
  pack_q_into(Q, rows, K, Kp, biased_isa(isa), data, corr);
  PackedQ q = packed_view(data, corr, rows, Kp);
  q.storage = std::move(storage);
  return q;
}

// Everything a panel kernel needs: the packed P rows [rows_pad][Kp] and the Q blocks [blk0, blk1).
struct PanelJob {
  const int8_t* A;  // P panel (uint8 view when the ISA wants x+128), rows lda bytes apart
  int64_t lda;
  int64_t rows, rows_pad, Kp;
  int64_t r_base;  // product row of the panel's first row
  const PackedQ* q;
  int64_t blk0, blk1;
  const Int8Epilogue* ep;

  void finish(int64_t r, int64_t mr, int64_t blk, int64_t nv, const int32_t* C, int64_t ldc) const {
    const int64_t nr = std::min(mr, rows - r);
    const int64_t c0 = blk * kBlock, nc = std::min(nv * kBlock, q->rows - c0);
    if (nr > 0 && nc > 0) ep->apply(r_base + r, nr, c0, nc, C, ldc);
  }
};

// --- AVX512-VNNI: 6 rows x up to 64 columns ---------------------------------------------------------

template <int NV>
QK_TARGET_VNNI512 QK_INLINE void ukr_vnni512(const int8_t* A, int64_t lda, const int8_t* B, int64_t bstride,
                                             int64_t kp4, const int32_t* corr, int32_t* C, int64_t ldc) {
  constexpr int MR = 6;
  __m512i acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_si512();
  for (int64_t k4 = 0; k4 < kp4; ++k4) {
    __m512i b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(B + v * bstride + k4 * 64);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      int32_t a4;
      std::memcpy(&a4, A + m * lda + k4 * 4, 4);
      const __m512i a = _mm512_set1_epi32(a4);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbusd_epi32(acc[m][v], a, b[v]);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const __m512i c = _mm512_loadu_si512(corr + v * 16);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) _mm512_storeu_si512(C + m * ldc + v * 16, _mm512_sub_epi32(acc[m][v], c));
  }
}

QK_TARGET_VNNI512 void panel_vnni512(const PanelJob& job) {
  alignas(64) int32_t C[6 * 64];
  const int64_t bs = job.q->block_bytes(), kp4 = job.Kp / 4;
  for (int64_t blk = job.blk0; blk < job.blk1; blk += 4) {
    const int64_t nv = std::min<int64_t>(4, job.blk1 - blk);
    const int8_t* B = job.q->data + blk * bs;
    const int32_t* corr = job.q->corr + blk * kBlock;
    for (int64_t r = 0; r < job.rows; r += 6) {
      const int8_t* A = job.A + r * job.lda;
      switch (nv) {
        case 4: ukr_vnni512<4>(A, job.lda, B, bs, kp4, corr, C, 64); break;
        case 3: ukr_vnni512<3>(A, job.lda, B, bs, kp4, corr, C, 64); break;
        case 2: ukr_vnni512<2>(A, job.lda, B, bs, kp4, corr, C, 64); break;
        default: ukr_vnni512<1>(A, job.lda, B, bs, kp4, corr, C, 64); break;
      }
      job.finish(r, 6, blk, nv, C, 64);
    }
  }
}

// --- AVX-VNNI: 6 rows x 16 columns ------------------------------------------------------------------

QK_TARGET_AVXVNNI void panel_avxvnni(const PanelJob& job) {
  constexpr int MR = 6;
  alignas(64) int32_t C[MR * 16];
  const int64_t bs = job.q->block_bytes(), kp4 = job.Kp / 4;
  for (int64_t blk = job.blk0; blk < job.blk1; ++blk) {
    const int8_t* B = job.q->data + blk * bs;
    const int32_t* corr = job.q->corr + blk * kBlock;
    for (int64_t r = 0; r < job.rows; r += MR) {
      const int8_t* A = job.A + r * job.lda;
      __m256i acc[MR][2];
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
      for (int64_t k4 = 0; k4 < kp4; ++k4) {
        const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + k4 * 64));
        const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + k4 * 64 + 32));
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
          int32_t a4;
          std::memcpy(&a4, A + m * job.lda + k4 * 4, 4);
          const __m256i a = _mm256_set1_epi32(a4);
          acc[m][0] = _mm256_dpbusd_avx_epi32(acc[m][0], a, b0);
          acc[m][1] = _mm256_dpbusd_avx_epi32(acc[m][1], a, b1);
        }
      }
      const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr));
      const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + 8));
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(C + m * 16), _mm256_sub_epi32(acc[m][0], c0));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(C + m * 16 + 8), _mm256_sub_epi32(acc[m][1], c1));
      }
      job.finish(r, MR, blk, 1, C, 16);
    }
  }
}

// --- portable ---------------------------------------------------------------------------------------

void panel_portable(const PanelJob& job) {
  int32_t C[16];
  const int64_t bs = job.q->block_bytes(), kp4 = job.Kp / 4;
  for (int64_t blk = job.blk0; blk < job.blk1; ++blk) {
    const int8_t* B = job.q->data + blk * bs;
    for (int64_t r = 0; r < job.rows; ++r) {
      const int8_t* A = job.A + r * job.lda;
      for (int c = 0; c < 16; ++c) C[c] = 0;
      for (int64_t k4 = 0; k4 < kp4; ++k4)
        for (int c = 0; c < 16; ++c)
          for (int t = 0; t < 4; ++t) C[c] += (int32_t)A[k4 * 4 + t] * (int32_t)B[k4 * 64 + c * 4 + t];
      job.finish(r, 1, blk, 1, C, 16);
    }
  }
}

// --- AMX-INT8: 32 rows x 32 columns per block, tiles 0-3 accumulate, 4-5 hold P, 6-7 hold Q -------

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles for products `depth` dwords deep per step (16, or Kp/4 when K < 64): accumulators 16x64 bytes,
// P tiles 16 rows x 4*depth bytes, Q tiles depth rows x 64 bytes. So a short K (a 1x1 conv over 32
// channels, the 27-deep stem) is not padded to 64. Constant objects: GCC's ldtilecfg builtin does not
// tell the optimiser that it reads its operand, so the stores filling a local one can be dropped.
constexpr TileConfig make_tile_config(int depth) {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = t >= 6 ? depth : 16;
    cfg.colsb[t] = t == 4 || t == 5 ? 4 * depth : 64;
  }
  return cfg;
}
template <size_t... D>
constexpr std::array<TileConfig, sizeof...(D)> make_tile_configs(std::index_sequence<D...>) {
  return {make_tile_config((int)D)...};
}
constexpr auto kTileConfigs = make_tile_configs(std::make_index_sequence<17>());  // [depth], 1..16 used

// Loading a configuration is slow, so each thread does it once per product rather than per panel.
QK_TARGET_AMX void amx_begin(int64_t Kp) { _tile_loadconfig(&kTileConfigs[std::min<int64_t>(Kp, 64) / 4]); }
QK_TARGET_AMX void amx_end() { _tile_release(); }

// 32 rows x 32 columns (Q blocks blk, blk + 1 if `two`) into C (row stride ldc).
QK_TARGET_AMX QK_INLINE void block_amx(const int8_t* A, int64_t lda, const int8_t* B0, const int8_t* B1, bool two,
                                       int64_t kb_count, int32_t* C, int64_t ldc) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kb = 0; kb < kb_count; ++kb) {
    _tile_loadd(4, A + kb * 64, lda);
    _tile_loadd(5, A + 16 * lda + kb * 64, lda);
    _tile_loadd(6, B0 + kb * 1024, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(2, 5, 6);
    if (two) {
      _tile_loadd(7, B1 + kb * 1024, 64);
      _tile_dpbssd(1, 4, 7);
      _tile_dpbssd(3, 5, 7);
    }
  }
  _tile_stored(0, C, ldc * 4);
  _tile_stored(2, C + 16 * ldc, ldc * 4);
  if (two) {
    _tile_stored(1, C + 16, ldc * 4);
    _tile_stored(3, C + 16 * ldc + 16, ldc * 4);
  }
}

// Steps of 32 rows x 64 columns (two 32x32 blocks): the epilogue then writes whole 64-byte output
// lines of int8 at once, which the write-allocate and prefetching handle better than half lines.
QK_TARGET_AMX void panel_amx(const PanelJob& job) {
  alignas(64) int32_t C[32 * 64];
  const int64_t bs = job.q->block_bytes(), kb_count = (job.Kp + 63) / 64, lda = job.lda;
  for (int64_t blk = job.blk0; blk < job.blk1; blk += 4) {
    const int64_t nblk = std::min<int64_t>(4, job.blk1 - blk);
    const int8_t* B = job.q->data + blk * bs;
    for (int64_t r = 0; r < job.rows; r += 32) {
      const int8_t* A = job.A + r * lda;
      block_amx(A, lda, B, B + bs, nblk >= 2, kb_count, C, 64);
      if (nblk > 2) block_amx(A, lda, B + 2 * bs, B + 3 * bs, nblk == 4, kb_count, C + 32, 64);
      job.finish(r, 32, blk, nblk, C, 64);
    }
  }
}

// --- epilogue of a product tile whose columns are channels -----------------------------------------

// Scale and bias of a tile's nc <= 64 contiguous channels from c0, in registers (zero past nc), with the lane
// masks of its 16-channel vectors; returns how many vectors there are.
QK_TARGET_AVX512 QK_INLINE int load_tile_params(const Int8Epilogue& ep, int64_t c0, int64_t nc, __m512 s[4], __m512 b[4],
                                                __mmask16 m[4]) {
  const int nvec = (int)((nc + 15) / 16);
  for (int v = 0; v < nvec; ++v) {
    const int64_t left = nc - 16 * v;
    m[v] = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
    s[v] = _mm512_maskz_loadu_ps(m[v], ep.scale + ep.channel_offset + c0 + 16 * v);
    b[v] = _mm512_maskz_loadu_ps(m[v], ep.bias + ep.channel_offset + c0 + 16 * v);
  }
  return nvec;
}

// Rows are output pixels, columns (at most 64) contiguous channels: scale and bias are loaded into
// registers once for the whole tile instead of once per row.
template <int KIND, int ACT>
QK_TARGET_AVX512 void tile_epilogue_avx512(const Int8Epilogue& ep, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                                           const int32_t* C, int64_t ldc) {
  const int64_t esize = KIND == kOutInt8 ? 1 : 4;
  __m512 s[4], b[4];
  __mmask16 m[4];
  const int nvec = load_tile_params(ep, c0, nc, s, b, m);
  const __mmask64 m64 = nc >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << nc) - 1);
  for (int64_t i = 0; i < nr; ++i) {
    char* o = static_cast<char*>(ep.out) + ((r0 + i) * ep.row_stride + c0 + ep.offset) * esize;
    const int32_t* c = C + i * ldc;
    // The panel loops' next tile writes the same columns nr rows further on. Output lines are not in
    // cache yet (a fresh tensor); prefetching them for write hides the read-for-ownership that would
    // otherwise stall these stores. (A prefetch past the end of the tensor is harmless.)
    _mm_prefetch(o + nr * ep.row_stride * esize, _MM_HINT_ET0);
    if (KIND == kOutInt8) {
      __m512i acc[4];
      for (int v = 0; v < nvec; ++v) acc[v] = _mm512_maskz_loadu_epi32(m[v], c + 16 * v);
      epilogue64_int8_avx512<ACT>(acc, s, b, nvec, m64, reinterpret_cast<int8_t*>(o));
      continue;
    }
    for (int v = 0; v < nvec; ++v)
      epilogue16_avx512_sb<KIND, ACT>(_mm512_maskz_loadu_epi32(m[v], c + 16 * v), s[v], b[v], m[v], o, 16 * v);
  }
}

// kOutNone: the bits of max finite |y| over a tile's values (rows pixels, at most 64 contiguous channels),
// straight from the accumulators, nothing stored.
template <int ACT>
QK_TARGET_AVX512 uint32_t tile_abs_max_avx512(const Int8Epilogue& ep, int64_t nr, int64_t c0, int64_t nc,
                                              const int32_t* C, int64_t ldc) {
  __m512 s[4], b[4];
  __mmask16 m[4];
  const int nvec = load_tile_params(ep, c0, nc, s, b, m);
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  __m512i mx = _mm512_setzero_si512();
  for (int64_t i = 0; i < nr; ++i)
    for (int v = 0; v < nvec; ++v) {  // lanes past nc: zero accumulator and parameters, so y = 0
      const __m512 y = epilogue_value16<ACT>(_mm512_maskz_loadu_epi32(m[v], C + i * ldc + 16 * v), s[v], b[v]);
      const __m512i a = _mm512_and_si512(_mm512_castps_si512(y), magnitude);
      mx = _mm512_mask_max_epu32(mx, _mm512_cmplt_epu32_mask(a, inf), mx, a);  // Inf and NaN left out
    }
  // the lanes reduced from memory: GCC 12's _mm512_reduce_max_epu32 (and its 512 -> 256 casts) warn about
  // an uninitialised temporary of their own; 16 scalar maxima per tile cost nothing next to the tile
  alignas(64) uint32_t lanes[16];
  _mm512_store_si512(lanes, mx);
  return *std::max_element(lanes, lanes + 16);
}

uint32_t tile_abs_max(const Int8Epilogue& ep, int64_t nr, int64_t c0, int64_t nc, const int32_t* C, int64_t ldc) {
  switch (ep.act) {
    case kActRelu: return tile_abs_max_avx512<kActRelu>(ep, nr, c0, nc, C, ldc);
    case kActRelu6: return tile_abs_max_avx512<kActRelu6>(ep, nr, c0, nc, C, ldc);
    default: return tile_abs_max_avx512<kActNone>(ep, nr, c0, nc, C, ldc);
  }
}

template <int KIND>
void tile_epilogue_kind(const Int8Epilogue& ep, int64_t r0, int64_t nr, int64_t c0, int64_t nc, const int32_t* C,
                        int64_t ldc) {
  switch (ep.act) {
    case kActRelu: return tile_epilogue_avx512<KIND, kActRelu>(ep, r0, nr, c0, nc, C, ldc);
    case kActRelu6: return tile_epilogue_avx512<KIND, kActRelu6>(ep, r0, nr, c0, nc, C, ldc);
    default: return tile_epilogue_avx512<KIND, kActNone>(ep, r0, nr, c0, nc, C, ldc);
  }
}

void tile_epilogue(const Int8Epilogue& ep, int64_t r0, int64_t nr, int64_t c0, int64_t nc, const int32_t* C,
                   int64_t ldc) {
  switch (ep.out_kind) {
    case kOutInt32: return tile_epilogue_kind<kOutInt32>(ep, r0, nr, c0, nc, C, ldc);
    case kOutInt8: return tile_epilogue_kind<kOutInt8>(ep, r0, nr, c0, nc, C, ldc);
    default: return tile_epilogue_kind<kOutFloat>(ep, r0, nr, c0, nc, C, ldc);
  }
}

}  // namespace

// --- public ------------------------------------------------------------------------------------------

const char* int8_isa_name(Int8Isa isa) {
  switch (isa) {
    case Int8Isa::kAmx: return "amx";
    case Int8Isa::kAvx512Vnni: return "avx512_vnni";
    case Int8Isa::kAvxVnni: return "avx_vnni";
    case Int8Isa::kAvx2: return "avx2";
    default: return "portable";
  }
}

Int8Isa int8_isa() { return std::min(best_isa(), isa_cap()); }

Int8Isa int8_best_isa() { return best_isa(); }

Isa int8_vector_isa(Int8Isa isa) {
  if (isa >= Int8Isa::kAvx512Vnni) return Isa::kAvx512;
  if (isa >= Int8Isa::kAvx2) return Isa::kAvx2;
  return Isa::kBase;
}

void int8_epilogue_row(Isa vec, const int32_t* acc, int64_t n, const float* s, const float* b, int64_t pstep, int act,
                       int kind, void* out, int64_t ostride) {
  switch (vec) {
    case Isa::kAvx512: return epilogue_row_avx512(acc, n, s, b, pstep, act, kind, out, ostride);
    case Isa::kAvx2: return epilogue_row_avx2(acc, n, s, b, pstep, act, kind, out, ostride);
    default: return epilogue_row_base(acc, n, s, b, pstep, act, kind, out, ostride);
  }
}

void Int8Epilogue::apply(int64_t r0, int64_t nr, int64_t c0, int64_t nc, const int32_t* C, int64_t ldc) const {
  if (out_kind == kOutNone) return merge_values_abs_max(r0, nr, c0, nc, C, ldc);
  write(r0, nr, c0, nc, C, ldc);
  if (abs_max == nullptr || out_kind != kOutFloat) return;
  // the tile just written, read back from L1 (the paths without a register form of the abs max)
  uint32_t m = 0;
  for (int64_t i = 0; i < nr; ++i)
    m = std::max(m, finite_abs_max_bits(static_cast<const float*>(out) + (r0 + i) * row_stride + c0 * col_stride + offset,
                                        nc, col_stride));
  abs_max->merge(m);
}

void Int8Epilogue::merge_values_abs_max(int64_t r0, int64_t nr, int64_t c0, int64_t nc, const int32_t* C,
                                        int64_t ldc) const {
  TORCH_CHECK(abs_max != nullptr, "qkernels: an int8 product with no output must gather an abs max");
  if (vec == Isa::kAvx512 && !channel_on_rows && nc <= 64) return abs_max->merge(tile_abs_max(*this, nr, c0, nc, C, ldc));
  // else the float values of a row, up to 64 at a time, in a buffer that stays in L1
  alignas(64) float values[64];
  uint32_t m = 0;
  for (int64_t i = 0; i < nr; ++i)
    for (int64_t j = 0; j < nc; j += 64) {
      const int64_t n = std::min<int64_t>(64, nc - j);
      const int64_t ch = channel_offset + (channel_on_rows ? r0 + i : c0 + j);
      int8_epilogue_row(vec, C + i * ldc + j, n, scale + ch, bias + ch, channel_on_rows ? 0 : 1, act, kOutFloat, values,
                        1);
      m = std::max(m, finite_abs_max_bits(values, n));
    }
  abs_max->merge(m);
}

void Int8Epilogue::write(int64_t r0, int64_t nr, int64_t c0, int64_t nc, const int32_t* C, int64_t ldc) const {
  if (vec == Isa::kAvx512 && !channel_on_rows && col_stride == 1 && nc <= 64)
    return tile_epilogue(*this, r0, nr, c0, nc, C, ldc);
  const int64_t esize = out_kind == kOutInt8 ? 1 : 4;
  if (channel_on_rows && row_stride == 1 && nr <= 64 && nc <= 64) {
    // Transposed product (rows are channels): transpose the tile so each output pixel gets one
    // contiguous, vectorised epilogue over its channels.
    int32_t T[64 * 64];
    for (int64_t i = 0; i < nr; ++i)
      for (int64_t j = 0; j < nc; ++j) T[j * nr + i] = C[i * ldc + j];
    for (int64_t j = 0; j < nc; ++j) {
      char* o = static_cast<char*>(out) + ((c0 + j) * col_stride + r0 + offset) * esize;
      int8_epilogue_row(vec, T + j * nr, nr, scale + channel_offset + r0, bias + channel_offset + r0, 1, act, out_kind,
                        o, 1);
    }
    return;
  }
  for (int64_t i = 0; i < nr; ++i) {
    const int64_t r = r0 + i;
    char* o = static_cast<char*>(out) + (r * row_stride + c0 * col_stride + offset) * esize;
    const float *s, *b;
    int64_t pstep;
    if (channel_on_rows) {
      s = scale + channel_offset + r;
      b = bias + channel_offset + r;
      pstep = 0;
    } else {
      s = scale + channel_offset + c0;
      b = bias + channel_offset + c0;
      pstep = 1;
    }
    int8_epilogue_row(vec, C + i * ldc, nc, s, b, pstep, act, out_kind, o, col_stride);
  }
}

namespace {

// Row steps of the panel kernels: a panel's rows are a whole number of them.
int64_t row_step(Int8Isa isa) {
  switch (isa) {
    case Int8Isa::kAmx: return 32;
    case Int8Isa::kAvx512Vnni:
    case Int8Isa::kAvxVnni: return 6;
    default: return 1;
  }
}

// C = P * Q^T through the epilogue, Q packed (per call or ahead of it).
void gemm_on_packed_q(Int8Isa isa, int64_t p_rows, int64_t K, Int8RowSource P, const PackedQ& q,
                      const Int8Epilogue& epilogue, Int8RowsInMemory p_in_memory) {
  Int8Epilogue ep = epilogue;
  ep.vec = int8_vector_isa(isa);
  const int64_t Kp = q.Kp;
  const bool biased = biased_isa(isa);
  // Panels of equal size (at most kMaxPanelRows, a whole number of row steps), so that threads get equal
  // work: 100 rows as 96 + 4 left one thread with nearly all of a batch-1 10x10 map.
  constexpr int64_t kMaxPanelRows = 96;  // a multiple of every kernel's row step
  const int64_t panels = (p_rows + kMaxPanelRows - 1) / kMaxPanelRows;
  const int64_t panel_rows = round_up((p_rows + panels - 1) / panels, row_step(isa));
  // Split the columns too when there are few panels, so both cores get work on small maps.
  const int64_t threads = at::get_num_threads();
  int64_t blocks_per_task = q.blocks;
  while (blocks_per_task > 4 && panels * ((q.blocks + blocks_per_task - 1) / blocks_per_task) < 4 * threads)
    blocks_per_task = (blocks_per_task + 1) / 2;
  if (blocks_per_task % 2 && blocks_per_task < q.blocks) ++blocks_per_task;  // AMX and VNNI steps pair blocks
  const int64_t col_tasks = (q.blocks + blocks_per_task - 1) / blocks_per_task;
  // AMX reads whole panels of rows in place when they need no padding (K a multiple of 64, a full
  // panel): the copy would cost as much as the product for a 1x1 conv over few channels.
  const bool in_place = isa == Int8Isa::kAmx && p_in_memory.data != nullptr && K == Kp;

  // A fixed contiguous share per thread, not tasks from a queue (task_queue.h): each thread then streams
  // through one half of the pixels and the output, which the memory-bound 1x1 convs over few channels
  // need (batch-8 pw 32->64 @150 on AMX: 1.01-1.08 ms this way, 1.37-1.55 ms from a queue).
  // Few panels (a batch-1 map of 10x10 or less): each thread takes a share of the columns across all panels
  // rather than whole panels, so that it streams only its share of Q (half a megabyte of a 1024->1024
  // layer's weights instead of all of it): 104-105 us -> 78-90 us for that layer in a process that had run
  // the float model first (in a fresh one both orders take ~70 us).
  const bool by_columns = panels < 2 * threads;
  at::parallel_for(0, panels * col_tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int8_t> panel_mem(panel_rows * Kp + 64);
    int8_t* panel = panel_mem.data();
    int64_t packed_panel = -1;
    if (isa == Int8Isa::kAmx) amx_begin(Kp);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t pi = by_columns ? t % panels : t / col_tasks, ci = by_columns ? t / panels : t % col_tasks;
      const int64_t r0 = pi * panel_rows, rows = std::min(panel_rows, p_rows - r0);
      if (rows <= 0) continue;
      const int8_t* A = panel;
      int64_t lda = Kp;
      if (in_place && rows == panel_rows) {
        A = p_in_memory.data + r0 * p_in_memory.ld;
        lda = p_in_memory.ld;
      } else if (pi != packed_panel) {
        std::memset(panel, 0, panel_rows * Kp);
        P(r0, rows, panel, Kp);
        if (biased) flip_sign_bits(panel, rows * Kp);
        packed_panel = pi;
      }
      PanelJob job{A, lda, rows, panel_rows, Kp, r0, &q, ci * blocks_per_task,
                   std::min(q.blocks, (ci + 1) * blocks_per_task), &ep};
      switch (isa) {
        case Int8Isa::kAmx: panel_amx(job); break;
        case Int8Isa::kAvx512Vnni: panel_vnni512(job); break;
        case Int8Isa::kAvxVnni: panel_avxvnni(job); break;
        default: panel_portable(job); break;
      }
    }
    if (isa == Int8Isa::kAmx) amx_end();
  });
}

}  // namespace

void int8_gemm(Int8Isa isa, int64_t p_rows, int64_t q_rows, int64_t K, Int8RowSource P, Int8RowSource Q,
               const Int8Epilogue& epilogue, Int8RowsInMemory p_in_memory) {
  if (p_rows == 0 || q_rows == 0) return;
  if (isa == Int8Isa::kAvx2) return int8_gemm_avx2(p_rows, q_rows, K, P, Q, epilogue, p_in_memory);
  gemm_on_packed_q(isa, p_rows, K, P, pack_q(isa, Q, q_rows, K), epilogue, p_in_memory);
}

int64_t int8_packed_q_bytes(Int8Isa isa, int64_t rows, int64_t K) {
  return packed_data_bytes(rows, packed_kp(isa, K)) + packed_corr_bytes(rows);
}

int64_t int8_packed_q_kp(Int8Isa isa, int64_t K) { return packed_kp(isa, K); }

void int8_pack_q(Int8Isa isa, Int8RowSource Q, int64_t rows, int64_t K, int8_t* dst) {
  TORCH_CHECK(isa != Int8Isa::kAvx2, "qkernels: int8_pack_q: AVX2 packs with avx2_pack_q");
  const int64_t Kp = packed_kp(isa, K);
  pack_q_into(Q, rows, K, Kp, biased_isa(isa), dst, reinterpret_cast<int32_t*>(dst + packed_data_bytes(rows, Kp)));
}

void int8_gemm_packed(Int8Isa isa, int64_t p_rows, int64_t K, Int8RowSource P, const Int8PackedQ& q,
                      const Int8Epilogue& epilogue, Int8RowsInMemory p_in_memory) {
  if (p_rows == 0 || q.rows == 0) return;
  TORCH_CHECK(isa != Int8Isa::kAvx2 && q.Kp == packed_kp(isa, K), "qkernels: packed weights do not fit K = ", K,
              " on ", int8_isa_name(isa));
  const int64_t data_bytes = packed_data_bytes(q.rows, q.Kp);
  const PackedQ view = packed_view(q.data, reinterpret_cast<const int32_t*>(q.data + data_bytes), q.rows, q.Kp);
  gemm_on_packed_q(isa, p_rows, K, P, view, epilogue, p_in_memory);
}

}  // namespace qkernels
