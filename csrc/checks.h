// Argument checks shared by the CPU and CUDA entry points: every message names what was expected
// and what came.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace qkernels {

inline void check_bits(int64_t bits) {
  TORCH_CHECK(bits >= 2 && bits <= 16, "qkernels: bits must be in [2, 16], got ", bits);
}

inline void check_float_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "qkernels: ", name, " must be float32, float16 or bfloat16, got ", x.scalar_type());
}

inline void check_scalar_scale(const at::Tensor& scale, const at::Tensor& x, const char* name) {
  TORCH_CHECK(scale.scalar_type() == at::kFloat, "qkernels: ", name, " must be float32, got ", scale.scalar_type());
  TORCH_CHECK(scale.numel() == 1, "qkernels: ", name, " must hold one value, got shape ", scale.sizes());
  TORCH_CHECK(scale.device() == x.device(), "qkernels: ", name, " is on ", scale.device(), " but the input is on ",
              x.device());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "qkernels: ", name, " is on ", t.device(), " but the input is on ", x.device());
}

// Quantizer state tensors are updated in place by the kernels.
inline void check_state(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, "qkernels: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel, "qkernels: ", name, " must hold ", numel, " values, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "qkernels: ", name, " must be contiguous (it is updated in place)");
  check_same_device(t, x, name);
}

inline int64_t wrap_axis(int64_t axis, const at::Tensor& x) {
  int64_t dim = x.dim();
  TORCH_CHECK(dim >= 1, "qkernels: channel-wise quantization needs at least 1 dimension, got a 0-dim tensor");
  TORCH_CHECK(axis >= -dim && axis < dim, "qkernels: axis ", axis, " is out of range for a ", dim, "-dim tensor");
  return axis < 0 ? axis + dim : axis;
}

// x (contiguous) viewed as [outer, channels, inner] around `axis`, for per-channel scales.
struct ChannelLayout {
  int64_t outer = 1, channels = 1, inner = 1;
};

inline ChannelLayout channel_layout(const at::Tensor& x, int64_t axis) {
  ChannelLayout l;
  l.channels = x.size(axis);
  for (int64_t d = 0; d < axis; ++d) l.outer *= x.size(d);
  for (int64_t d = axis + 1; d < x.dim(); ++d) l.inner *= x.size(d);
  return l;
}

inline void check_clip_grad_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale) {
  check_float_input(x, "x");
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "qkernels: grad dtype ", grad.scalar_type(),
              " differs from the input dtype ", x.scalar_type());
  TORCH_CHECK(grad.sizes() == x.sizes(), "qkernels: grad shape ", grad.sizes(), " differs from the input shape ",
              x.sizes());
  check_same_device(grad, x, "grad");
  check_scalar_scale(scale, x, "scale");
}

inline void check_range_abs_max_state(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& window,
                                      const at::Tensor& step, int64_t window_size) {
  check_float_input(x, "x");
  TORCH_CHECK(window_size >= 1, "qkernels: window_size must be >= 1, got ", window_size);
  check_state(scale, at::kFloat, 1, x, "scale");
  check_state(window, at::kFloat, window_size, x, "window");
  check_state(step, at::kLong, 1, x, "step");
}

inline void check_moving_average_state(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& accum,
                                       const at::Tensor& state, double moving_rate) {
  check_float_input(x, "x");
  TORCH_CHECK(moving_rate >= 0.0 && moving_rate <= 1.0, "qkernels: moving_rate must be in [0, 1], got ", moving_rate);
  check_state(scale, at::kFloat, 1, x, "scale");
  check_state(accum, at::kFloat, 1, x, "accum");
  check_state(state, at::kFloat, 1, x, "state");
}

inline at::ScalarType code_dtype(int64_t bits) { return bits <= 8 ? at::kChar : at::kShort; }

}  // namespace qkernels
