"""MobileNet-v1-SSD 300x300 (reference-semantics section 4), plain PyTorch modules only.

Every conv is an nn.Conv2d immediately followed by its nn.BatchNorm2d and nn.ReLU inside one
nn.Sequential, so the QAT transpiler can swap the convs and fold each BN into the conv before it.
The box and class heads are plain 1x1 convs with bias (no BN). Input: BGR, (pixel - 127.5) * 0.007843,
300x300; output logits, flattened in the prior order of ssd.priors.
"""
from __future__ import annotations

import torch
from torch import nn

from .priors import priors_per_location

# (output channels, stride) of MobileNet-v1's 13 depthwise-separable blocks at width 1.0.
MOBILENET_BLOCKS = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),  # block 11 ends here: the 19x19x512 map
    (1024, 2), (1024, 1),  # block 13: the 10x10x1024 map
)
# (1x1 reduction width, 3x3 stride-2 output width) of the four extra blocks: 5x5, 3x3, 2x2, 1x1 maps.
EXTRA_BLOCKS = ((256, 512), (128, 256), (128, 256), (64, 128))
FEATURE_CHANNELS = (512, 1024, 512, 256, 256, 128)
# The reference trains the weights of every conv of the body and the extra blocks (its conv_bn helper) at
# 0.1x the learning rate; batch-norm parameters and the heads (weights and biases) train at 1x.
BODY_CONV_LR_MULTIPLIER = 0.1


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> ReLU as three separate modules in one Sequential."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU()  # not in-place: quantizer hooks may keep the pre-activation,
    )


def depthwise_separable(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3x3 depthwise conv (with the stride) then 1x1 pointwise conv, each with BN and ReLU."""
    return nn.Sequential(
        conv_bn_relu(in_channels, in_channels, 3, stride, groups=in_channels),
        conv_bn_relu(in_channels, out_channels, 1),
    )


def extra_block(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv to the reduction width, then 3x3 stride-2 conv (padding 1), each with BN and ReLU."""
    return nn.Sequential(
        conv_bn_relu(in_channels, mid_channels, 1),
        conv_bn_relu(mid_channels, out_channels, 3, stride=2),
    )


def check_images(images: torch.Tensor) -> None:
    """A clear error for anything but a batch of 3-channel images."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"MobileNetSSD expects images [N, 3, H, W], got {shape}")


# torch.fx records the check as one call instead of tracing into it (a Python `if` on a traced tensor
# cannot be traced), so the QAT transpiler sees the model's whole graph and the check stays in the
# GraphModules it builds.
torch.fx.wrap("check_images")


class MobileNetSSD(nn.Module):
    """forward(images [N, 3, 300, 300]) -> (locs [N, P, 4], confs [N, P, num_classes]) logits, P = 1917."""

    def __init__(self, num_classes: int = 21):
        super().__init__()
        self.num_classes = num_classes
        self.priors_per_location = priors_per_location()

        layers = [conv_bn_relu(3, 32, 3, stride=2)]
        in_channels = 32
        for out_channels, stride in MOBILENET_BLOCKS:
            layers.append(depthwise_separable(in_channels, out_channels, stride))
            in_channels = out_channels
        # Stem + blocks 1-11 give the 19x19 map; blocks 12-13 the 10x10 map.
        self.body_19 = nn.Sequential(*layers[:12])
        self.body_10 = nn.Sequential(*layers[12:])

        self.extras = nn.ModuleList()
        for mid_channels, out_channels in EXTRA_BLOCKS:
            self.extras.append(extra_block(in_channels, mid_channels, out_channels))
            in_channels = out_channels

        self.loc_heads = nn.ModuleList(
            nn.Conv2d(channels, anchors * 4, kernel_size=1)
            for channels, anchors in zip(FEATURE_CHANNELS, self.priors_per_location)
        )
        self.conf_heads = nn.ModuleList(
            nn.Conv2d(channels, anchors * num_classes, kernel_size=1)
            for channels, anchors in zip(FEATURE_CHANNELS, self.priors_per_location)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As the reference: MSRA (He, fan-in, uniform) for the body and extra convs; the heads use
        the reference framework's default conv init (Xavier uniform, zero bias); BN starts at 1 / 0."""
        head_convs = {id(m) for m in [*self.loc_heads, *self.conf_heads]}
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                if id(module) in head_convs:
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.kaiming_uniform_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def lr_multipliers(self, body: float = BODY_CONV_LR_MULTIPLIER) -> dict[str, float]:
        """Learning-rate multiplier of every named parameter: ``body`` for the conv weights of the body and
        the extra blocks, 1 for the rest (also after QAT transpiling: the quantized convs subclass
        nn.Conv2d and keep their names)."""
        body_conv_weights = {f"{name}.weight" for part in ("body_19", "body_10", "extras")
                             for name, module in getattr(self, part).named_modules(prefix=part)
                             if isinstance(module, nn.Conv2d)}
        return {name: body if name in body_conv_weights else 1.0
                for name, _ in self.named_parameters()}

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The six maps the heads read: 19x19x512, 10x10x1024, 5x5x512, 3x3x256, 2x2x256, 1x1x128."""
        x = self.body_19(images)
        maps = [x]
        x = self.body_10(x)
        maps.append(x)
        for block in self.extras:
            x = block(x)
            maps.append(x)
        return maps

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_images(images)
        batch = images.shape[0]
        locs, confs = [], []
        for feature, loc_head, conf_head in zip(self.feature_maps(images), self.loc_heads, self.conf_heads):
            # NCHW -> NHWC then flatten: the order is row y, column x, prior, as the priors.
            locs.append(loc_head(feature).permute(0, 2, 3, 1).reshape(batch, -1, 4))
            confs.append(conf_head(feature).permute(0, 2, 3, 1).reshape(batch, -1, self.num_classes))
        return torch.cat(locs, dim=1), torch.cat(confs, dim=1)
