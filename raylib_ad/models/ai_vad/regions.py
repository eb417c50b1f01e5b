"""Regions of a frame (anomalib's RegionExtractor): Mask R-CNN detections on the scored frame, plus the
moving blobs the detector missed (connected components of the frame difference outside its boxes), then
filtered by class, area and mutual overlap."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_area, clip_boxes_to_image
from torchvision.transforms.functional import gaussian_blur, rgb_to_grayscale

PERSON_LABEL = 1  # COCO's person
FOREGROUND_LABEL = 0  # anomalib labels frame-difference regions as background...
FOREGROUND_SCORE = 0.5  # ...with confidence 0.5
_BOX_MARGIN = 2  # detector boxes are widened by 2 px before their pixels leave the foreground

Regions = dict[str, torch.Tensor]  # "boxes" (N, 4) x1 y1 x2 y2 in pixels, "labels" (N,), "scores" (N,)


def boxes_to_mask(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 4) boxes -> (H, W) bool mask of the pixels inside any box (corners inclusive, truncated to ints)."""
    mask = torch.zeros(size, dtype=torch.bool, device=boxes.device)
    for x1, y1, x2, y2 in boxes.int().tolist():
        mask[y1 : y2 + 1, x1 : x2 + 1] = True
    return mask


def component_boxes(mask: torch.Tensor) -> torch.Tensor:
    """Bounding boxes (N, 4) of the 8-connected components of a (H, W) binary mask, in raster order of
    the components' first pixels (anomalib: OpenCV's connectedComponents, then min/max of each)."""
    from scipy import ndimage

    labels, count = ndimage.label(mask.cpu().numpy().astype(np.uint8), structure=np.ones((3, 3), dtype=np.uint8))
    boxes = []
    for rows, cols in ndimage.find_objects(labels)[:count]:
        boxes.append([cols.start, rows.start, cols.stop - 1, rows.stop - 1])
    return torch.tensor(boxes, dtype=torch.float32, device=mask.device).view(-1, 4)


def subsample(regions: Regions, index: torch.Tensor) -> Regions:
    return {key: value[index] for key, value in regions.items()}


class RegionExtractor(nn.Module):
    def __init__(self, detector: nn.Module, *, persons_only: bool, min_bbox_area: float, max_bbox_overlap: float,
                 enable_foreground_detections: bool, foreground_kernel_size: int, foreground_binary_threshold: int):
        super().__init__()
        self.detector = detector
        self.persons_only = persons_only
        self.min_bbox_area = float(min_bbox_area)
        self.max_bbox_overlap = float(max_bbox_overlap)
        self.enable_foreground_detections = enable_foreground_detections
        self.foreground_kernel_size = int(foreground_kernel_size)
        self.foreground_binary_threshold = int(foreground_binary_threshold)

    @torch.no_grad()
    def forward(self, first_frame: torch.Tensor, last_frame: torch.Tensor) -> list[Regions]:
        """Frames (B, 3, H, W) in [0, 1] -> per frame the regions of `last_frame`."""
        detections = self.detector(list(last_frame))
        regions = [{"boxes": d["boxes"].float(), "labels": d["labels"].float(), "scores": d["scores"].float()}
                   for d in detections]
        if self.enable_foreground_detections:
            regions = self.add_foreground_boxes(regions, first_frame, last_frame)
        return [self.filter(r) for r in regions]

    def foreground(self, first_frame: torch.Tensor, last_frame: torch.Tensor) -> torch.Tensor:
        """(B, H, W) bool: pixels whose blurred grey-level difference exceeds the threshold (of 255)."""
        k = [self.foreground_kernel_size] * 2
        diff = (gaussian_blur(first_frame, k) - gaussian_blur(last_frame, k)).abs()
        return rgb_to_grayscale(diff)[:, 0] > self.foreground_binary_threshold / 255

    def add_foreground_boxes(self, regions: list[Regions], first_frame: torch.Tensor,
                             last_frame: torch.Tensor) -> list[Regions]:
        size = tuple(first_frame.shape[-2:])
        out = []
        for frame_regions, moving in zip(regions, self.foreground(first_frame, last_frame)):
            widened = clip_boxes_to_image(frame_regions["boxes"] + frame_regions["boxes"].new_tensor(
                [-_BOX_MARGIN, -_BOX_MARGIN, _BOX_MARGIN, _BOX_MARGIN]), size)
            boxes = component_boxes(moving & ~boxes_to_mask(widened, size))
            n = boxes.shape[0]
            out.append({"boxes": torch.cat([frame_regions["boxes"], boxes]),
                        "labels": torch.cat([frame_regions["labels"], boxes.new_full((n,), FOREGROUND_LABEL)]),
                        "scores": torch.cat([frame_regions["scores"], boxes.new_full((n,), FOREGROUND_SCORE)])})
        return out

    def filter(self, regions: Regions) -> Regions:
        if self.persons_only:
            regions = subsample(regions, regions["labels"] == PERSON_LABEL)
        regions = subsample(regions, box_area(regions["boxes"]) > self.min_bbox_area)
        return subsample(regions, self.non_overlapping(regions["boxes"]))

    def non_overlapping(self, boxes: torch.Tensor) -> torch.Tensor:
        """Indices of the boxes kept, smallest first: a box is dropped when more than max_bbox_overlap of
        its own area lies inside any box at least as large (so of two overlapping boxes the smaller goes)."""
        areas = box_area(boxes)
        order = torch.argsort(areas, stable=True)
        keep = []
        for pos, idx in enumerate(order.tolist()):
            others = boxes[order[pos + 1 :]]
            low = torch.maximum(boxes[idx, :2], others[:, :2])
            high = torch.minimum(boxes[idx, 2:], others[:, 2:])
            inter = (high - low).clamp_min(0).prod(dim=1)
            if not bool((inter / areas[idx] > self.max_bbox_overlap).any()):
                keep.append(idx)
        return torch.tensor(keep, dtype=torch.long, device=boxes.device)
