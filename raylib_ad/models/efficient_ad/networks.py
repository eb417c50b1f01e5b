"""EfficientAD's networks as anomalib builds them: the patch description networks (PDN, small and
medium: teacher and student) and the autoencoder. Attribute names follow anomalib's, so its
pretrained teacher files (pretrained_teacher_{small,medium}.pth) load into `PDN` unchanged.

Every network takes images in [0, 1] and applies ImageNet normalization itself, as anomalib's do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Smallest image side at which the unpadded PDN still has an output: 33 px gives a 1 x 1 map.
MIN_IMAGE_SIZE = 33


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


class PDN(nn.Module):
    """Patch description network. Small: 4 convolutions (128/256/256/C channels); medium: 6
    (256/512/512/512/C/C). The receptive field of one output is 33 x 33 pixels, the stride 4.

    `padding` is anomalib's setting (False by default: a 256 px image gives 56 x 56 features). The
    distillation stage calls with padding=True (a 256 px image gives 64 x 64, the size of the target
    features), as the original pretraining script does; the weights are the same either way.
    """

    def __init__(self, out_channels: int, size: str = "small", padding: bool = False):
        super().__init__()
        self.size, self.padding = size, padding
        if size == "small":
            self.conv1 = nn.Conv2d(3, 128, kernel_size=4)
            self.conv2 = nn.Conv2d(128, 256, kernel_size=4)
            self.conv3 = nn.Conv2d(256, 256, kernel_size=3)
            self.conv4 = nn.Conv2d(256, out_channels, kernel_size=4)
            # (conv, padding when padded, ReLU after); the pools come after conv1 and conv2.
            self._plan = [("conv1", 3, True), ("conv2", 3, True), ("conv3", 1, True), ("conv4", 0, False)]
        elif size == "medium":
            self.conv1 = nn.Conv2d(3, 256, kernel_size=4)
            self.conv2 = nn.Conv2d(256, 512, kernel_size=4)
            self.conv3 = nn.Conv2d(512, 512, kernel_size=1)
            self.conv4 = nn.Conv2d(512, 512, kernel_size=3)
            self.conv5 = nn.Conv2d(512, out_channels, kernel_size=4)
            self.conv6 = nn.Conv2d(out_channels, out_channels, kernel_size=1)
            self._plan = [("conv1", 3, True), ("conv2", 3, True), ("conv3", 0, True), ("conv4", 1, True),
                          ("conv5", 0, True), ("conv6", 0, False)]
        else:
            raise ValueError(f"PDN size must be 'small' or 'medium', got {size!r}")

    def forward(self, images: torch.Tensor, padding: bool | None = None) -> torch.Tensor:
        pad = self.padding if padding is None else padding
        x = imagenet_normalize(images)
        for name, conv_pad, relu in self._plan:
            conv = getattr(self, name)
            x = F.conv2d(x, conv.weight, conv.bias, padding=conv_pad if pad else 0)
            if relu:
                x = F.relu(x)
            if name in ("conv1", "conv2"):
                x = F.avg_pool2d(x, kernel_size=2, stride=2, padding=1 if pad else 0)
        return x


def pdn_output_size(image_size: int, padding: bool) -> int:
    """Side of the PDN's feature map for a square image (small and medium share the arithmetic)."""
    pad = int(padding)
    side = image_size
    for _ in range(2):  # 4 x 4 convolution (padding 3), then 2 x 2 average pooling (padding 1)
        side = side + 6 * pad - 3
        side = (side + 2 * pad - 2) // 2 + 1
    return side + 2 * pad - 2 - 3  # 3 x 3 convolution (padding 1), then the unpadded 4 x 4 one


class Encoder(nn.Module):
    """Five stride-2 4 x 4 convolutions and an 8 x 8 one: a 256 px image becomes a 64 x 1 x 1 code."""

    def __init__(self):
        super().__init__()
        self.enconv1 = nn.Conv2d(3, 32, kernel_size=4, stride=2, padding=1)
        self.enconv2 = nn.Conv2d(32, 32, kernel_size=4, stride=2, padding=1)
        self.enconv3 = nn.Conv2d(32, 64, kernel_size=4, stride=2, padding=1)
        self.enconv4 = nn.Conv2d(64, 64, kernel_size=4, stride=2, padding=1)
        self.enconv5 = nn.Conv2d(64, 64, kernel_size=4, stride=2, padding=1)
        self.enconv6 = nn.Conv2d(64, 64, kernel_size=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.enconv1, self.enconv2, self.enconv3, self.enconv4, self.enconv5):
            x = F.relu(conv(x))
        # Deviation for small images only: below 256 px anomalib's encoder fails (the 8 x 8 kernel is
        # larger than the map). Zero-padding the map to 8 x 8 keeps the architecture; at >= 256 px
        # nothing changes.
        short = [max(0, 8 - s) for s in x.shape[-2:]]
        if any(short):
            x = F.pad(x, (short[1] // 2, short[1] - short[1] // 2, short[0] // 2, short[0] - short[0] // 2))
        return self.enconv6(x)


class Decoder(nn.Module):
    """Bilinear upsampling to fixed fractions of the image size, each followed by a 4 x 4 convolution
    (+ ReLU, dropout 0.2), then two 3 x 3 convolutions to the teacher's channel count."""

    def __init__(self, out_channels: int, padding: bool):
        super().__init__()
        self.padding = padding
        for i in range(1, 7):
            setattr(self, f"deconv{i}", nn.Conv2d(64, 64, kernel_size=4, stride=1, padding=2))
        self.deconv7 = nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1)
        self.deconv8 = nn.Conv2d(64, out_channels, kernel_size=3, stride=1, padding=1)
        self.dropouts = nn.ModuleList(nn.Dropout(p=0.2) for _ in range(6))

    def sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """The seven upsampling sizes (anomalib's). The last one equals the PDN's output size. Clamped
        to >= 1 so that images below 128 px still work (no change at >= 128 px)."""
        steps = [lambda s: s // 64 - 1, lambda s: s // 32, lambda s: s // 16 - 1, lambda s: s // 8,
                 lambda s: s // 4 - 1, lambda s: s // 2 - 1,
                 (lambda s: math.ceil(s / 4)) if self.padding else (lambda s: math.ceil(s / 4) - 8)]
        return [(max(1, f(height)), max(1, f(width))) for f in steps]

    def forward(self, x: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        sizes = self.sizes(*image_size)
        for i, size in enumerate(sizes[:6]):
            x = F.interpolate(x, size=size, mode="bilinear")
            x = self.dropouts[i](F.relu(getattr(self, f"deconv{i + 1}")(x)))
        x = F.interpolate(x, size=sizes[6], mode="bilinear")
        return self.deconv8(F.relu(self.deconv7(x)))


class AutoEncoder(nn.Module):
    def __init__(self, out_channels: int, padding: bool):
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder(out_channels, padding)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(imagenet_normalize(images)), tuple(images.shape[-2:]))
