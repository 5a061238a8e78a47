// CPU kernels of the fake-quantize family and the quantizer state updates.
// Each op is at most two passes over memory: one abs-max reduction and one quantize pass, both
// vectorised (see simd.h) and split over threads with at::parallel_for. Inputs are walked in memory
// order (dense_input: any dense strides, no copy) and outputs keep those strides, as on CUDA.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/abs_max.h"
#include "cpu/simd.h"
#include "quant_math.h"

namespace qkernels {
namespace {

constexpr int64_t kGrain = 1 << 15;

template <typename T>
QK_INLINE int fake_quant_body(const T* x, T* out, int64_t n, QuantParams p) {
  for (int64_t i = 0; i < n; ++i) out[i] = from_float<T>(fake_quant(to_float(x[i]), p));
  return 0;
}
QK_DEFINE_ISA_DISPATCH(fake_quant_run, fake_quant_body)

template <typename T>
QK_INLINE int quantize8_body(const T* x, int8_t* out, int64_t n, QuantParams p) {
  for (int64_t i = 0; i < n; ++i) out[i] = (int8_t)quant_code_int(to_float(x[i]), p);
  return 0;
}
QK_DEFINE_ISA_DISPATCH(quantize8_run, quantize8_body)

template <typename T>
QK_INLINE int quantize16_body(const T* x, int16_t* out, int64_t n, QuantParams p) {
  for (int64_t i = 0; i < n; ++i) out[i] = (int16_t)quant_code_int(to_float(x[i]), p);
  return 0;
}
QK_DEFINE_ISA_DISPATCH(quantize16_run, quantize16_body)

template <typename T>
QK_INLINE int clip_grad_body(const T* g, const T* x, T* out, int64_t n, float s) {
  for (int64_t i = 0; i < n; ++i) {
    float xv = to_float(x[i]);
    float a = fabsf(xv);
    bool pass = a <= s;  // false for NaN and for Inf beyond any usable scale
    out[i] = pass ? g[i] : from_float<T>(0.f);
  }
  return 0;
}
QK_DEFINE_ISA_DISPATCH(clip_grad_run, clip_grad_body)

// Clip-STE mask words of x[0, n): bit i of word w is |x[32w + i]| <= s (the test clip_grad applies).
template <typename T>
QK_INLINE int mask_bits_body(const T* x, uint32_t* words, int64_t n, float s) {
  const int64_t full = n / 32;
  for (int64_t w = 0; w < full; ++w) {
    uint32_t m = 0;
    for (int i = 0; i < 32; ++i) m |= (uint32_t)(fabsf(to_float(x[w * 32 + i])) <= s) << i;
    words[w] = m;
  }
  if (n % 32) {
    uint32_t m = 0;
    for (int i = 0; i < (int)(n % 32); ++i) m |= (uint32_t)(fabsf(to_float(x[full * 32 + i])) <= s) << i;
    words[full] = m;
  }
  return 0;
}
QK_DEFINE_ISA_DISPATCH(mask_bits_run, mask_bits_body)

// out = g where the mask bit is set, else +0, on raw storage bits (R = uint32_t or uint16_t).
template <typename R>
QK_INLINE int mask_grad_body(const R* g, const uint32_t* words, R* out, int64_t n) {
  const int64_t full = n / 32;
  for (int64_t w = 0; w < full; ++w) {
    const uint32_t m = words[w];
    for (int i = 0; i < 32; ++i) out[w * 32 + i] = ((m >> i) & 1u) ? g[w * 32 + i] : R(0);
  }
  for (int64_t i = full * 32; i < n; ++i) out[i] = ((words[full] >> (i % 32)) & 1u) ? g[i] : R(0);
  return 0;
}
QK_DEFINE_ISA_DISPATCH(mask_grad_run, mask_grad_body)

// Channel-wise along short rows: one set of parameters per column (sc/inv/st: scale, inv_step, step).
template <typename T>
QK_INLINE int column_max_body(const T* x, uint32_t* m, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t a = abs_bits(x[j]);
    m[j] = a > m[j] ? a : m[j];
  }
  return 0;
}
QK_DEFINE_ISA_DISPATCH(column_max_run, column_max_body)

template <typename T>
QK_INLINE int fake_quant_columns_body(const T* x, T* out, int64_t n, const float* sc, const float* inv,
                                      const float* st) {
  for (int64_t j = 0; j < n; ++j) out[j] = from_float<T>(fake_quant(to_float(x[j]), QuantParams{sc[j], inv[j], st[j]}));
  return 0;
}
QK_DEFINE_ISA_DISPATCH(fake_quant_columns_run, fake_quant_columns_body)

template <typename T, typename Code>
QK_INLINE int quantize_columns_body(const T* x, Code* out, int64_t n, const float* sc, const float* inv) {
  for (int64_t j = 0; j < n; ++j) out[j] = (Code)quant_code_int(to_float(x[j]), QuantParams{sc[j], inv[j], 0.f});
  return 0;
}
template <typename T>
QK_INLINE int quantize8_columns_body(const T* x, int8_t* out, int64_t n, const float* sc, const float* inv) {
  return quantize_columns_body<T, int8_t>(x, out, n, sc, inv);
}
template <typename T>
QK_INLINE int quantize16_columns_body(const T* x, int16_t* out, int64_t n, const float* sc, const float* inv) {
  return quantize_columns_body<T, int16_t>(x, out, n, sc, inv);
}
QK_DEFINE_ISA_DISPATCH(quantize8_columns_run, quantize8_columns_body)
QK_DEFINE_ISA_DISPATCH(quantize16_columns_run, quantize16_columns_body)

// Block-level entry points. float and bfloat16 run the vectorised bodies directly; half goes through
// a float staging buffer (see half_to_float in simd.h).
constexpr int64_t kStage = 2048;

template <typename F>
void for_each_stage(int64_t n, F&& f) {
  for (int64_t b = 0; b < n; b += kStage) f(b, std::min(kStage, n - b));
}

template <typename T>
uint32_t abs_max_block(const T* x, int64_t n) {
  if constexpr (std::is_same_v<T, _Float16>) {
    float buf[kStage];
    uint32_t m = 0;
    for_each_stage(n, [&](int64_t b, int64_t len) {
      half_to_float(x + b, buf, len);
      m = std::max(m, abs_max_bits<float>(buf, len));
    });
    return m;
  } else {
    return abs_max_bits<T>(x, n);
  }
}

template <typename T>
void fake_quant_block(const T* x, T* out, int64_t n, const QuantParams& p) {
  if constexpr (std::is_same_v<T, _Float16>) {
    float buf[kStage];
    for_each_stage(n, [&](int64_t b, int64_t len) {
      half_to_float(x + b, buf, len);
      fake_quant_run<float>(buf, buf, len, p);
      float_to_half(buf, out + b, len);
    });
  } else {
    fake_quant_run<T>(x, out, n, p);
  }
}

// quant_code_int of float32 on AVX2, written out: GCC leaves the scalar loop's float -> int8 narrowing
// unvectorised (2.5 G codes/s on two threads for a tensor in cache, 5x slower than the abs max pass), and
// a dynamic int8 model quantizes every layer's input with it. Lane by lane the same: clip_to as min(s, x)
// then max(-s, .) (vminps/vmaxps return the second operand for NaN, so NaN passes as in clip_to), one
// multiply, then round_half_away as trunc(v + copysign(0.5 - 2^-25, v)): equal to its trunc-and-compare
// form for every float of magnitude <= 128 (all were checked), and |v| <= bin * (1 + 2^-23) < 128 here.
// NaN -> 0.
QK_TARGET_AVX2 QK_INLINE __m256i quant_code_int8_avx2(__m256 x, __m256 s, __m256 neg_s, __m256 inv) {
  const __m256 v = _mm256_mul_ps(_mm256_max_ps(neg_s, _mm256_min_ps(s, x)), inv);
  const __m256 h = _mm256_or_ps(_mm256_and_ps(v, _mm256_set1_ps(-0.f)), _mm256_set1_ps(0.49999997f));
  // NaN: cvttps gives INT32_MIN, zeroed by the ordered mask
  return _mm256_and_si256(_mm256_cvttps_epi32(_mm256_add_ps(v, h)), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q)));
}

QK_TARGET_AVX2 void quantize8_float_avx2(const float* x, int8_t* out, int64_t n, const QuantParams& p) {
  const __m256 s = _mm256_set1_ps(p.scale), neg_s = _mm256_set1_ps(-p.scale), inv = _mm256_set1_ps(p.inv_step);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i a = quant_code_int8_avx2(_mm256_loadu_ps(x + i), s, neg_s, inv);
    const __m256i b = quant_code_int8_avx2(_mm256_loadu_ps(x + i + 8), s, neg_s, inv);
    const __m256i c = quant_code_int8_avx2(_mm256_loadu_ps(x + i + 16), s, neg_s, inv);
    const __m256i d = quant_code_int8_avx2(_mm256_loadu_ps(x + i + 24), s, neg_s, inv);
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_permutevar8x32_epi32(bytes, order));
  }
  for (; i < n; ++i) out[i] = (int8_t)quant_code_int(x[i], p);
}

template <typename T, typename Code>
void quantize_block(const T* x, Code* out, int64_t n, const QuantParams& p) {
  if constexpr (std::is_same_v<T, float> && std::is_same_v<Code, int8_t>) {
    if (cpu_isa() != Isa::kBase) return quantize8_float_avx2(x, out, n, p);
  }
  auto run = [&](auto* src, Code* dst, int64_t len) {
    using S = std::remove_const_t<std::remove_pointer_t<decltype(src)>>;
    if constexpr (std::is_same_v<Code, int8_t>)
      quantize8_run<S>(src, dst, len, p);
    else
      quantize16_run<S>(src, dst, len, p);
  };
  if constexpr (std::is_same_v<T, _Float16>) {
    float buf[kStage];
    for_each_stage(n, [&](int64_t b, int64_t len) {
      half_to_float(x + b, buf, len);
      run(static_cast<const float*>(buf), out + b, len);
    });
  } else {
    run(x, out, n);
  }
}

template <typename T>
void clip_grad_block(const T* g, const T* x, T* out, int64_t n, float s) {
  if constexpr (std::is_same_v<T, _Float16>) {
    float gbuf[kStage], xbuf[kStage];
    for_each_stage(n, [&](int64_t b, int64_t len) {
      half_to_float(g + b, gbuf, len);
      half_to_float(x + b, xbuf, len);
      clip_grad_run<float>(static_cast<const float*>(gbuf), static_cast<const float*>(xbuf), gbuf, len, s);
      float_to_half(gbuf, out + b, len);
    });
  } else {
    clip_grad_run<T>(g, x, out, n, s);
  }
}

// Fake quant and its clip-STE mask words in one pass, stage by stage (kStage is a multiple of 32, so
// each stage fills whole words): the mask is taken from the input while the stage is in cache.
template <typename T>
void fake_quant_mask_block(const T* x, T* out, uint32_t* words, int64_t n, const QuantParams& p, float s) {
  for_each_stage(n, [&](int64_t b, int64_t len) {
    if constexpr (std::is_same_v<T, _Float16>) {
      float buf[kStage];
      half_to_float(x + b, buf, len);
      mask_bits_run<float>(static_cast<const float*>(buf), words + b / 32, len, s);
      fake_quant_run<float>(static_cast<const float*>(buf), buf, len, p);
      float_to_half(buf, out + b, len);
    } else {
      mask_bits_run<T>(x + b, words + b / 32, len, s);
      fake_quant_run<T>(x + b, out + b, len, p);
    }
  });
}

// Codes are written as int8 (bits <= 8) or int16 into `out`, whichever dtype it has.
template <typename T>
void quantize_codes_block(const T* x, at::Tensor& out, int64_t offset, int64_t n, const QuantParams& p) {
  if (out.scalar_type() == at::kChar)
    quantize_block<T, int8_t>(x, out.data_ptr<int8_t>() + offset, n, p);
  else
    quantize_block<T, int16_t>(x, out.data_ptr<int16_t>() + offset, n, p);
}

template <typename T>
float abs_max_of(const T* x, int64_t n) {
  uint32_t m = at::parallel_reduce(
      int64_t(0), n, kGrain, uint32_t(0),
      [&](int64_t b, int64_t e, uint32_t acc) { return std::max(acc, abs_max_block<T>(x + b, e - b)); },
      [](uint32_t a, uint32_t b) { return std::max(a, b); });
  return bits_to_float(m);
}

float scale_value(const at::Tensor& scale) { return *scale.data_ptr<float>(); }

at::Tensor new_scalar(const at::Tensor& like, float v) {
  at::Tensor s = at::empty({}, like.options().dtype(at::kFloat));
  *s.data_ptr<float>() = v;
  return s;
}

at::Tensor new_output(const at::Tensor& xd, int64_t bits, bool codes) {
  // empty_like keeps a dense input's strides: the output is written in x's memory order.
  return codes ? at::empty_like(xd, xd.options().dtype(code_dtype(bits))) : at::empty_like(xd);
}

at::Tensor new_mask(const at::Tensor& xd, bool clip_grad) {
  return at::empty({clip_grad ? mask_words(xd.numel()) : 0}, xd.options().dtype(at::kInt));
}

// Writes fake_quant(x) (and, when `mask` has words, its clip-STE mask) or the integer codes into `out`,
// with one scale for the whole tensor.
void quantize_pass(const at::Tensor& xd, at::Tensor& out, at::Tensor& mask, float s, int64_t bits, bool codes) {
  const QuantParams p = make_params(s, bin_count(bits));
  const int64_t n = xd.numel();
  QK_DISPATCH_FLOATING(xd.scalar_type(), "quantize", [&] {
    const T* x = static_cast<const T*>(xd.data_ptr());
    if (mask.numel() > 0) {  // split by whole words, so each thread writes its own
      T* o = static_cast<T*>(out.data_ptr());
      uint32_t* words = reinterpret_cast<uint32_t*>(mask.data_ptr<int32_t>());
      at::parallel_for(0, mask.numel(), kGrain / 32, [&](int64_t wb, int64_t we) {
        const int64_t b = wb * 32, e = std::min(we * 32, n);
        fake_quant_mask_block<T>(x + b, o + b, words + wb, e - b, p, s);
      });
      return;
    }
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      if (!codes)
        fake_quant_block<T>(x + b, static_cast<T*>(out.data_ptr()) + b, e - b, p);
      else
        quantize_codes_block<T>(x + b, out, b, e - b, p);
    });
  });
}

at::Tensor abs_max_cpu(const at::Tensor& x) {
  check_float_input(x, "x");
  at::Tensor xd = dense_input(x);
  return new_scalar(x, QK_DISPATCH_FLOATING(xd.scalar_type(), "abs_max", [&] {
    return abs_max_of(static_cast<const T*>(xd.data_ptr()), xd.numel());
  }));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> abs_max_quant(const at::Tensor& x, int64_t bits, bool codes,
                                                             bool clip_grad) {
  check_float_input(x, "x");
  check_bits(bits);
  at::Tensor xd = dense_input(x);
  at::Tensor scale = abs_max_cpu(xd);
  at::Tensor out = new_output(xd, bits, codes);
  at::Tensor mask = new_mask(xd, clip_grad);
  quantize_pass(xd, out, mask, scale_value(scale), bits, codes);
  return {out, scale, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_abs_max_cpu(const at::Tensor& x, int64_t bits,
                                                                      bool clip_grad) {
  return abs_max_quant(x, bits, false, clip_grad);
}

std::tuple<at::Tensor, at::Tensor> quantize_abs_max_cpu(const at::Tensor& x, int64_t bits) {
  auto r = abs_max_quant(x, bits, true, false);
  return {std::get<0>(r), std::get<1>(r)};
}

std::tuple<at::Tensor, at::Tensor> with_scale_quant(const at::Tensor& x, const at::Tensor& scale, int64_t bits,
                                                    bool codes, bool clip_grad) {
  check_float_input(x, "x");
  check_bits(bits);
  check_scalar_scale(scale, x, "scale");
  at::Tensor xd = dense_input(x);
  at::Tensor out = new_output(xd, bits, codes);
  at::Tensor mask = new_mask(xd, clip_grad);
  quantize_pass(xd, out, mask, scale_value(scale.contiguous()), bits, codes);
  return {out, mask};
}

std::tuple<at::Tensor, at::Tensor> fake_quant_with_scale_cpu(const at::Tensor& x, const at::Tensor& scale, int64_t bits,
                                                             bool clip_grad) {
  return with_scale_quant(x, scale, bits, false, clip_grad);
}

at::Tensor quantize_with_scale_cpu(const at::Tensor& x, const at::Tensor& scale, int64_t bits) {
  return std::get<0>(with_scale_quant(x, scale, bits, true, false));
}

// out[3w + c] = plane c [w] for w < n: 16 pixels of three planes -> 48 interleaved bytes with nine byte
// shuffles (each output vector takes its bytes of each plane, the others zeroed by index 0x80).
QK_TARGET_AVX2 void interleave3_avx2(const int8_t* p0, const int8_t* p1, const int8_t* p2, int64_t n, int8_t* out) {
  static const auto masks = [] {
    std::array<std::array<std::array<int8_t, 16>, 3>, 3> m{};  // [output vector][plane][byte]
    for (int k = 0; k < 3; ++k)
      for (int i = 0; i < 16; ++i)
        for (int c = 0; c < 3; ++c) m[k][c][i] = (16 * k + i) % 3 == c ? (int8_t)((16 * k + i) / 3) : (int8_t)0x80;
    return m;
  }();
  __m128i idx[3][3];
  for (int k = 0; k < 3; ++k)
    for (int c = 0; c < 3; ++c) idx[k][c] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(masks[k][c].data()));
  int64_t w = 0;
  for (; w + 16 <= n; w += 16) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p0 + w));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p1 + w));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p2 + w));
    for (int k = 0; k < 3; ++k) {
      const __m128i v = _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(a, idx[k][0]), _mm_shuffle_epi8(b, idx[k][1])),
                                     _mm_shuffle_epi8(c, idx[k][2]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 3 * w + 16 * k), v);
    }
  }
  for (; w < n; ++w) {
    out[3 * w] = p0[w];
    out[3 * w + 1] = p1[w];
    out[3 * w + 2] = p2[w];
  }
}

at::Tensor quantize_with_scale_channels_last_cpu(const at::Tensor& x, const at::Tensor& scale, int64_t bits) {
  check_float_input(x, "x");
  check_bits(bits);
  check_scalar_scale(scale, x, "scale");
  TORCH_CHECK(x.dim() == 4, "qkernels: quantize_with_scale_channels_last expects a 4-D x [N, C, H, W], got ", x.dim(),
              "-D");
  if (x.scalar_type() != at::kFloat || bits > 8 || !x.is_contiguous())  // a layout copy first, then the codes
    return quantize_with_scale_cpu(x.contiguous(at::MemoryFormat::ChannelsLast), scale, bits);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({N, C, H, W}, x.options().dtype(at::kChar).memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const QuantParams p = make_params(scale_value(scale.contiguous()), bin_count(bits));
  const float* xp = x.data_ptr<float>();
  int8_t* op = out.data_ptr<int8_t>();
  // One image row at a time: each of its C plane rows quantized into a small buffer (the vectorised codes of
  // quantize_with_scale, so the same codes), then interleaved into the row's NHWC bytes.
  at::parallel_for(0, N * H, std::max<int64_t>(1, kGrain / std::max<int64_t>(C * W, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<int8_t> rows(C * W);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / H, h = r % H;
      for (int64_t c = 0; c < C; ++c) quantize_block<float, int8_t>(xp + ((n * C + c) * H + h) * W, rows.data() + c * W, W, p);
      int8_t* o = op + r * W * C;
      if (C == 3 && cpu_isa() != Isa::kBase) {
        interleave3_avx2(rows.data(), rows.data() + W, rows.data() + 2 * W, W, o);
        continue;
      }
      for (int64_t w = 0; w < W; ++w)
        for (int64_t c = 0; c < C; ++c) o[w * C + c] = rows[c * W + w];
    }
  });
  return out;
}

// Rows of `inner` elements, one channel each (long rows: conv and linear weights along axis 0).
template <typename T>
void channel_wise_rows(const T* xp, at::Tensor& out, float* sp, const ChannelLayout& l, int bin, bool codes) {
  const int64_t outer = l.outer, channels = l.channels, inner = l.inner;
  at::parallel_for(0, channels, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      uint32_t m = 0;
      for (int64_t o = 0; o < outer; ++o) m = std::max(m, abs_max_block<T>(xp + (o * channels + c) * inner, inner));
      sp[c] = bits_to_float(m);
    }
  });
  const int64_t rows = outer * channels;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1)), [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const QuantParams p = make_params(sp[r % channels], bin);
      const T* src = xp + r * inner;
      if (!codes)
        fake_quant_block<T>(src, static_cast<T*>(out.data_ptr()) + r * inner, inner, p);
      else
        quantize_codes_block<T>(src, out, r * inner, inner, p);
    }
  });
}

// Calls f(float pointer, length) over x[0, n) in stages: half is converted first (see simd.h).
template <typename T, typename F>
void as_floats(const T* x, int64_t n, F&& f) {
  if constexpr (std::is_same_v<T, _Float16>) {
    float buf[kStage];
    for_each_stage(n, [&](int64_t b, int64_t len) {
      half_to_float(x + b, buf, len);
      f(static_cast<const float*>(buf), b, len);
    });
  } else {
    f(x, int64_t(0), n);
  }
}

// Short rows (inner < kCpuRowMin: channels_last activations, transposed weights, the last axis): the
// memory as [outer, L = channels * inner] rows, with per-column maxima and per-column parameters.
template <typename T>
void channel_wise_columns(const T* xp, at::Tensor& out, float* sp, const ChannelLayout& l, int bin, bool codes) {
  const int64_t outer = l.outer, inner = l.inner, L = l.channels * l.inner;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), outer * L / kGrain));
  std::vector<uint32_t> part(tasks * L, 0u);
  at::parallel_for(0, tasks, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      uint32_t* m = part.data() + t * L;
      for (int64_t o = outer * t / tasks; o < outer * (t + 1) / tasks; ++o)
        as_floats(xp + o * L, L, [&](const auto* f, int64_t b, int64_t len) {
          using S = std::remove_const_t<std::remove_pointer_t<decltype(f)>>;
          column_max_run<S>(f, m + b, len);
        });
    }
  });
  for (int64_t c = 0; c < l.channels; ++c) {
    uint32_t m = 0;
    for (int64_t t = 0; t < tasks; ++t)
      for (int64_t j = c * inner; j < (c + 1) * inner; ++j) m = std::max(m, part[t * L + j]);
    sp[c] = bits_to_float(m);
  }
  std::vector<float> sc(L), inv(L), st(L);
  for (int64_t j = 0; j < L; ++j) {
    const QuantParams p = make_params(sp[j / inner], bin);
    sc[j] = p.scale;
    inv[j] = p.inv_step;
    st[j] = p.step;
  }
  at::parallel_for(0, outer, std::max<int64_t>(1, kGrain / L), [&](int64_t ob, int64_t oe) {
    for (int64_t o = ob; o < oe; ++o) {
      const T* src = xp + o * L;
      const int64_t row_at = o * L;
      if (!codes) {
        T* dst = static_cast<T*>(out.data_ptr()) + row_at;
        if constexpr (std::is_same_v<T, _Float16>) {
          float buf[kStage];
          for_each_stage(L, [&](int64_t b, int64_t len) {
            half_to_float(src + b, buf, len);
            fake_quant_columns_run<float>(static_cast<const float*>(buf), buf, len, sc.data() + b, inv.data() + b,
                                          st.data() + b);
            float_to_half(buf, dst + b, len);
          });
        } else {
          fake_quant_columns_run<T>(src, dst, L, sc.data(), inv.data(), st.data());
        }
      } else {
        as_floats(src, L, [&](const auto* f, int64_t b, int64_t len) {
          using S = std::remove_const_t<std::remove_pointer_t<decltype(f)>>;
          if (out.scalar_type() == at::kChar)
            quantize8_columns_run<S>(f, out.data_ptr<int8_t>() + row_at + b, len, sc.data() + b, inv.data() + b);
          else
            quantize16_columns_run<S>(f, out.data_ptr<int16_t>() + row_at + b, len, sc.data() + b, inv.data() + b);
        });
      }
    }
  });
}

constexpr int64_t kCpuRowMin = 16;

std::tuple<at::Tensor, at::Tensor> channel_wise_quant(const at::Tensor& x, int64_t bits, int64_t axis, bool codes) {
  check_float_input(x, "x");
  check_bits(bits);
  axis = wrap_axis(axis, x);
  at::Tensor xd = dense_input(x);
  const ChannelLayout layout = memory_channel_layout(xd, axis);
  at::Tensor scales = at::empty({layout.channels}, xd.options().dtype(at::kFloat));
  at::Tensor out = new_output(xd, bits, codes);
  if (xd.numel() == 0) {
    scales.zero_();
    return {out, scales};
  }
  float* sp = scales.data_ptr<float>();
  const int bin = bin_count(bits);
  QK_DISPATCH_FLOATING(xd.scalar_type(), "channel-wise quantize", [&] {
    const T* xp = static_cast<const T*>(xd.data_ptr());
    if (layout.inner >= kCpuRowMin)
      channel_wise_rows<T>(xp, out, sp, layout, bin, codes);
    else
      channel_wise_columns<T>(xp, out, sp, layout, bin, codes);
  });
  return {out, scales};
}

std::tuple<at::Tensor, at::Tensor> fake_channel_wise_quant_abs_max_cpu(const at::Tensor& x, int64_t bits, int64_t axis,
                                                                      bool /*clip_grad*/) {
  return channel_wise_quant(x, bits, axis, false);
}

std::tuple<at::Tensor, at::Tensor> quantize_channel_wise_abs_max_cpu(const at::Tensor& x, int64_t bits, int64_t axis) {
  return channel_wise_quant(x, bits, axis, true);
}

at::Tensor fake_quant_clip_grad_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale) {
  check_clip_grad_args(grad, x, scale);
  at::Tensor xd = dense_input(x);
  at::Tensor gd = in_layout_of(grad, xd);
  at::Tensor out = at::empty_like(xd);
  const float s = scale_value(scale.contiguous());
  QK_DISPATCH_FLOATING(xd.scalar_type(), "fake_quant_clip_grad", [&] {
    const T* g = static_cast<const T*>(gd.data_ptr());
    const T* xp = static_cast<const T*>(xd.data_ptr());
    T* o = static_cast<T*>(out.data_ptr());
    at::parallel_for(0, xd.numel(), kGrain, [&](int64_t b, int64_t e) { clip_grad_block<T>(g + b, xp + b, o + b, e - b, s); });
  });
  return out;
}

at::Tensor fake_quant_mask_grad_cpu(const at::Tensor& grad, const at::Tensor& mask) {
  check_mask_grad_args(grad, mask);
  at::Tensor gd = dense_input(grad);
  at::Tensor md = mask.contiguous();
  at::Tensor out = at::empty_like(gd);
  const int64_t n = gd.numel();
  const uint32_t* words = reinterpret_cast<const uint32_t*>(md.data_ptr<int32_t>());
  QK_DISPATCH_FLOATING(gd.scalar_type(), "fake_quant_mask_grad", [&] {
    using R = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;  // bits pass through unchanged
    const R* g = static_cast<const R*>(gd.data_ptr());
    R* o = static_cast<R*>(out.data_ptr());
    at::parallel_for(0, md.numel(), kGrain / 32, [&](int64_t wb, int64_t we) {
      const int64_t b = wb * 32, e = std::min(we * 32, n);
      mask_grad_run<R>(g + b, words + wb, o + b, e - b);
    });
  });
  return out;
}

void range_abs_max_update_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& window,
                              const at::Tensor& step, int64_t window_size) {
  check_range_abs_max_state(x, scale, window, step, window_size);
  const float cur = scale_value(abs_max_cpu(x));
  float* w = window.data_ptr<float>();
  float* s = scale.data_ptr<float>();
  int64_t valid = 0;
  if (range_abs_max_step(cur, w, step.data_ptr<int64_t>(), window_size, s, &valid)) *s = *std::max_element(w, w + valid);
}

void moving_average_abs_max_update_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& accum,
                                       const at::Tensor& state, double moving_rate) {
  check_moving_average_state(x, scale, accum, state, moving_rate);
  const float cur = scale_value(abs_max_cpu(x));
  moving_average_step(cur, (float)moving_rate, accum.data_ptr<float>(), state.data_ptr<float>(), scale.data_ptr<float>());
}

}  // namespace

TORCH_LIBRARY_IMPL(qkernels, CPU, m) {
  m.impl("abs_max", &abs_max_cpu);
  m.impl("fake_quant_abs_max", &fake_quant_abs_max_cpu);
  m.impl("quantize_abs_max", &quantize_abs_max_cpu);
  m.impl("fake_quant_with_scale", &fake_quant_with_scale_cpu);
  m.impl("quantize_with_scale", &quantize_with_scale_cpu);
  m.impl("quantize_with_scale_channels_last", &quantize_with_scale_channels_last_cpu);
  m.impl("fake_channel_wise_quant_abs_max", &fake_channel_wise_quant_abs_max_cpu);
  m.impl("quantize_channel_wise_abs_max", &quantize_channel_wise_abs_max_cpu);
  m.impl("fake_quant_clip_grad", &fake_quant_clip_grad_cpu);
  m.impl("fake_quant_mask_grad", &fake_quant_mask_grad_cpu);
  m.impl("range_abs_max_update_", &range_abs_max_update_cpu);
  m.impl("moving_average_abs_max_update_", &moving_average_abs_max_update_cpu);
}

}  // namespace qkernels
