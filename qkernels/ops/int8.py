"""Real int8 convolution and linear layers: int8 x int8 -> int32 accumulator -> fused epilogue.

Semantics shared by both ops (reference: ``qkernels.reference.conv2d_int8`` / ``linear_int8``):
- ``acc`` is the exact int32 sum of int8 products (it wraps only if it overflows int32, which needs
  more than 131072 products of -128 * -128).
- ``out_dtype=torch.float32``: ``act(acc * scale + bias)``, computed as ``fma(float(acc), scale, bias)``
  in float32; ``scale`` is a Python number, a 0-dim (or one-element) tensor or one value per output
  channel ``[O]``; ``bias`` is float32 ``[O]``; ``activation`` is None, "relu" or "relu6".
- ``out_dtype=torch.int8``: the same value requantized: rounded half away from zero and saturated to
  [-127, 127] (NaN becomes 0), so int8 layers chain without a float round trip. Fold the next layer's
  input scale into ``scale`` and ``bias`` (``scale = s_a * s_w / s_next``).
- ``out_dtype=torch.int32``: the raw accumulator; scale, bias and activation must keep their defaults.
- conv2d_int8 takes any memory format and **always returns channels-last** (NHWC in memory, the
  layout its kernels compute in and the fast input layout of the next layer); call ``.contiguous()``
  for NCHW strides. linear_int8 returns a contiguous ``[..., O]`` tensor.
- The int32 accumulator is the same on every device; float and int8 outputs are bit-identical between
  CPU and CUDA (both use one fused multiply-add per element).
"""
from typing import Optional, Sequence, Union

import torch

from .._library import check_backend, ops

ACTIVATIONS = (None, "none", "relu", "relu6")
OUT_DTYPES = (torch.float32, torch.int32, torch.int8)

Scale = Union[float, int, torch.Tensor]


def _pair(v, name: str):
    if isinstance(v, int) and not isinstance(v, bool):
        return [v, v]
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return [int(v[0]), int(v[1])]
    raise ValueError("qkernels: %s must be an int or a pair of ints, got %r" % (name, v))


def _activation(activation: Optional[str]) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError("qkernels: activation must be None, 'relu' or 'relu6', got %r" % (activation,))
    return activation or "none"


def _epilogue_args(x, weight, bias, scale, out_dtype, activation):
    for t, name in ((x, "x"), (weight, "weight")):
        if not isinstance(t, torch.Tensor):
            raise TypeError("qkernels: %s must be a torch.Tensor, got %s" % (name, type(t).__name__))
    check_backend(x)
    if out_dtype not in OUT_DTYPES:
        raise ValueError("qkernels: out_dtype must be torch.float32, torch.int32 or torch.int8, got %r" % (out_dtype,))
    act = _activation(activation)
    if out_dtype == torch.int32:
        default_scale = not isinstance(scale, torch.Tensor) and scale == 1
        if bias is not None or act != "none" or not default_scale:
            raise ValueError(
                "qkernels: out_dtype=torch.int32 returns the raw accumulator; leave scale=1.0, bias=None and "
                "activation=None (got scale=%r, bias %s, activation=%r)"
                % (scale if not isinstance(scale, torch.Tensor) else "a tensor",
                   "given" if bias is not None else "None", activation))
    if isinstance(scale, torch.Tensor):
        scale_t = scale
    elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
        scale_t = torch.tensor(float(scale), dtype=torch.float32, device=x.device)
    else:
        raise TypeError("qkernels: scale must be a number or a float32 tensor, got %s" % type(scale).__name__)
    return scale_t, act


def conv2d_int8(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    scale: Scale = 1.0,
    out_dtype: torch.dtype = torch.float32,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """int8 2-D convolution: x int8 [N, C, H, W], weight int8 [O, C/groups, kh, kw]; returns
    ``act(acc * scale + bias)`` as ``out_dtype`` in channels-last memory format (see module doc)."""
    scale_t, act = _epilogue_args(x, weight, bias, scale, out_dtype, activation)
    return ops.conv2d_int8(
        x, weight, bias, _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"),
        int(groups), scale_t, out_dtype, act,
    )


def linear_int8(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scale: Scale = 1.0,
    out_dtype: torch.dtype = torch.float32,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """int8 linear layer: x int8 [..., K], weight int8 [O, K]; returns ``act(acc * scale + bias)``
    as ``out_dtype``, shape [..., O] (see module doc)."""
    scale_t, act = _epilogue_args(x, weight, bias, scale, out_dtype, activation)
    return ops.linear_int8(x, weight, bias, scale_t, out_dtype, act)


def pack_conv2d_int8_weight(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``weight`` (int8 [O, C/groups, kh, kw]) packed once into the layout of this device's int8 conv
    kernels, for ``conv2d_int8_packed``: an opaque int8 tensor, empty where the kernels have no packed form
    (the CPU packs GEMM weights for the instruction set in use, AMX, VNNI, AVX2 or portable, and depthwise
    weights for its AVX2 kernel; CUDA into the tensor-core and depthwise kernels' layouts)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError("qkernels: weight must be a torch.Tensor, got %s" % type(weight).__name__)
    check_backend(weight)
    return ops.pack_conv2d_int8_weight(weight, int(groups))


def conv2d_int8_packed(
    x: torch.Tensor,
    weight: torch.Tensor,
    packed: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    scale: Scale = 1.0,
    out_dtype: torch.dtype = torch.float32,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """``conv2d_int8`` with the weights also given packed (``pack_conv2d_int8_weight(weight, groups)``):
    the same result bit for bit, without repacking the weights on every call. A ``packed`` tensor made for
    another shape, instruction set or device is ignored (the weights are then packed per call)."""
    args, act = _packed_conv_args(x, weight, packed, bias, stride, padding, dilation, groups, scale, out_dtype,
                                  activation)
    return ops.conv2d_int8_packed(*args, out_dtype, act)


def _packed_conv_args(x, weight, packed, bias, stride, padding, dilation, groups, scale, out_dtype, activation):
    """The checked leading arguments of the packed conv ops (through the scale), and the activation."""
    scale_t, act = _epilogue_args(x, weight, bias, scale, out_dtype, activation)
    if not isinstance(packed, torch.Tensor):
        raise TypeError("qkernels: packed must be a torch.Tensor, got %s" % type(packed).__name__)
    return (x, weight, packed, bias, _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"),
            int(groups), scale_t), act


def conv2d_int8_packed_abs_max(
    x: torch.Tensor,
    weight: torch.Tensor,
    packed: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    scale: Scale = 1.0,
    activation: Optional[str] = None,
):
    """``(out, abs_max(out))`` for ``out = conv2d_int8_packed(..., out_dtype=torch.float32)``, both bit for bit.
    The CPU kernels take the abs max of the values as they write them (no pass of its own over ``out``): the
    batch scale the next layer of a dynamic (``abs_max``) int8 model quantizes ``out`` with."""
    args, act = _packed_conv_args(x, weight, packed, bias, stride, padding, dilation, groups, scale, torch.float32,
                                  activation)
    return ops.conv2d_int8_packed_abs_max(*args, act)


@torch.library.impl("qkernels::conv2d_int8_packed_abs_max", "CUDA")
def _conv2d_int8_packed_abs_max_cuda(x, weight, packed, bias, stride, padding, dilation, groups, scale, activation):
    # The CUDA kernels have no fused abs max yet: the conv, then the abs-max reduction (the same values).
    out = ops.conv2d_int8_packed(x, weight, packed, bias, stride, padding, dilation, groups, scale, torch.float32,
                                 activation)
    return out, ops.abs_max(out)


def conv2d_int8_packed_requant_abs_max(
    x: torch.Tensor,
    weight: torch.Tensor,
    packed: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    scale: Scale = 1.0,
    activation: Optional[str] = None,
):
    """``(codes, m)``: ``m = abs_max(y)`` for the float output ``y = conv2d_int8_packed(..., torch.float32)``
    (bit for bit), and the 8-bit codes of ``y`` at scale ``m``, what ``quantize_with_scale(y, m, 8)`` gives
    up to one step on rounding ties. The input of a dynamic (``abs_max``) next layer. Where the product is
    cheap next to a float tensor written and read back (CPU: AMX and VNNI, and on AVX2 products over at most
    64 values: depthwise, the stem, 1x1 over few channels) the kernels run twice, first for ``m`` alone, then
    writing the codes with ``127 / m`` folded into the epilogue (as for chained static layers: hence the
    ties); elsewhere ``y`` is written and quantized (exact codes). Not for relu6 (its clamp at 6 is no clamp
    in codes of ``m``)."""
    args, act = _packed_conv_args(x, weight, packed, bias, stride, padding, dilation, groups, scale, torch.int8,
                                  activation)
    return ops.conv2d_int8_packed_requant_abs_max(*args, act)


@torch.library.impl("qkernels::conv2d_int8_packed_requant_abs_max", "CUDA")
def _conv2d_int8_packed_requant_abs_max_cuda(x, weight, packed, bias, stride, padding, dilation, groups, scale,
                                             activation):
    # From the CUDA ops, the one-pass form of the CPU kernels: the float output and its abs max, then its
    # codes (exact). relu6 is refused as on the CPU, so the op's contract does not depend on the device.
    torch._check(activation != "relu6", lambda: "qkernels: conv2d_int8_packed_requant_abs_max cannot fold relu6")
    y, m = _conv2d_int8_packed_abs_max_cuda(x, weight, packed, bias, stride, padding, dilation, groups, scale,
                                            activation)
    return ops.quantize_with_scale(y, m, 8), m


# --- fake (meta) kernels: shapes and dtypes only, so torch.compile traces without graph breaks ------

def _conv_out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_fake(x, weight, stride, padding, dilation, out_dtype):
    torch._check(x.dim() == 4 and weight.dim() == 4, lambda: "qkernels: conv2d_int8 expects 4-D input and weight")
    n, h, w = x.shape[0], x.shape[2], x.shape[3]
    o, kh, kw = weight.shape[0], weight.shape[2], weight.shape[3]
    oh = _conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = _conv_out_size(w, kw, stride[1], padding[1], dilation[1])
    return torch.empty((n, o, oh, ow), dtype=out_dtype, device=x.device, memory_format=torch.channels_last)


@torch.library.register_fake("qkernels::conv2d_int8")
def _(x, weight, bias, stride, padding, dilation, groups, scale, out_dtype, activation):
    return _conv_fake(x, weight, stride, padding, dilation, out_dtype)


@torch.library.register_fake("qkernels::linear_int8")
def _(x, weight, bias, scale, out_dtype, activation):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype)


@torch.library.register_fake("qkernels::conv2d_int8_packed")
def _(x, weight, packed, bias, stride, padding, dilation, groups, scale, out_dtype, activation):
    return _conv_fake(x, weight, stride, padding, dilation, out_dtype)


@torch.library.register_fake("qkernels::conv2d_int8_packed_abs_max")
def _(x, weight, packed, bias, stride, padding, dilation, groups, scale, activation):
    out = _conv_fake(x, weight, stride, padding, dilation, torch.float32)
    return out, x.new_empty((), dtype=torch.float32)


@torch.library.register_fake("qkernels::conv2d_int8_packed_requant_abs_max")
def _(x, weight, packed, bias, stride, padding, dilation, groups, scale, activation):
    out = _conv_fake(x, weight, stride, padding, dilation, torch.int8)
    return out, x.new_empty((), dtype=torch.float32)


@torch.library.register_fake("qkernels::pack_conv2d_int8_weight")
def _(weight, groups):
    # the packed size depends on the instruction set found at run time
    return weight.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int8)
