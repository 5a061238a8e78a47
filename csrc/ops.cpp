// The one schema set of the qkernels operator library. Kernels register per backend in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA) with TORCH_LIBRARY_IMPL; Python adds
// fake (meta) kernels and autograd in qkernels/ops/.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(qkernels, m) {
  // --- fake quantization (reference-semantics.md, section 2) -------------------------------
  // `clip_grad` only selects the straight-through gradient (autograd, in Python): false passes the
  // gradient unchanged as the reference does, true zeroes it where the input was clipped.
  // max|x| over finite values, as a 0-dim float32 tensor.
  m.def("abs_max(Tensor x) -> Tensor");
  // (x fake-quantized with s = max|x|, s)
  m.def("fake_quant_abs_max(Tensor x, int bits, bool clip_grad=False) -> (Tensor, Tensor)");
  // (integer codes: int8 for bits <= 8, int16 above; s)
  m.def("quantize_abs_max(Tensor x, int bits) -> (Tensor, Tensor)");
  m.def("fake_quant_with_scale(Tensor x, Tensor scale, int bits, bool clip_grad=False) -> Tensor");
  m.def("quantize_with_scale(Tensor x, Tensor scale, int bits) -> Tensor");
  // one scale per slice along `axis`: (out, scales[x.size(axis)])
  m.def(
      "fake_channel_wise_quant_abs_max(Tensor x, int bits, int axis, bool clip_grad=False) -> (Tensor, Tensor)");
  m.def("quantize_channel_wise_abs_max(Tensor x, int bits, int axis) -> (Tensor, Tensor)");
  // straight-through gradient that is zero where x was clipped (|x| > scale, or x not finite)
  m.def("fake_quant_clip_grad(Tensor grad, Tensor x, Tensor scale) -> Tensor");
  // --- quantizer state, updated in place on the tensor's device, with no host synchronisation --
  m.def(
      "range_abs_max_update_(Tensor x, Tensor(a!) scale, Tensor(b!) window, Tensor(c!) step, "
      "int window_size) -> ()");
  m.def(
      "moving_average_abs_max_update_(Tensor x, Tensor(a!) scale, Tensor(b!) accum, "
      "Tensor(c!) state, float moving_rate) -> ()");
  // --- int8 x int8 -> int32 with fused epilogue: act(acc * scale + bias) -----------------------
  m.def(
      "conv2d_int8(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, Tensor scale, ScalarType out_dtype, str activation) -> Tensor");
  m.def(
      "linear_int8(Tensor x, Tensor weight, Tensor? bias, Tensor scale, ScalarType out_dtype, "
      "str activation) -> Tensor");
  // conv2d_int8 with the weights also given packed for the device's kernels (pack_conv2d_int8_weight,
  // done once per layer); the result is that of conv2d_int8(x, weight, ...) bit for bit. A packed
  // tensor that does not fit (other shape, instruction set, device) is ignored.
  m.def(
      "conv2d_int8_packed(Tensor x, Tensor weight, Tensor packed, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, Tensor scale, ScalarType out_dtype, str activation) -> Tensor");
  // weight [O, C/groups, kh, kw] int8 packed for conv2d_int8_packed on its device (empty where the
  // device's kernels have no packed form).
  m.def("pack_conv2d_int8_weight(Tensor weight, int groups) -> Tensor");
}

namespace {

PyObject* has_cuda_kernels(PyObject*, PyObject*) {
#ifdef QKERNELS_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"has_cuda_kernels", has_cuda_kernels, METH_NOARGS, "Whether CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Importing qkernels._C from Python runs the static registrations above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
