// Argument checks of conv2d_int8 / linear_int8, shared by the CPU and CUDA entry points (and the CUDA
// emulator's build of the CUDA files): every message names what was expected and what came.
#include "int8_common.h"

#include "checks.h"

namespace qkernels {

namespace {

int parse_activation(c10::string_view a) {
  if (a.empty() || a == "none") return kActNone;
  if (a == "relu") return kActRelu;
  if (a == "relu6") return kActRelu6;
  TORCH_CHECK(false, "qkernels: activation must be 'none', 'relu' or 'relu6', got '", std::string(a), "'");
}

int parse_out_dtype(at::ScalarType t) {
  if (t == at::kFloat) return kOutFloat;
  if (t == at::kInt) return kOutInt32;
  if (t == at::kChar) return kOutInt8;
  TORCH_CHECK(false, "qkernels: out_dtype must be float32, int32 or int8, got ", t);
}

// Checks scale, bias, activation and out_dtype against O output channels; returns per_channel_scale.
bool check_epilogue_args(const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& scale,
                         int64_t O, int act, int out_kind) {
  TORCH_CHECK(scale.scalar_type() == at::kFloat, "qkernels: scale must be float32, got ", scale.scalar_type());
  check_same_device(scale, x, "scale");
  const bool per_channel = scale.dim() == 1 && scale.size(0) == O && O != 1;
  TORCH_CHECK(scale.dim() == 0 || (scale.dim() == 1 && (scale.size(0) == O || scale.size(0) == 1)),
              "qkernels: scale must be 0-dim or have shape [", O, "] (one per output channel), got shape ",
              scale.sizes());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.scalar_type() == at::kFloat, "qkernels: bias must be float32, got ", b.scalar_type());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == O, "qkernels: bias must have shape [", O, "], got ", b.sizes());
    check_same_device(b, x, "bias");
  }
  if (out_kind == kOutInt32) {
    TORCH_CHECK(!bias.has_value(), "qkernels: out_dtype int32 returns the raw accumulator; bias is not allowed");
    TORCH_CHECK(act == kActNone, "qkernels: out_dtype int32 returns the raw accumulator; activation must be none");
    TORCH_CHECK(scale.numel() == 1, "qkernels: out_dtype int32 returns the raw accumulator; scale must be 1");
    if (scale.device().is_cpu())  // on a GPU this would synchronise; the Python wrapper checks it there
      TORCH_CHECK(scale.item<float>() == 1.f,
                  "qkernels: out_dtype int32 returns the raw accumulator; scale must be 1, got ", scale.item<float>());
  }
  return per_channel;
}

int64_t conv_out_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, const char* dim) {
  const int64_t span = in + 2 * p - d * (k - 1) - 1;
  TORCH_CHECK(span >= 0, "qkernels: conv2d_int8 input ", dim, " ", in, " (padded by ", p,
              " on each side) is smaller than the dilated kernel extent ", d * (k - 1) + 1);
  return span / s + 1;
}

}  // namespace

Int8ConvShape check_conv2d_int8(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, const at::Tensor& scale, at::ScalarType out_dtype,
                                c10::string_view activation) {
  TORCH_CHECK(x.scalar_type() == at::kChar, "qkernels: conv2d_int8 input must be int8, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == at::kChar, "qkernels: conv2d_int8 weight must be int8, got ",
              weight.scalar_type());
  TORCH_CHECK(x.dim() == 4, "qkernels: conv2d_int8 input must be 4-D [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, "qkernels: conv2d_int8 weight must be 4-D [O, C/groups, kh, kw], got shape ",
              weight.sizes());
  check_same_device(weight, x, "weight");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "qkernels: stride, padding and dilation must have 2 values each");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, "qkernels: stride must be >= 1, got ", stride);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, "qkernels: dilation must be >= 1, got ", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, "qkernels: padding must be >= 0, got ", padding);
  TORCH_CHECK(groups >= 1, "qkernels: groups must be >= 1, got ", groups);
  Int8ConvShape s;
  s.N = x.size(0), s.C = x.size(1), s.H = x.size(2), s.W = x.size(3);
  s.O = weight.size(0), s.kh = weight.size(2), s.kw = weight.size(3);
  TORCH_CHECK(s.C % groups == 0, "qkernels: groups (", groups, ") must divide the input channels (", s.C, ")");
  TORCH_CHECK(s.O % groups == 0, "qkernels: groups (", groups, ") must divide the output channels (", s.O, ")");
  TORCH_CHECK(weight.size(1) == s.C / groups, "qkernels: weight must have C/groups = ", s.C / groups,
              " input channels, got shape ", weight.sizes());
  TORCH_CHECK(s.kh >= 1 && s.kw >= 1, "qkernels: kernel size must be at least 1x1, got weight shape ", weight.sizes());
  s.sh = stride[0], s.sw = stride[1], s.ph = padding[0], s.pw = padding[1], s.dh = dilation[0], s.dw = dilation[1];
  s.groups = groups;
  s.OH = conv_out_size(s.H, s.kh, s.sh, s.ph, s.dh, "height");
  s.OW = conv_out_size(s.W, s.kw, s.sw, s.pw, s.dw, "width");
  s.act = parse_activation(activation);
  s.out_kind = parse_out_dtype(out_dtype);
  s.per_channel_scale = check_epilogue_args(x, bias, scale, s.O, s.act, s.out_kind);
  s.has_bias = bias.has_value();
  return s;
}

Int8LinearShape check_linear_int8(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& scale, at::ScalarType out_dtype, c10::string_view activation) {
  TORCH_CHECK(x.scalar_type() == at::kChar, "qkernels: linear_int8 input must be int8, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == at::kChar, "qkernels: linear_int8 weight must be int8, got ",
              weight.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "qkernels: linear_int8 input must have at least 1 dimension [..., K]");
  TORCH_CHECK(weight.dim() == 2, "qkernels: linear_int8 weight must be 2-D [O, K], got shape ", weight.sizes());
  check_same_device(weight, x, "weight");
  Int8LinearShape s;
  s.K = x.size(-1);
  s.O = weight.size(0);
  TORCH_CHECK(weight.size(1) == s.K, "qkernels: linear_int8 weight has ", weight.size(1),
              " input features but the input has ", s.K, " (last dimension)");
  s.M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) s.M *= x.size(d);
  s.act = parse_activation(activation);
  s.out_kind = parse_out_dtype(out_dtype);
  s.per_channel_scale = check_epilogue_args(x, bias, scale, s.O, s.act, s.out_kind);
  s.has_bias = bias.has_value();
  return s;
}

std::vector<int64_t> linear_int8_out_sizes(const at::Tensor& x, int64_t O) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = O;
  return sizes;
}

}  // namespace qkernels
