// Runtime ISA dispatch for the auto-vectorised CPU loops: one body, compiled for AVX-512, AVX2 and a
// portable baseline, picked once from what the processor reports.
#pragma once
// GCC 12 reports the _mm512_undefined_* placeholders inside its own conversion intrinsics as
// "may be used uninitialized" in every file that vectorises with them; a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#define QK_INLINE inline __attribute__((always_inline))
#define QK_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))
#define QK_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace qkernels {

enum class Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa cpu_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return Isa::kAvx2;
    return Isa::kBase;
  }();
  return isa;
}

// Element storage types: float, IEEE half as _Float16, bfloat16 as its raw 16 bits.
struct bf16_bits {
  uint16_t v;
};

QK_INLINE float to_float(float x) { return x; }
QK_INLINE float to_float(_Float16 x) { return (float)x; }
QK_INLINE float to_float(bf16_bits x) {
  uint32_t u = (uint32_t)x.v << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
QK_INLINE T from_float(float f);
template <>
QK_INLINE float from_float<float>(float f) { return f; }
template <>
QK_INLINE _Float16 from_float<_Float16>(float f) { return (_Float16)f; }
template <>
QK_INLINE bf16_bits from_float<bf16_bits>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  // round to nearest even; NaN stays a quiet NaN
  uint32_t r = ((u & 0x7fffffffu) > 0x7f800000u) ? 0x7fc00000u : u + 0x7fffu + ((u >> 16) & 1u);
  return bf16_bits{(uint16_t)(r >> 16)};
}

// GCC 12 does not vectorise _Float16 conversions without AVX512-FP16, so half tensors are converted
// in blocks with F16C instructions and then go through the float kernels.
QK_TARGET_AVX512 inline void half_to_float_avx512(const _Float16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  for (; i < n; ++i) dst[i] = (float)src[i];
}
QK_TARGET_AVX2 inline void half_to_float_avx2(const _Float16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = (float)src[i];
}
QK_TARGET_AVX512 inline void float_to_half_avx512(const float* src, _Float16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = (_Float16)src[i];
}
QK_TARGET_AVX2 inline void float_to_half_avx2(const float* src, _Float16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = (_Float16)src[i];
}

inline void half_to_float(const _Float16* src, float* dst, int64_t n) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return half_to_float_avx512(src, dst, n);
    case Isa::kAvx2: return half_to_float_avx2(src, dst, n);
    default:
      for (int64_t i = 0; i < n; ++i) dst[i] = (float)src[i];
  }
}

inline void float_to_half(const float* src, _Float16* dst, int64_t n) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return float_to_half_avx512(src, dst, n);
    case Isa::kAvx2: return float_to_half_avx2(src, dst, n);
    default:
      for (int64_t i = 0; i < n; ++i) dst[i] = (_Float16)src[i];
  }
}

}  // namespace qkernels

// Defines NAME(isa, args...) that calls BODY<T>(args...) compiled for the chosen ISA.
// BODY must be a QK_INLINE function template so it is inlined into each target clone.
#define QK_DEFINE_ISA_DISPATCH(NAME, BODY)                                                \
  template <typename T, typename... A>                                                    \
  QK_TARGET_AVX512 auto NAME##_avx512(A... a) { return BODY<T>(a...); }                   \
  template <typename T, typename... A>                                                    \
  QK_TARGET_AVX2 auto NAME##_avx2(A... a) { return BODY<T>(a...); }                       \
  template <typename T, typename... A>                                                    \
  auto NAME##_base(A... a) { return BODY<T>(a...); }                                      \
  template <typename T, typename... A>                                                    \
  auto NAME(A... a) {                                                                     \
    switch (::qkernels::cpu_isa()) {                                                      \
      case ::qkernels::Isa::kAvx512: return NAME##_avx512<T>(a...);                        \
      case ::qkernels::Isa::kAvx2: return NAME##_avx2<T>(a...);                            \
      default: return NAME##_base<T>(a...);                                               \
    }                                                                                     \
  }

// Runs BODY (a lambda using the type alias T) with T the storage type of a floating tensor.
#define QK_DISPATCH_FLOATING(stype, opname, ...)                                                   \
  [&] {                                                                                            \
    switch (stype) {                                                                               \
      case at::kFloat: { using T = float; return __VA_ARGS__(); }                                 \
      case at::kHalf: { using T = _Float16; return __VA_ARGS__(); }                               \
      case at::kBFloat16: { using T = ::qkernels::bf16_bits; return __VA_ARGS__(); }              \
      default: TORCH_CHECK(false, "qkernels: ", opname, " expects float32, float16 or bfloat16, got ", stype); \
    }                                                                                              \
  }()
