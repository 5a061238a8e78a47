// int8 x int8 -> int32 matrix products with a fused epilogue, for conv2d_int8 / linear_int8.
//
// The epilogue math at the top is shared with the CUDA kernels (csrc/cuda/conv_int8.cu) so that both
// devices compute bit-identical results: v = fma(float(acc), scale, bias), then the activation, then
// (for int8 output) round half away from zero and saturate to [-127, 127].
#pragma once

// GCC 12 reports the _mm512_undefined_* placeholders inside its own conversion intrinsics as
// "may be used uninitialized" in every file that vectorises with them; a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <cstdint>

#include "quant_math.h"

namespace qkernels {

enum Int8Activation : int { kActNone = 0, kActRelu = 1, kActRelu6 = 2 };
enum Int8OutKind : int { kOutFloat = 0, kOutInt32 = 1, kOutInt8 = 2 };

// NaN passes through both activations, as in torch.relu / F.relu6.
QK_HD float int8_activate(float v, int act) {
  if (act == kActRelu) return v < 0.f ? 0.f : v;
  if (act == kActRelu6) return v < 0.f ? 0.f : (v > 6.f ? 6.f : v);
  return v;
}

QK_HD float int8_epilogue_value(int32_t acc, float scale, float bias, int act) {
  return int8_activate(fmaf((float)acc, scale, bias), act);
}

}  // namespace qkernels

// --- argument checks shared by the CPU and CUDA entry points (defined in csrc/cpu/conv_int8.cpp) ----
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <vector>

namespace qkernels {

struct Int8ConvShape {
  int64_t N, C, H, W, O, kh, kw, sh, sw, ph, pw, dh, dw, groups, OH, OW;
  int act, out_kind;
  bool per_channel_scale, has_bias;
};

struct Int8LinearShape {
  int64_t M, K, O;
  int act, out_kind;
  bool per_channel_scale, has_bias;
};

Int8ConvShape check_conv2d_int8(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, const at::Tensor& scale, at::ScalarType out_dtype,
                                c10::string_view activation);

Int8LinearShape check_linear_int8(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& scale, at::ScalarType out_dtype, c10::string_view activation);

// Output sizes of linear_int8: x's leading dimensions, then O.
std::vector<int64_t> linear_int8_out_sizes(const at::Tensor& x, int64_t O);

}  // namespace qkernels

#if !defined(__CUDACC__)
#include <c10/util/FunctionRef.h>

#include <immintrin.h>

#include "cpu/simd.h"

namespace qkernels {

// Instruction sets of the CPU int8 products, best last. QKERNELS_INT8_ISA (portable, avx2, avx_vnni,
// avx512_vnni, amx) caps the choice, so tests can exercise every path on one machine.
enum class Int8Isa { kPortable = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512Vnni = 3, kAmx = 4 };

Int8Isa int8_isa();            // best available, capped by QKERNELS_INT8_ISA (read on every call)
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

  // Writes the tile C[0..nr)[0..nc) (row stride ldc) whose top-left product element is (r0, c0).
  void apply(int64_t r0, int64_t nr, int64_t c0, int64_t nc, const int32_t* C, int64_t ldc) const;
};

// out[j * ostride] = epilogue(acc[j]) for j < n, with channel parameters s[j * pstep], b[j * pstep];
// `out` points at the first element, typed by `kind`. Vectorised for the processor at hand.
void int8_epilogue_row(Isa vec, const int32_t* acc, int64_t n, const float* s, const float* b, int64_t pstep, int act, int kind,
                       void* out, int64_t ostride);

// The epilogue of 16 accumulators (lanes in `m`) in registers, stored at out[j..j+16) (typed by KIND).
// Same results as int8_epilogue_value + saturate_int8 lane by lane: vmaxps/vminps return their second
// operand when one is NaN, which keeps NaN through relu/relu6 as the scalar code does.
// This form takes scale and bias already in registers (a tile loop loads them once per column block).
template <int KIND, int ACT>
QK_TARGET_AVX512 QK_INLINE void epilogue16_avx512_sb(__m512i a, __m512 s, __m512 b, __mmask16 m, void* out,
                                                    int64_t j) {
  if (KIND == kOutInt32) {
    _mm512_mask_storeu_epi32(static_cast<int32_t*>(out) + j, m, a);
    return;
  }
  const __m512 zero = _mm512_setzero_ps();
  __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), s, b);
  if (ACT == kActRelu) v = _mm512_max_ps(zero, v);
  if (ACT == kActRelu6) v = _mm512_min_ps(_mm512_set1_ps(6.f), _mm512_max_ps(zero, v));
  if (KIND == kOutFloat) {
    _mm512_mask_storeu_ps(static_cast<float*>(out) + j, m, v);
    return;
  }
  // round half away from zero: t = trunc(v), d = v - t (exact), trunc(2d) is +-1 exactly when |d| >= 0.5
  constexpr int kTrunc = _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC;
  const __m512 t = _mm512_roundscale_ps(v, kTrunc);
  const __m512 d = _mm512_sub_ps(v, t);
  __m512 r = _mm512_add_ps(t, _mm512_roundscale_ps(_mm512_add_ps(d, d), kTrunc));
  r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(r, r, _CMP_ORD_Q), r);  // NaN -> 0
  r = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-127.f)), _mm512_set1_ps(127.f));
  _mm_mask_storeu_epi8(static_cast<int8_t*>(out) + j, m, _mm512_cvtsepi32_epi8(_mm512_cvttps_epi32(r)));
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

// Whether a product of M pixels by O channels should put pixels on P's rows (channels on the columns):
// that orientation has the vectorised tile epilogue and reads 1x1-conv rows in place, and packing
// costs the same either way (each operand is read once), so it wins unless M is too small to fill
// the kernels' row steps (32 for AMX) while O would.
inline bool int8_pixels_on_rows(int64_t M, int64_t O) { return M >= 32 || M >= O; }

}  // namespace qkernels
#endif
