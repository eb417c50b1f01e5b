"""The three attributes of a region (anomalib's VideoRegionFeatureExtractor):

- velocity: the region's optical flow as a histogram over direction bins, each bin the mean flow magnitude
  of the pixels whose direction falls in it (n_velocity_bins = 1: the mean speed);
- pose: the 17 COCO keypoints Keypoint R-CNN's keypoint head predicts inside the box, as coordinates
  relative to the box (34 numbers);
- deep: the CLIP image embedding of the region's crop.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.roi_heads import keypointrcnn_inference
from torchvision.ops import roi_align

ROI_SIZE = 224  # anomalib crops flow and pixels of each region to 224 x 224
N_KEYPOINTS = 17


def boxes_with_index(boxes: list[torch.Tensor]) -> torch.Tensor:
    """Per-frame (N_i, 4) boxes -> (sum N_i, 5) rows [frame index, x1, y1, x2, y2] for roi_align."""
    index = torch.cat([torch.full((b.shape[0], 1), float(i), device=b.device) for i, b in enumerate(boxes)])
    return torch.cat([index, torch.cat(boxes)], dim=1)


def velocity_histograms(flows: torch.Tensor, rois: torch.Tensor, n_bins: int) -> torch.Tensor:
    """(B, 2, H, W) flow, (M, 5) rois -> (M, n_bins) mean magnitude per direction bin over (-pi, pi]."""
    if rois.shape[0] == 0:
        return flows.new_zeros(0, n_bins)
    region = roi_align(flows, rois, output_size=[ROI_SIZE, ROI_SIZE])  # (M, 2, S, S)
    magnitude = torch.linalg.vector_norm(region, dim=1).flatten(1)
    # anomalib's angle convention: atan2(flow_x, flow_y)
    theta = torch.atan2(region[:, 0], region[:, 1]).flatten(1)
    # torch.histogram's equal-width bins over [-pi, pi], the last one closed
    bins = ((theta + math.pi) / (2 * math.pi) * n_bins).floor().long().clamp_(0, n_bins - 1)
    total = magnitude.new_zeros(rois.shape[0], n_bins).scatter_add_(1, bins, magnitude)
    counts = magnitude.new_zeros(rois.shape[0], n_bins).scatter_add_(1, bins, torch.ones_like(magnitude))
    return torch.where(counts > 0, total / counts.clamp_min(1), torch.zeros_like(total))


@torch.no_grad()
def pose_features(keypoint_model: nn.Module, frames: torch.Tensor, boxes: list[torch.Tensor]) -> list[torch.Tensor]:
    """Keypoint R-CNN's keypoint head run on given boxes (not its own detections) -> per frame (N_i, 34):
    keypoint (x, y) relative to the box corner, divided by the box size."""
    if sum(b.shape[0] for b in boxes) == 0:
        return [frames.new_zeros(0, 2 * N_KEYPOINTS) for _ in boxes]
    transform, heads = keypoint_model.transform, keypoint_model.roi_heads
    images, _ = transform(list(frames))
    features = keypoint_model.backbone(images.tensors)
    if isinstance(features, torch.Tensor):  # a single-map backbone, as GeneralizedRCNN wraps it
        features = OrderedDict([("0", features)])
    original = [tuple(f.shape[-2:]) for f in frames]
    # Boxes into the resized image. (anomalib scales x by the height ratio and y by the width ratio;
    # identical for the square frames used here, and correct for any frame in this form.)
    scaled = []
    for box, (h, w), (nh, nw) in zip(boxes, original, images.image_sizes):
        scaled.append(box * box.new_tensor([nw / w, nh / h, nw / w, nh / h]))
    pooled = heads.keypoint_roi_pool(features, scaled, images.image_sizes)
    logits = heads.keypoint_predictor(heads.keypoint_head(pooled))
    keypoints, _ = keypointrcnn_inference(logits, scaled)
    detections = transform.postprocess([{"keypoints": k, "boxes": b} for k, b in zip(keypoints, scaled)],
                                       images.image_sizes, original)
    out = []
    for det in detections:
        box = det["boxes"].unsqueeze(1)
        relative = (det["keypoints"][..., :2] - box[..., :2]) / (box[..., 2:] - box[..., :2])
        out.append(relative.flatten(1).float())
    return out


@torch.no_grad()
def deep_features(clip_visual: nn.Module, frames: torch.Tensor, rois: torch.Tensor, mean: torch.Tensor,
                  std: torch.Tensor, chunk: int) -> torch.Tensor:
    """CLIP embeddings (M, E) of the regions' crops, resized to CLIP's input size and normalized."""
    size = clip_visual.image_size
    size = [int(size[0]), int(size[1])] if isinstance(size, (tuple, list)) else [int(size)] * 2
    if rois.shape[0] == 0:
        return frames.new_zeros(0, int(clip_visual.output_dim))
    crops = roi_align(frames, rois, output_size=size)
    crops = (crops - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    return torch.cat([clip_visual(part).float() for part in crops.split(max(1, chunk))])


def region_features(*, frames: torch.Tensor, flows: torch.Tensor, boxes: list[torch.Tensor], use: dict[str, bool],
                    n_velocity_bins: int, keypoint_model: nn.Module, clip_visual: nn.Module,
                    clip_mean: torch.Tensor, clip_std: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """feature name -> per frame (N_i, D) tensors, for the enabled features."""
    rois = boxes_with_index(boxes) if boxes else frames.new_zeros(0, 5)
    counts = [b.shape[0] for b in boxes]
    out: dict[str, list[torch.Tensor]] = {}
    if use["velocity"]:
        out["velocity"] = list(velocity_histograms(flows, rois, n_velocity_bins).split(counts))
    if use["pose"]:
        out["pose"] = pose_features(keypoint_model, frames, boxes)
    if use["deep"]:
        feats = deep_features(clip_visual, frames, rois, clip_mean, clip_std, chunk=frames.shape[0])
        out["deep"] = list(feats.split(counts))
    return out
