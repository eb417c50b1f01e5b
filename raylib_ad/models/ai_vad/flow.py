"""Optical flow between the two frames of a clip with torchvision's RAFT (anomalib's FlowExtractor)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RAFT_SIZE = (520, 960)  # anomalib resizes both frames to this before RAFT large
RAFT_UPDATES = 12  # torchvision's (and so anomalib's) number of flow updates


class FlowExtractor(nn.Module):
    """(B, 3, H, W) frames in [0, 1] -> (B, 2, H, W) flow from the first to the last frame.

    As in anomalib, the flow is computed at `size` and resized back without rescaling the vectors, so
    velocities are in units of pixels at `size`."""

    def __init__(self, raft: nn.Module, size: tuple[int, int] = RAFT_SIZE, num_flow_updates: int = RAFT_UPDATES):
        super().__init__()
        self.raft = raft
        self.size = tuple(int(s) for s in size)
        self.num_flow_updates = int(num_flow_updates)

    @torch.no_grad()
    def forward(self, first_frame: torch.Tensor, last_frame: torch.Tensor) -> torch.Tensor:
        height, width = first_frame.shape[-2:]

        def prepare(frames: torch.Tensor) -> torch.Tensor:
            # torchvision's OpticalFlow preset: [0, 1] -> [-1, 1] (after anomalib's plain bilinear resize)
            resized = F.interpolate(frames, size=self.size, mode="bilinear", align_corners=False, antialias=False)
            return (resized * 2 - 1).contiguous()

        flows = self.raft(prepare(first_frame), prepare(last_frame), num_flow_updates=self.num_flow_updates)[-1]
        return F.interpolate(flows, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
