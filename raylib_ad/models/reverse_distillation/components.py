"""Reverse Distillation's trainable parts, built from the encoder's feature shapes (channels, strides)
so that any timm backbone works, not only the ResNets anomalib's hand-written decoder supports.

- OneClassBottleneck (the paper's OCBE): multi-scale feature fusion (MFF) brings every encoder layer
  down to the deepest layer's resolution with strided 3x3 convs and concatenates them; the one-class
  embedding (OCE) is a strided residual stage, like ResNet's layer4, giving a compact code at twice
  the deepest stride. Being smaller than the encoder's features is the point: the decoder cannot
  simply copy anomalous details through it.
- MirrorDecoder: from that code, one stage per encoder layer, deepest first; each stage upsamples to
  the encoder layer's resolution, runs residual blocks, and a linear 1x1 head emits a feature with
  the encoder layer's channels.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """ResNet bottleneck block (1x1 reduce, 3x3, 1x1 expand) with an optional stride and projection."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        width = max(out_ch // 2, 8)  # "wide" bottleneck, as in wide_resnet50_2 and RD's decoder
        self.body = nn.Sequential(
            conv_bn_relu(in_ch, width, kernel=1),
            conv_bn_relu(width, width, kernel=3, stride=stride),
            nn.Conv2d(width, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
        self.shortcut = nn.Identity() if stride == 1 and in_ch == out_ch else nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def _resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    # Odd input sizes can leave a strided path one pixel off the encoder's grid; snap it back.
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(
        x, size=tuple(size), mode="bilinear", align_corners=False)


def _halvings(stride: int, deepest: int) -> int:
    steps = math.log2(deepest / stride)
    if steps != int(steps):
        raise ConfigError(f"reverse_distillation: layer stride {stride} does not divide the deepest stride "
                          f"{deepest} by a power of two; choose layers whose strides differ by 2x, 4x, ...")
    return int(steps)


class OneClassBottleneck(nn.Module):
    def __init__(self, channels: Sequence[int], strides: Sequence[int], oce_blocks: int = 3):
        super().__init__()
        deep = max(range(len(strides)), key=lambda i: (strides[i], i))  # the deepest layer, kept as is
        self.deep_index = deep
        c_deep, s_deep = channels[deep], strides[deep]
        self.fuse = nn.ModuleList()
        for i, (c_in, stride) in enumerate(zip(channels, strides)):
            if i == deep:
                self.fuse.append(nn.Identity())
                continue
            steps = _halvings(stride, s_deep)
            if steps == 0:  # same resolution as the deepest layer: only match its channels
                self.fuse.append(conv_bn_relu(c_in, c_deep, kernel=1))
                continue
            convs, c = [], c_in
            # Channels grow towards c_deep as the grid halves (RD on wide_resnet50_2: 256 -> 512 -> 1024).
            for k in range(steps, 0, -1):
                c_out = c_deep if k == 1 else max(c, c_deep // 2 ** (k - 1))
                convs.append(conv_bn_relu(c, c_out, kernel=3, stride=2))
                c = c_out
            self.fuse.append(nn.Sequential(*convs))
        self.out_channels = 2 * c_deep
        blocks = [ResidualBlock(len(channels) * c_deep, self.out_channels, stride=2)]
        blocks += [ResidualBlock(self.out_channels, self.out_channels) for _ in range(oce_blocks - 1)]
        self.embed = nn.Sequential(*blocks)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[self.deep_index].shape[-2:]
        fused = torch.cat([_resize_to(f(x), size) for f, x in zip(self.fuse, features)], dim=1)
        return self.embed(fused)


class MirrorDecoder(nn.Module):
    """Outputs one feature map per encoder layer, in the encoder's layer order."""

    def __init__(self, in_channels: int, channels: Sequence[int], strides: Sequence[int], blocks: int = 2):
        super().__init__()
        # Decode from the deepest layer to the shallowest (the "reverse" in reverse distillation).
        self.order = sorted(range(len(channels)), key=lambda i: (strides[i], i), reverse=True)
        self.stages, self.heads = nn.ModuleList(), nn.ModuleList()
        c = in_channels
        for i in self.order:
            layers = [conv_bn_relu(c, channels[i], kernel=3)]
            layers += [ResidualBlock(channels[i], channels[i]) for _ in range(blocks)]
            self.stages.append(nn.Sequential(*layers))
            # Linear head: the residual blocks end in ReLU, but some encoders' features are signed
            # (EfficientNet blocks end in BatchNorm without activation) and cosine needs the sign.
            self.heads.append(nn.Conv2d(channels[i], channels[i], kernel_size=1))
            c = channels[i]

    def forward(self, code: torch.Tensor, sizes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """sizes: the encoder features' (h, w), in layer order; only their shapes are used."""
        outputs: list[torch.Tensor | None] = [None] * len(sizes)
        x = code
        for i, stage, head in zip(self.order, self.stages, self.heads):
            # Bilinear upsampling + conv rather than ConvTranspose2d: it lands on any grid size.
            x = stage(_resize_to(x, sizes[i]))
            outputs[i] = head(x)
        return outputs
