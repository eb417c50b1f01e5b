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
        # (in_h, in_w, out_h, out_w, mode, dtype, device) -> the two matrices of upsample_and_blur; derived
        # from the kernel, so neither buffers nor state.
        self._matrices: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _trimmed(self, height: int, width: int, dtype: torch.dtype) -> tuple[int, torch.Tensor]:
        """Reflect padding cannot exceed the map's size minus one: the padding and the kernel trimmed to it."""
        k = self.kernel.to(dtype)
        pad = min(self.radius, width - 1, height - 1)
        trim = self.radius - pad
        return pad, (k[trim : len(k) - trim] if trim else k)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """maps: (B, 1, H, W) -> same shape; reflect padding keeps borders from darkening."""
        pad, kh = self._trimmed(maps.shape[-2], maps.shape[-1], maps.dtype)
        x = F.pad(maps, (pad, pad, pad, pad), mode="reflect")
        x = F.conv2d(x, kh.view(1, 1, -1, 1))
        x = F.conv2d(x, kh.view(1, 1, 1, -1))
        return x

    def upsample_and_blur(self, maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
        """self(F.interpolate(maps, size, mode)) (bilinear: align_corners=False), equal up to float rounding,
        as two small matrix products per map: both steps are linear and separable, so each axis is one
        (out, in) matrix, and a (B, 1, 32, 32) patch-score grid becomes 256 x 256 with ~2.4 M multiply-adds
        instead of a full-resolution convolution (measured: 5.7 -> ~0.2 ms per 256 px map, 1 thread)."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            # A traced graph (ONNX export) keeps the two plain steps: no constants built while tracing.
            kwargs = {} if mode == "nearest" else {"align_corners": False}
            return self(F.interpolate(maps, size=size, mode=mode, **kwargs))
        h, w = maps.shape[-2:]
        key = (h, w, *size, mode, maps.dtype, maps.device)
        if key not in self._matrices:
            pad, kernel = self._trimmed(size[0], size[1], torch.float64)
            self._matrices[key] = tuple(
                _axis_matrix(n_in, n_out, mode, pad, kernel).to(maps.dtype).to(maps.device)
                for n_in, n_out in ((h, size[0]), (w, size[1])))
        rows, cols = self._matrices[key]
        return rows @ maps @ cols.T


def _axis_matrix(n_in: int, n_out: int, mode: str, pad: int, kernel: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in): interpolation along one axis, then the reflect-padded blur, applied to each unit vector
    (in float64, by the same torch functions the two-step path uses)."""
    eye = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, n_in, 1)
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    up = F.interpolate(eye, size=(n_out, 1), mode=mode, **kwargs)[..., 0]  # (n_in, 1, n_out)
    blurred = F.conv1d(F.pad(up, (pad, pad), mode="reflect"), kernel.view(1, 1, -1))  # (n_in, 1, n_out)
    return blurred[:, 0].T.contiguous()
