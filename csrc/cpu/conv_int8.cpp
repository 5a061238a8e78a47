// CPU kernels of conv2d_int8 and linear_int8: int8 x int8 -> int32 accumulator -> act(acc*scale + bias)
// as float32, the raw int32, or requantized int8 (round half away from zero, saturate to [-127, 127]).
//
// Activations are processed as NHWC (channels-last); the conv output is always channels-last.
//   depthwise (groups == C == O)  direct kernel, vectorised over channels;
//   everything else               per group, a GEMM [N*OH*OW, kh*kw*C/g] x [kh*kw*C/g, O/g] whose left
//                                 rows are NHWC patches gathered on the fly (a 1x1 stride-1 conv reads
//                                 pixels as they are); see int8_gemm.cpp.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <vector>

#include "checks.h"
#include "cpu/depthwise_avx2.h"
#include "cpu/int8_gemm.h"
#include "cpu/packed_weights.h"
#include "cpu/simd.h"

namespace qkernels {

namespace {

at::ScalarType out_scalar_type(int out_kind) {
  return out_kind == kOutFloat ? at::kFloat : (out_kind == kOutInt32 ? at::kInt : at::kChar);
}

// Per-channel scale and bias arrays (a per-tensor scale and a missing bias expanded), so the
// epilogue reads scale[c] and bias[c] without branches.
struct ChannelParams {
  std::vector<float> scale, bias;
  ChannelParams(const at::Tensor& s, const std::optional<at::Tensor>& b, int64_t O) {
    at::Tensor sc = s.contiguous();
    const float* sp = sc.data_ptr<float>();
    scale.resize(std::max<int64_t>(O, 1));
    for (int64_t c = 0; c < O; ++c) scale[c] = sc.numel() == 1 ? sp[0] : sp[c];
    bias.assign(std::max<int64_t>(O, 1), 0.f);
    if (b.has_value()) {
      at::Tensor bc = b->contiguous();
      std::memcpy(bias.data(), bc.data_ptr<float>(), O * sizeof(float));
    }
  }
};

// --- depthwise: one output pixel, all channels, taps skipped where they fall in the padding --------

struct DepthwiseArgs {
  const int8_t* x;   // NHWC
  const int16_t* w;  // [kh*kw][C]
  const Int8ConvShape* s;
  const ChannelParams* p;
  void* out;  // NHWC
  int64_t esize;
  Isa vec;
  float* row_out = nullptr;  // set: every output row goes here instead (float rows, for their abs max alone)
};

// Where output row (b, oh) goes: its place in out, or row_out.
QK_INLINE char* row_base(const DepthwiseArgs& a, int64_t b, int64_t oh) {
  if (a.row_out != nullptr) return reinterpret_cast<char*>(a.row_out);
  const Int8ConvShape& s = *a.s;
  return static_cast<char*>(a.out) + (b * s.OH + oh) * s.OW * s.C * a.esize;
}

constexpr int64_t kDwChunk = 128;  // channels per accumulator block (fits in registers / L1)

QK_INLINE void depthwise_row_body(const DepthwiseArgs& a, int64_t b, int64_t oh) {
  const Int8ConvShape& s = *a.s;
  alignas(64) int32_t acc[kDwChunk];
  char* row = row_base(a, b, oh);
  for (int64_t ow = 0; ow < s.OW; ++ow) {
    for (int64_t c0 = 0; c0 < s.C; c0 += kDwChunk) {
      const int64_t cn = std::min(kDwChunk, s.C - c0);
      for (int64_t c = 0; c < cn; ++c) acc[c] = 0;
      for (int64_t i = 0; i < s.kh; ++i) {
        const int64_t ih = oh * s.sh - s.ph + i * s.dh;
        if (ih < 0 || ih >= s.H) continue;
        for (int64_t j = 0; j < s.kw; ++j) {
          const int64_t iw = ow * s.sw - s.pw + j * s.dw;
          if (iw < 0 || iw >= s.W) continue;
          const int8_t* xp = a.x + ((b * s.H + ih) * s.W + iw) * s.C + c0;
          const int16_t* wp = a.w + (i * s.kw + j) * s.C + c0;
          for (int64_t c = 0; c < cn; ++c) acc[c] += (int32_t)xp[c] * (int32_t)wp[c];
        }
      }
      int8_epilogue_row(a.vec, acc, cn, a.p->scale.data() + c0, a.p->bias.data() + c0, 1, s.act, s.out_kind,
                        row + (ow * s.C + c0) * a.esize, 1);
    }
  }
}

QK_TARGET_AVX512 void depthwise_row_avx512(const DepthwiseArgs& a, int64_t b, int64_t oh) {
  depthwise_row_body(a, b, oh);
}
QK_TARGET_AVX2 void depthwise_row_avx2(const DepthwiseArgs& a, int64_t b, int64_t oh) { depthwise_row_body(a, b, oh); }
void depthwise_row_base(const DepthwiseArgs& a, int64_t b, int64_t oh) { depthwise_row_body(a, b, oh); }

// AVX512-VNNI: one vpdpbusd applies a whole kernel column (up to 4 kernel rows) to 16 channels.
// For each input column, the bytes of the kernel rows' input pixels are interleaved per channel into
// dwords [x(row 0), x(row 1), x(row 2), x(row 3)] (punpck*bw then punpck*wd), once per column: every
// output pixel that reads the column (kw / stride of them) reuses it from a small buffer.
// The unpacks work within 128-bit lanes, so interleaved vector q holds channel 16L + 4q + t in lane L,
// dword t; the weights are stored in that order and the accumulators are put back in channel order
// before the epilogue. vpdpbusd multiplies uint8 by int8, so x enters as x + 128 (xor 0x80): that adds
// 128 * (sum of all kh*kw weights) per channel, padding taps included (their x = 0 enters as 128),
// which the accumulators start from negated. Exact: the int32 sums wrap like the reference's.
// Few channels (C = 32 or 16, stride 1): a 64-byte block holds `pixels` = 64 / C neighbouring pixels
// (NHWC), so one block computes that many neighbouring output pixels at once (tap j of output pixels
// ow, ow+1 reads input columns ow-p+j, ow+1-p+j: again one 64-byte load) instead of leaving lanes empty.
#define QK_TARGET_VNNI512_DW __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))

constexpr int64_t kDwMaxRows = 4;     // kernel rows per dword
constexpr int64_t kDwSegment = 32;    // output pixels per interleaved-column buffer (stays in L1)
constexpr int64_t kDwColumnBytes = 256;  // one interleaved column of a 64-channel block: 4 vectors

// Pixels per 64-byte block (see above).
int64_t dw_pixels_per_block(const Int8ConvShape& s) {
  return s.sw == 1 && s.C <= 32 && 64 % s.C == 0 ? 64 / s.C : 1;
}

// Per 64-lane block ("lane" = channel, or channel c of pixel l / C when several pixels share a block):
// weights [kw][4 vectors][64 bytes] in interleaved order, the starting accumulator (-128 * sum of the
// lane's weights) as 4 vectors in the same order, and scale and bias in channel order.
struct DwVnniWeights {
  std::vector<int8_t> w;
  std::vector<int32_t> start;
  std::vector<float> scale, bias;
  int64_t blocks, kw, pixels;
  DwVnniWeights(const int8_t* wp, const Int8ConvShape& s, const ChannelParams& cp)
      : kw(s.kw), pixels(dw_pixels_per_block(s)) {
    blocks = pixels > 1 ? 1 : (s.C + 63) / 64;
    const int64_t lanes = pixels > 1 ? 64 : s.C;  // lanes holding a channel
    w.assign(blocks * kw * kDwColumnBytes, 0);
    start.assign(blocks * 64, 0);
    scale.assign(blocks * 64, 0.f);
    bias.assign(blocks * 64, 0.f);
    for (int64_t l = 0; l < lanes; ++l) {
      scale[l] = cp.scale[l % s.C];
      bias[l] = cp.bias[l % s.C];
    }
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t p = 0; p < 64; ++p) {  // p = 16q + 4L + t: vector q, lane L, dword t
        const int64_t q = p / 16, L = (p % 16) / 4, t = p % 4, lane = blk * 64 + 16 * L + 4 * q + t;
        if (lane >= lanes) continue;
        const int64_t c = lane % s.C;
        int32_t sum = 0;
        for (int64_t j = 0; j < kw; ++j)
          for (int64_t i = 0; i < s.kh; ++i) {
            const int8_t v = wp[(c * s.kh + i) * kw + j];
            w[((blk * kw + j) * 4 + q) * 64 + (4 * L + t) * 4 + i] = v;
            sum += v;
          }
        start[blk * 64 + p] = -128 * sum;
      }
  }
};

// One interleaved column (see below) at d.
QK_TARGET_VNNI512_DW QK_INLINE void dw_interleave_column(const int8_t* const rows[kDwMaxRows], int64_t W, int64_t C,
                                                        __mmask64 cm, int64_t pixels, int64_t iw, int8_t* d) {
  const __m512i flip = _mm512_set1_epi8((char)0x80);  // x = 0 (padding) as uint8
  __mmask64 m = 0;  // masked-off bytes load as 0 (padding) and are never read
  for (int64_t p = 0; p < pixels; ++p)
    if (iw + p >= 0 && iw + p < W) m |= cm << (p * C);
  __m512i r[kDwMaxRows];
  for (int i = 0; i < kDwMaxRows; ++i)
    r[i] = rows[i] != nullptr ? _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, rows[i] + iw * C), flip) : flip;
  const __m512i lo01 = _mm512_unpacklo_epi8(r[0], r[1]), hi01 = _mm512_unpackhi_epi8(r[0], r[1]);
  const __m512i lo23 = _mm512_unpacklo_epi8(r[2], r[3]), hi23 = _mm512_unpackhi_epi8(r[2], r[3]);
  _mm512_store_si512(d, _mm512_unpacklo_epi16(lo01, lo23));
  _mm512_store_si512(d + 64, _mm512_unpackhi_epi16(lo01, lo23));
  _mm512_store_si512(d + 128, _mm512_unpacklo_epi16(hi01, hi23));
  _mm512_store_si512(d + 192, _mm512_unpackhi_epi16(hi01, hi23));
}

// Interleaves input columns iw_first .. iw_first + ncols - 1 of the rows `rows` (null: padding) for
// the channels in `cm` into buf, kDwColumnBytes per column. With pixels > 1, "column" iw is the block
// of pixels iw .. iw + pixels - 1, each masked off where it falls in the padding. With two pixels
// (32 channels) an odd column is the upper pixel of the column before and the lower pixel of the
// column after: 128-bit lanes 2-3 and 0-1 of theirs, one lane shuffle per vector instead of loading
// and interleaving again. (buf then has room for ncols + 1 columns.)
QK_TARGET_VNNI512_DW void dw_interleave_columns(const int8_t* const rows[kDwMaxRows], int64_t W, int64_t C,
                                                __mmask64 cm, int64_t pixels, int64_t iw_first, int64_t ncols,
                                                int8_t* buf) {
  if (pixels != 2) {
    for (int64_t k = 0; k < ncols; ++k)
      dw_interleave_column(rows, W, C, cm, pixels, iw_first + k, buf + k * kDwColumnBytes);
    return;
  }
  for (int64_t k = 0; k < ncols + 1; k += 2)
    dw_interleave_column(rows, W, C, cm, pixels, iw_first + k, buf + k * kDwColumnBytes);
  for (int64_t k = 1; k < ncols; k += 2) {
    const int8_t* before = buf + (k - 1) * kDwColumnBytes;
    const int8_t* after = buf + (k + 1) * kDwColumnBytes;
    for (int q = 0; q < 4; ++q)
      _mm512_store_si512(buf + k * kDwColumnBytes + 64 * q,
                         _mm512_shuffle_i32x4(_mm512_load_si512(before + 64 * q), _mm512_load_si512(after + 64 * q),
                                              _MM_SHUFFLE(1, 0, 3, 2)));
  }
}

// Accumulators in interleaved order (acc[q] lane L = channels 16L + 4q ..) -> channel order
// (out[L] = channels 16L .. 16L + 15): a 4x4 transpose of 128-bit lanes.
QK_TARGET_VNNI512_DW QK_INLINE void dw_channel_order(const __m512i acc[4], __m512i out[4]) {
  const __m512i t0 = _mm512_shuffle_i32x4(acc[0], acc[1], _MM_SHUFFLE(1, 0, 1, 0));
  const __m512i t1 = _mm512_shuffle_i32x4(acc[2], acc[3], _MM_SHUFFLE(1, 0, 1, 0));
  const __m512i t2 = _mm512_shuffle_i32x4(acc[0], acc[1], _MM_SHUFFLE(3, 2, 3, 2));
  const __m512i t3 = _mm512_shuffle_i32x4(acc[2], acc[3], _MM_SHUFFLE(3, 2, 3, 2));
  out[0] = _mm512_shuffle_i32x4(t0, t1, _MM_SHUFFLE(2, 0, 2, 0));
  out[1] = _mm512_shuffle_i32x4(t0, t1, _MM_SHUFFLE(3, 1, 3, 1));
  out[2] = _mm512_shuffle_i32x4(t2, t3, _MM_SHUFFLE(2, 0, 2, 0));
  out[3] = _mm512_shuffle_i32x4(t2, t3, _MM_SHUFFLE(3, 1, 3, 1));
}

// One output row (b, oh), all channels. KW > 0: the kernel width as a constant (weights stay in
// registers); 0: s.kw at run time. buf holds kDwColumnBytes * dw_buffer_columns(s) bytes.
template <int KIND, int ACT, int KW>
QK_TARGET_VNNI512_DW void depthwise_row_vnni512(const DepthwiseArgs& a, const DwVnniWeights& wv, int8_t* buf, int64_t b,
                                                int64_t oh) {
  const Int8ConvShape& s = *a.s;
  const int64_t kw = KW > 0 ? KW : s.kw;
  const int64_t px = wv.pixels;  // output pixels per block (stride 1 when > 1)
  const int64_t col_step = px * s.sw * kDwColumnBytes, tap_step = s.dw * kDwColumnBytes;
  char* row = row_base(a, b, oh);
  for (int64_t blk = 0; blk < wv.blocks; ++blk) {
    const int64_t c0 = blk * 64, cn = px > 1 ? s.C : std::min<int64_t>(64, s.C - c0);  // channels per pixel
    const __mmask64 cm = cn == 64 ? ~(__mmask64)0 : (((__mmask64)1 << cn) - 1);
    const int8_t* rows[kDwMaxRows];
    for (int64_t i = 0; i < kDwMaxRows; ++i) {
      const int64_t ih = oh * s.sh - s.ph + i * s.dh;
      rows[i] = i < s.kh && ih >= 0 && ih < s.H ? a.x + (b * s.H + ih) * s.W * s.C + c0 : nullptr;
    }
    const int8_t* wblk = wv.w.data() + blk * kw * kDwColumnBytes;
    __m512i wreg[KW > 0 ? KW : 1][4];
    if (KW > 0)
      for (int j = 0; j < KW; ++j)
        for (int q = 0; q < 4; ++q) wreg[j][q] = _mm512_loadu_si512(wblk + (j * 4 + q) * 64);
    __m512i start[4];
    __m512 sc[4], bi[4];
    const int64_t lanes = cn * px;  // lanes of whole pixels
    for (int v = 0; v < 4; ++v) {
      start[v] = _mm512_loadu_si512(wv.start.data() + blk * 64 + 16 * v);
      sc[v] = _mm512_loadu_ps(wv.scale.data() + blk * 64 + 16 * v);
      bi[v] = _mm512_loadu_ps(wv.bias.data() + blk * 64 + 16 * v);
    }
    for (int64_t ow0 = 0; ow0 < s.OW; ow0 += kDwSegment) {  // kDwSegment: a multiple of every px
      const int64_t n = std::min(kDwSegment, s.OW - ow0);
      dw_interleave_columns(rows, s.W, s.C, cm, px, ow0 * s.sw - s.pw, (n - 1) * s.sw + (kw - 1) * s.dw + 1, buf);
      for (int64_t u = 0; u * px < n; ++u) {
        // lanes stored: all of them but in a last, partial group of pixels
        const int64_t nl = std::min(lanes, (n - u * px) * cn);
        const __mmask64 lm = nl == 64 ? ~(__mmask64)0 : (((__mmask64)1 << nl) - 1);
        __m512i acc[4] = {start[0], start[1], start[2], start[3]};
        const int8_t* col = buf + u * col_step;
        for (int64_t j = 0; j < kw; ++j)
          for (int q = 0; q < 4; ++q) {
            const __m512i w = KW > 0 ? wreg[KW > 0 ? j : 0][q] : _mm512_loadu_si512(wblk + (j * 4 + q) * 64);
            acc[q] = _mm512_dpbusd_epi32(acc[q], _mm512_load_si512(col + j * tap_step + q * 64), w);
          }
        __m512i out[4];
        dw_channel_order(acc, out);
        const int64_t o = (ow0 + u * px) * s.C + c0;  // within the row
        if (KIND == kOutInt8) {
          epilogue64_int8_avx512<ACT>(out, sc, bi, 4, lm, reinterpret_cast<int8_t*>(row) + o);
          continue;
        }
        for (int v = 0; v < 4; ++v)
          if (nl > 16 * v) epilogue16_avx512_sb<KIND, ACT>(out[v], sc[v], bi[v], (__mmask16)(lm >> (16 * v)), row, o + 16 * v);
      }
    }
  }
}

// Columns of the interleaving buffer: those one segment of output pixels reads, plus one (see
// dw_interleave_columns).
int64_t dw_buffer_columns(const Int8ConvShape& s) { return (kDwSegment - 1) * s.sw + (s.kw - 1) * s.dw + 2; }

template <int KIND, int ACT>
void depthwise_vnni512_act(const DepthwiseArgs& a, const DwVnniWeights& wv, int8_t* buf, int64_t b, int64_t oh) {
  if (a.s->kw == 3) return depthwise_row_vnni512<KIND, ACT, 3>(a, wv, buf, b, oh);
  depthwise_row_vnni512<KIND, ACT, 0>(a, wv, buf, b, oh);
}

template <int KIND>
void depthwise_vnni512_kind(const DepthwiseArgs& a, const DwVnniWeights& wv, int8_t* buf, int64_t b, int64_t oh) {
  switch (a.s->act) {
    case kActRelu: return depthwise_vnni512_act<KIND, kActRelu>(a, wv, buf, b, oh);
    case kActRelu6: return depthwise_vnni512_act<KIND, kActRelu6>(a, wv, buf, b, oh);
    default: return depthwise_vnni512_act<KIND, kActNone>(a, wv, buf, b, oh);
  }
}

void depthwise_vnni512(const DepthwiseArgs& a, const DwVnniWeights& wv, int8_t* buf, int64_t b, int64_t oh) {
  switch (a.s->out_kind) {
    case kOutInt32: return depthwise_vnni512_kind<kOutInt32>(a, wv, buf, b, oh);
    case kOutInt8: return depthwise_vnni512_kind<kOutInt8>(a, wv, buf, b, oh);
    default: return depthwise_vnni512_kind<kOutFloat>(a, wv, buf, b, oh);
  }
}

// A thread's copy of a: every row into `row` when that is sized (the values-only pass), else into out.
DepthwiseArgs with_row_buffer(const DepthwiseArgs& a, std::vector<float>& row) {
  DepthwiseArgs t = a;
  if (!row.empty()) t.row_out = row.data();
  return t;
}

// max |y| of output row (b, oh) of float NHWC rows as written (the paths that gather it per row, from cache)
uint32_t row_abs_max_bits(const DepthwiseArgs& a, int64_t b, int64_t oh) {
  return finite_abs_max_bits(reinterpret_cast<const float*>(row_base(a, b, oh)), a.s->OW * a.s->C);
}

// out: NHWC, typed by s.out_kind (null for kOutNone: the row kernels then write each row's float values into
// a buffer of their thread and the abs max is taken there; the AVX2 kernel keeps it in registers).
void depthwise_conv(const at::Tensor& xc, const at::Tensor& weight, const Int8ConvShape& s, const ChannelParams& p,
                    void* out, const at::Tensor* blob, AbsMaxSink* abs_max) {
  if (s.out_kind != kOutFloat && s.out_kind != kOutNone) abs_max = nullptr;
  const bool values_only = s.out_kind == kOutNone;
  Int8ConvShape sf = s;  // what the row kernels write
  if (values_only) sf.out_kind = kOutFloat;
  const int64_t esize = s.out_kind == kOutInt8 ? 1 : 4;
  const int64_t row_floats = values_only ? s.OW * s.C : 0;
  at::Tensor wc = weight.contiguous();
  const int8_t* wp = wc.data_ptr<int8_t>();
  const Int8Isa int8isa = int8_isa();
  const Isa isa = int8_vector_isa(int8isa);
  DepthwiseArgs a{xc.data_ptr<int8_t>(), nullptr, &sf, &p, out, esize, isa};
  if (int8isa >= Int8Isa::kAvx512Vnni && s.kh <= kDwMaxRows) {
    const DwVnniWeights wv(wp, s, p);
    at::parallel_for(0, s.N * s.OH, 1, [&](int64_t r0, int64_t r1) {
      std::vector<int8_t> mem(dw_buffer_columns(s) * kDwColumnBytes + 64);
      int8_t* buf = mem.data() + (64 - reinterpret_cast<uintptr_t>(mem.data()) % 64) % 64;  // aligned stores
      std::vector<float> row(row_floats);
      const DepthwiseArgs ta = with_row_buffer(a, row);
      uint32_t m = 0;
      for (int64_t r = r0; r < r1; ++r) {
        depthwise_vnni512(ta, wv, buf, r / s.OH, r % s.OH);
        if (abs_max != nullptr) m = std::max(m, row_abs_max_bits(ta, r / s.OH, r % s.OH));
      }
      if (abs_max != nullptr) abs_max->merge(m);
    });
    return;
  }
  // weights as [tap][channel] int16, so the channel loop reads both operands contiguously (the AVX2 kernel
  // needs them only for rows it hands back: made then, once)
  std::vector<int16_t> w16;
  auto widen = [&] {
    w16.resize(s.kh * s.kw * s.C);
    for (int64_t c = 0; c < s.C; ++c)
      for (int64_t t = 0; t < s.kh * s.kw; ++t) w16[t * s.C + c] = wp[c * s.kh * s.kw + t];
  };
  if (int8isa == Int8Isa::kAvx2 && depthwise_avx2_applies(s)) {
    std::once_flag widened;
    const int8_t* packed = blob != nullptr ? packed_depthwise_weights(*blob, s, int8isa) : nullptr;
    depthwise_avx2(
        xc.data_ptr<int8_t>(), wp, packed, s, p.scale.data(), p.bias.data(), out,
        [&](int64_t b, int64_t oh) {
          std::call_once(widened, [&] {
            widen();
            a.w = w16.data();
          });
          std::vector<float> row(row_floats);
          const DepthwiseArgs ra = with_row_buffer(a, row);
          depthwise_row_avx2(ra, b, oh);
          if (abs_max != nullptr) abs_max->merge(row_abs_max_bits(ra, b, oh));
        },
        abs_max);
    return;
  }
  widen();
  a.w = w16.data();
  at::parallel_for(0, s.N * s.OH, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(row_floats);
    const DepthwiseArgs ta = with_row_buffer(a, row);
    uint32_t m = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / s.OH, oh = r % s.OH;
      switch (isa) {
        case Isa::kAvx512: depthwise_row_avx512(ta, b, oh); break;
        case Isa::kAvx2: depthwise_row_avx2(ta, b, oh); break;
        default: depthwise_row_base(ta, b, oh); break;
      }
      if (abs_max != nullptr) m = std::max(m, row_abs_max_bits(ta, b, oh));
    }
    if (abs_max != nullptr) abs_max->merge(m);
  });
}

// --- general conv: per group, GEMM over NHWC patches ------------------------------------------------

// memcpy for the short runs of patch gathering (a library call costs more than a 9-byte copy): a run of
// 4..63 bytes is two fixed-size copies that overlap in the middle (each one unaligned vector move; the
// stem's 21-byte kernel rows cost more as a byte loop than the product).
QK_INLINE void copy_bytes(int8_t* dst, const int8_t* src, int64_t n) {
  if (n >= 64) {
    std::memcpy(dst, src, n);
  } else if (n >= 32) {
    std::memcpy(dst, src, 32);
    std::memcpy(dst + n - 32, src + n - 32, 32);
  } else if (n >= 16) {
    std::memcpy(dst, src, 16);
    std::memcpy(dst + n - 16, src + n - 16, 16);
  } else if (n >= 8) {
    std::memcpy(dst, src, 8);
    std::memcpy(dst + n - 8, src + n - 8, 8);
  } else if (n >= 4) {
    std::memcpy(dst, src, 4);
    std::memcpy(dst + n - 4, src + n - 4, 4);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  }
}

// Patch rows of one group of a (non-pointwise) conv: row r is output pixel r's taps in (kh, kw, c) order.
struct PatchSource {
  const int8_t* x;  // NHWC
  const Int8ConvShape* s;
  int64_t g, Cg;
};

// The taps of kernel row ki of one output pixel (top-left input column iw0), written to d: zeros where
// they fall in the padding.
QK_INLINE void gather_kernel_row(const PatchSource& ps, int64_t b, int64_t ih, int64_t iw0, int8_t* d) {
  const Int8ConvShape& s = *ps.s;
  const int64_t Cg = ps.Cg;
  if (ih < 0 || ih >= s.H) {
    std::memset(d, 0, s.kw * Cg);
    return;
  }
  const int8_t* xrow = ps.x + (b * s.H + ih) * s.W * s.C + ps.g * Cg;
  // groups == 1 with undilated columns: the kw taps are kw*C contiguous bytes
  if (s.groups == 1 && s.dw == 1 && iw0 >= 0 && iw0 + s.kw <= s.W) {
    copy_bytes(d, xrow + iw0 * s.C, s.kw * Cg);
    return;
  }
  for (int64_t kj = 0; kj < s.kw; ++kj) {
    const int64_t iw = iw0 + kj * s.dw;
    if (iw < 0 || iw >= s.W)
      std::memset(d + kj * Cg, 0, Cg);
    else
      copy_bytes(d + kj * Cg, xrow + iw * s.C, Cg);
  }
}

// Output pixel (b, oh, ow) of patch row r; the loops below step it along without divisions.
struct PixelCursor {
  int64_t b, oh, ow;
  PixelCursor(const Int8ConvShape& s, int64_t r) : b(r / (s.OW * s.OH)), oh((r / s.OW) % s.OH), ow(r % s.OW) {}
  void next(const Int8ConvShape& s) {
    if (++ow == s.OW) {
      ow = 0;
      if (++oh == s.OH) oh = 0, ++b;
    }
  }
};

void gather_patches(const PatchSource& ps, int64_t r0, int64_t n, int8_t* dst, int64_t ld) {
  const Int8ConvShape& s = *ps.s;
  PixelCursor px(s, r0);
  for (int64_t i = 0; i < n; ++i, px.next(s))
    for (int64_t ki = 0; ki < s.kh; ++ki)
      gather_kernel_row(ps, px.b, px.oh * s.sh - s.ph + ki * s.dh, px.ow * s.sw - s.pw, dst + i * ld + ki * s.kw * ps.Cg);
}

// groups == 1, undilated columns and kw*C <= 64: an interior kernel row's taps are copied by one masked
// load and store (the stem: 9 bytes, where a byte loop cost more than the product).
QK_TARGET_AVX512 void gather_patches_short_runs(const PatchSource& ps, int64_t r0, int64_t n, int8_t* dst,
                                                int64_t ld) {
  const Int8ConvShape& s = *ps.s;
  const int64_t run = s.kw * s.C;
  const __mmask64 mask = run >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << run) - 1);
  PixelCursor px(s, r0);
  for (int64_t i = 0; i < n; ++i, px.next(s)) {
    const int64_t iw0 = px.ow * s.sw - s.pw;
    const bool columns_inside = iw0 >= 0 && iw0 + s.kw <= s.W;
    for (int64_t ki = 0; ki < s.kh; ++ki) {
      const int64_t ih = px.oh * s.sh - s.ph + ki * s.dh;
      int8_t* d = dst + i * ld + ki * run;
      const int8_t* src = ps.x + ((px.b * s.H + ih) * s.W + iw0) * s.C;
      if (!columns_inside || ih < 0 || ih >= s.H)
        gather_kernel_row(ps, px.b, ih, iw0, d);
      else if (run <= 16)  // narrower masked moves cross fewer cache lines
        _mm_mask_storeu_epi8(d, (__mmask16)mask, _mm_maskz_loadu_epi8((__mmask16)mask, src));
      else
        _mm512_mask_storeu_epi8(d, mask, _mm512_maskz_loadu_epi8(mask, src));
    }
  }
}

// groups == 1, undilated and a whole patch of at most 64 bytes (the stem: 3 kernel rows of 9): an interior
// pixel's patch is assembled in one register by kh masked loads, each filling its kernel row's bytes, and
// stored at once: a third of the stores of gather_patches_short_runs, whose byte-masked stores were 44% of
// the batch-8 stem. A load's lanes start ki * run bytes before its row so that its bytes land at ki * run;
// the lanes before them are masked off, so no byte outside the input is read.
template <int KH>  // kernel rows: 3 as a constant (the stem), 0 for s.kh
QK_TARGET_AVX512 void gather_patches_whole_t(const PatchSource& ps, int64_t r0, int64_t n, int8_t* dst, int64_t ld) {
  const Int8ConvShape& s = *ps.s;
  const int64_t kh = KH > 0 ? KH : s.kh;
  const int64_t run = s.kw * s.C, bytes = kh * run;
  const __mmask64 patch_mask = bytes >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << bytes) - 1);
  __mmask64 row_mask[64];  // kh * run <= 64 bytes, run >= 1
  int64_t row_offset[64];
  for (int64_t ki = 0; ki < kh; ++ki) {
    row_mask[ki] = (((__mmask64)1 << run) - 1) << (ki * run);
    row_offset[ki] = ki * s.dh * s.W * s.C - ki * run;
  }
  PixelCursor px(s, r0);
  for (int64_t i = 0; i < n; ++i, px.next(s)) {
    const int64_t iw0 = px.ow * s.sw - s.pw, ih0 = px.oh * s.sh - s.ph;
    int8_t* d = dst + i * ld;
    if (iw0 < 0 || iw0 + s.kw > s.W || ih0 < 0 || ih0 + (kh - 1) * s.dh >= s.H) {
      for (int64_t ki = 0; ki < kh; ++ki) gather_kernel_row(ps, px.b, ih0 + ki * s.dh, iw0, d + ki * run);
      continue;
    }
    const uintptr_t src = reinterpret_cast<uintptr_t>(ps.x + ((px.b * s.H + ih0) * s.W + iw0) * s.C);
    __m512i v = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int64_t ki = 0; ki < kh; ++ki)
      v = _mm512_mask_loadu_epi8(v, row_mask[ki], reinterpret_cast<const void*>(src + row_offset[ki]));
    _mm512_mask_storeu_epi8(d, patch_mask, v);
  }
}

void gather_patches_whole(const PatchSource& ps, int64_t r0, int64_t n, int8_t* dst, int64_t ld) {
  if (ps.s->kh == 3) return gather_patches_whole_t<3>(ps, r0, n, dst, ld);
  gather_patches_whole_t<0>(ps, r0, n, dst, ld);
}

// The same for AVX2: an interior kernel row's run (kw*C < 64 bytes: the stem's 9 or 21) is copied by
// copy_bytes' two overlapping moves, with the pixel's bounds tested once instead of per kernel row.
void gather_patches_short_runs_avx2(const PatchSource& ps, int64_t r0, int64_t n, int8_t* dst, int64_t ld) {
  const Int8ConvShape& s = *ps.s;
  const int64_t run = s.kw * s.C;
  PixelCursor px(s, r0);
  for (int64_t i = 0; i < n; ++i, px.next(s)) {
    const int64_t iw0 = px.ow * s.sw - s.pw, ih0 = px.oh * s.sh - s.ph;
    const bool inside = iw0 >= 0 && iw0 + s.kw <= s.W && ih0 >= 0 && ih0 + (s.kh - 1) * s.dh < s.H;
    int8_t* d = dst + i * ld;
    if (!inside) {
      for (int64_t ki = 0; ki < s.kh; ++ki) gather_kernel_row(ps, px.b, ih0 + ki * s.dh, iw0, d + ki * run);
      continue;
    }
    const int8_t* src = ps.x + ((px.b * s.H + ih0) * s.W + iw0) * s.C;
    for (int64_t ki = 0; ki < s.kh; ++ki) copy_bytes(d + ki * run, src + ki * s.dh * s.W * s.C, run);
  }
}

// --- weights in patch order ---------------------------------------------------------------------

// n weight rows [Cg][T] -> [T][Cg] (T = kh*kw taps; rows ld bytes apart in dst) for Cg % 8 == 0 and
// T <= 16 with AVX512-VBMI: eight channels' taps (8*T <= 128 bytes) are loaded at once and one
// two-register byte permute per eight taps turns them into eight bytes per tap. Several times faster
// than a strided copy, which costs as much as the whole product for the 3x3 convs of the extra layers
// (a megabyte of weights, few pixels); done while packing, so no reordered copy is stored.
QK_TARGET_VNNI512_DW __attribute__((target("avx512vbmi"))) void weights_to_patch_order_vbmi(const int8_t* src, int64_t n,
                                                                                         int64_t Cg, int64_t T,
                                                                                         int8_t* dst, int64_t ld) {
  alignas(64) int8_t index[2][64];  // result byte 8*t' + c of permute h: channel c, tap 8*h + t'
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < 8; ++t)
      for (int c = 0; c < 8; ++c) index[h][8 * t + c] = (int8_t)(8 * h + t < T ? c * T + 8 * h + t : 0);
  const __m512i idx0 = _mm512_load_si512(index[0]), idx1 = _mm512_load_si512(index[1]);
  const int64_t window = 8 * T;  // bytes of eight channels' taps
  const __mmask64 lo_mask = window >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << window) - 1);
  const __mmask64 hi_mask = window <= 64 ? 0 : (window >= 128 ? ~(__mmask64)0 : (((__mmask64)1 << (window - 64)) - 1));
  alignas(64) int8_t taps[128];
  for (int64_t o = 0; o < n; ++o) {
    const int8_t* so = src + o * Cg * T;
    int8_t* d = dst + o * ld;
    for (int64_t c0 = 0; c0 < Cg; c0 += 8) {
      const __m512i lo = _mm512_maskz_loadu_epi8(lo_mask, so + c0 * T);
      const __m512i hi = _mm512_maskz_loadu_epi8(hi_mask, so + c0 * T + 64);
      _mm512_store_si512(taps, _mm512_permutex2var_epi8(lo, idx0, hi));
      if (T > 8) _mm512_store_si512(taps + 64, _mm512_permutex2var_epi8(lo, idx1, hi));
      for (int64_t t = 0; t < T; ++t) std::memcpy(d + t * Cg + c0, taps + 8 * t, 8);
    }
  }
}

// Whether weights_to_patch_order_vbmi serves this conv (else the weights are permuted by torch).
bool weights_reorder_while_packing(const Int8ConvShape& s, Int8Isa isa) {
  static const bool vbmi = __builtin_cpu_supports("avx512vbmi");
  const int64_t Cg = s.C / s.groups, T = s.kh * s.kw;
  return T > 1 && T <= 16 && Cg % 8 == 0 && vbmi && int8_vector_isa(isa) == Isa::kAvx512;
}

// out: NHWC, typed by s.out_kind (null for kOutNone: the abs max only).
void grouped_gemm_conv(const at::Tensor& xc, const at::Tensor& weight, const Int8ConvShape& s, const ChannelParams& p,
                       void* out, const PackedConvWeights& packed, AbsMaxSink* abs_max) {
  const int64_t Cg = s.C / s.groups, Og = s.O / s.groups, K = s.kh * s.kw * Cg;
  const int64_t M = s.N * s.OH * s.OW;
  const Int8Isa isa = int8_isa();
  // weight rows in patch order (kh, kw, c): [O][kh][kw][C/g], or as given ([O][C/g][kh][kw]) and
  // reordered row by row while packing (neither when they come packed)
  const bool reorder = weights_reorder_while_packing(s, isa);
  const at::Tensor wrows = packed.valid ? at::Tensor() : reorder ? weight.contiguous() : weight.permute({0, 2, 3, 1}).contiguous();
  const int8_t* wp = packed.valid ? nullptr : wrows.data_ptr<int8_t>();
  const int8_t* xp = xc.data_ptr<int8_t>();
  const bool pointwise = s.kh == 1 && s.kw == 1 && s.sh == 1 && s.sw == 1 && s.ph == 0 && s.pw == 0;
  const bool short_runs = int8_vector_isa(isa) == Isa::kAvx512 && s.groups == 1 && s.dw == 1 && s.kw * Cg <= 64;
  const bool short_runs_avx2 = !short_runs && s.groups == 1 && s.dw == 1 && s.kw * Cg < 64;
  const bool whole_patches = short_runs && K <= 64 && s.kw * Cg < 64;
  for (int64_t g = 0; g < s.groups; ++g) {
    auto patch_rows = [&](int64_t r0, int64_t n, int8_t* dst, int64_t ld) {
      if (pointwise) {
        for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * ld, xp + (r0 + i) * s.C + g * Cg, Cg);
        return;
      }
      const PatchSource ps{xp, &s, g, Cg};
      if (whole_patches)
        gather_patches_whole(ps, r0, n, dst, ld);
      else if (short_runs)
        gather_patches_short_runs(ps, r0, n, dst, ld);
      else if (short_runs_avx2)
        gather_patches_short_runs_avx2(ps, r0, n, dst, ld);
      else
        gather_patches(ps, r0, n, dst, ld);
    };
    auto weight_rows = [&](int64_t r0, int64_t n, int8_t* dst, int64_t ld) {
      if (reorder) return weights_to_patch_order_vbmi(wp + (g * Og + r0) * K, n, Cg, s.kh * s.kw, dst, ld);
      for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * ld, wp + (g * Og + r0 + i) * K, K);
    };
    Int8Epilogue ep;
    ep.out = out;
    ep.out_kind = s.out_kind;
    ep.offset = g * Og;
    ep.channel_offset = g * Og;
    ep.scale = p.scale.data();
    ep.bias = p.bias.data();
    ep.act = s.act;
    ep.abs_max = abs_max;
    Int8RowsInMemory pixels;  // a 1x1 stride-1 conv's patches are the NHWC pixels themselves
    if (pointwise) pixels = {xp + g * Cg, s.C};
    if (packed.valid) {  // pixels on the rows, whatever M: the weights are packed as the columns
      ep.row_stride = s.O, ep.col_stride = 1, ep.channel_on_rows = false;
      if (packed.isa == Int8Isa::kAvx2)
        int8_gemm_avx2_packed(M, K, patch_rows, packed.group(g), ep, pixels);
      else
        int8_gemm_packed(isa, M, K, patch_rows, packed.gemm_group(g), ep, pixels);
    } else if (int8_pixels_on_rows(M, Og)) {
      ep.row_stride = s.O, ep.col_stride = 1, ep.channel_on_rows = false;
      int8_gemm(isa, M, Og, K, patch_rows, weight_rows, ep, pixels);
    } else {
      ep.row_stride = 1, ep.col_stride = s.O, ep.channel_on_rows = true;
      int8_gemm(isa, Og, M, K, weight_rows, patch_rows, ep);
    }
  }
}

// The conv of shape s (checked) with channel parameters p: out typed by s.out_kind (undefined for kOutNone),
// max |y| into abs_max where wanted (float output or none).
void run_conv(const at::Tensor& xc, const at::Tensor& weight, const at::Tensor* blob, const Int8ConvShape& s,
              const ChannelParams& p, at::Tensor& out, AbsMaxSink* abs_max) {
  void* o = s.out_kind == kOutNone ? nullptr : out.data_ptr();
  if (s.groups == s.C && s.groups == s.O)
    depthwise_conv(xc, weight, s, p, o, blob, abs_max);
  else
    grouped_gemm_conv(xc, weight, s, p, o, blob != nullptr ? packed_conv_weights(*blob, s, int8_isa()) : PackedConvWeights{},
                      abs_max);
}

at::Tensor new_conv_output(const at::Tensor& x, const Int8ConvShape& s) {
  return at::empty({s.N, s.O, s.OH, s.OW},
                   x.options().dtype(out_scalar_type(s.out_kind)).memory_format(at::MemoryFormat::ChannelsLast));
}

at::Tensor conv2d_int8_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* blob,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups, const at::Tensor& scale, at::ScalarType out_dtype,
                            c10::string_view activation, AbsMaxSink* abs_max = nullptr) {
  const Int8ConvShape s =
      check_conv2d_int8(x, weight, bias, stride, padding, dilation, groups, scale, out_dtype, activation);
  at::Tensor out = new_conv_output(x, s);
  if (out.numel() == 0) return out;
  const ChannelParams p(scale, bias, s.O);
  run_conv(x.contiguous(at::MemoryFormat::ChannelsLast), weight, blob, s, p, out, abs_max);
  return out;
}

at::Tensor conv2d_int8_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           const at::Tensor& scale, at::ScalarType out_dtype, c10::string_view activation) {
  return conv2d_int8_impl(x, weight, nullptr, bias, stride, padding, dilation, groups, scale, out_dtype, activation);
}

at::Tensor conv2d_int8_packed_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed,
                                  const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, int64_t groups, const at::Tensor& scale,
                                  at::ScalarType out_dtype, c10::string_view activation) {
  return conv2d_int8_impl(x, weight, &packed, bias, stride, padding, dilation, groups, scale, out_dtype, activation);
}

// The max a sink gathered, as the 0-dim float tensor the ops return.
at::Tensor abs_max_tensor(const at::Tensor& like, const AbsMaxSink& sink) {
  at::Tensor m = at::empty({}, like.options().dtype(at::kFloat));
  *m.data_ptr<float>() = sink.value();
  return m;
}

// The float output of conv2d_int8_packed and its max |y| (what abs_max(out) returns), the latter gathered by
// the kernels as they write: a dynamic (abs_max) next layer quantizes with it without a reduction pass.
std::tuple<at::Tensor, at::Tensor> conv2d_int8_packed_abs_max_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const at::Tensor& scale,
    c10::string_view activation) {
  AbsMaxSink sink;
  at::Tensor out = conv2d_int8_impl(x, weight, &packed, bias, stride, padding, dilation, groups, scale, at::kFloat,
                                    activation, &sink);
  return {out, abs_max_tensor(x, sink)};
}

// The int8 codes a dynamic (abs_max, 8-bit) reader of the float output y would quantize it to, with the scale
// it would take, max |y|, and that max. Where the product is cheap next to writing y as float and reading it
// back (AMX and VNNI; on AVX2 products of K <= 64: depthwise, the stem, 1x1 over few channels), two passes:
// the first computes y only for its max (nothing stored), the second writes codes with 127 / max folded into
// the epilogue (scale * f, bias * f: the chaining of static layers, so codes agree with quantizing y up to a
// step on rounding ties). Elsewhere y is written once as float and quantized (the same codes exactly).
// Measured on the whole MobileNet-SSD at batch 8 (Xeon): AMX 25.9 ms two-pass vs 52.5 ms float; AVX2 with
// two passes everywhere 123.5 ms vs 93.6 ms float, since its larger products cost more than the round trip.
std::tuple<at::Tensor, at::Tensor> conv2d_int8_packed_requant_abs_max_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const at::Tensor& scale,
    c10::string_view activation) {
  TORCH_CHECK(activation != "relu6", "qkernels: conv2d_int8_packed_requant_abs_max cannot fold relu6 (its clamp at 6 "
              "is not one in codes of the batch scale); use conv2d_int8_packed_abs_max");
  const Int8ConvShape s =
      check_conv2d_int8(x, weight, bias, stride, padding, dilation, groups, scale, at::kChar, activation);
  if (int8_isa() < Int8Isa::kAvxVnni && s.kh * s.kw * (s.C / s.groups) > 64) {  // one pass: y as float, quantized
    const auto [y, m] =
        conv2d_int8_packed_abs_max_cpu(x, weight, packed, bias, stride, padding, dilation, groups, scale, activation);
    static const auto quantize = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("qkernels::quantize_with_scale", "")
                                     .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
    return {quantize.call(y, m, 8), m};
  }
  AbsMaxSink sink;
  at::Tensor out = new_conv_output(x, s);
  if (out.numel() == 0) return {out, abs_max_tensor(x, sink)};
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  ChannelParams p(scale, bias, s.O);
  Int8ConvShape first = s;
  first.out_kind = kOutNone;
  at::Tensor none;
  run_conv(xc, weight, &packed, first, p, none, &sink);
  const at::Tensor m = abs_max_tensor(x, sink);
  const float y_max = sink.value();
  // 127 / max (0 for an unusable max: codes 0, as quantize_with_scale gives). The epilogue's saturation at
  // +-127 is then the clip to [-max, max] (an infinite y gives +-127 both ways; 8-bit codes only).
  const float f = make_params(y_max, bin_count(8)).inv_step;
  for (int64_t c = 0; c < s.O; ++c) {
    p.scale[c] *= f;
    p.bias[c] *= f;
  }
  run_conv(xc, weight, &packed, s, p, out, nullptr);
  return {out, m};
}

at::Tensor linear_int8_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& scale, at::ScalarType out_dtype, c10::string_view activation) {
  const Int8LinearShape s = check_linear_int8(x, weight, bias, scale, out_dtype, activation);
  at::Tensor out = at::empty(linear_int8_out_sizes(x, s.O), x.options().dtype(out_scalar_type(s.out_kind)));
  if (out.numel() == 0) return out;
  const ChannelParams p(scale, bias, s.O);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const int8_t* xp = xc.data_ptr<int8_t>();
  const int8_t* wp = wc.data_ptr<int8_t>();
  const int64_t K = s.K;
  auto x_rows = [&](int64_t r0, int64_t n, int8_t* dst, int64_t ld) {
    for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * ld, xp + (r0 + i) * K, K);
  };
  auto w_rows = [&](int64_t r0, int64_t n, int8_t* dst, int64_t ld) {
    for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * ld, wp + (r0 + i) * K, K);
  };
  Int8Epilogue ep;
  ep.out = out.data_ptr();
  ep.out_kind = s.out_kind;
  ep.scale = p.scale.data();
  ep.bias = p.bias.data();
  ep.act = s.act;
  if (int8_pixels_on_rows(s.M, s.O)) {
    ep.row_stride = s.O, ep.col_stride = 1, ep.channel_on_rows = false;
    int8_gemm(int8_isa(), s.M, s.O, K, x_rows, w_rows, ep, Int8RowsInMemory{xp, K});
  } else {
    ep.row_stride = 1, ep.col_stride = s.O, ep.channel_on_rows = true;
    int8_gemm(int8_isa(), s.O, s.M, K, w_rows, x_rows, ep);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qkernels, CPU, m) {
  m.impl("conv2d_int8", &conv2d_int8_cpu);
  m.impl("conv2d_int8_packed", &conv2d_int8_packed_cpu);
  m.impl("conv2d_int8_packed_abs_max", &conv2d_int8_packed_abs_max_cpu);
  m.impl("conv2d_int8_packed_requant_abs_max", &conv2d_int8_packed_requant_abs_max_cpu);
  m.impl("pack_conv2d_int8_weight", &pack_conv2d_int8_weight_cpu);
  m.impl("linear_int8", &linear_int8_cpu);
}

}  // namespace qkernels
