"""Weights of conv2d_int8 stored once in the memory layout the CUDA kernels read, instead of permuted on every
call. The packed weight is the same tensor (shape [O, C/groups, kh, kw], same values) with other strides, so
every op, fake kernel, ``state_dict`` and the CPU kernels take it unchanged, and ``Tensor.to`` keeps it:

- convs: channels-last, i.e. [O][kh][kw][C/groups] in memory: each output channel's patch row, the GEMM
  operand of the tensor-core kernel;
- depthwise convs (groups == O, one input channel per group): [kh][kw][C] in memory, so a thread reads the
  weights of adjacent channels of one tap in one load.

conv2d_int8 on CUDA detects these layouts and reads them in place; it permutes any other layout per call.
The CPU kernels read either without a copy too, but keep their own (contiguous) layout as the default.
linear_int8 reads [O, K] contiguous on every device: ``kernel_weight_layout`` makes a 2-D weight
contiguous.
"""
import torch

__all__ = ["cuda_weight_layout", "kernel_weight_layout"]


def _is_depthwise(weight: torch.Tensor, groups: int) -> bool:
    return weight.dim() == 4 and weight.size(1) == 1 and groups == weight.size(0) and groups > 1


def cuda_weight_layout(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``weight`` (int8 [O, C/groups, kh, kw], or [O, K] for linear) in the CUDA kernels' layout; returns
    ``weight`` itself when it is already stored that way."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError("qkernels: weight must be a torch.Tensor, got %s" % type(weight).__name__)
    if weight.dim() == 2:
        return weight.contiguous()
    if weight.dim() != 4:
        raise ValueError("qkernels: an int8 weight is 2-D [O, K] or 4-D [O, C/groups, kh, kw], got shape %s"
                         % (tuple(weight.shape),))
    if _is_depthwise(weight, groups):
        tap_major = weight.permute(2, 3, 1, 0)
        return weight if tap_major.is_contiguous() else tap_major.contiguous().permute(3, 2, 0, 1)
    return weight.contiguous(memory_format=torch.channels_last)


def kernel_weight_layout(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``weight`` in the layout of the kernels of its own device: the CUDA layout on CUDA, contiguous
    elsewhere. What Int8Conv2d stores, again after ``.to(device)``."""
    if weight.device.type == "cuda":
        return cuda_weight_layout(weight, groups)
    return weight.contiguous()
