"""Public operators: thin Python signatures over torch.ops.qkernels.* with fake kernels and autograd."""
from .fake_quant import (  # noqa: F401
    abs_max,
    fake_channel_wise_quant_abs_max,
    fake_quant_abs_max,
    fake_quant_with_scale,
    moving_average_abs_max_update_,
    quantize_abs_max,
    quantize_channel_wise_abs_max,
    quantize_with_scale,
    range_abs_max_update_,
    recompute_fake_quant_outputs,
)
from .int8 import (  # noqa: F401
    conv2d_int8,
    conv2d_int8_packed,
    conv2d_int8_packed_abs_max,
    conv2d_int8_packed_requant_abs_max,
    linear_int8,
    pack_conv2d_int8_weight,
)

__all__ = [
    "abs_max",
    "conv2d_int8",
    "conv2d_int8_packed",
    "conv2d_int8_packed_abs_max",
    "conv2d_int8_packed_requant_abs_max",
    "fake_channel_wise_quant_abs_max",
    "fake_quant_abs_max",
    "fake_quant_with_scale",
    "linear_int8",
    "moving_average_abs_max_update_",
    "pack_conv2d_int8_weight",
    "quantize_abs_max",
    "quantize_channel_wise_abs_max",
    "quantize_with_scale",
    "range_abs_max_update_",
    "recompute_fake_quant_outputs",
]
