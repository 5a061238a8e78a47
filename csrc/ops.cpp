// The one schema set of the qkernels operator library. Kernels register per backend in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA) with TORCH_LIBRARY_IMPL; Python adds
// fake (meta) kernels and autograd in qkernels/ops/.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(qkernels, m) {
  // --- fake quantization (reference-semantics.md, section 2) -------------------------------
  // `clip_grad` selects the straight-through gradient (autograd, in Python): false passes the gradient
  // unchanged as the reference does, true zeroes it where the input was clipped. With it, the per-tensor
  // ops also return `mask`, the 1-bit-per-element record of which elements pass (bit p % 32 of int32
  // word p / 32 for the element at memory position p of the output, whose strides are the input's when
  // the input is dense), so backward needs neither x nor the scale; without it, `mask` is empty.
  // Outputs keep a dense input's strides (channels_last stays channels_last); others come out contiguous.
  // max|x| over finite values, as a 0-dim float32 tensor.
  m.def("abs_max(Tensor x) -> Tensor");
  // (x fake-quantized with s = max|x|, s, mask)
  m.def("fake_quant_abs_max(Tensor x, int bits, bool clip_grad=False) -> (Tensor, Tensor, Tensor)");
  // (integer codes: int8 for bits <= 8, int16 above; s)
  m.def("quantize_abs_max(Tensor x, int bits) -> (Tensor, Tensor)");
  // (x fake-quantized with the given scale, mask)
  m.def("fake_quant_with_scale(Tensor x, Tensor scale, int bits, bool clip_grad=False) -> (Tensor, Tensor)");
  m.def("quantize_with_scale(Tensor x, Tensor scale, int bits) -> Tensor");
  // one scale per slice along `axis`: (out, scales[x.size(axis)]); its clip backward reads x (a weight,
  // which autograd keeps anyway)
  m.def(
      "fake_channel_wise_quant_abs_max(Tensor x, int bits, int axis, bool clip_grad=False) -> (Tensor, Tensor)");
  m.def("quantize_channel_wise_abs_max(Tensor x, int bits, int axis) -> (Tensor, Tensor)");
  // straight-through gradient that is zero where x was clipped (|x| > scale, or x not finite)
  m.def("fake_quant_clip_grad(Tensor grad, Tensor x, Tensor scale) -> Tensor");
  // the same from a forward's mask: grad where its bit is set, else 0; grad is read in its memory order,
  // so it must have the forward output's strides
  m.def("fake_quant_mask_grad(Tensor grad, Tensor mask) -> Tensor");
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
