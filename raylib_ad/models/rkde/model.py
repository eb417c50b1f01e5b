"""R-KDE (Rudolph et al., "Region-based anomaly detection with real-time training and analysis",
ICMLA 2019), as anomalib 1.x implemented it (anomalib dropped it in 2.0).

A pretrained detector proposes regions; each region is described by RoI-pooled CNN features; a
Gaussian KDE over the regions of the normal training images (PCA to 16 components, scaled) tells how
usual a region is. Each box gets a score, the image the score of its worst box, and the anomaly map is
built from the boxes (every pixel takes the highest score of the boxes covering it).

Scores are raw, higher = more anomalous: a box scores -log density. anomalib reports
1 / (1 + exp(0.05 * (log density - 12))) instead, a monotone map of the same number that saturates
at 1 (and at 1e-300 densities), so the ordering of boxes and images is anomalib's. Pixels outside
every box, and images without boxes, score the lowest value a box can reach (-log of the KDE's peak
density), as anomalib's empty pixels score 0.

The fit is exact on any number of workers: regions are counted over workers, the same seeded subset
of at most max_training_points regions is chosen from their rank-order union, PCA comes from moments
summed over workers (or, with fewer regions than feature dimensions, from the gathered regions
themselves), and the KDE is fitted on the gathered projected regions (16 numbers each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ... import distributed
from ...progress import progress_bar
from ..base import AnomalyModel, AnomalyOutput, register_model
from ..components.kde import GaussianKDE
from ..components.pca import PCA
from .regions import (DETECTORS, AlexNetRegionFeatures, build_detector, configure_detector, detector_feature_dim,
                      detector_region_features, propose)


@dataclass
class DetectionOutput(AnomalyOutput):
    """AnomalyOutput plus the boxes behind it: per image, (K, 4) x1 y1 x2 y2 in input pixels and (K,)
    raw scores (same scale as `score`)."""

    boxes: list[torch.Tensor] = field(default_factory=list)
    box_scores: list[torch.Tensor] = field(default_factory=list)


def boxes_to_map(boxes: list[torch.Tensor], scores: list[torch.Tensor], size: tuple[int, int],
                 background: float) -> torch.Tensor:
    """anomalib's boxes_to_anomaly_maps: each pixel takes the highest score of the boxes covering it
    (box corners truncated to whole pixels, both ends included); `background` elsewhere. (B, H, W)."""
    height, width = size
    maps = []
    for image_boxes, image_scores in zip(boxes, scores):
        device = image_scores.device
        amap = torch.full((height, width), background, device=device)
        if len(image_boxes):
            corners = image_boxes.int()
            ys = torch.arange(height, device=device).view(1, -1, 1)
            xs = torch.arange(width, device=device).view(1, 1, -1)
            inside = ((ys >= corners[:, 1, None, None]) & (ys <= corners[:, 3, None, None])
                      & (xs >= corners[:, 0, None, None]) & (xs <= corners[:, 2, None, None]))
            values = torch.where(inside, image_scores.view(-1, 1, 1).float(), torch.tensor(background, device=device))
            amap = torch.maximum(amap, values.amax(0))
        maps.append(amap)
    return torch.stack(maps)


@register_model
class Rkde(AnomalyModel):
    name = "rkde"
    default_backbone = None  # torchvision detector and anomalib's own feature network, not timm
    input_mean = (0.0, 0.0, 0.0)  # inputs in [0, 1]: both networks normalize themselves
    input_std = (1.0, 1.0, 1.0)
    # anomalib 1.x's defaults (configs/model/rkde.yaml). Its images are resized to 240 x 360; here to the
    # square --image-size. The detector resizes again internally (800 px short side for COCO's).
    defaults = {
        "roi_stage": "rcnn", "roi_score_threshold": 0.001, "min_box_size": 25, "iou_threshold": 0.3,
        "max_detections_per_image": 100, "n_pca_components": 16, "feature_scaling_method": "scale",
        "max_training_points": 40000,
        "detector_arch": "fasterrcnn_resnet50_fpn",  # anomalib's detector
        "region_features": "alexnet",  # anomalib's feature network; "detector": the detector's box head
        "feature_weights": None,  # rkde_feature_extractor.pth (anomalib's release asset), when not found
    }
    test_preset = {"detector_arch": "fasterrcnn_mobilenet_v3_large_320_fpn", "region_features": "detector"}  # tests/test_zoo.py: a tiny offline instance
    search_space = {
        "n_pca_components": {"choice": [8, 16, 32]},
        "feature_scaling_method": {"choice": ["scale", "norm"]},
        "max_detections_per_image": {"choice": [50, 100]},
    }

    def __init__(self, *args, detector: nn.Module | None = None, **kwargs):
        """`detector`: a torchvision FasterRCNN to use instead of building `detector_arch` (tests, or
        a detector of your own; not saved in config.json, so read_model needs the same architecture)."""
        super().__init__(*args, **kwargs)
        s = self.settings
        self._check_setting("roi_stage", s["roi_stage"] in ("rcnn", "rpn"), "'rcnn' or 'rpn'")
        self._check_setting("roi_score_threshold", _number(s["roi_score_threshold"], 0, 1), "a number in [0, 1]")
        self._check_setting("min_box_size", _number(s["min_box_size"], 0, math.inf), "a number >= 0")
        self._check_setting("iou_threshold", _number(s["iou_threshold"], 0, 1), "a number in [0, 1]")
        for key in ("max_detections_per_image", "n_pca_components", "max_training_points"):
            self._check_setting(key, _integer(s[key]), "an integer >= 1")
        self._check_setting("feature_scaling_method", s["feature_scaling_method"] in ("scale", "norm"),
                            "'scale' or 'norm'")
        self._check_setting("detector_arch", s["detector_arch"] in DETECTORS, f"one of {sorted(DETECTORS)}")
        self._check_setting("region_features", s["region_features"] in ("alexnet", "detector"),
                            "'alexnet' or 'detector'")
        alexnet = s["region_features"] == "alexnet"
        # Both weights files are found (or refused, naming the ways out) before anything is built.
        feature_file = AlexNetRegionFeatures.weights_path(s["feature_weights"]) if alexnet and self.pretrained else None
        with torch.random.fork_rng(devices=[]):  # random parts (pretrained=False) drawn from `seed` alone
            torch.manual_seed(self.seed)
            self.detector = detector if detector is not None else build_detector(
                s["detector_arch"], self.pretrained, self.weights)
            configure_detector(self.detector, s["roi_stage"], float(s["roi_score_threshold"]),
                               int(s["max_detections_per_image"]))
            if alexnet:
                self.region_features = AlexNetRegionFeatures()
                if feature_file is not None:
                    self.region_features.load(feature_file)
                self.feature_dim = AlexNetRegionFeatures.out_features
            else:
                self.region_features = None
                self.feature_dim = detector_feature_dim(self.detector)
        self.requires_grad_(False)
        self.pca = PCA(int(s["n_pca_components"]))
        self.kde = GaussianKDE()
        self.register_buffer("max_length", torch.ones(1))
        self.eval()

    def train(self, mode: bool = True):
        # Detection networks behave differently in train mode (they ask for targets): always eval.
        return super().train(False)

    # -- regions and their features --------------------------------------------------------------
    def regions(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per image the kept boxes (input pixels), and the features of all of them in order (K, D)."""
        s = self.settings
        found = propose(self.detector, images, stage=s["roi_stage"], min_size=float(s["min_box_size"]),
                        iou_threshold=float(s["iou_threshold"]), max_detections=int(s["max_detections_per_image"]))
        if sum(len(b) for b in found.boxes) == 0:
            return found.boxes, images.new_zeros(0, self.feature_dim)
        with torch.no_grad():
            if self.region_features is None:
                features = detector_region_features(self.detector, found)
            else:
                features = self.region_features(images, found.rois())
        return found.boxes, features.float()

    # -- fit (Collect) ---------------------------------------------------------------------------
    def fit(self, batches: Iterable[torch.Tensor], progress: bool = False) -> None:
        rows = [self.regions(images.to(self.device))[1]
                for images in progress_bar(batches, desc="rkde regions", enabled=progress)]
        local = torch.cat(rows) if rows else torch.zeros(0, self.feature_dim, device=self.device)
        counts = distributed.all_gather_rows(torch.tensor([[local.shape[0]]], dtype=torch.int64))[:, 0]
        total, offset = int(counts.sum()), int(counts[: distributed.rank()].sum())
        n_pca = int(self.settings["n_pca_components"])
        if total < n_pca:
            raise RuntimeError(
                f"R-KDE found {total} regions in the training images, fewer than n_pca_components={n_pca}: "
                f"lower min_box_size ({self.settings['min_box_size']}) or roi_score_threshold "
                f"({self.settings['roi_score_threshold']}), or train on more images")
        cap = int(self.settings["max_training_points"])
        if total > cap:
            # anomalib: random.sample of max_training_points regions; here a seeded draw over the
            # rank-order union, the same on every worker, each keeping its own chosen rows.
            chosen = torch.zeros(total, dtype=torch.bool)
            chosen[torch.randperm(total, generator=torch.Generator().manual_seed(self.seed))[:cap]] = True
            local = local[chosen[offset : offset + local.shape[0]].to(local.device)]
        d = self.feature_dim
        if min(total, cap) <= d:
            # Fewer regions than feature dimensions: the rows are the smaller thing to move, and the SVD
            # of N x D is cheaper than the eigendecomposition of D x D (a minute for D = 4096 on a CPU).
            self.pca.fit(distributed.all_gather_rows(local.cpu()))
        else:
            x = local.double()
            moments = torch.cat([torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device),
                                 x.sum(0), (x.T @ x).flatten()])
            moments = distributed.all_reduce_sum(moments).cpu()
            self.pca.fit_from_moments(int(moments[0]), moments[1 : d + 1], moments[d + 1 :].view(d, d))
        self.pca.to(self.device)
        projected = self.pca.transform(local.float())
        if self.settings["feature_scaling_method"] == "scale":
            longest = torch.linalg.norm(projected, dim=1).max() if len(projected) else projected.new_zeros(())
            self.max_length = distributed.all_reduce_max(longest.reshape(1).cpu()).clamp_min(1e-12).to(self.device)
        points = distributed.all_gather_rows(self._scale(projected).cpu())
        self.kde.fit(points)
        self.to(self.device)

    def _scale(self, projected: torch.Tensor) -> torch.Tensor:
        if self.settings["feature_scaling_method"] == "norm":
            return projected / torch.linalg.norm(projected, dim=1, keepdim=True).clamp_min(1e-12)
        return projected / self.max_length

    # -- scoring ---------------------------------------------------------------------------------
    def background_score(self) -> float:
        """The lowest score a box can get: -log of the KDE's peak density (every kernel at its centre)."""
        return -float(self.kde.log_norm[0]) - math.log(self.kde.dataset.shape[0])

    def forward(self, images: torch.Tensor) -> DetectionOutput:
        if self.kde.dataset.numel() == 0:
            raise RuntimeError("R-KDE is not fitted: fit() it or load a trained model first")
        boxes, features = self.regions(images)
        if len(features):
            flat = -self.kde.log_density(self._scale(self.pca.transform(features)))
        else:
            flat = features.new_zeros(0)
        box_scores = list(flat.split([len(b) for b in boxes]))
        floor = self.background_score()
        score = torch.stack([s.max() if len(s) else flat.new_tensor(floor) for s in box_scores])
        anomaly_map = boxes_to_map(boxes, box_scores, tuple(images.shape[-2:]), floor)
        return DetectionOutput(score=score, anomaly_map=anomaly_map, boxes=boxes, box_scores=box_scores)


def _number(value, low: float, high: float) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return False
    return low <= value <= high


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
