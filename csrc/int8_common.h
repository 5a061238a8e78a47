// What the CPU and CUDA int8 conv/linear kernels share: the epilogue arithmetic (so both devices compute
// bit-identical results: v = fma(float(acc), scale, bias), then the activation, then, for int8 output,
// round half away from zero and saturate to [-127, 127]) and the argument checks (int8_checks.cpp).
#pragma once

#include <cstdint>

#include "quant_math.h"

namespace qkernels {

enum Int8Activation : int { kActNone = 0, kActRelu = 1, kActRelu6 = 2 };
// kOutNone (CPU kernels only): nothing is stored, the float values are computed for their abs max alone
// (the first pass of conv2d_int8_packed_requant_abs_max).
enum Int8OutKind : int { kOutFloat = 0, kOutInt32 = 1, kOutInt8 = 2, kOutNone = 3 };

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

// --- argument checks shared by the CPU and CUDA entry points (defined in csrc/int8_checks.cpp) ----
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

