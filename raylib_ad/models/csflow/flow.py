"""CS-Flow's cross-scale normalizing flow over three feature maps whose sides halve from one to the next
(Rudolph et al., WACV 2022, "Fully Convolutional Cross-Scale-Flows for Image-based Defect Detection").

Each block permutes the channels (a fixed permutation) and applies a GLOW-style affine coupling whose
scale/shift subnets are cross-scale convolutions: every scale's coefficients are computed from that scale
and its neighbours (upsampled from the coarser one, strided-convolved from the finer one). Only the
forward (density) direction is needed for anomaly detection, so the blocks are plain modules.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

Scales = list[torch.Tensor]  # three (B, C, s, s), (B, C, s/2, s/2), (B, C, s/4, s/4)


class CrossConvolutions(nn.Module):
    """Scale and shift coefficients for three scales, with information flowing between adjacent scales.
    The outputs start at zero (learned gammas initialised at 0): each coupling starts as the identity."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, kernel_size: int = 3,
                 leaky_slope: float = 0.1):
        super().__init__()
        pad = kernel_size // 2

        def conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=pad)

        self.first = nn.ModuleList(conv(in_channels, hidden) for _ in range(3))
        self.second = nn.ModuleList(conv(hidden, out_channels) for _ in range(3))
        self.up_from_1, self.up_from_2 = conv(hidden, out_channels), conv(hidden, out_channels)
        self.down_from_0, self.down_from_1 = conv(hidden, out_channels, 2), conv(hidden, out_channels, 2)
        self.gammas = nn.Parameter(torch.zeros(3))
        self.activation = nn.LeakyReLU(leaky_slope)
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor) -> Scales:
        h0, h1, h2 = (self.activation(conv(x)) for conv, x in zip(self.first, (x0, x1, x2)))
        out0 = self.second[0](h0) + self.up_from_1(self.upsample(h1))
        out1 = self.second[1](h1) + self.down_from_0(h0) + self.up_from_2(self.upsample(h2))
        out2 = self.second[2](h2) + self.down_from_1(h1)
        return [out0 * self.gammas[0], out1 * self.gammas[1], out2 * self.gammas[2]]


class ParallelCoupling(nn.Module):
    """GLOW coupling applied to the three scales at once; the log-scale is soft-clamped with
    clamp * 0.636 * atan(s / clamp), as in the paper's code."""

    def __init__(self, channels: int, hidden: int, kernel_size: int, clamp: float):
        super().__init__()
        self.split1, self.split2 = channels // 2, channels - channels // 2
        self.clamp = float(clamp)
        self.net1 = CrossConvolutions(self.split1, 2 * self.split2, hidden, kernel_size)  # reads the first half
        self.net2 = CrossConvolutions(self.split2, 2 * self.split1, hidden, kernel_size)  # reads the second half

    def log_scale(self, s: torch.Tensor) -> torch.Tensor:
        return self.clamp * 0.636 * torch.atan(s / self.clamp) if self.clamp > 0 else s

    def forward(self, xs: Scales) -> tuple[Scales, torch.Tensor]:
        firsts = [x[:, : self.split1] for x in xs]
        seconds = [x[:, self.split1 :] for x in xs]
        coeffs = self.net2(*seconds)
        log_s1 = [self.log_scale(c[:, : self.split1]) for c in coeffs]
        new_firsts = [torch.exp(ls) * x + c[:, self.split1 :] for ls, x, c in zip(log_s1, firsts, coeffs)]
        coeffs = self.net1(*new_firsts)
        log_s2 = [self.log_scale(c[:, : self.split2]) for c in coeffs]
        new_seconds = [torch.exp(ls) * x + c[:, self.split2 :] for ls, x, c in zip(log_s2, seconds, coeffs)]
        outputs = [torch.cat(pair, dim=1).clamp(-1e6, 1e6) for pair in zip(new_firsts, new_seconds)]
        # Per-sample log|det J| summed over the scales. anomalib also sums it over the batch (every sample's
        # loss then carries the whole batch's Jacobian term, so the loss depends on the batch size and on how
        # DDP splits it); Csflow.loss does that by default (log_jac_reduction="batch_sum"). Measured on Magnetic Tile's validation images (jobs/csflow_probe.py,
        # docs/benchmarks.md): with anomalib's sum the loss falls faster but validation AUROC stays at chance
        # after 60 steps of 16 (0.56; hidden width 256), against 0.65 per sample at the same learning rate.
        log_jac = sum(a.sum(dim=(1, 2, 3)) + b.sum(dim=(1, 2, 3)) for a, b in zip(log_s1, log_s2))
        return outputs, log_jac


class CrossScaleFlow(nn.Module):
    """n blocks of (fixed channel permutation, parallel coupling); the last block uses 5x5 kernels."""

    def __init__(self, channels: int, n_blocks: int, clamp: float, hidden: int):
        super().__init__()
        kernels = [3] * (n_blocks - 1) + [5]
        self.couplings = nn.ModuleList(ParallelCoupling(channels, hidden, k, clamp) for k in kernels)
        for block in range(n_blocks):
            # anomalib seeds block b's permutation with b (the same one for all three scales). Not
            # persistent: it is a function of the block index, rebuilt identically on load.
            perm = torch.from_numpy(np.random.default_rng(block).permutation(channels))
            self.register_buffer(f"perm{block}", perm, persistent=False)

    def forward(self, xs: Scales) -> tuple[Scales, torch.Tensor]:
        log_jac = torch.zeros(xs[0].shape[0], device=xs[0].device)
        for block, coupling in enumerate(self.couplings):
            perm = getattr(self, f"perm{block}")
            xs, block_jac = coupling([x[:, perm] for x in xs])
            log_jac = log_jac + block_jac
        return xs, log_jac
