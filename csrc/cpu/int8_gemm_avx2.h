// The AVX2 (no VNNI) int8 product and the AVX2 epilogue pieces the CPU int8 kernels share; see
// int8_gemm_avx2.cpp for the layouts.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/int8_gemm.h"

#if !defined(__CUDACC__)
namespace qkernels {

// Q packed for the AVX2 kernels: blocks of 16 rows, each [Kp/4][16][4] bytes (Kp = K rounded up to 4).
struct Avx2PackedQ {
  const int8_t* data = nullptr;
  int64_t rows = 0, Kp = 0;
  bool has_min = false;  // some value is -128 (the sign-moving kernel cannot take it)
};

// Bytes avx2_pack_q writes for `rows` rows of K.
int64_t avx2_packed_q_bytes(int64_t rows, int64_t K);
// Packs Q into dst; returns whether some value is -128 (Avx2PackedQ::has_min).
bool avx2_pack_q(Int8RowSource Q, int64_t rows, int64_t K, int8_t* dst);

// C = P * Q^T through the epilogue, Q already packed.
void int8_gemm_avx2_packed(int64_t p_rows, int64_t K, Int8RowSource P, const Avx2PackedQ& q, const Int8Epilogue& ep,
                           Int8RowsInMemory p_in_memory = {});
// The same, packing Q first (what int8_gemm does for Int8Isa::kAvx2).
void int8_gemm_avx2(int64_t p_rows, int64_t q_rows, int64_t K, Int8RowSource P, Int8RowSource Q, const Int8Epilogue& ep,
                    Int8RowsInMemory p_in_memory = {});

// act(fma(float(acc), s, b)) on 8 lanes; NaN kept (vmaxps/vminps return the second operand on NaN).
template <int ACT>
QK_TARGET_AVX2 QK_INLINE __m256 avx2_value8(__m256i acc, __m256 s, __m256 b) {
  __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), s, b);
  if (ACT == kActRelu) v = _mm256_max_ps(_mm256_setzero_ps(), v);
  if (ACT == kActRelu6) v = _mm256_min_ps(_mm256_set1_ps(6.f), _mm256_max_ps(_mm256_setzero_ps(), v));
  return v;
}

// saturate_int8 on 8 lanes as int32 (NaN -> INT32_MIN, turned into 0 by the caller): the rounding of
// round_clamp_int8 in int8_gemm.h (clamp, then trunc(v + copysign(0.5 - 2^-25, v)), exact on [-127, 127]).
template <int ACT>
QK_TARGET_AVX2 QK_INLINE __m256i avx2_round8(__m256 v) {
  if (ACT == kActNone) v = _mm256_max_ps(_mm256_set1_ps(-127.f), v);
  if (ACT != kActRelu6) v = _mm256_min_ps(_mm256_set1_ps(127.f), v);
  __m256 h = _mm256_set1_ps(0.49999997f);
  if (ACT == kActNone) h = _mm256_or_ps(h, _mm256_and_ps(v, _mm256_set1_ps(-0.f)));
  return _mm256_cvttps_epi32(_mm256_add_ps(v, h));
}

// Bits of finite_abs(v) on 8 lanes (|v| for finite v, else 0; see AbsMaxSink).
QK_TARGET_AVX2 QK_INLINE __m256i avx2_finite_abs_bits8(__m256 v) {
  const __m256i a = _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7fffffff));
  return _mm256_and_si256(a, _mm256_cmpgt_epi32(_mm256_set1_epi32(0x7f800000), a));  // Inf and NaN -> 0
}

// The largest of 8 unsigned lanes.
QK_TARGET_AVX2 QK_INLINE uint32_t avx2_max_epu32(__m256i m) {
  __m128i h = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  h = _mm_max_epu32(h, _mm_shuffle_epi32(h, 0x4E));
  h = _mm_max_epu32(h, _mm_shuffle_epi32(h, 0xB1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(h));
}

// 16 int32 (two vectors, saturate_int8 results or INT32_MIN for NaN) -> 16 int8 in order, NaN -> 0.
QK_TARGET_AVX2 QK_INLINE __m128i avx2_pack16(__m256i r0, __m256i r1) {
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(r0, r1), 0xD8);  // 16 int16 in order
  const __m128i b = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
  return _mm_andnot_si128(_mm_cmpeq_epi8(b, _mm_set1_epi8(-128)), b);  // NaN (INT32_MIN) -> 0
}

// The epilogue of 16 accumulators (a0: lanes 0-7, a1: 8-15) with channel parameters s, b in registers,
// the first n <= 16 stored at out (typed by KIND). With float output (or none) and `abs_max`, the lanes'
// finite |y| bits are max-ed into it: all 16 lanes, so lanes past n must hold zero parameters (their y is 0).
template <int KIND, int ACT>
QK_TARGET_AVX2 QK_INLINE void epilogue16_avx2(__m256i a0, __m256i a1, const __m256 s[2], const __m256 b[2], int64_t n,
                                             void* out, __m256i* abs_max = nullptr) {
  if (KIND == kOutInt32) {
    alignas(32) int32_t t[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), a0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(t + 8), a1);
    if (n == 16) std::memcpy(out, t, 64);
    else std::memcpy(out, t, n * 4);
    return;
  }
  const __m256 v0 = avx2_value8<ACT>(a0, s[0], b[0]), v1 = avx2_value8<ACT>(a1, s[1], b[1]);
  if (KIND == kOutFloat || KIND == kOutNone) {
    if (abs_max != nullptr)
      *abs_max = _mm256_max_epu32(*abs_max, _mm256_max_epu32(avx2_finite_abs_bits8(v0), avx2_finite_abs_bits8(v1)));
    if (KIND == kOutNone) return;
    if (n == 16) {
      _mm256_storeu_ps(static_cast<float*>(out), v0);
      _mm256_storeu_ps(static_cast<float*>(out) + 8, v1);
      return;
    }
    alignas(32) float t[16];
    _mm256_store_ps(t, v0);
    _mm256_store_ps(t + 8, v1);
    std::memcpy(out, t, n * 4);
    return;
  }
  const __m128i bytes = avx2_pack16(avx2_round8<ACT>(v0), avx2_round8<ACT>(v1));
  if (n == 16) {
    _mm_storeu_si128(static_cast<__m128i*>(out), bytes);
    return;
  }
  alignas(16) int8_t t[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(t), bytes);
  std::memcpy(out, t, n);
}


}  // namespace qkernels
#endif
