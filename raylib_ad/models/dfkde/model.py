"""DFKDE (anomalib's deep-feature kernel density estimation): global-average-pooled deep features,
PCA to a few components, scaled, then a Gaussian KDE; anomaly = negative log density. No anomaly map.

The fit gathers every worker's feature rows (a few hundred floats per image) and fits once on the union,
so the model is the one a single process would fit on the same images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import distributed
from ..base import AnomalyModel, AnomalyOutput, register_model
from ..components.kde import GaussianKDE
from ..components.pca import PCA
from ...progress import progress_bar


@register_model
class DFKDE(AnomalyModel):
    name = "dfkde"
    default_backbone = "resnet18"
    default_layers = ("layer4",)
    defaults = {"n_pca_components": 16, "feature_scaling_method": "scale", "max_training_points": 40000}
    # Sweep defaults (raylib_ad/tuning/space.py format).
    # jobs/benchmark.py's configuration (tf_efficientnet_lite0 layers): the reference rows of docs/benchmarks.md
    benchmark_preset = {"settings": {"n_pca_components": 16, "max_training_points": 40000}, "layers": ["blocks.6"]}
    search_space = {"n_pca_components": {"choice": [8, 16, 32]}, "layers": {"choice": [["layer4"], ["layer3"]]}}
    produces_maps = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_setting("feature_scaling_method", self.settings["feature_scaling_method"] in ("scale", "norm"),
                            "'scale' or 'norm'")
        self.pca = PCA(int(self.settings["n_pca_components"]))
        self.kde = GaussianKDE()
        self.register_buffer("max_length", torch.ones(1))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        features = self.feature_extractor(images)  # one backbone pass for all the layers
        return torch.cat([F.adaptive_avg_pool2d(features[layer], 1).flatten(1) for layer in self.layers], dim=1)

    def _scale(self, projected: torch.Tensor) -> torch.Tensor:
        if self.settings["feature_scaling_method"] == "norm":
            return projected / torch.linalg.norm(projected, dim=1, keepdim=True).clamp_min(1e-12)
        return projected / self.max_length

    def fit(self, batches, progress: bool = False) -> None:
        self.eval()
        rows = [self.features(b.to(self.device)) for b in progress_bar(batches, desc="dfkde features",
                                                                      enabled=progress)]
        if not rows:
            raise RuntimeError("no training images reached this worker: its data shard is empty")
        feats = distributed.all_gather_rows(torch.cat(rows)).cpu()
        cap = int(self.settings["max_training_points"])
        if feats.shape[0] > cap:
            generator = torch.Generator().manual_seed(self.seed)
            feats = feats[torch.randperm(feats.shape[0], generator=generator)[:cap]]
        projected = self.pca.fit(feats).transform(feats.float())
        self.max_length = torch.linalg.norm(projected, dim=1).max().reshape(1).clamp_min(1e-12)
        self.kde.fit(self._scale(projected))
        self.to(self.device)

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if self.kde.dataset.numel() == 0:
            raise RuntimeError("DFKDE is not fitted: fit() it or load a trained model first")
        projected = self.pca.transform(self.features(images))
        return AnomalyOutput(score=-self.kde.log_density(self._scale(projected)), anomaly_map=None)
