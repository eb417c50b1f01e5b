"""AI-VAD (Reiss & Hoshen, "Attribute-based Representations for Accurate and Interpretable Video Anomaly
Detection", 2022), as anomalib builds it.

A sample is a clip of two consecutive frames; the second is scored. Regions: Mask R-CNN detections on the
scored frame plus moving blobs of the frame difference the detector missed. Each region gets three
attributes: velocity (RAFT optical flow histogram), pose (Keypoint R-CNN keypoints) and appearance (CLIP
embedding of its crop), each modelled on the normal training regions by a density model (velocity: a
Gaussian mixture; pose and deep: k nearest neighbours). No gradient training: one Collect stage extracts
the training regions' attributes on every worker, gathers them, and fits the density models on the union.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable

import numpy as np
import torch

from ... import distributed
from ...errors import ConfigError, ModelError
from ...progress import progress_bar
from ..base import AnomalyModel, AnomalyOutput, register_model
from .density import DensityModels
from .features import region_features
from .flow import RAFT_SIZE, RAFT_UPDATES, FlowExtractor
from .networks import CLIP_MEAN, CLIP_STD, FILE_NAMES, build_networks, resolve_all
from .regions import RegionExtractor

FEATURES = ("velocity", "pose", "deep")
_TINY_FLOW_UPDATES = 2


def _int_in(value: Any, low: int, high: int | None = None) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and value >= low
            and (high is None or value <= high))


def _number_in(value: Any, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


@register_model
class AiVad(AnomalyModel):
    """AI-VAD on (B, 2, 3, S, S) clips in [0, 1]; each network normalizes its own input.

    Output: the frame score is the sum over attributes of the highest normalized region score (0 when the
    frame has no region); the anomaly map holds, at each pixel, the highest score of the region boxes
    covering it (0 elsewhere).

    Weights (networks="full", pretrained=True), looked up at construction, each from its setting, else
    $RAYLIB_AD_WEIGHTS_DIR under a fixed name, else torch's / huggingface's caches, else downloaded when
    online (not with $RAYLIB_AD_OFFLINE):
      detector_weights  maskrcnn_resnet50_fpn_v2.pth   torchvision Mask R-CNN R50-FPN v2, COCO
      keypoint_weights  keypointrcnn_resnet50_fpn.pth  torchvision Keypoint R-CNN R50-FPN, COCO
      flow_weights      raft_large.pth                 torchvision RAFT large, C_T_SKHT_V2
      clip_weights      ViT-B-16.pt                    open_clip ViT-B-16, OpenAI weights (open_clip format)
    (torchvision's own file names, e.g. maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth, are found too.)
    Without them: WeightsUnavailableError naming the ways out. The model directory holds every network.

    networks="tiny": small randomly initialised networks of the same families (a 2-conv backbone Mask R-CNN
    and Keypoint R-CNN, a narrow RAFT with 2 updates, a 1-layer CLIP ViT), drawn from `seed`; for tests
    and smoke runs only (pretrained is ignored: no such weights exist). With random detectors the regions
    come from the frame difference (enable_foreground_detections).

    Training batches may be tensors, or dicts {"image": tensor, "video": ids} (what the video data path
    yields: the id of each clip's frame folder, raylib_ad.data.transforms.video_id): with video ids the kNN
    normalization leaves out each region's whole video as anomalib does; without, each clip is its own group.
    """

    name = "ai_vad"
    default_backbone = None
    input_mean = (0.0, 0.0, 0.0)
    input_std = (1.0, 1.0, 1.0)
    clip_length = 2
    # anomalib's AiVad (lightning_model.py and examples/configs/model/ai_vad.yaml) defaults, then ours.
    defaults = {
        "box_score_thresh": 0.7, "persons_only": False, "min_bbox_area": 100, "max_bbox_overlap": 0.65,
        "enable_foreground_detections": True, "foreground_kernel_size": 3, "foreground_binary_threshold": 18,
        "n_velocity_bins": 1, "use_velocity_features": True, "use_pose_features": True,
        "use_deep_features": True, "n_components_velocity": 2, "n_neighbors_pose": 1, "n_neighbors_deep": 1,
        "networks": "full", "detector_weights": None, "keypoint_weights": None, "flow_weights": None,
        "clip_weights": None,
    }
    search_space = {
        "n_components_velocity": {"choice": [1, 2, 3, 5]},
        "n_neighbors_deep": {"choice": [1, 3, 5]},
        "box_score_thresh": {"uniform": [0.5, 0.9]},
    }
    pretrained_prefixes = ("region_extractor.detector.", "keypoint_model.", "flow_extractor.raft.", "clip.")
    test_preset = {"networks": "tiny", "min_bbox_area": 10}

    @classmethod
    def check_weights(cls, backbone, weights, settings) -> None:
        if settings.get("networks", "full") == "full":
            resolve_all(settings, download=False)

    def __init__(self, backbone: str | None = None, layers: Iterable[str] | None = None, **kwargs: Any):
        if backbone is not None or layers:
            raise ConfigError("ai_vad has no timm backbone or layers; its networks are fixed (see --set networks)")
        if kwargs.get("weights"):
            raise ConfigError("ai_vad needs four weight files, not one: give them with --set "
                              + ", ".join(f"{k}=PATH" for k in FILE_NAMES))
        super().__init__(None, None, **kwargs)
        s = self._validate()
        self.use = {name: bool(s[f"use_{name}_features"]) for name in FEATURES}
        tiny = s["networks"] == "tiny"
        paths = resolve_all(s) if self.pretrained and not tiny else None
        nets = build_networks(s["networks"], self.image_size, float(s["box_score_thresh"]), self.seed, paths)
        self.region_extractor = RegionExtractor(
            nets["detector"], persons_only=s["persons_only"], min_bbox_area=s["min_bbox_area"],
            max_bbox_overlap=s["max_bbox_overlap"], enable_foreground_detections=s["enable_foreground_detections"],
            foreground_kernel_size=s["foreground_kernel_size"],
            foreground_binary_threshold=s["foreground_binary_threshold"])
        flow_size = (-(-self.image_size // 8) * 8,) * 2 if tiny else RAFT_SIZE  # RAFT needs multiples of 8
        self.flow_extractor = FlowExtractor(nets["raft"], flow_size, _TINY_FLOW_UPDATES if tiny else RAFT_UPDATES)
        self.keypoint_model = nets["keypoints"]
        self.clip = nets["clip"]
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN), persistent=False)
        self.register_buffer("clip_std", torch.tensor(CLIP_STD), persistent=False)
        self.density = DensityModels(self.use, s["n_components_velocity"], s["n_neighbors_pose"],
                                     s["n_neighbors_deep"])

    def _validate(self) -> dict[str, Any]:
        s, check = self.settings, self._check_setting
        check("networks", s["networks"] in ("full", "tiny"), "'full' (anomalib's networks) or 'tiny' (tests)")
        check("box_score_thresh", _number_in(s["box_score_thresh"], 0.0, 1.0), "a number in [0, 1]")
        check("max_bbox_overlap", _number_in(s["max_bbox_overlap"], 0.0, 1.0), "a number in [0, 1]")
        check("min_bbox_area", _number_in(s["min_bbox_area"], 0, float("inf")), "a number >= 0 (pixels)")
        check("foreground_kernel_size", _int_in(s["foreground_kernel_size"], 1) and s["foreground_kernel_size"] % 2,
              "an odd integer >= 1 (Gaussian blur kernel)")
        check("foreground_binary_threshold", _int_in(s["foreground_binary_threshold"], 0, 255),
              "an integer in [0, 255]")
        check("n_velocity_bins", _int_in(s["n_velocity_bins"], 1), "an integer >= 1")
        for key in ("n_components_velocity", "n_neighbors_pose", "n_neighbors_deep"):
            check(key, _int_in(s[key], 1), "an integer >= 1")
        for key in ("persons_only", "enable_foreground_detections", *(f"use_{n}_features" for n in FEATURES)):
            check(key, isinstance(s[key], bool), "true or false")
        if not any(s[f"use_{n}_features"] for n in FEATURES):
            raise ConfigError("ai_vad: use_velocity_features, use_pose_features and use_deep_features are all "
                              "false; enable at least one")
        for key in FILE_NAMES:
            check(key, s[key] is None or isinstance(s[key], str), "a file path or null")
        return s

    def train(self, mode: bool = True):
        # The networks are never trained (anomalib puts them in eval mode in every forward).
        super().train(mode)
        for net in (self.region_extractor, self.flow_extractor, self.keypoint_model, self.clip):
            net.eval()
        return self

    # -- regions and their attributes -----------------------------------------------------------------
    def _check_clips(self, clips: torch.Tensor) -> None:
        if clips.dim() != 5 or clips.shape[1] != self.clip_length or clips.shape[2] != 3:
            raise ValueError(f"ai_vad takes clips of shape (B, {self.clip_length}, 3, H, W); got {tuple(clips.shape)}")

    @torch.no_grad()
    def extract(self, clips: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
        """(B, 2, 3, H, W) -> (per frame (N_i, 4) region boxes, attribute -> per frame (N_i, D) features)."""
        self._check_clips(clips)
        first, last = clips[:, 0], clips[:, -1]
        flows = self.flow_extractor(first, last)
        boxes = [r["boxes"] for r in self.region_extractor(first, last)]
        # anomalib computes pose and appearance on the clip's first frame (the regions are the last frame's).
        features = region_features(frames=first, flows=flows, boxes=boxes, use=self.use,
                                   n_velocity_bins=int(self.settings["n_velocity_bins"]),
                                   keypoint_model=self.keypoint_model, clip_visual=self.clip,
                                   clip_mean=self.clip_mean, clip_std=self.clip_std)
        return boxes, features

    # -- training: one Collect stage --------------------------------------------------------------------
    def recipe(self):
        from ..recipe import Collect

        return [Collect("regions", self.fit)]

    @torch.no_grad()
    def fit(self, batches: Iterable[Any], progress: bool = False) -> None:
        """Attributes of every training region on this worker's shard, gathered over all workers, put in
        a canonical order (so the union does not depend on sharding), then the density models fitted."""
        self.eval()
        rows: dict[str, list[torch.Tensor]] = {"group": [], **{n: [] for n in FEATURES if self.use[n]}}
        for batch in progress_bar(batches, desc="ai_vad regions", enabled=progress):
            clips, videos = (batch["image"], batch.get("video")) if isinstance(batch, dict) else (batch, None)
            clips = clips.to(self.device)
            boxes, features = self.extract(clips)
            for i, frame_boxes in enumerate(boxes):
                key = _group_key(clips[i] if videos is None else videos[i])
                rows["group"].append(torch.full((frame_boxes.shape[0],), key, dtype=torch.int64))
                for name in features:
                    rows[name].append(features[name][i].cpu())
        dims = {"velocity": int(self.settings["n_velocity_bins"]), "pose": 34, "deep": int(self.clip.output_dim)}
        local = {name: torch.cat(parts) if parts else torch.zeros(0, dims[name]) for name, parts in rows.items()
                 if name != "group"}
        local["group"] = torch.cat(rows["group"]) if rows["group"] else torch.zeros(0, dtype=torch.int64)
        union = {name: distributed.all_gather_rows(value) for name, value in local.items()}
        if union["group"].numel() == 0:
            raise ModelError("ai_vad: no regions were found in the training clips (anomalib: 'No regions were "
                             "extracted during training'); lower box_score_thresh or min_bbox_area, or enable "
                             "enable_foreground_detections")
        order = canonical_order(union)
        union = {name: value[order].to(self.device) for name, value in union.items()}
        generator = torch.Generator().manual_seed(self.seed)
        try:
            self.density.fit({n: union[n] for n in FEATURES if self.use[n]}, union["group"], generator)
        except ValueError as err:
            raise ModelError(str(err)) from err
        # Every worker fitted on the same rows; rank 0's tensors are taken so that they are bitwise equal
        # even where kernels are not deterministic.
        for name, buf in list(self.density.named_buffers()):
            owner, _, attr = name.rpartition(".")
            setattr(self.density.get_submodule(owner), attr, distributed.broadcast(buf))

    # -- scoring -------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if not self.density.fitted:
            raise RuntimeError("ai_vad is not fitted: fit it (its Collect stage) or load a trained model first")
        boxes, features = self.extract(images)
        height, width = images.shape[-2:]
        scores, maps = [], []
        for i, frame_boxes in enumerate(boxes):
            region_scores, frame_score = self.density.score({n: f[i] for n, f in features.items()})
            scores.append(frame_score)
            maps.append(box_map(frame_boxes, region_scores, (height, width)))
        return AnomalyOutput(score=torch.stack(scores).float(), anomaly_map=torch.stack(maps))


def box_map(boxes: torch.Tensor, scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W): at each pixel the highest score of the boxes covering it (corners inclusive), 0 elsewhere.
    (anomalib fills the detector's instance masks instead; box maps are what region-level metrics on
    box or mask ground truth compare with.)"""
    out = torch.full(size, -torch.inf, device=scores.device)
    for (x1, y1, x2, y2), score in zip(boxes.int().tolist(), scores):
        patch = out[y1 : y2 + 1, x1 : x2 + 1]
        torch.maximum(patch, score, out=patch)
    return torch.where(torch.isinf(out), torch.zeros_like(out), out)


def _group_key(item: Any) -> int:
    """A 63-bit id of a region's group: its video id when given, else the clip's pixel bytes."""
    if isinstance(item, torch.Tensor) and item.numel() == 1 and not item.is_floating_point():
        return int(item) & ((1 << 63) - 1)  # a video id (raylib_ad.data.transforms.video_id) as it is
    data = item.detach().to("cpu", torch.float32).contiguous().numpy().tobytes() if isinstance(
        item, torch.Tensor) else str(item).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") >> 1


def canonical_order(rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """A row order that depends only on the rows' values (group, then features lexicographically), so the
    gathered union is the same tensor whichever worker held which clip."""
    columns = [rows["group"].numpy()]
    for name in FEATURES:
        if name in rows:
            columns.extend(rows[name].double().numpy().T)
    return torch.from_numpy(np.lexsort(columns[::-1]).astype(np.int64))
