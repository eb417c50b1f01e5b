"""DFM (Ahuja et al., 2019, "Probabilistic modeling of deep features for out-of-distribution and
adversarial detection"): PCA of pooled deep features of normal images; anomaly = feature
reconstruction error ("fre", which also gives a coarse map) or Gaussian negative log-likelihood ("nll").

The fit is exact on any number of workers: moments (sum, sum of outer products) are all-reduced when the
feature dimension is small; otherwise the feature rows themselves are all-gathered (N x D moves less
than D x D). Either way the PCA is the one a single process would fit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import distributed
from ..base import AnomalyModel, AnomalyOutput, register_model
from ..components.gaussian import Moments
from ..components.pca import PCA
from ...progress import progress_bar


@register_model
class DFM(AnomalyModel):
    name = "dfm"
    default_backbone = "resnet50"
    default_layers = ("layer3",)
    # nll_centering: "centered" scores the PCA projection of (x - mean), the method's Gaussian. "anomalib_2_7"
    # reproduces anomalib 2.7's nll as it runs: its fit centres the feature bank in place (PCA.fit:
    # dataset -= mean) and PCA.transform subtracts the mean again in place, so its Gaussian is fitted on
    # x - 2 mean and a test feature scores as the projection of x itself (docs/parity.md). A bug, so not
    # the default; the setting exists to show parity with anomalib as released.
    defaults = {"pooling_kernel_size": 4, "pca_level": 0.97, "score_type": "fre", "moments_max_dim": 4096,
                "nll_centering": "centered"}
    # Sweep defaults (raylib_ad/tuning/space.py format).
    # jobs/benchmark.py's configuration (tf_efficientnet_lite0 layers): the reference rows of docs/benchmarks.md
    benchmark_preset = {"settings": {"pooling_kernel_size": 4, "pca_level": 0.97, "score_type": "fre"}, "layers": ["blocks.4"]}
    search_space = {"pca_level": {"uniform": [0.9, 0.995]}, "score_type": {"choice": ["fre", "nll"]}}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_setting("score_type", self.settings["score_type"] in ("fre", "nll"), "'fre' or 'nll'")
        self._check_setting("nll_centering", self.settings["nll_centering"] in ("centered", "anomalib_2_7"),
                            "'centered' or 'anomalib_2_7' (anomalib 2.7's double centring, docs/parity.md)")
        level = self.settings["pca_level"]
        # anomalib: a level <= 1 is a fraction of the variance (1 included, also as the int 1), a level
        # > 1 a component count. The count at a fraction follows anomalib's rule exactly (see
        # components/pca.py): the components whose cumulative variance ratio stays below the level.
        # 1.0 keeps every component with non-zero variance (anomalib's rule would drop the last one).
        is_number = isinstance(level, (int, float)) and not isinstance(level, bool)
        self._check_setting("pca_level", is_number and 0 < level and (level <= 1 or float(level).is_integer()),
                            "a variance fraction in (0, 1] (1.0 = all components) or an integer count > 1")
        self._check_setting("layers", len(self.layers) == 1, "exactly one layer")
        self.pca = PCA(float(level) if level <= 1 else int(level))
        self.produces_maps = self.settings["score_type"] == "fre"

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        x = self.feature_extractor(images)[self.layers[0]]
        k = int(self.settings["pooling_kernel_size"])
        if k > 1:
            x = F.avg_pool2d(x, kernel_size=k)
        return x.flatten(1), x.shape

    def fit(self, batches, progress: bool = False) -> None:
        self.eval()
        rows = []
        for images in progress_bar(batches, desc="dfm features", enabled=progress):
            rows.append(self.features(images.to(self.device))[0])
        if not rows:
            raise RuntimeError("no training images reached this worker: its data shard is empty")
        local = torch.cat(rows)
        if local.shape[1] <= int(self.settings["moments_max_dim"]):
            moments = Moments()
            moments.update(local.unsqueeze(1))
            moments.all_reduce()
            self.pca.fit_from_moments(moments.count, moments.total[0], moments.outer[0])
        else:
            self.pca.fit(distributed.all_gather_rows(local))

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if self.pca.components.numel() == 0:
            raise RuntimeError("DFM is not fitted: fit() it or load a trained model first")
        feats, shape = self.features(images)
        projected = self.pca.transform(feats)
        if self.settings["score_type"] == "nll":
            if self.settings["nll_centering"] == "anomalib_2_7":
                projected = feats @ self.pca.components.T
            var = self.pca.explained_variance.clamp_min(1e-12)
            score = (projected.pow(2) / var).sum(1) + var.log().sum()
            return AnomalyOutput(score=score, anomaly_map=None)
        error = (feats - self.pca.inverse_transform(projected)).pow(2)
        amap = error.view(shape).sum(1, keepdim=True)  # per-position reconstruction error
        return AnomalyOutput(score=error.sum(1), anomaly_map=self.upsample(amap)[:, 0])
