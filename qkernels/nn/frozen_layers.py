"""FrozenConv2d / FrozenLinear: the inference form made by ``QuantizeTranspiler.freeze_program``.

Weights are their integer codes (stored in float32), the input is turned into integer codes with the
frozen (static types) or per-batch (abs_max) scale, the conv / linear runs on codes and the
dequantization comes after it: ``y = conv(q_a, q_w) * s_a * s_w / (bin_a * bin_w) + bias``.
This equals the training form in eval() up to float rounding. The accumulation runs in float32, exact
while ``|acc| < 2**24`` (e.g. 8-bit codes over about 1000 products of full-range values).

Under ``torch.onnx.export`` the layers write the same computation in standard QDQ form instead: the input
through our fake-quant op (QuantizeLinear / DequantizeLinear, see qkernels/ops/onnx.py), the integer
weight behind a DequantizeLinear (per channel with ``axis`` 0 for channel-wise weights), then the float
conv / linear; equal up to float rounding again (the scales multiply before the sum instead of after).
Under autocast the codes stay float32: fp16 would round integer codes above 2048 and accumulate
products in half precision.
"""
import torch
from torch import nn
import torch.nn.functional as F

from .. import ops as qk
from ..ops.fake_quant import bin_count
from .bn_fold import bn_factor, folded_bias
from .quant_layers import QuantConv2d, QuantLinear
from .quantizers import ActivationQuantizer


def _dequantize_weight(codes: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes * step`` as a DequantizeLinear of int8 codes in ONNX (torch.ao's quantized_decomposed ops,
    which the exporter translates)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)

    q = torch.ops.quantized_decomposed
    bin_w = bin_count(bits)
    ints = codes.round().to(torch.int8)
    if step.dim() == 0:
        return q.dequantize_per_tensor.tensor(ints, step, torch.zeros((), dtype=torch.int64), -bin_w, bin_w,
                                              torch.int8)
    return q.dequantize_per_channel(ints, step, torch.zeros(step.shape, dtype=torch.int64), 0, -bin_w, bin_w,
                                    torch.int8)


class _Frozen(nn.Module):
    input_quantizer: ActivationQuantizer
    bn_folded = False  # whether a batch norm was folded into the weights during QAT (fold_bn)

    def _init_common(self, quant_layer, weight: torch.Tensor, bias):
        wq = quant_layer.weight_quantizer
        codes, scale = wq.quantize(weight.detach())
        self.weight_bits = wq.bits
        self.weight_quantize_type = wq.quantize_type
        self.register_buffer("weight", codes.to(torch.float32))
        self.register_buffer("weight_scale", scale.to(torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.input_quantizer = quant_layer.input_quantizer
        self.input_quantizer.eval()

    def _dequant_scale(self, input_scale: torch.Tensor) -> torch.Tensor:
        return input_scale * self.weight_scale / float(self.input_quantizer.bin * bin_count(self.weight_bits))

    def _qdq_input_and_weight(self, x: torch.Tensor):
        """(fake-quantized input, dequantized weight): the ONNX export form."""
        quantizer = self.input_quantizer
        if quantizer.static:
            xq = qk.fake_quant_with_scale(x, quantizer.scale, quantizer.bits)
        else:
            xq = qk.fake_quant_abs_max(x, quantizer.bits)[0]
        step = self.weight_scale / float(bin_count(self.weight_bits))
        return xq, _dequantize_weight(self.weight, step, self.weight_bits)

    @staticmethod
    def _exporting_onnx() -> bool:
        return torch.onnx.is_in_onnx_export()


class FrozenConv2d(_Frozen):
    @classmethod
    def from_quant(cls, layer: QuantConv2d) -> "FrozenConv2d":
        new = cls()
        weight, bias = layer.weight, layer.bias
        bn = layer.folded_bn
        new.bn_folded = bn is not None  # structure only (the weights hold it): for the transpiler's summary
        if bn is not None:
            with torch.no_grad():
                factor = bn_factor(bn)
                weight = weight * factor.reshape(-1, 1, 1, 1)
                bias = folded_bias(bn, bias, factor)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(new, name, getattr(layer, name))
        new._init_common(layer, weight, bias)
        return new

    def conv_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            codes = F.pad(codes, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(codes, self.weight, None, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(codes, self.weight, None, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._exporting_onnx():
            xq, w = self._qdq_input_and_weight(x)
            if self.padding_mode != "zeros":
                xq = F.pad(xq, self._reversed_padding_repeated_twice, mode=self.padding_mode)
                return F.conv2d(xq, w, self.bias, self.stride, 0, self.dilation, self.groups)
            return F.conv2d(xq, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        codes, input_scale = self.input_quantizer.quantize(x)
        with torch.autocast(x.device.type, enabled=False):
            y = self.conv_codes(codes.to(torch.float32)) * self._dequant_scale(input_scale).reshape(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return "%d, %d, kernel_size=%s, stride=%s, padding=%s, groups=%d, weight=%s/%d bit" % (
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.groups,
            self.weight_quantize_type, self.weight_bits)


class FrozenLinear(_Frozen):
    @classmethod
    def from_quant(cls, layer: QuantLinear) -> "FrozenLinear":
        new = cls()
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new._init_common(layer, layer.weight, layer.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._exporting_onnx():
            xq, w = self._qdq_input_and_weight(x)
            return F.linear(xq, w, self.bias)
        codes, input_scale = self.input_quantizer.quantize(x)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(codes.to(torch.float32), self.weight) * self._dequant_scale(input_scale)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return "in_features=%d, out_features=%d, weight=%s/%d bit" % (
            self.in_features, self.out_features, self.weight_quantize_type, self.weight_bits)
