"""U-Net building blocks shared by DRAEM (BatchNorm) and DSR (InstanceNorm): conv 3x3 + norm + ReLU,
and the encoder-decoder pass with skip connections both use."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_norm_relu(cin: int, cout: int, norm: type[nn.Module]) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, padding=1), norm(cout), nn.ReLU(inplace=True)]


def double_conv(cin: int, cout: int, norm: type[nn.Module], mid: int | None = None) -> nn.Sequential:
    mid = cout if mid is None else mid
    return nn.Sequential(*conv_norm_relu(cin, mid, norm), *conv_norm_relu(mid, cout, norm))


def up_conv(cin: int, cout: int, norm: type[nn.Module]) -> nn.Sequential:
    """2x bilinear upsampling (align_corners=True, as anomalib's DRAEM and DSR), then conv + norm + ReLU."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         *conv_norm_relu(cin, cout, norm))


def unet_forward(x: torch.Tensor, encoder, ups, merges, out: nn.Module) -> torch.Tensor:
    """Encoder blocks with 2x max-pooling between them, then per level: upsample, concatenate the skip
    connection of that level, merge; `out` maps to the output channels."""
    skips = []
    for index, block in enumerate(encoder):
        x = block(x if index == 0 else F.max_pool2d(x, 2))
        skips.append(x)
    x = skips.pop()
    for up, merge in zip(ups, merges):
        x = merge(torch.cat((up(x), skips.pop()), dim=1))
    return out(x)
