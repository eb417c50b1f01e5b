"""U-Net building blocks shared by DRAEM (BatchNorm) and DSR (InstanceNorm): conv 3x3 + norm + ReLU."""

from __future__ import annotations

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
