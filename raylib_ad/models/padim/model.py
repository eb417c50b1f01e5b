"""PaDiM (Defard et al., ICPR 2020): a multivariate Gaussian per feature-map position; anomaly =
Mahalanobis distance of a test patch to its position's Gaussian.

The fit is exact on any number of workers: per-position sums and outer products (float64) are summed
across workers, then turned into means and covariances once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import AnomalyModel, AnomalyOutput, register_model
from ..components.blur import GaussianBlur2d
from ..components.gaussian import Moments
from ...progress import progress_bar

# anomalib's feature counts per backbone; other backbones keep all their channels up to this cap.
_N_FEATURES = {"resnet18": 100, "wide_resnet50_2": 550}
_DEFAULT_CAP = 550
# anomalib's MultiVariateGaussian: covariance + 0.01 I (covariance_regularization) + 1e-5 I before inversion.
_STABILIZER = 1e-5


@register_model
class Padim(AnomalyModel):
    name = "padim"
    default_backbone = "resnet18"
    default_layers = ("layer1", "layer2", "layer3")
    defaults = {"n_features": None, "covariance_regularization": 0.01}
    # Sweep defaults (raylib_ad/tuning/space.py format). 150 features fit every layer choice on resnet18
    # and tf_efficientnet_lite0 (layer2+3 there has 152 channels).
    # jobs/benchmark.py's configuration (tf_efficientnet_lite0 layers): the reference rows of docs/benchmarks.md
    benchmark_preset = {"settings": {"n_features": 100}, "layers": ["blocks.1", "blocks.2", "blocks.4"]}
    search_space = {
        "n_features": {"choice": [50, 100, 150]},
        "layers": {"choice": [["layer1", "layer2", "layer3"], ["layer2", "layer3"]]},
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        total = sum(self.feature_extractor.channels.values())
        n = self.settings["n_features"] or min(_N_FEATURES.get(self.backbone_name, _DEFAULT_CAP), total)
        self._check_setting("n_features", 1 <= int(n) <= total, f"an integer in [1, {total}] for these layers")
        self.settings["n_features"] = int(n)
        generator = torch.Generator().manual_seed(self.seed)
        # A fixed random channel subset (the paper's random dimensionality reduction).
        self.register_buffer("feature_index", torch.randperm(total, generator=generator)[: int(n)].sort().values)
        self.register_buffer("mean", torch.empty(0))  # (P, C)
        self.register_buffer("inv_covariance", torch.empty(0))  # (P, C, C)
        self.blur = GaussianBlur2d(sigma=4.0)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, h*w, n_features) contiguous patch features and the grid size (h, w): the layers resized
        (nearest) to the first layer's grid, concatenated, then the random channel subset. Concatenated
        in (B, h, w, C) order (the channels_last features' own layout), so that the subset and the patch
        rows come out contiguous without transposing copies (the same values)."""
        features = self.feature_extractor(images)
        size = features[self.layers[0]].shape[-2:]
        parts = []
        for layer in self.layers:
            x = features[layer]
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="nearest")
            parts.append(x.permute(0, 2, 3, 1))
        embedding = torch.cat(parts, dim=-1).index_select(-1, self.feature_index)  # (B, h, w, n_features)
        return embedding.flatten(1, 2), tuple(size)

    def fit(self, batches, progress: bool = False) -> None:
        self.eval()
        moments = Moments()
        for images in progress_bar(batches, desc="padim features", enabled=progress):
            moments.update(self.embed(images.to(self.device))[0])
        # anomalib adds 0.01 * I to each covariance, then 1e-5 * I more before inverting ("stabilized"); the
        # second term moved the inverse by 0.4% (relative, parity harness) when it was left out.
        mean, cov = moments.all_reduce().mean_and_covariance(
            float(self.settings["covariance_regularization"]) + _STABILIZER)
        self.mean = mean.float()
        self.inv_covariance = torch.linalg.inv(cov).float()

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if self.mean.numel() == 0:
            raise RuntimeError("PaDiM is not fitted: fit() it or load a trained model first")
        patches, (h, w) = self.embed(images)
        # Position-major (P, B, C), contiguous: one batched matmul per position, (P, B, C) @ (P, C, C),
        # without bmm copying a strided operand position by position.
        delta = patches.transpose(0, 1).contiguous().sub_(self.mean.unsqueeze(1))
        left = torch.bmm(delta, self.inv_covariance)
        dist = (left.mul_(delta)).sum(-1).clamp_min_(0).sqrt_().T  # (B, P)
        # anomalib: bilinear upsampling, then the Gaussian blur; both as two small matrix products.
        amap = self.blur.upsample_and_blur(dist.reshape(-1, 1, h, w), (self.image_size, self.image_size))[:, 0]
        return AnomalyOutput(score=amap.amax(dim=(1, 2)), anomaly_map=amap)
