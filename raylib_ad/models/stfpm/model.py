"""STFPM (Wang et al., BMVC 2021, "Student-Teacher Feature Pyramid Matching for Anomaly Detection").

A frozen pretrained teacher and a student of the same architecture, trained from scratch to reproduce
the teacher's (channel-normalized) features on normal images only. Where the student fails to follow
the teacher, the image is unlike the training set: the per-position discrepancy is the anomaly map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..base import AnomalyModel, AnomalyOutput, register_model
from ..components.feature_extractor import FeatureExtractor


def _number_in(value, low: float, high: float = math.inf, *, low_open: bool = False) -> bool:
    """A real number (not a bool or a string) in [low, high), or (low, high) when low_open."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return (low < value if low_open else low <= value) and value < high


@register_model
class Stfpm(AnomalyModel):
    name = "stfpm"
    loss_reduction = "sum"  # anomalib's STFPM loss sums over the batch (its lr 0.4 was tuned so)
    has_frozen_part = True  # the pretrained backbone/teacher/encoder is frozen: its features are cached
    default_backbone = "resnet18"
    default_layers = ("layer1", "layer2", "layer3")
    # anomalib's optimizer: SGD(lr=0.4, momentum=0.9, weight_decay=1e-3), no scheduler; 100 epochs with
    # early stopping (patience 5 in anomalib's config: pass --patience 5 to get it).
    defaults = {"lr": 0.4, "momentum": 0.9, "weight_decay": 1e-3}
    default_epochs = 100
    # anomalib's EarlyStopping patience (monitors pixel AUROC; we monitor validation image AUROC, the headline metric)
    default_patience = 5
    gradient_clip_val = None  # anomalib: gradient_clip_val=0, i.e. none
    # Sweep defaults (raylib_ad/tuning/space.py format): lr brackets anomalib's 0.4 (SGD).
    # jobs/benchmark.py's configuration (tf_efficientnet_lite0 layers): the reference rows of docs/benchmarks.md
    benchmark_preset = {"settings": {}, "layers": ["blocks.1", "blocks.2", "blocks.4"]}
    search_space = {
        "lr": {"loguniform": [0.01, 0.4]},
        "epochs": {"randint": [3, 10]},
        "layers": {"choice": [["layer1", "layer2", "layer3"], ["layer2", "layer3"]]},
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_setting("lr", _number_in(self.settings["lr"], 0, low_open=True), "a number > 0")
        self._check_setting("momentum", _number_in(self.settings["momentum"], 0, 1), "a number in [0, 1)")
        self._check_setting("weight_decay", _number_in(self.settings["weight_decay"], 0), "a number >= 0")
        # The student starts from random weights drawn from `seed` alone, so every DDP worker builds
        # the same one (DDP would broadcast rank 0's anyway, but a single-process run must be
        # reproducible too). timm initializes from torch's global RNG; fork_rng leaves it untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.student = FeatureExtractor(self.backbone_name, self.layers, pretrained=False,
                                            requires_grad=True)

    @property
    def teacher(self) -> FeatureExtractor:
        # The base class's frozen, pretrained extractor. Not a second attribute: a module registered
        # twice would put shared tensors in the state dict, which safetensors refuses to save.
        return self.feature_extractor

    def frozen_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.teacher(images)

    def forward(self, images: torch.Tensor, frozen: dict[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor] | AnomalyOutput:
        teacher_features = frozen if frozen is not None else self.teacher(images)
        student_features = self.student(images)
        if self.training:
            return {"loss": self.loss(teacher_features, student_features)}
        anomaly_map = torch.ones(images.shape[0], 1, self.image_size, self.image_size,
                                 device=images.device, dtype=images.dtype)
        for layer in self.layers:
            distance = self.layer_distance(teacher_features[layer], student_features[layer])
            # anomalib multiplies the per-layer maps: a position is anomalous only if every scale agrees.
            anomaly_map = anomaly_map * self.upsample(distance)
        anomaly_map = anomaly_map[:, 0]
        return AnomalyOutput(score=anomaly_map.amax(dim=(-2, -1)), anomaly_map=anomaly_map)

    @staticmethod
    def layer_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w): 0.5 * squared distance of the channel-wise L2-normalized features."""
        diff = F.normalize(teacher, dim=1) - F.normalize(student, dim=1)
        return 0.5 * diff.pow(2).sum(dim=1, keepdim=True)

    def loss(self, teacher_features: dict[str, torch.Tensor],
             student_features: dict[str, torch.Tensor]) -> torch.Tensor:
        """anomalib's STFPM loss: per layer 0.5 / (h * w) * sum of squared normalized differences,
        summed over positions AND the batch (MSELoss(reduction="sum")), then over layers. The sum over
        the batch is kept because lr 0.4 was tuned with it (anomalib's batch of 32)."""
        total = torch.zeros((), device=next(iter(teacher_features.values())).device)
        for layer in self.layers:
            height, width = teacher_features[layer].shape[-2:]
            total = total + self.layer_distance(teacher_features[layer], student_features[layer]).sum() / (
                height * width)
        return total

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=float(self.settings["lr"]),
                                    momentum=float(self.settings["momentum"]),
                                    weight_decay=float(self.settings["weight_decay"]))
        return optimizer, None
