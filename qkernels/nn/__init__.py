"""Quantizer modules and quantized layers (the building blocks of qkernels.transpiler)."""
from .bn_fold import FoldedBatchNorm2d  # noqa: F401
from .frozen_layers import FrozenConv2d, FrozenLinear  # noqa: F401
from .int8_layers import Int8Conv2d, Int8Linear  # noqa: F401  (run on qkernels.conv2d_int8 / linear_int8)
from .quant_layers import QuantConv2d, QuantLinear  # noqa: F401
from .quantizers import (  # noqa: F401
    ACTIVATION_QUANTIZE_TYPES,
    WEIGHT_QUANTIZE_TYPES,
    ActivationQuantizer,
    FakeQuantAbsMax,
    FakeQuantMovingAverageAbsMax,
    FakeQuantRangeAbsMax,
    FakeQuantWeight,
    make_activation_quantizer,
    quantizers,
    set_quantization_enabled,
)
