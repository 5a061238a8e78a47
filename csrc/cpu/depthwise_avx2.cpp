// int8 depthwise conv for AVX2 without VNNI: one vpmaddubsw + vpmaddwd applies a whole kernel column
// (up to 4 kernel rows) to 8 channels.
//
// For each input column, the 32 channel bytes of the (up to 4) kernel rows' input pixels are interleaved
// per channel into dwords [x(row 0), x(row 1), x(row 2), x(row 3)] (punpck*bw then punpck*wd), once per
// column: the kw / stride output pixels that read the column reuse it from a small buffer. The unpacks
// work within 128-bit lanes, so interleaved vector q holds channels 4q..4q+3 (lane 0) and 16+4q..16+4q+3
// (lane 1); the weights are stored in that order and the sums are put back in channel order before the
// epilogue. x enters vpmaddubsw as uint8, which is exact for x >= 0 (pair sums <= 2 * 127 * 128 < 2^15):
// every depthwise input of a ReLU network. The interleaving sees every input byte, so it also notes a
// negative one; such an output row is then recomputed by the general kernel (exact for everything).
#include "cpu/depthwise_avx2.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "cpu/int8_gemm_avx2.h"
#include "cpu/task_queue.h"

namespace qkernels {
namespace {

constexpr int64_t kRows = 4;       // kernel rows per dword
constexpr int64_t kLanes = 32;     // channels per block (one 256-bit load per input pixel)
constexpr int64_t kColumn = 128;   // bytes of one interleaved column of a block: 4 vectors
constexpr int64_t kSegment = 64;   // output pixels per interleaving buffer (stays in L1)

int64_t blocks_of(int64_t C) { return (C + kLanes - 1) / kLanes; }

// The channel at interleaved position p = 8q + 4L + d (vector q, lane L, dword d) of block blk.
int64_t lane_channel(int64_t blk, int64_t p) { return blk * kLanes + 16 * ((p % 8) / 4) + 4 * (p / 8) + p % 4; }

// The kernel's weight bytes (depthwise_avx2_pack): per block [kw][4 vectors][32 bytes] in interleaved order,
// then w_next, the same weights one kernel row down (dword bytes [0, w0, w1, w2]), for the second of two
// output rows computed from one interleaving of four input rows (stride 1, kernels up to 3 rows).
void pack_taps(const int8_t* wp, int64_t C, int64_t kh, int64_t kw, int8_t* dst) {
  const int64_t blocks = blocks_of(C), half = blocks * kw * kColumn;
  int8_t* w = dst;
  int8_t* w_next = dst + half;
  std::memset(dst, 0, 2 * half);
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t p = 0; p < kLanes; ++p) {
      const int64_t c = lane_channel(blk, p);
      if (c >= C) continue;
      for (int64_t j = 0; j < kw; ++j)
        for (int64_t i = 0; i < kh; ++i) {
          const int64_t at = ((blk * kw + j) * 4 + p / 8) * 32 + (p % 8) * 4 + i;  // dword 4L + d of vector q
          w[at] = wp[(c * kh + i) * kw + j];
          if (i + 1 < kRows) w_next[at + 1] = w[at];
        }
    }
}

// Weights as the kernel reads them: the packed taps (from the layer's packed blob, or packed here), and
// scale and bias per block [4 vectors][8] in interleaved order (they change per call: dynamic scales).
struct Weights {
  std::vector<int8_t> own;  // the taps when no packed ones were given
  const int8_t* w = nullptr;
  const int8_t* w_next = nullptr;
  std::vector<float> scale, bias;
  int64_t blocks;
  Weights(const int8_t* wp, const int8_t* packed, const Int8ConvShape& s, const float* sc, const float* bi) {
    blocks = blocks_of(s.C);
    if (packed == nullptr) {
      own.resize(depthwise_avx2_packed_bytes(s.C, s.kw));
      pack_taps(wp, s.C, s.kh, s.kw, own.data());
      packed = own.data();
    }
    w = packed;
    w_next = packed + blocks * s.kw * kColumn;
    scale.assign(blocks * kLanes, 0.f);
    bias.assign(blocks * kLanes, 0.f);
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t p = 0; p < kLanes; ++p) {
        const int64_t c = lane_channel(blk, p);
        if (c >= s.C) continue;
        scale[blk * kLanes + p] = sc[c];
        bias[blk * kLanes + p] = bi[c];
      }
  }
};

// 32 bytes of channels [c0, c0 + cn) at p (zeros beyond cn).
QK_TARGET_AVX2 QK_INLINE __m256i load_channels(const int8_t* p, int64_t cn) {
  if (cn >= kLanes) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  alignas(32) int8_t t[kLanes] = {0};
  std::memcpy(t, p, cn);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(t));
}

// Interleaves input columns iw_first .. iw_first + ncols - 1 of `rows` (null: padding) into buf; ORs
// every byte read into *seen (its sign bit then says whether an input was negative). Padding rows read
// a zero vector with column step 0, so the interior columns need no tests.
QK_TARGET_AVX2 QK_INLINE void interleave_columns(const int8_t* const rows[kRows], int64_t W, int64_t C, int64_t cn,
                                                 int64_t iw_first, int64_t ncols, int8_t* buf, __m256i* seen) {
  alignas(32) static const int8_t zeros[kLanes] = {0};
  const int8_t* base[kRows];
  int64_t step[kRows];
  for (int i = 0; i < kRows; ++i) {
    base[i] = rows[i] != nullptr ? rows[i] : zeros;
    step[i] = rows[i] != nullptr ? C : 0;
  }
  __m256i any = *seen;
  for (int64_t k = 0; k < ncols; ++k) {
    const int64_t iw = iw_first + k;
    __m256i r[kRows];
    if (iw < 0 || iw >= W || cn < kLanes) {
      for (int i = 0; i < kRows; ++i)
        r[i] = rows[i] != nullptr && iw >= 0 && iw < W ? load_channels(rows[i] + iw * C, cn) : _mm256_setzero_si256();
    } else {
      for (int i = 0; i < kRows; ++i) r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base[i] + iw * step[i]));
    }
    any = _mm256_or_si256(any, _mm256_or_si256(_mm256_or_si256(r[0], r[1]), _mm256_or_si256(r[2], r[3])));
    const __m256i lo01 = _mm256_unpacklo_epi8(r[0], r[1]), hi01 = _mm256_unpackhi_epi8(r[0], r[1]);
    const __m256i lo23 = _mm256_unpacklo_epi8(r[2], r[3]), hi23 = _mm256_unpackhi_epi8(r[2], r[3]);
    int8_t* d = buf + k * kColumn;
    _mm256_store_si256(reinterpret_cast<__m256i*>(d), _mm256_unpacklo_epi16(lo01, lo23));
    _mm256_store_si256(reinterpret_cast<__m256i*>(d + 32), _mm256_unpackhi_epi16(lo01, lo23));
    _mm256_store_si256(reinterpret_cast<__m256i*>(d + 64), _mm256_unpacklo_epi16(hi01, hi23));
    _mm256_store_si256(reinterpret_cast<__m256i*>(d + 96), _mm256_unpackhi_epi16(hi01, hi23));
  }
  *seen = any;
}

// The epilogue of one block's accumulators, still in interleaved order (acc[q] lane L: channels
// 16L + 4q .. + 3; scale and bias likewise), stored as cn <= 32 channels in channel order. For int8 the
// saturating packs put the channels in order by themselves: packs(acc0, acc1) holds channels 0-7 | 16-23
// as int16, packs(acc2, acc3) 8-15 | 24-31, and packing those two gives 0-15 | 16-31.
template <int KIND, int ACT>
QK_TARGET_AVX2 QK_INLINE void store_block(const __m256i acc[4], const __m256 sc[4], const __m256 bi[4], int64_t cn,
                                         char* o, __m256i* abs_max) {
  if (KIND == kOutInt8) {
    __m256i r[4];
    for (int q = 0; q < 4; ++q) r[q] = avx2_round8<ACT>(avx2_value8<ACT>(acc[q], sc[q], bi[q]));
    __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
    bytes = _mm256_andnot_si256(_mm256_cmpeq_epi8(bytes, _mm256_set1_epi8(-128)), bytes);  // NaN -> 0
    if (cn == kLanes) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), bytes);
    } else {
      alignas(32) int8_t t[kLanes];
      _mm256_store_si256(reinterpret_cast<__m256i*>(t), bytes);
      std::memcpy(o, t, cn);
    }
    return;
  }
  // float / int32 / none (o null: the abs max only): to channel order first (a 2x2 transpose of 128-bit lanes)
  const __m256i o0 = _mm256_permute2x128_si256(acc[0], acc[1], 0x20);  // channels 0-7
  const __m256i o1 = _mm256_permute2x128_si256(acc[2], acc[3], 0x20);  // 8-15
  const __m256i o2 = _mm256_permute2x128_si256(acc[0], acc[1], 0x31);  // 16-23
  const __m256i o3 = _mm256_permute2x128_si256(acc[2], acc[3], 0x31);  // 24-31
  const __m256 s01[2] = {_mm256_permute2f128_ps(sc[0], sc[1], 0x20), _mm256_permute2f128_ps(sc[2], sc[3], 0x20)};
  const __m256 s23[2] = {_mm256_permute2f128_ps(sc[0], sc[1], 0x31), _mm256_permute2f128_ps(sc[2], sc[3], 0x31)};
  const __m256 b01[2] = {_mm256_permute2f128_ps(bi[0], bi[1], 0x20), _mm256_permute2f128_ps(bi[2], bi[3], 0x20)};
  const __m256 b23[2] = {_mm256_permute2f128_ps(bi[0], bi[1], 0x31), _mm256_permute2f128_ps(bi[2], bi[3], 0x31)};
  epilogue16_avx2<KIND, ACT>(o0, o1, s01, b01, std::min<int64_t>(cn, 16), o, abs_max);
  if (cn > 16) epilogue16_avx2<KIND, ACT>(o2, o3, s23, b23, cn - 16, KIND == kOutNone ? o : o + 16 * 4, abs_max);
}

// One output row (b, oh), channel blocks [blk0, blk1); returns false when some input was negative (the row
// must then be recomputed). abs_max (float output, or null): max-ed with the row's finite |y| bits.
bool pairs_rows(const Int8ConvShape& s) { return s.sh == 1 && s.dh == 1 && s.kh < kRows; }

// PAIR: output rows oh and oh + 1 (if there is one) from one interleaving of input rows oh - ph .. oh - ph + 3
// (stride 1, undilated, kh <= 3), the second with w_next: half the interleaving work per output row.
template <int KIND, int ACT, int KW, bool PAIR>
QK_TARGET_AVX2 bool depthwise_row(const int8_t* x, const Weights& wv, const Int8ConvShape& s, void* out, int8_t* buf,
                                  int64_t b, int64_t oh, int64_t blk0, int64_t blk1, uint32_t* abs_max) {
  const int64_t kw = KW > 0 ? KW : s.kw;
  const bool second = PAIR && oh + 1 < s.OH;
  const int64_t esize = KIND == kOutInt8 ? 1 : KIND == kOutNone ? 0 : 4;  // kOutNone: out is null, nothing stored
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i seen = _mm256_setzero_si256(), row_max = _mm256_setzero_si256();
  __m256i* const max_to = abs_max != nullptr ? &row_max : nullptr;
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t c0 = blk * kLanes, cn = std::min(kLanes, s.C - c0);
    const int8_t* rows[kRows];
    for (int64_t i = 0; i < kRows; ++i) {
      const int64_t ih = oh * s.sh - s.ph + i * s.dh;
      rows[i] = i < s.kh + (PAIR ? 1 : 0) && ih >= 0 && ih < s.H ? x + (b * s.H + ih) * s.W * s.C + c0 : nullptr;
    }
    const int8_t* wblk = wv.w + blk * kw * kColumn;
    const int8_t* wblk_next = wv.w_next + blk * kw * kColumn;
    __m256 sc[4], bi[4];
    for (int v = 0; v < 4; ++v) {
      sc[v] = _mm256_loadu_ps(wv.scale.data() + c0 + 8 * v);
      bi[v] = _mm256_loadu_ps(wv.bias.data() + c0 + 8 * v);
    }
    for (int64_t ow0 = 0; ow0 < s.OW; ow0 += kSegment) {
      const int64_t n = std::min(kSegment, s.OW - ow0);
      interleave_columns(rows, s.W, s.C, cn, ow0 * s.sw - s.pw, (n - 1) * s.sw + (kw - 1) * s.dw + 1, buf, &seen);
      for (int64_t u = 0; u < n; ++u) {
        __m256i acc[4], acc2[4];
        for (int q = 0; q < 4; ++q) acc[q] = acc2[q] = _mm256_setzero_si256();
        const int8_t* col = buf + u * s.sw * kColumn;
#pragma GCC unroll 4
        for (int64_t j = 0; j < kw; ++j) {
          const int8_t* cj = col + j * s.dw * kColumn;
          const int8_t* wj = wblk + j * kColumn;
          const int8_t* wj2 = wblk_next + j * kColumn;
#pragma GCC unroll 4
          for (int q = 0; q < 4; ++q) {
            const __m256i xv = _mm256_load_si256(reinterpret_cast<const __m256i*>(cj + 32 * q));
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wj + 32 * q));
            acc[q] = _mm256_add_epi32(acc[q], _mm256_madd_epi16(_mm256_maddubs_epi16(xv, w), ones));
            if (PAIR) {
              const __m256i w2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wj2 + 32 * q));
              acc2[q] = _mm256_add_epi32(acc2[q], _mm256_madd_epi16(_mm256_maddubs_epi16(xv, w2), ones));
            }
          }
        }
        char* o = static_cast<char*>(out) + (((b * s.OH + oh) * s.OW + ow0 + u) * s.C + c0) * esize;
        store_block<KIND, ACT>(acc, sc, bi, cn, o, max_to);
        if (second) store_block<KIND, ACT>(acc2, sc, bi, cn, o + s.OW * s.C * esize, max_to);
      }
    }
  }
  if (abs_max != nullptr) *abs_max = avx2_max_epu32(row_max);
  return _mm256_movemask_epi8(seen) == 0;
}

template <int KIND, int ACT>
bool depthwise_row_act(const int8_t* x, const Weights& wv, const Int8ConvShape& s, void* out, int8_t* buf, int64_t b,
                       int64_t oh, int64_t blk0, int64_t blk1, uint32_t* m) {
  if (pairs_rows(s)) {
    if (s.kw == 3) return depthwise_row<KIND, ACT, 3, true>(x, wv, s, out, buf, b, oh, blk0, blk1, m);
    return depthwise_row<KIND, ACT, 0, true>(x, wv, s, out, buf, b, oh, blk0, blk1, m);
  }
  if (s.kw == 3) return depthwise_row<KIND, ACT, 3, false>(x, wv, s, out, buf, b, oh, blk0, blk1, m);
  return depthwise_row<KIND, ACT, 0, false>(x, wv, s, out, buf, b, oh, blk0, blk1, m);
}

template <int KIND>
bool depthwise_row_kind(const int8_t* x, const Weights& wv, const Int8ConvShape& s, void* out, int8_t* buf, int64_t b,
                        int64_t oh, int64_t blk0, int64_t blk1, uint32_t* m) {
  switch (s.act) {
    case kActRelu: return depthwise_row_act<KIND, kActRelu>(x, wv, s, out, buf, b, oh, blk0, blk1, m);
    case kActRelu6: return depthwise_row_act<KIND, kActRelu6>(x, wv, s, out, buf, b, oh, blk0, blk1, m);
    default: return depthwise_row_act<KIND, kActNone>(x, wv, s, out, buf, b, oh, blk0, blk1, m);
  }
}

bool depthwise_row_any(const int8_t* x, const Weights& wv, const Int8ConvShape& s, void* out, int8_t* buf, int64_t b,
                       int64_t oh, int64_t blk0, int64_t blk1, uint32_t* m) {
  switch (s.out_kind) {
    case kOutInt32: return depthwise_row_kind<kOutInt32>(x, wv, s, out, buf, b, oh, blk0, blk1, nullptr);
    case kOutInt8: return depthwise_row_kind<kOutInt8>(x, wv, s, out, buf, b, oh, blk0, blk1, nullptr);
    case kOutNone: return depthwise_row_kind<kOutNone>(x, wv, s, out, buf, b, oh, blk0, blk1, m);
    default: return depthwise_row_kind<kOutFloat>(x, wv, s, out, buf, b, oh, blk0, blk1, m);
  }
}

}  // namespace

bool depthwise_avx2_takes_kernel_rows(int64_t kh) { return kh <= kRows; }

int64_t depthwise_avx2_packed_bytes(int64_t C, int64_t kw) { return 2 * blocks_of(C) * kw * kColumn; }

void depthwise_avx2_pack(const int8_t* w, int64_t C, int64_t kh, int64_t kw, int8_t* dst) {
  pack_taps(w, C, kh, kw, dst);
}

void depthwise_avx2(const int8_t* x, const int8_t* w, const int8_t* packed, const Int8ConvShape& s, const float* scale,
                    const float* bias, void* out, DepthwiseRowFallback fallback, AbsMaxSink* abs_max) {
  const Weights wv(w, packed, s, scale, bias);
  const int64_t ncols = (kSegment - 1) * s.sw + (s.kw - 1) * s.dw + 1;
  const int64_t step = pairs_rows(s) ? 2 : 1, per_image = (s.OH + step - 1) / step, rows = s.N * per_image;
  // Few rows (batch 1, a 10x10 map: 5 row pairs for 2 threads, one of them idle 40% of the time): the
  // channel blocks are split too, so that there are about 4 work items per thread.
  const int64_t want = 4 * at::get_num_threads();
  const int64_t per_part = rows >= want ? wv.blocks : std::max<int64_t>(1, (wv.blocks * rows + want - 1) / want);
  const int64_t parts = (wv.blocks + per_part - 1) / per_part;
  // Rows with a negative input are recomputed exactly afterwards; several parts of a row may flag it.
  std::vector<std::atomic<uint8_t>> redo(rows);  // value-initialized: 0
  std::atomic<bool> any_redo{false};
  TaskQueue queue(rows * parts);
  run_workers(queue, [&] {
    std::vector<int8_t> mem(ncols * kColumn + 32);
    int8_t* buf = mem.data() + (32 - reinterpret_cast<uintptr_t>(mem.data()) % 32) % 32;
    const bool want_max = abs_max != nullptr && (s.out_kind == kOutFloat || s.out_kind == kOutNone);
    uint32_t task_max = 0;
    for (int64_t i; queue.next(i);) {
      const int64_t r = i / parts, part = i % parts;
      const int64_t b = r / per_image, oh = (r % per_image) * step;
      const int64_t blk0 = part * per_part, blk1 = std::min(wv.blocks, blk0 + per_part);
      uint32_t row_max = 0;
      if (!depthwise_row_any(x, wv, s, out, buf, b, oh, blk0, blk1, want_max ? &row_max : nullptr)) {
        redo[r].store(1, std::memory_order_relaxed);  // its values are redone, and so is their max
        any_redo.store(true, std::memory_order_relaxed);
      } else {
        task_max = std::max(task_max, row_max);
      }
    }
    if (want_max) abs_max->merge(task_max);
  });
  if (!any_redo.load()) return;  // the usual case (ReLU outputs): no second parallel region
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (!redo[r].load(std::memory_order_relaxed)) continue;
      const int64_t b = r / per_image, oh = (r % per_image) * step;
      for (int64_t o = oh; o < std::min(oh + step, s.OH); ++o) fallback(b, o);
    }
  });
}

}  // namespace qkernels
