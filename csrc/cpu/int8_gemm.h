// int8 x int8 -> int32 matrix products with a fused epilogue, for conv2d_int8 / linear_int8 on the CPU.
// The epilogue arithmetic it shares with the CUDA kernels is in int8_common.h.
#pragma once

#include <cstdint>

#include "int8_common.h"

#if !defined(__CUDACC__)
#include <c10/util/FunctionRef.h>

#include <immintrin.h>

#include "cpu/abs_max.h"
#include "cpu/simd.h"

namespace qkernels {

// Instruction sets of the CPU int8 products, best last. QKERNELS_INT8_ISA (portable, avx2, avx_vnni,
// avx512_vnni, amx) caps the choice, so tests can exercise every path on one machine.
enum class Int8Isa { kPortable = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512Vnni = 3, kAmx = 4 };

Int8Isa int8_isa();            // best available, capped by QKERNELS_INT8_ISA (read on every call)
Int8Isa int8_best_isa();       // best this processor (and OS) runs, whatever QKERNELS_INT8_ISA says
const char* int8_isa_name(Int8Isa isa);
Isa int8_vector_isa(Int8Isa isa);  // the simd.h level that goes with it (epilogues, depthwise)

// Where results go: C[r][c] of the product lands at output element
//   out[r * row_stride + c * col_stride + offset]
// and uses scale/bias of channel (channel_on_rows ? r : c) + channel_offset.
struct Int8Epilogue {
  void* out = nullptr;
  int out_kind = kOutFloat;
  int64_t row_stride = 0, col_stride = 1, offset = 0;
  bool channel_on_rows = false;
  int64_t channel_offset = 0;
  // One value per output channel each (callers expand a per-tensor scale and a missing bias), so
  // the epilogue never branches on them. Unused for int32 output but must still be valid arrays.
  const float* scale = nullptr;
  const float* bias = nullptr;
  int act = kActNone;
  Isa vec = Isa::kBase;  // set by int8_gemm from its instruction set
  // Float output: also gather max |y| here (null: not wanted), the batch abs max a dynamic next layer
  // quantizes with, taken while the values are in registers or cache instead of in a pass of its own.
  // kOutNone: the abs max is all there is (out may be null).
  AbsMaxSink* abs_max = nullptr;

  // Writes the tile C[0..nr)[0..nc) (row stride ldc) whose top-left product element is (r0, c0) (for
  // kOutNone: only merges the abs max of its values).
  void apply(int64_t r0, int64_t nr, int64_t c0, int64_t nc, const int32_t* C, int64_t ldc) const;

 private:
  void write(int64_t r0, int64_t nr, int64_t c0, int64_t nc, const int32_t* C, int64_t ldc) const;
  void merge_values_abs_max(int64_t r0, int64_t nr, int64_t c0, int64_t nc, const int32_t* C, int64_t ldc) const;
};

// out[j * ostride] = epilogue(acc[j]) for j < n, with channel parameters s[j * pstep], b[j * pstep];
// `out` points at the first element, typed by `kind`. Vectorised for the processor at hand.
void int8_epilogue_row(Isa vec, const int32_t* acc, int64_t n, const float* s, const float* b, int64_t pstep, int act, int kind,
                       void* out, int64_t ostride);

// act(fma(float(acc), s, b)) on 16 lanes. Same results as int8_epilogue_value lane by lane: vmaxps and
// vminps return their second operand when one is NaN, which keeps NaN through relu/relu6 as the
// scalar code does.
template <int ACT>
QK_TARGET_AVX512 QK_INLINE __m512 epilogue_value16(__m512i acc, __m512 s, __m512 b) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), s, b);
  if (ACT == kActRelu) v = _mm512_max_ps(zero, v);
  if (ACT == kActRelu6) v = _mm512_min_ps(_mm512_set1_ps(6.f), _mm512_max_ps(zero, v));
  return v;
}

// saturate_int8 on 16 lanes (v from epilogue_value16<ACT>) as int32, except that NaN gives INT32_MIN,
// which callers turn into 0. Clamp to [-127, 127] (NaN kept: the constant is the first operand), then
// trunc(v + copysign(0.5 - 2^-25, v)): exactly round half away from zero on [-127, 127], checked on
// every float there (the plain +0.5 would round 0.49999997 up in the addition). After relu or relu6,
// v >= 0 or -0 or NaN, so the sign and one side of the clamp need no work.
template <int ACT>
QK_TARGET_AVX512 QK_INLINE __m512i round_clamp_int8(__m512 v) {
  if (ACT == kActNone) v = _mm512_max_ps(_mm512_set1_ps(-127.f), v);
  if (ACT != kActRelu6) v = _mm512_min_ps(_mm512_set1_ps(127.f), v);
  __m512 h = _mm512_set1_ps(0.49999997f);
  if (ACT == kActNone)  // (v & sign) | h
    h = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(v), _mm512_set1_epi32(INT32_MIN),
                                                      _mm512_castps_si512(h), 0xEA));
  return _mm512_cvttps_epi32(_mm512_add_ps(v, h));
}

// The epilogue of 16 accumulators (lanes in `m`) in registers, stored at out[j..j+16) (typed by KIND).
// This form takes scale and bias already in registers (a tile loop loads them once per column block).
template <int KIND, int ACT>
QK_TARGET_AVX512 QK_INLINE void epilogue16_avx512_sb(__m512i a, __m512 s, __m512 b, __mmask16 m, void* out,
                                                    int64_t j) {
  if (KIND == kOutInt32) {
    _mm512_mask_storeu_epi32(static_cast<int32_t*>(out) + j, m, a);
    return;
  }
  const __m512 v = epilogue_value16<ACT>(a, s, b);
  if (KIND == kOutFloat) {
    _mm512_mask_storeu_ps(static_cast<float*>(out) + j, m, v);
    return;
  }
  __m512i r = round_clamp_int8<ACT>(v);
  r = _mm512_mask_mov_epi32(r, _mm512_cmpeq_epi32_mask(r, _mm512_set1_epi32(INT32_MIN)), _mm512_setzero_si512());
  _mm_mask_storeu_epi8(static_cast<int8_t*>(out) + j, m, _mm512_cvtsepi32_epi8(r));
}

// The int8 epilogue of up to 64 accumulators (acc[v] for v < nvec, channels 16v..16v+15) with one
// store of the bytes in `m`: packing four vectors costs less than four narrowing stores.
template <int ACT>
QK_TARGET_AVX512 QK_INLINE void epilogue64_int8_avx512(const __m512i* acc, const __m512* s, const __m512* b, int nvec,
                                                      __mmask64 m, int8_t* out) {
  __m512i r[4];
  for (int v = 0; v < 4; ++v)
    r[v] = v < nvec ? round_clamp_int8<ACT>(epilogue_value16<ACT>(acc[v], s[v], b[v])) : _mm512_setzero_si512();
  // saturating packs (a no-op on [-127, 127]; NaN's INT32_MIN becomes -128) interleave 128-bit lanes:
  // lane L holds dwords [r0 4L..4L+3 | r1 .. | r2 .. | r3 ..]; vpermd puts them back in order.
  const __m512i bytes = _mm512_packs_epi16(_mm512_packs_epi32(r[0], r[1]), _mm512_packs_epi32(r[2], r[3]));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  __m512i o = _mm512_permutexvar_epi32(order, bytes);
  o = _mm512_mask_mov_epi8(o, _mm512_cmpeq_epi8_mask(o, _mm512_set1_epi8(-128)), _mm512_setzero_si512());  // NaN
  _mm512_mask_storeu_epi8(out, m, o);
}

template <int KIND, int ACT>
QK_TARGET_AVX512 QK_INLINE void epilogue16_avx512(__m512i a, const float* s, const float* b, __mmask16 m, void* out,
                                                 int64_t j) {
  if (KIND == kOutInt32)
    epilogue16_avx512_sb<KIND, ACT>(a, _mm512_setzero_ps(), _mm512_setzero_ps(), m, out, j);
  else
    epilogue16_avx512_sb<KIND, ACT>(a, _mm512_maskz_loadu_ps(m, s), _mm512_maskz_loadu_ps(m, b), m, out, j);
}

// Writes rows [r0, r0 + n) of an int8 matrix with K columns to dst (row stride ld >= K).
using Int8RowSource = c10::function_ref<void(int64_t r0, int64_t n, int8_t* dst, int64_t ld)>;

// P rows that already lie in memory as K contiguous bytes each, `ld` bytes apart (a 1x1 conv's NHWC
// pixels, a linear layer's input): the AMX kernel then reads them in place instead of copying them.
struct Int8RowsInMemory {
  const int8_t* data = nullptr;  // null: not available, use the row source
  int64_t ld = 0;
};

// C = P * Q^T with P [p_rows, K] and Q [q_rows, K] given by row sources; every C element goes through
// the epilogue. Q is packed once (the caller should make it the smaller operand); P is packed in
// row panels per task (or read in place, see Int8RowsInMemory). Work is split over threads with
// at::parallel_for.
void int8_gemm(Int8Isa isa, int64_t p_rows, int64_t q_rows, int64_t K, Int8RowSource P, Int8RowSource Q,
               const Int8Epilogue& ep, Int8RowsInMemory p_in_memory = {});

// Q packed ahead of the products (a conv layer's weights) for an instruction set other than AVX2 (which has
// its own, Avx2PackedQ): int8_packed_q_bytes(isa, rows, K) bytes at data, written by int8_pack_q.
struct Int8PackedQ {
  const int8_t* data = nullptr;
  int64_t rows = 0, Kp = 0;  // Kp: K as padded for isa (int8_packed_q_kp)
};
int64_t int8_packed_q_bytes(Int8Isa isa, int64_t rows, int64_t K);
// K as every packed layout pads it for isa: to 64 for AMX with K >= 64, else to 4 (Avx2PackedQ too).
int64_t int8_packed_q_kp(Int8Isa isa, int64_t K);
void int8_pack_q(Int8Isa isa, Int8RowSource Q, int64_t rows, int64_t K, int8_t* dst);
// int8_gemm with Q packed by int8_pack_q for the same isa and K.
void int8_gemm_packed(Int8Isa isa, int64_t p_rows, int64_t K, Int8RowSource P, const Int8PackedQ& q,
                      const Int8Epilogue& ep, Int8RowsInMemory p_in_memory = {});

// Whether a product of M pixels by O channels should put pixels on P's rows (channels on the columns):
// that orientation has the vectorised tile epilogue and reads 1x1-conv rows in place, and packing
// costs the same either way (each operand is read once), so it wins unless M is too small to fill
// the kernels' row steps (32 for AMX) while O would.
inline bool int8_pixels_on_rows(int64_t M, int64_t O) { return M >= 32 || M >= O; }

}  // namespace qkernels
#endif
