"""DRAEM's two sub-networks (Zavrtanik et al., ICCV 2021), laid out as anomalib's draem/torch_model.py:

- reconstructive: an encoder of five double-conv blocks (widths w, 2w, 4w, 8w, 8w; four 2x poolings)
  and a decoder of four (bilinear upsample, conv) steps, each followed by a double conv, no skips;
  anomalib's w = 128. The bottleneck block may be an SSPCAB block instead (Ristea et al., CVPR 2022);
- discriminative: a U-Net over the image and its reconstruction (6 channels), six encoder blocks
  (w, 2w, 4w, 8w, 8w, 8w; five poolings), a decoder with skip connections, 2 output classes; w = 64.

Every conv is 3x3 + BatchNorm + ReLU, as in anomalib. Inputs must be multiples of 32 pixels per side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..components.conv_blocks import double_conv as _double_conv
from ..components.conv_blocks import unet_forward
from ..components.conv_blocks import up_conv as _up_conv


def double_conv(cin: int, cout: int, mid: int | None = None) -> nn.Sequential:
    return _double_conv(cin, cout, nn.BatchNorm2d, mid)


def up_conv(cin: int, cout: int) -> nn.Sequential:
    return _up_conv(cin, cout, nn.BatchNorm2d)


class SSPCAB(nn.Module):
    """Self-supervised predictive convolutional attention block: four 1x1 convs read the corners of a
    (2k + 2d + 1)-wide window around each position (never the position itself), summed, then a
    squeeze-and-excitation channel attention (reduction 8). anomalib's kernel_size=1, dilation=1."""

    def __init__(self, channels: int, kernel_size: int = 1, dilation: int = 1, reduction: int = 8):
        super().__init__()
        self.pad = kernel_size + dilation
        self.crop = kernel_size + 2 * dilation + 1
        self.masked_convs = nn.ModuleList(nn.Conv2d(channels, channels, kernel_size) for _ in range(4))
        self.fc1 = nn.Linear(channels, max(1, channels // reduction))
        self.fc2 = nn.Linear(max(1, channels // reduction), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (self.pad,) * 4)
        c = self.crop
        corners = (padded[..., :-c, :-c], padded[..., :-c, c:], padded[..., c:, :-c], padded[..., c:, c:])
        out = sum(conv(corner) for conv, corner in zip(self.masked_convs, corners))
        weights = torch.sigmoid(self.fc2(F.relu(self.fc1(out.mean(dim=(2, 3))))))
        return out * weights[:, :, None, None]


class ReconstructiveNetwork(nn.Module):
    """Autoencoder that learns to repair the synthetic anomalies: (B, 3, H, W) -> (B, 3, H, W)."""

    def __init__(self, base_width: int = 128, sspcab: bool = False, in_channels: int = 3, out_channels: int = 3):
        super().__init__()
        w = base_width
        self.encoder = nn.ModuleList([double_conv(in_channels, w), double_conv(w, 2 * w), double_conv(2 * w, 4 * w),
                                      double_conv(4 * w, 8 * w)])
        self.bottleneck = SSPCAB(8 * w) if sspcab else double_conv(8 * w, 8 * w)
        self.decoder = nn.ModuleList([
            nn.Sequential(up_conv(8 * w, 8 * w), double_conv(8 * w, 4 * w, mid=8 * w)),
            nn.Sequential(up_conv(4 * w, 4 * w), double_conv(4 * w, 2 * w, mid=4 * w)),
            nn.Sequential(up_conv(2 * w, 2 * w), double_conv(2 * w, w, mid=2 * w)),
            nn.Sequential(up_conv(w, w), double_conv(w, w)),
        ])
        self.out = nn.Conv2d(w, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (reconstruction, bottleneck input, bottleneck output): the last two feed the SSPCAB loss."""
        for block in self.encoder:
            x = F.max_pool2d(block(x), 2)
        pooled = x
        x = self.bottleneck(pooled)
        bottleneck = x
        for block in self.decoder:
            x = block(x)
        return self.out(x), pooled, bottleneck


class DiscriminativeNetwork(nn.Module):
    """U-Net over [image, reconstruction] -> 2-class logits per pixel (normal, anomalous)."""

    def __init__(self, base_width: int = 64, in_channels: int = 6, out_channels: int = 2):
        super().__init__()
        w = base_width
        widths = [w, 2 * w, 4 * w, 8 * w, 8 * w, 8 * w]
        self.encoder = nn.ModuleList(double_conv(cin, cout) for cin, cout in zip([in_channels] + widths[:-1], widths))
        # Decoder step i: upsample the deeper map to `ups[i]` channels, concatenate the skip, double conv.
        ups = [8 * w, 4 * w, 2 * w, w, w]
        skips = [8 * w, 8 * w, 4 * w, 2 * w, w]
        deeper = [8 * w, 8 * w, 4 * w, 2 * w, w]
        self.ups = nn.ModuleList(up_conv(d, u) for d, u in zip(deeper, ups))
        self.merges = nn.ModuleList(double_conv(u + s, u) for u, s in zip(ups, skips))
        self.out = nn.Conv2d(w, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unet_forward(x, self.encoder, self.ups, self.merges, self.out)
