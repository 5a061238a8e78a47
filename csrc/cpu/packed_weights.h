// Conv weights packed once (when a layer is built, loaded or moved) into the layout of the CPU int8
// GEMM, so that a call does not repack them. The blob is an int8 tensor: a header saying for which
// instruction set and shape it was packed, then the packed groups. A blob that does not fit the call
// (another shape, or the instruction set capped differently since, e.g. by QKERNELS_INT8_ISA) is
// ignored and the weights are packed per call as without one: results never depend on it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "cpu/int8_gemm.h"
#include "cpu/int8_gemm_avx2.h"

namespace qkernels {

// What a blob holds for one conv, or valid == false.
struct PackedConvWeights {
  bool valid = false;
  Int8Isa isa = Int8Isa::kPortable;  // packed for
  int64_t groups = 0;
  const at::Tensor* blob = nullptr;
  // Q of group g (rows O/groups, K = kh*kw*C/groups in patch order): for AVX2, and for the others
  Avx2PackedQ group(int64_t g) const;
  Int8PackedQ gemm_group(int64_t g) const;
};

// Packs weight [O, C/groups, kh, kw] for the current instruction set (the GEMM's layout for it). Depthwise
// weights are packed only for the AVX2 depthwise kernel (kernels up to 4 rows high), in a blob of their own
// kind; other depthwise convs get an empty tensor (their kernels read the weights as they are).
at::Tensor pack_conv2d_int8_weight_cpu(const at::Tensor& weight, int64_t groups);

// The blob's view for a (non-depthwise) conv of shape s on instruction set isa (valid == false if it does
// not fit).
PackedConvWeights packed_conv_weights(const at::Tensor& blob, const Int8ConvShape& s, Int8Isa isa);

// The packed depthwise weights for a depthwise conv of shape s on isa, or null if the blob does not fit.
const int8_t* packed_depthwise_weights(const at::Tensor& blob, const Int8ConvShape& s, Int8Isa isa);

}  // namespace qkernels
