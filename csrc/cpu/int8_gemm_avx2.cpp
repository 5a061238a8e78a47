// int8 GEMM for processors with AVX2 but no VNNI (e.g. AMD Zen 2/3): C = P * Q^T + fused epilogue.
//
// The fast product is vpmaddubsw (uint8 x int8 -> int16 pair sums) then vpmaddwd by ones (-> int32):
// on Zen 3 it runs on other pipes than a lone vpmaddwd, twice the int8 products per cycle of widening
// both operands to int16. vpmaddubsw saturates its pair sums, so it is used only where they cannot
// overflow, which keeps every product exact:
//   P rows all >= 0 (activations after ReLU: every MobileNet-SSD layer but the stem): x as uint8 in
//     [0, 127] times any int8 w, pair sums <= 2 * 127 * 128 < 2^15; 6 rows x 16 columns per step;
//   some P < 0, no Q == -128: |x| (<= 128) times sign(x) * w (vpsignb, |w| <= 127), pair sums
//     <= 2 * 128 * 127 < 2^15; 4 rows x 16 columns (the sign products need registers);
//   otherwise both widened to int16 and vpmaddwd (exact for everything), 6 x 16.
// Q (the weights) is packed in blocks of 16 rows, [Kp/4][16][4] bytes (four consecutive k of one row
// per 32-bit lane), once per layer (prepacked) or once per call. P is read in place (a 1x1 conv's NHWC
// pixels) or copied into row panels per task; each panel is checked for negative values first.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/int8_gemm.h"
#include "cpu/int8_gemm_avx2.h"
#include "cpu/simd.h"
#include "cpu/task_queue.h"

namespace qkernels {
namespace {

constexpr int64_t kMr = 6;       // rows per kernel step
constexpr int64_t kNr = 16;      // columns per block
constexpr int64_t kPanel = 96;   // most rows per panel

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Channel parameters of 16 columns from c (n valid), zero beyond.
QK_TARGET_AVX2 QK_INLINE void load_params16(const float* p, int64_t n, __m256 out[2]) {
  if (n >= 16) {
    out[0] = _mm256_loadu_ps(p);
    out[1] = _mm256_loadu_ps(p + 8);
    return;
  }
  alignas(32) float t[16] = {0};
  std::memcpy(t, p, n * 4);
  out[0] = _mm256_load_ps(t);
  out[1] = _mm256_load_ps(t + 8);
}

// --- the kernels: an accumulate step, and one block runner for every step -------------------------------

// acc[MR][16] = A[MR rows, lda bytes apart][Kp] * B block ([Kp/4][16][4] bytes) with vpmaddubsw: A as
// uint8 (all >= 0) or, SIGNED, as |x| with the sign moved onto B (see the top of the file).
template <int MR, bool SIGNED>
QK_TARGET_AVX2 QK_INLINE void accumulate_u8(const int8_t* A, int64_t lda, const int8_t* B, int64_t kp4,
                                            __m256i acc[][2]) {
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t k4 = 0; k4 < kp4; ++k4) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + k4 * 64));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + k4 * 64 + 32));
#pragma GCC unroll 6
    for (int m = 0; m < MR; ++m) {
      int32_t quad;
      std::memcpy(&quad, A + m * lda + 4 * k4, 4);
      __m256i a = _mm256_set1_epi32(quad), w0 = b0, w1 = b1;
      if (SIGNED) {
        w0 = _mm256_sign_epi8(b0, a);
        w1 = _mm256_sign_epi8(b1, a);
        a = _mm256_abs_epi8(a);
      }
      acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(_mm256_maddubs_epi16(a, w0), ones));
      acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(_mm256_maddubs_epi16(a, w1), ones));
    }
  }
}

// The exact fallback: acc[6][16] = A[6 rows, lda apart][Kp] int16 * B block ([Kp/2][16][2] int16).
QK_TARGET_AVX2 QK_INLINE void accumulate_i16(const int16_t* A, int64_t lda, const int16_t* B, int64_t kp2,
                                             __m256i acc[][2]) {
#pragma GCC unroll 6
  for (int m = 0; m < kMr; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  for (int64_t k2 = 0; k2 < kp2; ++k2) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + k2 * 32));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + k2 * 32 + 16));
#pragma GCC unroll 6
    for (int m = 0; m < kMr; ++m) {
      int32_t pair;
      std::memcpy(&pair, A + m * lda + 2 * k2, 4);
      const __m256i a = _mm256_set1_epi32(pair);
      acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(a, b0));
      acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(a, b1));
    }
  }
}

// One block column's operands: A rows lda elements apart (int8, or int16 for the exact fallback) and the Q
// block (int8 [Kp/4][16][4], or int16 [Kp/2][16][2]).
struct BlockOperands {
  const int8_t* a = nullptr;
  const int16_t* a16 = nullptr;
  int64_t lda = 0;
  const int8_t* b = nullptr;
  const int16_t* b16 = nullptr;
  int64_t kp = 0;
};

// Accumulate steps: kRows rows of a block's product from row r into acc.
struct StepUint8 {  // A >= 0
  static constexpr int kRows = kMr;
  QK_TARGET_AVX2 static QK_INLINE void run(const BlockOperands& o, int64_t r, __m256i acc[][2]) {
    accumulate_u8<kRows, false>(o.a + r * o.lda, o.lda, o.b, o.kp / 4, acc);
  }
};
struct StepSignMoved {  // some A < 0, no Q == -128 (the sign products need registers: 4 rows)
  static constexpr int kRows = 4;
  QK_TARGET_AVX2 static QK_INLINE void run(const BlockOperands& o, int64_t r, __m256i acc[][2]) {
    accumulate_u8<kRows, true>(o.a + r * o.lda, o.lda, o.b, o.kp / 4, acc);
  }
};
struct StepInt16 {  // everything else
  static constexpr int kRows = kMr;
  QK_TARGET_AVX2 static QK_INLINE void run(const BlockOperands& o, int64_t r, __m256i acc[][2]) {
    accumulate_i16(o.a16 + r * o.lda, o.lda, o.b16, o.kp / 2, acc);
  }
};

// One block column (16 output channels from c0, nc valid) of a panel (rows from r0) through the epilogue
// straight from the accumulators: no tile store and reload, no call per tile. The epilogue's parameters are
// loaded after the product so that the product keeps all 16 registers.
template <class Step, int KIND, int ACT, bool ABS_MAX>
QK_TARGET_AVX2 void block_fused(const Int8Epilogue& ep, const BlockOperands& o, int64_t r0, int64_t rows, int64_t c0,
                                int64_t nc) {
  constexpr int MR = Step::kRows;
  const int64_t esize = KIND == kOutInt8 ? 1 : KIND == kOutNone ? 0 : 4;  // kOutNone: out null, no stores
  __m256i m = _mm256_setzero_si256();
  for (int64_t r = 0; r < rows; r += MR) {
    __m256i acc[MR][2];
    Step::run(o, r, acc);
    __m256 sc[2], bi[2];
    if (KIND != kOutInt32) {
      load_params16(ep.scale + ep.channel_offset + c0, nc, sc);
      load_params16(ep.bias + ep.channel_offset + c0, nc, bi);
    }
    const int64_t nr = std::min<int64_t>(MR, rows - r);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      if (i >= nr) break;
      char* out = static_cast<char*>(ep.out) + ((r0 + r + i) * ep.row_stride + c0 + ep.offset) * esize;
      epilogue16_avx2<KIND, ACT>(acc[i][0], acc[i][1], sc, bi, nc, out, ABS_MAX ? &m : nullptr);
    }
  }
  if (ABS_MAX) ep.abs_max->merge(avx2_max_epu32(m));
}

// The same where the epilogue needs the tile in memory (channels on the rows, strided output columns):
// Int8Epilogue::apply.
template <class Step>
QK_TARGET_AVX2 void block_via_tile(const Int8Epilogue& ep, const BlockOperands& o, int64_t r0, int64_t rows,
                                   int64_t c0, int64_t nc) {
  constexpr int MR = Step::kRows;
  alignas(32) int32_t C[MR * kNr];
  for (int64_t r = 0; r < rows; r += MR) {
    __m256i acc[MR][2];
    Step::run(o, r, acc);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(C + i * kNr), acc[i][0]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(C + i * kNr + 8), acc[i][1]);
    }
    ep.apply(r0 + r, std::min<int64_t>(MR, rows - r), c0, nc, C, kNr);
  }
}

using BlockRunner = void (*)(const Int8Epilogue&, const BlockOperands&, int64_t, int64_t, int64_t, int64_t);

template <class Step, int KIND, bool ABS_MAX = false>
BlockRunner block_runner_act(int act) {
  switch (act) {
    case kActRelu: return block_fused<Step, KIND, kActRelu, ABS_MAX>;
    case kActRelu6: return block_fused<Step, KIND, kActRelu6, ABS_MAX>;
    default: return block_fused<Step, KIND, kActNone, ABS_MAX>;
  }
}

// The runner of Step's block columns for this epilogue, picked once per product.
template <class Step>
BlockRunner block_runner(const Int8Epilogue& ep) {
  if (ep.channel_on_rows || ep.col_stride != 1) return block_via_tile<Step>;
  switch (ep.out_kind) {
    case kOutInt32: return block_fused<Step, kOutInt32, kActNone, false>;  // the raw accumulators
    case kOutInt8: return block_runner_act<Step, kOutInt8>(ep.act);
    case kOutNone: return block_runner_act<Step, kOutNone, true>(ep.act);
    default:
      return ep.abs_max != nullptr ? block_runner_act<Step, kOutFloat, true>(ep.act)
                                   : block_runner_act<Step, kOutFloat>(ep.act);
  }
}

// Whether any of n bytes is negative.
QK_TARGET_AVX2 bool any_negative(const int8_t* p, int64_t n) {
  __m256i o = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) o = _mm256_or_si256(o, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
  int8_t tail = 0;
  for (; i < n; ++i) tail |= p[i];
  return _mm256_movemask_epi8(o) != 0 || tail < 0;
}

// Packed Q blocks [Kp/4][16][4] -> [Kp/2][16][2] int16 (for accumulate_i16).
void widen_packed_q(const Avx2PackedQ& q, int16_t* dst) {
  const int64_t blocks = (q.rows + kNr - 1) / kNr;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int8_t* src = q.data + blk * q.Kp * kNr;
    int16_t* d = dst + blk * q.Kp * kNr;
    for (int64_t k = 0; k < q.Kp; ++k)
      for (int64_t c = 0; c < kNr; ++c) d[((k / 2) * kNr + c) * 2 + k % 2] = src[((k / 4) * kNr + c) * 4 + k % 4];
  }
}

// A panel of P: `rows` rows (padded with zero rows to a whole number of kernel steps) of Kp bytes.
struct Panel {
  const int8_t* a = nullptr;  // rows lda bytes apart
  int64_t lda = 0;
  bool negative = false;
};

}  // namespace

int64_t avx2_packed_q_bytes(int64_t rows, int64_t K) {
  return round_up(std::max<int64_t>(rows, 1), kNr) * round_up(std::max<int64_t>(K, 1), 4);
}

bool avx2_pack_q(Int8RowSource Q, int64_t rows, int64_t K, int8_t* dst) {
  const int64_t Kp = round_up(std::max<int64_t>(K, 1), 4), blocks = (rows + kNr - 1) / kNr;
  std::vector<int8_t> tmp(kNr * Kp);
  bool has_min = false;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t r0 = blk * kNr, n = std::min(kNr, rows - r0);
    std::fill(tmp.begin(), tmp.end(), 0);
    Q(r0, n, tmp.data(), Kp);
    int8_t* d = dst + blk * Kp * kNr;
    for (int64_t c = 0; c < kNr; ++c)
      for (int64_t k4 = 0; k4 < Kp / 4; ++k4)
        for (int t = 0; t < 4; ++t) {
          const int8_t v = tmp[c * Kp + 4 * k4 + t];
          has_min |= v == INT8_MIN;
          d[(k4 * kNr + c) * 4 + t] = v;
        }
  }
  return has_min;
}

void int8_gemm_avx2_packed(int64_t p_rows, int64_t K, Int8RowSource P, const Avx2PackedQ& q,
                           const Int8Epilogue& epilogue, Int8RowsInMemory p_in_memory) {
  if (p_rows == 0 || q.rows == 0) return;
  Int8Epilogue ep = epilogue;
  ep.vec = Isa::kAvx2;
  const int64_t Kp = q.Kp, blocks = (q.rows + kNr - 1) / kNr;
  TORCH_CHECK(Kp == round_up(std::max<int64_t>(K, 1), 4), "qkernels: packed weights do not fit K = ", K);
  // Q as int16, for panels with negative values when Q holds -128 (rare: quantizers give [-127, 127]).
  std::vector<int16_t> q16;
  if (q.has_min) {
    q16.resize(blocks * Kp * kNr);
    widen_packed_q(q, q16.data());
  }
  // Panels of equal size (a multiple of both kernels' rows), so that threads get equal work.
  constexpr int64_t kStep = 12;
  const int64_t panels = (p_rows + kPanel - 1) / kPanel;
  const int64_t panel_rows = round_up((p_rows + panels - 1) / panels, kStep);
  const int64_t threads = at::get_num_threads();
  int64_t blocks_per_task = blocks;
  while (blocks_per_task > 1 && panels * ((blocks + blocks_per_task - 1) / blocks_per_task) < 4 * threads)
    blocks_per_task = (blocks_per_task + 1) / 2;
  const int64_t col_tasks = (blocks + blocks_per_task - 1) / blocks_per_task;
  // Rows are read in place when they need no padding (K a multiple of 4), except the last rows.
  const bool in_place = p_in_memory.data != nullptr && K == Kp;
  // Threads take tasks one at a time (task_queue.h); a panel whose column tasks go to both threads is packed
  // by both, as at the middle of a static split.
  TaskQueue queue(panels * col_tasks);
  const BlockRunner run_uint8 = block_runner<StepUint8>(ep), run_signed = block_runner<StepSignMoved>(ep),
                    run_int16 = block_runner<StepInt16>(ep);
  run_workers(queue, [&] {
    std::vector<int8_t> mem(panel_rows * Kp + 64);
    std::vector<int16_t> mem16;
    int64_t packed_panel = -1;
    Panel pan;
    for (int64_t t; queue.next(t);) {
      const int64_t pi = t / col_tasks, ci = t % col_tasks;
      const int64_t r0 = pi * panel_rows, rows = std::min(panel_rows, p_rows - r0);
      if (rows <= 0) continue;
      const int64_t rows_pad = round_up(rows, kStep);
      if (pi != packed_panel) {
        if (in_place && rows == rows_pad) {
          pan.a = p_in_memory.data + r0 * p_in_memory.ld;
          pan.lda = p_in_memory.ld;
          pan.negative = false;
          for (int64_t i = 0; i < rows && !pan.negative; ++i) pan.negative = any_negative(pan.a + i * pan.lda, K);
        } else {
          if (in_place) {
            for (int64_t i = 0; i < rows; ++i) std::memcpy(mem.data() + i * Kp, p_in_memory.data + (r0 + i) * p_in_memory.ld, K);
          } else {
            if (Kp != K) std::memset(mem.data(), 0, rows * Kp);
            P(r0, rows, mem.data(), Kp);
          }
          std::memset(mem.data() + rows * Kp, 0, (rows_pad - rows) * Kp);
          pan.a = mem.data();
          pan.lda = Kp;
          pan.negative = any_negative(mem.data(), rows * Kp);
        }
        if (pan.negative && q.has_min) {
          mem16.resize(rows_pad * Kp);
          for (int64_t i = 0; i < rows_pad; ++i)
            for (int64_t k = 0; k < Kp; ++k) mem16[i * Kp + k] = i < rows ? pan.a[i * pan.lda + k] : 0;
        }
        packed_panel = pi;
      }
      const int64_t b0 = ci * blocks_per_task, b1 = std::min(blocks, b0 + blocks_per_task);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t c0 = blk * kNr, nc = std::min(kNr, q.rows - c0);
        BlockOperands o;
        o.kp = Kp;
        if (!pan.negative || !q.has_min) {
          o.a = pan.a;
          o.lda = pan.lda;
          o.b = q.data + blk * Kp * kNr;
          (pan.negative ? run_signed : run_uint8)(ep, o, r0, rows, c0, nc);
        } else {
          o.a16 = mem16.data();
          o.lda = Kp;
          o.b16 = q16.data() + blk * Kp * kNr;
          run_int16(ep, o, r0, rows, c0, nc);
        }
      }
    }
  });
}

void int8_gemm_avx2(int64_t p_rows, int64_t q_rows, int64_t K, Int8RowSource P, Int8RowSource Q,
                    const Int8Epilogue& ep, Int8RowsInMemory p_in_memory) {
  if (p_rows == 0 || q_rows == 0) return;
  thread_local std::vector<int8_t> kept;  // reused between calls: no page faults for fresh memory
  const int64_t n = avx2_packed_q_bytes(q_rows, K);
  std::vector<int8_t> own;
  int8_t* mem;
  if (n <= (8 << 20)) {
    if ((int64_t)kept.size() < n) kept.resize(n);
    mem = kept.data();
  } else {
    own.resize(n);
    mem = own.data();
  }
  Avx2PackedQ q;
  q.has_min = avx2_pack_q(Q, q_rows, K, mem);
  q.data = mem;
  q.rows = q_rows;
  q.Kp = round_up(std::max<int64_t>(K, 1), 4);
  int8_gemm_avx2_packed(p_rows, K, P, q, ep, p_in_memory);
}

}  // namespace qkernels
