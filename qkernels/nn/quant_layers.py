"""QuantConv2d / QuantLinear: the training form made by ``QuantizeTranspiler.training_transpile``.

Each layer fake-quantizes its input activation and its weight with the qkernels ops, then runs the float
conv / linear. They subclass nn.Conv2d / nn.Linear and reuse the original ``weight`` and ``bias``
Parameter objects, so float checkpoints load before or after transpiling and an optimizer built on the
float model keeps training the same tensors.

A tensor read by several layers has one input quantizer, as in the reference: the transpiler gives the
first reader (in call order) the quantizer and registers the same module in the later readers with
``shares_input_quantizer = True``; those apply its state without updating it, so the state is updated
once per step and ``state_dict`` lists it under every reader's name (one tensor). The fake quant itself
still runs in each reader (same values).
"""
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from .bn_fold import batch_norm_after_fold, bn_factor, folded_bias
from .quantizers import ActivationQuantizer, FakeQuantWeight


def _quantize_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if layer.shares_input_quantizer:
        return layer.input_quantizer.reuse(x)
    return layer.input_quantizer(x)


class QuantConv2d(nn.Conv2d):
    """nn.Conv2d with fake-quantized input and weight (optionally with the next BatchNorm2d folded in)."""

    input_quantizer: ActivationQuantizer
    weight_quantizer: FakeQuantWeight
    shares_input_quantizer = False  # True: input_quantizer belongs to an earlier layer reading the same tensor

    @classmethod
    def from_float(cls, conv: nn.Conv2d, input_quantizer: ActivationQuantizer, weight_quantizer: FakeQuantWeight,
                   bn: Optional[nn.BatchNorm2d] = None) -> "QuantConv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        new.input_quantizer = input_quantizer
        new.weight_quantizer = weight_quantizer
        # The folded BatchNorm2d stays registered at its own place in the model (a FoldedBatchNorm2d):
        # keep an unregistered reference so that its state is not listed twice.
        new._folded_bn = (bn,) if bn is not None else ()
        new.train(conv.training)
        return new

    @property
    def folded_bn(self) -> Optional[nn.BatchNorm2d]:
        return self._folded_bn[0] if self._folded_bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _quantize_input(self, x)
        if not self._folded_bn:
            return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)
        bn = self._folded_bn[0]
        factor = bn_factor(bn)
        w = self.weight_quantizer(self.weight * factor.reshape(-1, 1, 1, 1))
        if not bn.training:
            # Running statistics: exactly the folded conv that freeze_program and convert_to_int8 produce.
            return self._conv_forward(x, w, folded_bias(bn, self.bias, factor))
        # Batch statistics: undo the factor per output channel and batch-normalise. Scaling an output
        # channel of a conv equals scaling its weights, so the division is applied to the (small) weight
        # rather than to the activation: conv(x, q(w*f)) / f == conv(x, q(w*f) / f).
        y = self._conv_forward(x, w / factor.reshape(-1, 1, 1, 1), self.bias)
        return batch_norm_after_fold(y, bn)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", bn folded" if self._folded_bn else "") + (
            ", shared input quantizer" if self.shares_input_quantizer else "")


class QuantLinear(nn.Linear):
    """nn.Linear with fake-quantized input and weight (weight axis 0 = output features)."""

    input_quantizer: ActivationQuantizer
    weight_quantizer: FakeQuantWeight
    shares_input_quantizer = False

    @classmethod
    def from_float(cls, linear: nn.Linear, input_quantizer: ActivationQuantizer,
                   weight_quantizer: FakeQuantWeight) -> "QuantLinear":
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.input_quantizer = input_quantizer
        new.weight_quantizer = weight_quantizer
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_quantize_input(self, x), self.weight_quantizer(self.weight), self.bias)
