// The one schema set of the qkernels operator library. Kernels register per backend in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA) with TORCH_LIBRARY_IMPL; Python adds
// fake (meta) kernels and autograd in qkernels/ops/.
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include <exception>

#include "cpu/int8_gemm.h"

#ifdef QKERNELS_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

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
  // the same codes of a 4-D x [N, C, H, W], always in channels_last memory (CPU): a model's NCHW input is
  // quantized and transposed in one pass for the int8 kernels, which read NHWC
  m.def("quantize_with_scale_channels_last(Tensor x, Tensor scale, int bits) -> Tensor");
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
  // conv2d_int8 with the weights also given packed for the device's kernels (pack_conv2d_int8_weight,
  // done once per layer); the result is that of conv2d_int8(x, weight, ...) bit for bit. A packed
  // tensor that does not fit (other shape, instruction set, device) is ignored.
  m.def(
      "conv2d_int8_packed(Tensor x, Tensor weight, Tensor packed, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, Tensor scale, ScalarType out_dtype, str activation) -> Tensor");
  // conv2d_int8_packed with float32 output, and max|out| over its finite values (abs_max(out), bit for bit):
  // the scale a dynamic (abs_max) next layer quantizes with, gathered by the CPU kernels as they write.
  m.def(
      "conv2d_int8_packed_abs_max(Tensor x, Tensor weight, Tensor packed, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, Tensor scale, str activation) -> (Tensor, Tensor)");
  // the 8-bit codes that quantizing the float output y of conv2d_int8_packed with its abs max gives (scale
  // max|y|; a step apart at most, on rounding ties), and that max: a dynamic next layer's input written
  // directly. The CPU kernels run twice where that is cheaper than a float tensor in between (the first
  // pass only for the max), else write y once and quantize it.
  m.def(
      "conv2d_int8_packed_requant_abs_max(Tensor x, Tensor weight, Tensor packed, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, Tensor scale, str activation) -> (Tensor, Tensor)");
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

// What only the compiled library knows, for qkernels.build_info(): the headers it was compiled with and
// the int8 instruction sets this processor runs (setup.py records the rest in _build_info.json).
PyObject* build_info(PyObject*, PyObject*) {
  using qkernels::Int8Isa;
  const Int8Isa best = qkernels::int8_best_isa();
  PyObject* isas = PyList_New(0);
  for (int i = 0; i <= static_cast<int>(best); ++i) {
    PyObject* name = PyUnicode_FromString(qkernels::int8_isa_name(static_cast<Int8Isa>(i)));
    PyList_Append(isas, name);
    Py_DECREF(name);
  }
#ifdef QKERNELS_WITH_CUDA
  PyObject* cuda = PyUnicode_FromFormat("%d.%d", CUDART_VERSION / 1000, CUDART_VERSION % 1000 / 10);
#else
  Py_INCREF(Py_None);
  PyObject* cuda = Py_None;
#endif
#if defined(__clang__) || !defined(__GNUC__)
  const char* compiler = __VERSION__;  // clang's names itself
#else
  const char* compiler = "GCC " __VERSION__;
#endif
#ifndef TORCH_VERSION  // older torch headers spell only the parts
#define QK_STR2(x) #x
#define QK_STR(x) QK_STR2(x)
#define TORCH_VERSION QK_STR(TORCH_VERSION_MAJOR) "." QK_STR(TORCH_VERSION_MINOR) "." QK_STR(TORCH_VERSION_PATCH)
#endif
  // "N" hands over the references made above.
  return Py_BuildValue("{s:s,s:N,s:s,s:N,s:s}", "torch_headers", TORCH_VERSION, "cuda_runtime_headers", cuda,
                       "compiler", compiler, "int8_isas", isas, "int8_isa_best", qkernels::int8_isa_name(best));
}

// The int8 path the kernels take now: the best one, capped by QKERNELS_INT8_ISA (a bad value raises).
PyObject* int8_isa_selected(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(qkernels::int8_isa_name(qkernels::int8_isa()));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"has_cuda_kernels", has_cuda_kernels, METH_NOARGS, "Whether CUDA kernels were compiled in."},
    {"build_info", build_info, METH_NOARGS, "Compiled-in build facts and the int8 paths this CPU runs."},
    {"int8_isa_selected", int8_isa_selected, METH_NOARGS, "The int8 instruction set the kernels use now."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Importing qkernels._C from Python runs the static registrations above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
