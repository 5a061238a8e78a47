// int8 depthwise conv (groups == C == O) for AVX2 without VNNI; see depthwise_avx2.cpp.
#pragma once

#include <c10/util/FunctionRef.h>

#include <cstdint>

#include "cpu/int8_gemm.h"
#include "int8_common.h"

namespace qkernels {

// Recomputes output row (b, oh) exactly (for rows with negative inputs, which the kernel cannot take).
using DepthwiseRowFallback = c10::function_ref<void(int64_t b, int64_t oh)>;

// Whether depthwise_avx2 takes kernels kh rows high (up to 4), or this shape.
bool depthwise_avx2_takes_kernel_rows(int64_t kh);
inline bool depthwise_avx2_applies(const Int8ConvShape& s) { return depthwise_avx2_takes_kernel_rows(s.kh); }

// Bytes of the kernel's packed weights for C channels and kernels kw wide; the packing of w [C][kh][kw].
int64_t depthwise_avx2_packed_bytes(int64_t C, int64_t kw);
void depthwise_avx2_pack(const int8_t* w, int64_t C, int64_t kh, int64_t kw, int8_t* dst);

// x NHWC int8, w [C][kh][kw] (packed: depthwise_avx2_pack of it, or null: packed per call), scale and bias
// one per channel, out NHWC typed by s.out_kind. With float output and `abs_max`, max |y| of the rows it
// writes goes there (the fallback's rows are the caller's).
void depthwise_avx2(const int8_t* x, const int8_t* w, const int8_t* packed, const Int8ConvShape& s, const float* scale,
                    const float* bias, void* out, DepthwiseRowFallback fallback, AbsMaxSink* abs_max = nullptr);

}  // namespace qkernels
