"""ONNX translations of the qkernels ops for ``torch.onnx.export(..., dynamo=True)``: standard QDQ.

The exporter does not know our ops; ``onnx_translations()`` is the table to pass as its
``custom_translation_table`` (``qkernels.export_onnx`` does so). Each translation writes the op with
standard ONNX operators (opset 18), the ops themselves are unchanged:

- quantization with a scale ``s`` and ``bits``: ``Clip(x, -s, s)`` (our codes stop at ``+-bin``;
  QuantizeLinear's int8 would reach -128) then ``QuantizeLinear(step = s / bin, zero point int8 0)``;
  fake quant adds ``DequantizeLinear(step)``. A scale at or below 1e-30 (or not finite) clips to 0 with
  step 1: zeros, as our ops give.
- dynamic ``abs_max``: ``ReduceMax(Abs(x))`` over the finite values (NaN and +-Inf never set a scale),
  then the QDQ above; no Clip (``|x| <= max|x|``).
- channel-wise weights: ``ReduceMax(Abs(w))`` over every axis but ``axis``, then QuantizeLinear /
  DequantizeLinear with one step per channel and ``axis``; the exporter's optimizer folds them on
  constant weights into an int8 initializer and a DequantizeLinear.
- int8 conv / linear: ``DequantizeLinear(codes, 1)`` on the int8 input, the integer weight behind a
  ``DequantizeLinear`` carrying the layer's whole epilogue scale (per output channel with ``axis``),
  Conv / MatMul with the float bias, ReLU / Clip(0, 6), and for int8 outputs ``Clip(-127, 127)`` then
  ``QuantizeLinear(1)``.

Difference from PyTorch (bounded and tested): ONNX rounds half to even, we round half away from zero,
and QuantizeLinear divides by the step where our kernels multiply by ``bin / s``. A code therefore differs
by at most one step, and only where ``x * bin / s`` is a tie or within float rounding (a few ulps) of
one. NaN inputs are not specified by ONNX (ours: NaN in fake-quant output, code 0). Codes wider than
8 bits have no opset-18 QuantizeLinear type and are refused with an error at export.
"""
from typing import Callable, Dict

import numpy as np

_MIN_SCALE = 1e-30
_FLT_MAX = float(np.finfo(np.float32).max)


def _op():
    from onnxscript import opset18  # imported late: onnxscript is needed for ONNX export only

    return opset18


def _ir():
    import onnx_ir

    return onnx_ir


def _const(value, dtype=np.float32):
    return _op().Constant(value=_ir().tensor(np.asarray(value, dtype=dtype)))


def _bin(bits: int) -> float:
    if bits > 8:
        raise ValueError("qkernels: ONNX export supports codes of at most 8 bits (opset 18 QuantizeLinear is "
                         "int8 or uint8), got bits=%d" % bits)
    return float(2 ** (bits - 1) - 1)


def _as_float(x):
    """x as float32 (QuantizeLinear's input in opset 18) and a function giving results back x's type."""
    op = _op()
    if x.dtype is not None and x.dtype == _ir().DataType.FLOAT:
        return x, lambda y: y
    return op.Cast(x, to=_ir().DataType.FLOAT), lambda y: op.CastLike(y, x)


def _finite_abs_max(x, axes=None):
    """max |x| over finite values (over ``axes``, or all), float32; 0 where nothing is finite."""
    op = _op()
    a = op.Abs(x)
    a = op.Where(op.LessOrEqual(a, _const(_FLT_MAX)), a, _const(0.0))
    if axes is None:  # a 0-dim scale, as the op's
        return op.Reshape(op.ReduceMax(a, keepdims=0), _const([], np.int64))
    return op.ReduceMax(a, _const(axes, np.int64), keepdims=0)


def _usable(scale):
    op = _op()
    return op.And(op.Greater(scale, _const(_MIN_SCALE)), op.LessOrEqual(scale, _const(_FLT_MAX)))


def _step_and_bound(scale, bits: int):
    """(QuantizeLinear step s / bin, clip bound s) with unusable scales turned into (1, 0)."""
    op = _op()
    scale = op.Cast(scale, to=_ir().DataType.FLOAT)
    usable = _usable(scale)
    step = op.Where(usable, op.Div(scale, _const(_bin(bits))), _const(1.0))
    bound = op.Where(usable, scale, _const(0.0))
    return step, bound


def _zero_point(channels=None):
    return _const(0 if channels is None else np.zeros(channels), np.int8)


def _codes_with_scale(x, scale, bits: int):
    op = _op()
    step, bound = _step_and_bound(scale, bits)
    clipped = op.Clip(x, op.Neg(bound), bound)
    return op.QuantizeLinear(clipped, step, _zero_point()), step


def _codes_abs_max(x, bits: int):
    op = _op()
    scale = _finite_abs_max(x)
    step, bound = _step_and_bound(scale, bits)
    # |x| <= max|x| already; only an unusable scale (bound 0) or +-Inf needs the clip.
    clipped = op.Clip(x, op.Neg(bound), bound)
    return op.QuantizeLinear(clipped, step, _zero_point()), step, scale


def _channel_axes(x, axis: int):
    rank = len(x.shape)
    axis = axis % rank
    return axis, [d for d in range(rank) if d != axis], int(x.shape[axis])


def _codes_channel_wise(x, bits: int, axis: int):
    op = _op()
    axis, others, channels = _channel_axes(x, axis)
    scales = _finite_abs_max(x, others)
    usable = _usable(scales)
    steps = op.Where(usable, op.Div(scales, _const(_bin(bits))), _const(1.0))
    bound = op.Where(usable, scales, _const(0.0))
    shape = [1] * len(x.shape)
    shape[axis] = channels
    bound = op.Reshape(bound, _const(shape, np.int64))
    clipped = op.Min(op.Max(x, op.Neg(bound)), bound)  # per-channel clip (Clip takes scalars only)
    return op.QuantizeLinear(clipped, steps, _zero_point(channels), axis=axis), steps, scales, axis, channels


# --- the ops -----------------------------------------------------------------------------------------

def abs_max(x):
    xf, _ = _as_float(x)
    return _finite_abs_max(xf)


def _grad_mask(x, clip_grad: bool):
    """The op's third output, the clip-STE gradient mask (1 bit per element, int32 words): backward only, so
    zeros of the op's shape (empty without clip_grad)."""
    words = 0
    if clip_grad:
        if x.shape is None or not all(isinstance(d, int) for d in x.shape):
            raise ValueError("qkernels: ONNX export of a clip-STE fake quant needs static input shapes")
        words = (int(np.prod([int(d) for d in x.shape])) + 31) // 32
    return _const(np.zeros(words), np.int32)


def fake_quant_abs_max(x, bits: int = 8, clip_grad: bool = False):
    xf, back = _as_float(x)
    codes, step, scale = _codes_abs_max(xf, bits)
    return back(_op().DequantizeLinear(codes, step, _zero_point())), scale, _grad_mask(x, clip_grad)


def quantize_abs_max(x, bits: int = 8):
    xf, _ = _as_float(x)
    codes, _step, scale = _codes_abs_max(xf, bits)
    return codes, scale


def fake_quant_with_scale(x, scale, bits: int = 8, clip_grad: bool = False):
    xf, back = _as_float(x)
    codes, step = _codes_with_scale(xf, scale, bits)
    return back(_op().DequantizeLinear(codes, step, _zero_point())), _grad_mask(x, clip_grad)


def quantize_with_scale(x, scale, bits: int = 8):
    xf, _ = _as_float(x)
    return _codes_with_scale(xf, scale, bits)[0]


def fake_channel_wise_quant_abs_max(x, bits: int = 8, axis: int = 0, clip_grad: bool = False):
    xf, back = _as_float(x)
    codes, steps, scales, axis, channels = _codes_channel_wise(xf, bits, axis)
    return back(_op().DequantizeLinear(codes, steps, _zero_point(channels), axis=axis)), scales


def quantize_channel_wise_abs_max(x, bits: int = 8, axis: int = 0):
    xf, _ = _as_float(x)
    codes, _steps, scales, _axis, _channels = _codes_channel_wise(xf, bits, axis)
    return codes, scales


def _dequantized_weight(weight, scale, axis: int):
    """DequantizeLinear of the int8 weight with the epilogue scale: one value, or one per output channel."""
    op = _op()
    if scale.shape is None:
        raise ValueError("qkernels: ONNX export of an int8 layer needs the static shape of its scale")
    numel = int(np.prod([int(d) for d in scale.shape])) if len(scale.shape) else 1
    scale = op.Cast(scale, to=_ir().DataType.FLOAT)
    if numel == 1:
        return op.DequantizeLinear(weight, op.Reshape(scale, _const([], np.int64)), _zero_point())
    return op.DequantizeLinear(weight, op.Reshape(scale, _const([numel], np.int64)), _zero_point(numel), axis=axis)


def _epilogue(y, bias, out_dtype, activation: str, bias_shape):
    op = _op()
    if bias is not None and bias_shape is not None:
        y = op.Add(y, op.Reshape(bias, _const(bias_shape, np.int64)))
    if activation == "relu":
        y = op.Relu(y)
    elif activation == "relu6":
        y = op.Clip(y, _const(0.0), _const(6.0))
    if _is_int8(out_dtype):
        y = op.Clip(y, _const(-127.0), _const(127.0))
        y = op.QuantizeLinear(y, _const(1.0), _zero_point())
    elif _is_int32(out_dtype):
        y = op.Cast(y, to=_ir().DataType.INT32)
    return y


def _dtype_name(out_dtype) -> str:
    return str(out_dtype).replace("torch.", "").upper()


def _is_int8(out_dtype) -> bool:
    import torch

    return out_dtype == torch.int8 or _dtype_name(out_dtype) in ("INT8", "3")


def _is_int32(out_dtype) -> bool:
    import torch

    return out_dtype == torch.int32 or _dtype_name(out_dtype) in ("INT32", "6")


def conv2d_int8(x, weight, bias, stride, padding, dilation, groups, scale, out_dtype, activation):
    op = _op()
    xd = op.DequantizeLinear(x, _const(1.0), _zero_point())
    wd = _dequantized_weight(weight, scale, axis=0)
    pads = [int(padding[0]), int(padding[1]), int(padding[0]), int(padding[1])]
    y = op.Conv(xd, wd, strides=[int(s) for s in stride], pads=pads, dilations=[int(d) for d in dilation],
                group=int(groups))
    return _epilogue(y, bias, out_dtype, activation, [1, -1, 1, 1])


def conv2d_int8_packed(x, weight, packed, bias, stride, padding, dilation, groups, scale, out_dtype, activation):
    """The packed weights are a CPU-kernel layout of ``weight`` (same result): ONNX gets ``weight`` itself."""
    return conv2d_int8(x, weight, bias, stride, padding, dilation, groups, scale, out_dtype, activation)


def linear_int8(x, weight, bias, scale, out_dtype, activation):
    op = _op()
    xd = op.DequantizeLinear(x, _const(1.0), _zero_point())
    wt = op.Transpose(weight, perm=[1, 0])  # [K, O]: folded on the constant weight
    wd = _dequantized_weight(wt, scale, axis=1)
    y = op.MatMul(xd, wd)
    return _epilogue(y, bias, out_dtype, activation, [-1])


def dequantize_per_tensor(x, scale, zero_point, quant_min, quant_max, dtype, out_dtype=None):
    """torch.ao's quantized_decomposed op, as frozen layers use it for their int8 weight (zero point 0)."""
    op = _op()
    return op.DequantizeLinear(x, op.Cast(scale, to=_ir().DataType.FLOAT), _zero_point())


def dequantize_per_channel(x, scales, zero_points, axis, quant_min, quant_max, dtype, out_dtype=None):
    op = _op()
    channels = int(x.shape[axis])
    return op.DequantizeLinear(x, op.Cast(scales, to=_ir().DataType.FLOAT), _zero_point(channels), axis=int(axis))


_TRANSLATIONS = {
    "abs_max": abs_max,
    "fake_quant_abs_max": fake_quant_abs_max,
    "quantize_abs_max": quantize_abs_max,
    "fake_quant_with_scale": fake_quant_with_scale,
    "quantize_with_scale": quantize_with_scale,
    "quantize_with_scale_channels_last": quantize_with_scale,  # the same values (ONNX tensors have no layout)
    "fake_channel_wise_quant_abs_max": fake_channel_wise_quant_abs_max,
    "quantize_channel_wise_abs_max": quantize_channel_wise_abs_max,
    "conv2d_int8": conv2d_int8,
    "conv2d_int8_packed": conv2d_int8_packed,
    "linear_int8": linear_int8,
}


def onnx_translations() -> Dict[Callable, Callable]:
    """``{torch.ops.qkernels.<op>.default: translation}`` for torch.onnx.export's custom_translation_table."""
    import torch
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)

    from .._library import ops

    table = {getattr(ops, name).default: fn for name, fn in _TRANSLATIONS.items()}
    decomposed = torch.ops.quantized_decomposed
    table[decomposed.dequantize_per_tensor.tensor] = dequantize_per_tensor
    table[decomposed.dequantize_per_channel.default] = dequantize_per_channel
    return table
