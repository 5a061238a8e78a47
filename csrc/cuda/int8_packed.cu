// CUDA side of the packed-weight ops (csrc/ops.cpp). The CUDA int8 kernels have no packed weight layout
// (yet): packing gives an empty tensor and conv2d_int8_packed runs the CUDA conv2d_int8 kernel, whose
// result it is by definition. A kernel with its own layout replaces these two functions.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

namespace qkernels {
namespace {

at::Tensor conv2d_int8_packed_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& /*packed*/,
                                   const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                   const at::Tensor& scale, at::ScalarType out_dtype, c10::string_view activation) {
  static const auto conv = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("qkernels::conv2d_int8", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                                 at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                                                 const at::Tensor&, at::ScalarType, c10::string_view)>();
  return conv.call(x, weight, bias, stride, padding, dilation, groups, scale, out_dtype, activation);
}

at::Tensor pack_conv2d_int8_weight_cuda(const at::Tensor& weight, int64_t /*groups*/) {
  return at::empty({0}, weight.options().dtype(at::kChar));
}

}  // namespace

TORCH_LIBRARY_IMPL(qkernels, CUDA, m) {
  m.impl("conv2d_int8_packed", &conv2d_int8_packed_cuda);
  m.impl("pack_conv2d_int8_weight", &pack_conv2d_int8_weight_cuda);
}

}  // namespace qkernels
