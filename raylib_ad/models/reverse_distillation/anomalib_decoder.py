"""anomalib's Reverse Distillation bottleneck and decoder, for the ResNets it supports (decoder="anomalib").

The same architecture as anomalib's (components/backbone/resnet_decoder.py: de_resnet*, and
reverse_distillation/components/bottleneck.py: OCBE), written here from its description:

- AnomalibBottleneck (OCBE): layer1's feature goes through two strided 3x3 conv-BN-ReLU, layer2's
  through one, both landing on layer3's grid with 256 * e channels (e: 1 for BasicBlock ResNets, 4 for
  Bottleneck ones); the three are concatenated (768 * e) and one ResNet stage of torchvision blocks
  (2 BasicBlocks or 3 Bottlenecks, width 64, stride 2) makes the 512 * e one-class embedding at half
  layer3's grid. anomalib's OCBE also builds a conv4/bn4 pair that its forward never uses: left out here,
  since parameters that never get a gradient make DDP fail (and Adam never moves them anyway).
- AnomalibDecoder (de_resnet): three stages mirroring ResNet's layer3, layer2, layer1, each doubling the
  grid with stride-2 transposed convolutions (in the first block's main path and its shortcut); the
  block counts, groups and width per group are those of the encoder (wide_resnet50_2: width 128).

Initialization as anomalib: Kaiming normal (fan_out, ReLU) for every Conv2d (not the transposed ones,
which keep torch's default), BatchNorm weight 1 and bias 0.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

# backbone: (block kind, decoder blocks per stage from the deepest, groups, width per group), as anomalib.
ARCHITECTURES = {
    "resnet18": ("basic", (2, 2, 2), 1, 64),
    "resnet34": ("basic", (3, 4, 6), 1, 64),
    "resnet50": ("bottleneck", (3, 4, 6), 1, 64),
    "resnet101": ("bottleneck", (3, 4, 23), 1, 64),
    "resnet152": ("bottleneck", (3, 8, 36), 1, 64),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6), 32, 4),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23), 32, 8),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6), 1, 128),
    "wide_resnet101_2": ("bottleneck", (3, 4, 23), 1, 128),
}
LAYERS = ("layer1", "layer2", "layer3")


def expansion(backbone: str) -> int:
    return 1 if ARCHITECTURES[backbone][0] == "basic" else 4


def encoder_channels(backbone: str) -> list[int]:
    """What layer1..3 of this ResNet emit, hence what the bottleneck expects."""
    e = expansion(backbone)
    return [64 * e, 128 * e, 256 * e]


def _conv3x3(c_in: int, c_out: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride, padding=1, groups=groups, bias=False)


def _up2(c_in: int, c_out: int, groups: int = 1) -> nn.ConvTranspose2d:
    """Doubles the grid: kernel 2, stride 2, no overlap."""
    return nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2, groups=groups, bias=False)


def _halve(c_in: int, c_out: int) -> list[nn.Module]:
    return [_conv3x3(c_in, c_out, stride=2), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _DecoderBasic(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, up: bool, shortcut: nn.Module | None, groups: int, width: int):
        super().__init__()
        del groups, width  # a basic block is always groups 1, width 64 (as in ResNet)
        self.conv1 = _up2(c_in, planes) if up else _conv3x3(c_in, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class _DecoderBottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, up: bool, shortcut: nn.Module | None, groups: int, width: int):
        super().__init__()
        mid = int(planes * width / 64) * groups
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = _up2(mid, mid, groups) if up else _conv3x3(mid, mid, groups=groups)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class AnomalibDecoder(nn.Module):
    def __init__(self, backbone: str):
        super().__init__()
        kind, counts, groups, width = ARCHITECTURES[backbone]
        block = _DecoderBasic if kind == "basic" else _DecoderBottleneck
        c = 512 * block.expansion
        self.stages = nn.ModuleList()
        for planes, count in zip((256, 128, 64), counts):  # layer3's mirror first
            c_out = planes * block.expansion
            shortcut = nn.Sequential(_up2(c, c_out, groups), nn.BatchNorm2d(c_out))
            blocks = [block(c, planes, True, shortcut, groups, width)]
            blocks += [block(c_out, planes, False, None, groups, width) for _ in range(count - 1)]
            self.stages.append(nn.Sequential(*blocks))
            c = c_out
        _init(self)

    def forward(self, code: torch.Tensor, sizes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """sizes: the encoder's layer1..3 grids. Returns the decoded layer1, layer2, layer3 features."""
        outputs, x = [], code
        for stage, size in zip(self.stages, reversed(list(sizes))):
            x = stage(x)
            if tuple(x.shape[-2:]) != tuple(size):
                # Only when the image side is not a multiple of 32 (layer3's grid is then odd and
                # doubling overshoots it): anomalib fails there; snapping to the grid keeps it usable.
                x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
            outputs.append(x)
        return outputs[::-1]


class AnomalibBottleneck(nn.Module):
    def __init__(self, backbone: str):
        super().__init__()
        kind = ARCHITECTURES[backbone][0]
        block, n_blocks = (BasicBlock, 2) if kind == "basic" else (Bottleneck, 3)
        e = block.expansion
        # layer1 (64e, stride 4) -> two halvings -> 256e; layer2 (128e, stride 8) -> one halving -> 256e.
        self.from_layer1 = nn.Sequential(*_halve(64 * e, 128 * e), *_halve(128 * e, 256 * e))
        self.from_layer2 = nn.Sequential(*_halve(128 * e, 256 * e))
        fused, c_out = 3 * 256 * e, 512 * e
        shortcut = nn.Sequential(nn.Conv2d(fused, c_out, 1, stride=2, bias=False), nn.BatchNorm2d(c_out))
        blocks = [block(fused, 512, stride=2, downsample=shortcut)]
        blocks += [block(c_out, 512) for _ in range(n_blocks - 1)]
        self.embed = nn.Sequential(*blocks)
        self.out_channels = c_out
        _init(self)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        first, second, third = features
        return self.embed(torch.cat([self.from_layer1(first), self.from_layer2(second), third], dim=1))
