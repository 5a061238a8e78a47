// Argument checks shared by the CPU and CUDA entry points: every message names what was expected
// and what came.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
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

// The tensor the kernels walk: x itself when its elements fill one block of memory (any strides: a
// channels_last activation, a transposed weight), else a contiguous copy. Kernels run over its memory
// in storage order and write outputs made with empty_like, which keeps those strides.
inline at::Tensor dense_input(const at::Tensor& x) { return x.is_non_overlapping_and_dense() ? x : x.contiguous(); }

// t (same shape as the dense tensor `like`) with like's strides, so both are walked in the same order.
inline at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  return t.strides() == like.strides() ? t : at::empty_like(like).copy_(t);
}

// The memory of a dense tensor viewed as [outer, channels, inner] around `axis`: the element at memory
// position p belongs to channel (p / inner) % channels. For a dense tensor, inner is the axis's stride
// (the dims laid out faster than the axis fill exactly that much memory).
struct ChannelLayout {
  int64_t outer = 1, channels = 1, inner = 1;
};

inline ChannelLayout memory_channel_layout(const at::Tensor& xd, int64_t axis) {
  ChannelLayout l;
  const int64_t n = xd.numel();
  l.channels = xd.size(axis);
  if (n == 0) {
    l.outer = 0;
  } else if (l.channels == 1) {
    l.inner = n;
  } else {
    l.inner = xd.stride(axis);
    l.outer = n / (l.channels * l.inner);
  }
  return l;
}

// The clip-STE mask: bit p % 32 of 32-bit word p / 32 says whether the element at memory position p
// passes the gradient (|x| <= s), in the order dense_input(x) holds the elements.
inline int64_t mask_words(int64_t n) { return (n + 31) / 32; }

inline void check_mask_grad_args(const at::Tensor& grad, const at::Tensor& mask) {
  check_float_input(grad, "grad");
  TORCH_CHECK(mask.scalar_type() == at::kInt, "qkernels: mask must be int32 (32 elements per word), got ",
              mask.scalar_type());
  TORCH_CHECK(mask.dim() == 1 && mask.numel() == mask_words(grad.numel()), "qkernels: mask must hold ",
              mask_words(grad.numel()), " words for a grad of ", grad.numel(), " elements, got shape ", mask.sizes());
  check_same_device(mask, grad, "mask");
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
