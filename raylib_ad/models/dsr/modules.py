"""DSR's trained parts (anomalib dsr/torch_model.py), all with InstanceNorm (no running statistics, so
train and eval mode compute the same thing):

- SubspaceRestrictionNetwork: an encoder (3 double-conv blocks, 2 poolings) and a decoder that
  restores codes to normal appearance (one per latent level, width = code dimension);
- ImageReconstructionNetwork: the object-specific decoder, codes (stride 4) -> image;
- UNet: 4-level U-Net used by the anomaly detection module ([object-specific image, general image] ->
  2-class logits) and by the upsampling module ([both images, the detection's softmax] -> logits).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..components.conv_blocks import double_conv as _double_conv
from ..components.conv_blocks import unet_forward
from ..components.conv_blocks import up_conv as _up_conv
from .latent import ResidualStack


def double_conv(cin: int, cout: int, mid: int | None = None) -> nn.Sequential:
    return _double_conv(cin, cout, nn.InstanceNorm2d, mid)


def up_conv(cin: int, cout: int) -> nn.Sequential:
    return _up_conv(cin, cout, nn.InstanceNorm2d)


class SubspaceRestrictionNetwork(nn.Module):
    """(B, C, h, w) codes -> (B, C, h, w) unquantized features that quantize to normal codes. The decoder
    starts from the deepest encoder block only (no skip connections), as anomalib's."""

    def __init__(self, channels: int, base_width: int | None = None):
        super().__init__()
        w = channels if base_width is None else base_width
        self.encoder = nn.ModuleList([double_conv(channels, w), double_conv(w, 2 * w), double_conv(2 * w, 4 * w)])
        self.decoder = nn.Sequential(up_conv(4 * w, 2 * w), double_conv(2 * w, 2 * w), up_conv(2 * w, w),
                                     double_conv(w, w), nn.Conv2d(w, channels, 3, padding=1))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = codes
        for index, block in enumerate(self.encoder):
            x = block(x if index == 0 else F.max_pool2d(x, 2))
        return self.decoder(x)


class ImageReconstructionNetwork(nn.Module):
    """Object-specific decoder: codes at stride 4 (2 * code dim channels) -> image. Two conv blocks with
    poolings, a 1x1 to 64 channels, two transposed convs back to stride 4, then the VQ-VAE decoder's
    shape (3x3 conv, residual stack, two transposed convs)."""

    def __init__(self, in_channels: int, num_hiddens: int, res_layers: int, res_hiddens: int):
        super().__init__()
        c = in_channels
        self.block1 = double_conv(c, 2 * c, mid=c)
        self.block2 = double_conv(2 * c, 4 * c, mid=2 * c)
        self.pre_vq_conv = nn.Conv2d(4 * c, 64, 1)
        self.upblock1 = nn.ConvTranspose2d(64, 64, 4, stride=2, padding=1)
        self.upblock2 = nn.ConvTranspose2d(64, 64, 4, stride=2, padding=1)
        self._conv_1 = nn.Conv2d(64, num_hiddens, 3, padding=1)
        self._residual_stack = ResidualStack(num_hiddens, res_layers, res_hiddens)
        self._conv_trans_1 = nn.ConvTranspose2d(num_hiddens, num_hiddens // 2, 4, stride=2, padding=1)
        self._conv_trans_2 = nn.ConvTranspose2d(num_hiddens // 2, 3, 4, stride=2, padding=1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.block2(F.max_pool2d(self.block1(codes), 2)), 2)
        x = F.relu(self.upblock2(F.relu(self.upblock1(self.pre_vq_conv(x)))))
        x = self._residual_stack(self._conv_1(x))
        return self._conv_trans_2(F.relu(self._conv_trans_1(x)))


class UNet(nn.Module):
    """Encoder widths w, 2w, 4w, 4w (three poolings); decoder with skips; `out_channels` logits."""

    def __init__(self, in_channels: int, out_channels: int, base_width: int = 64):
        super().__init__()
        w = base_width
        self.encoder = nn.ModuleList([double_conv(in_channels, w), double_conv(w, 2 * w), double_conv(2 * w, 4 * w),
                                      double_conv(4 * w, 4 * w)])
        self.ups = nn.ModuleList([up_conv(4 * w, 4 * w), up_conv(4 * w, 2 * w), up_conv(2 * w, w)])
        self.merges = nn.ModuleList([double_conv(8 * w, 4 * w), double_conv(4 * w, 2 * w), double_conv(2 * w, w)])
        self.out = nn.Conv2d(w, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unet_forward(x, self.encoder, self.ups, self.merges, self.out)


class AnomalyDetectionModule(nn.Module):
    """[object-specific image, general appearance image] -> (B, 2, H, W) logits."""

    def __init__(self, base_width: int = 64):
        super().__init__()
        self.unet = UNet(6, 2, base_width)

    def forward(self, specific: torch.Tensor, general: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat((specific, general), dim=1))


class UpsamplingModule(nn.Module):
    """[object-specific image, general image, detection softmax] -> (B, 2, H, W) refined logits."""

    def __init__(self, base_width: int = 64):
        super().__init__()
        self.unet = UNet(8, 2, base_width)

    def forward(self, specific: torch.Tensor, general: torch.Tensor, detection: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat((specific, general, detection), dim=1))
