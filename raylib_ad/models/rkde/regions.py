"""R-KDE's two networks: the region proposer (torchvision's Faster R-CNN, COCO weights) and the
region feature extractor (anomalib's: AlexNet-style convolutions, RoIAlign 6 x 6 at stride 16, two
4096-wide fully connected layers; or the detector's own RoI box head).

Everything here works on images in [0, 1]: both networks normalize themselves.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models import detection
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import RoIAlign
from torchvision.ops import boxes as box_ops
from torchvision.transforms import functional as TF

from ..components.url_weights import resolve_url_weights
from ..components.weights import read_state_dict

# Detector architectures and their COCO weights (torchvision's file names, e.g.
# fasterrcnn_resnet50_fpn_coco-258fb6c6.pth for anomalib's fasterrcnn_resnet50_fpn).
DETECTORS = {
    "fasterrcnn_resnet50_fpn": (detection.fasterrcnn_resnet50_fpn, detection.FasterRCNN_ResNet50_FPN_Weights),
    "fasterrcnn_resnet50_fpn_v2": (detection.fasterrcnn_resnet50_fpn_v2,
                                   detection.FasterRCNN_ResNet50_FPN_V2_Weights),
    "fasterrcnn_mobilenet_v3_large_fpn": (detection.fasterrcnn_mobilenet_v3_large_fpn,
                                          detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (detection.fasterrcnn_mobilenet_v3_large_320_fpn,
                                              detection.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights),
}
ALEXNET_FEATURES_URL = "https://github.com/openvinotoolkit/anomalib/releases/download/rkde-weights/rkde_feature_extractor.pth"


def detector_url(arch: str) -> str:
    return DETECTORS[arch][1].COCO_V1.url


def build_detector(arch: str, pretrained: bool, weights: str | None = None) -> nn.Module:
    """A torchvision Faster R-CNN with COCO weights from a local file (or torch's hub cache)."""
    builder, _ = DETECTORS[arch]
    path = None
    if pretrained:  # found (or refused) before the network is built
        path = resolve_url_weights(f"the R-KDE region detector '{arch}'", detector_url(arch), weights,
                                   how="or pick another detector whose weights you have: --set detector_arch="
                                       + "|".join(DETECTORS))
    model = builder(weights=None, weights_backbone=None, num_classes=91)
    if path is not None:
        model.load_state_dict(read_state_dict(path))
    return model


def configure_detector(detector: nn.Module, stage: str, score_threshold: float, max_detections: int) -> None:
    """anomalib's RegionExtractor settings on any torchvision Faster R-CNN (built or injected): no
    class-wise NMS and no top-k in the detector (R-KDE applies its own, class-agnostic, afterwards);
    the RPN stage keeps `max_detections` proposals above the score threshold."""
    rpn, heads = detector.rpn, detector.roi_heads
    rpn._post_nms_top_n = dict(rpn._post_nms_top_n, testing=max_detections if stage == "rpn" else 1000)
    rpn.score_thresh = score_threshold if stage == "rpn" else 0.0
    heads.score_thresh = score_threshold
    heads.nms_thresh = 1.0  # IoU > 1 never happens: keeps every box
    heads.detections_per_img = 1000


class Regions:
    """Boxes of a batch: per image, in input pixels (`boxes`) and in the detector's resized frame
    (`detector_boxes`, for RoI pooling on its features), plus the detector's features and sizes."""

    def __init__(self, boxes, detector_boxes, features, image_sizes):
        self.boxes, self.detector_boxes = boxes, detector_boxes
        self.features, self.image_sizes = features, image_sizes

    def rois(self) -> torch.Tensor:
        """(K, 5): image index in the batch, x1, y1, x2, y2 (input pixels)."""
        rows = [torch.cat([torch.full((len(b), 1), float(i), device=b.device), b], 1) for i, b in enumerate(self.boxes)]
        return torch.cat(rows) if rows else torch.empty(0, 5)


@torch.no_grad()
def propose(detector: nn.Module, images: torch.Tensor, *, stage: str, min_size: float, iou_threshold: float,
            max_detections: int) -> Regions:
    """anomalib's RegionExtractor: detections (stage "rcnn") or raw proposals ("rpn"), small boxes
    dropped, class-agnostic NMS, the `max_detections` best kept. The detector runs piece by piece so its
    features can be pooled for the kept boxes without a second pass."""
    height, width = images.shape[-2:]
    image_list, _ = detector.transform(list(images))
    features = detector.backbone(image_list.tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    proposals, _ = detector.rpn(image_list, features)
    if stage == "rcnn":
        detections, _ = detector.roi_heads(features, proposals, image_list.image_sizes)
        raw = [(d["boxes"], d["scores"]) for d in detections]
    else:
        # Each image's own resized size (anomalib scales from the padded batch size, slightly off).
        raw = [(box_ops.clip_boxes_to_image(p, size), torch.ones(len(p), device=p.device))
               for p, size in zip(proposals, image_list.image_sizes)]
    boxes, detector_boxes = [], []
    for (found, scores), size in zip(raw, image_list.image_sizes):
        in_pixels = resize_boxes(found, size, (height, width))
        keep = box_ops.remove_small_boxes(in_pixels, min_size=min_size)
        in_pixels, found, scores = in_pixels[keep], found[keep], scores[keep]
        keep = box_ops.nms(in_pixels, scores, iou_threshold)[:max_detections]
        boxes.append(in_pixels[keep])
        detector_boxes.append(found[keep])
    return Regions(boxes, detector_boxes, features, image_list.image_sizes)


def detector_region_features(detector: nn.Module, regions: Regions) -> torch.Tensor:
    """The detector's RoI-pooled box-head representation of each kept box: (K, D)."""
    heads = detector.roi_heads
    pooled = heads.box_roi_pool(regions.features, regions.detector_boxes, regions.image_sizes)
    return heads.box_head(pooled).flatten(1)


def detector_feature_dim(detector: nn.Module) -> int:
    return int(detector.roi_heads.box_predictor.cls_score.in_features)


class AlexNetRegionFeatures(nn.Module):
    """anomalib's R-KDE feature extractor: images resized to a 600 px short side (at most 1000 long),
    ImageNet-normalized, five AlexNet convolutions, RoIAlign 6 x 6 at 1/16, fc6 and fc7 (4096 each)."""

    out_features = 4096

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        )
        self.roi_align = RoIAlign(output_size=(6, 6), spatial_scale=1 / 16, sampling_ratio=0)
        self.classifier = nn.Sequential(nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
                                        nn.Linear(4096, 4096), nn.ReLU(inplace=True))

    @staticmethod
    def weights_path(explicit: str | None = None):
        return resolve_url_weights("R-KDE's region feature extractor (anomalib's rkde_feature_extractor.pth)",
                                   ALEXNET_FEATURES_URL, explicit,
                                   how="or pool features from the detector itself: --set region_features=detector")

    def load(self, path) -> None:
        self.load_state_dict(read_state_dict(path))

    @torch.no_grad()
    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        resized = TF.resize(images, 600, max_size=1000, antialias=True)
        mean = resized.new_tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
        std = resized.new_tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
        scale = resized.new_tensor([resized.shape[-1] / images.shape[-1], resized.shape[-2] / images.shape[-2]])
        rois = torch.cat([rois[:, :1], rois[:, 1:] * scale.repeat(2)], 1)
        pooled = self.roi_align(self.features((resized - mean) / std), rois)
        return self.classifier(pooled.flatten(1))
