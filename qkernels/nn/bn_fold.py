"""Batch norm folded into the preceding convolution (QAT with ``fold_bn=True``).

The scheme is the one of Jacob et al. 2018 as PyTorch's fused QAT conv-bn implements it: the weight that
gets fake-quantized is ``w * gamma / sqrt(running_var + eps)`` (what inference will use), and in training
the conv output is divided back by that per-channel factor and batch-normalised with the *batch*
statistics (which also updates the running statistics). So training sees batch-norm behaviour while the
quantized weight is the folded one. With the batch norm in eval() (inference, or statistics frozen during
fine-tuning) the layer is exactly the folded conv ``conv(x, q(w * f)) + beta + (b - mean) * f`` with
``f = gamma / sqrt(running_var + eps)``, what freeze_program and convert_to_int8 produce. In training the
division by ``f`` is applied to the quantized weight (the same thing for a conv, and far cheaper than
dividing the activation). As in PyTorch's version, a channel with ``gamma == 0`` is not supported.

The BatchNorm2d stays at its place in the model as a ``FoldedBatchNorm2d`` (same parameters and buffers
under the same names, so checkpoints and optimizers keep working) whose forward is the identity: the
QuantConv2d before it does its work.
"""
import torch
from torch import nn
import torch.nn.functional as F


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose normalisation is done by the QuantConv2d in front of it (identity here)."""

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d) -> "FoldedBatchNorm2d":
        new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats, device="meta")
        # Reuse the very tensors: optimizer state and checkpoints refer to them.
        if bn.affine:
            new.weight, new.bias = bn.weight, bn.bias
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
        new.train(bn.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def can_fold(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(bn) is nn.BatchNorm2d and bn.track_running_stats and bn.running_var is not None
            and bn.num_features == conv.out_channels)


def bn_factor(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per-channel ``gamma / sqrt(running_var + eps)``."""
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    return bn.weight * inv_std if bn.affine else inv_std


def folded_bias(bn: nn.BatchNorm2d, conv_bias, factor: torch.Tensor) -> torch.Tensor:
    """``beta + (b - mean) * f``: the bias of the folded conv (inference statistics)."""
    centred = -bn.running_mean if conv_bias is None else conv_bias - bn.running_mean
    shift = centred * factor
    return shift + bn.bias if bn.affine else shift


def batch_norm_after_fold(y: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(y)`` with the module's own mode and momentum rules (as nn.BatchNorm2d.forward does)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average, as nn.BatchNorm
            factor = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or bn.running_mean is None
    return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                        use_batch_stats, factor, bn.eps)
