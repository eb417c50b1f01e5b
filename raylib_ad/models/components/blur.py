"""Separable Gaussian blur for anomaly maps (anomalib: sigma 4, kernel 2 * int(4 * sigma + 0.5) + 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GaussianBlur2d(nn.Module):
    def __init__(self, sigma: float = 4.0):
        super().__init__()
        radius = int(4.0 * sigma + 0.5)
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(x**2) / (2 * sigma**2))
        self.register_buffer("kernel", kernel / kernel.sum(), persistent=False)
        self.radius = radius

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """maps: (B, 1, H, W) -> same shape; reflect padding keeps borders from darkening."""
        k = self.kernel.to(maps.dtype)
        pad = min(self.radius, maps.shape[-1] - 1, maps.shape[-2] - 1)
        x = F.pad(maps, (pad, pad, pad, pad), mode="reflect")
        trim = self.radius - pad
        kh = k[trim : len(k) - trim] if trim else k
        x = F.conv2d(x, kh.view(1, 1, -1, 1))
        x = F.conv2d(x, kh.view(1, 1, 1, -1))
        return x
