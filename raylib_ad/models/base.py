"""What every model in the zoo is: a plain torch module with a name, defaults and a forward pass.

A model declares its learning type ("memory_bank" models are fitted once over the training set by
`fit(batches)`; "gradient" models are trained by the shared loop in raylib_ad/train), its anomalib-named
settings with defaults, and returns an `AnomalyOutput` from `forward(images)` in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .components.feature_extractor import FeatureExtractor


@dataclass
class AnomalyOutput:
    score: torch.Tensor  # (B,) raw image scores: higher = more anomalous
    anomaly_map: torch.Tensor | None  # (B, H, W) raw pixel scores at input resolution, or None


class AnomalyModel(nn.Module):
    name: ClassVar[str]
    learning_type: ClassVar[str] = "memory_bank"
    default_backbone: ClassVar[str]
    default_layers: ClassVar[tuple[str, ...]]
    # anomalib's parameter names and defaults; `--set key=value` may override any of them.
    defaults: ClassVar[dict[str, Any]] = {}
    produces_maps: ClassVar[bool] = True
    # Gradient models only: epochs when --max-epochs is not given, and gradient-norm clipping (None: off).
    default_epochs: ClassVar[int] = 10
    gradient_clip_val: ClassVar[float | None] = None
    # "sum" when the loss adds up over the batch (STFPM): DDP averages gradients over workers, so the
    # loop scales such a loss by the world size to keep N workers x batch b equal to 1 worker x N*b.
    loss_reduction: ClassVar[str] = "mean"
    # Gradient models with a frozen pretrained part: whether the train-mode forward still needs the
    # images once it is given that part's output (STFPM's student does; RD and FastFlow do not).
    needs_images_with_frozen: ClassVar[bool] = True
    # What a sweep searches by default ({key: {distribution: args}}, see raylib_ad/tuning/space.py);
    # None: the model must be given a --search-space file.
    search_space: ClassVar[dict[str, Any] | None] = None

    def __init__(self, backbone: str | None = None, layers: Iterable[str] | None = None, *,
                 pretrained: bool = True, weights: str | None = None, image_size: int = 256,
                 seed: int = 0, **settings: Any):
        super().__init__()
        unknown = sorted(set(settings) - set(self.defaults))
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {unknown} for model '{self.name}'; valid: {sorted(self.defaults)}")
        self.settings = {**self.defaults, **settings}
        self.backbone_name = backbone or self.default_backbone
        self.layers = list(layers) if layers else default_layers_for(self.backbone_name, self.default_layers)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.pretrained = pretrained
        self.feature_extractor = FeatureExtractor(self.backbone_name, self.layers, pretrained=pretrained,
                                                  weights=weights)

    # -- description -----------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this model (the weights come separately)."""
        return {"model": self.name, "backbone": self.backbone_name, "layers": self.layers,
                "image_size": self.image_size, "seed": self.seed, "settings": dict(self.settings),
                "mean": list(self.feature_extractor.mean), "std": list(self.feature_extractor.std)}

    @property
    def device(self) -> torch.device:
        return next(self.feature_extractor.parameters()).device

    # -- training --------------------------------------------------------------------------------
    def fit(self, batches: Iterable[torch.Tensor], progress: bool = False) -> None:
        """Memory-bank models: one pass over the (sharded) training images, then a reduction across
        workers through raylib_ad.distributed. Every worker ends with the same fitted model."""
        raise NotImplementedError(f"{self.name} is trained by the gradient loop, not fit()")

    def frozen_features(self, images: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Gradient models: the output of the frozen, pretrained part for these images, or None when
        there is none. Training images are not augmented, so this never changes from one epoch to the
        next: the training loop computes it once per image, caches it, and passes it back as
        forward(images, frozen=...), which then skips the frozen part (a third of STFPM's step)."""
        return None

    # -- shared helpers --------------------------------------------------------------------------
    def upsample(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w) -> (B, 1, S, S) bilinear, as anomalib does before blurring."""
        return F.interpolate(maps, size=(self.image_size, self.image_size), mode="bilinear",
                             align_corners=False)

    def _check_setting(self, key: str, ok: bool, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{self.name}: setting {key}={self.settings[key]!r} is invalid; expected {expected}")


# Default layers are written with ResNet names; on another backbone the same strides are used.
_RESNET_STRIDES = {"act1": 2, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


def default_layers_for(backbone: str, resnet_layers: Iterable[str]) -> list[str]:
    """anomalib's default layers, translated by stride to `backbone`'s feature modules
    (tf_efficientnet_lite0: layer1..4 -> blocks.1, blocks.2, blocks.4, blocks.6)."""
    from .components.feature_extractor import feature_layers

    names, strides = feature_layers(backbone)
    if all(layer in names for layer in resnet_layers):
        return list(resnet_layers)
    by_stride = {}
    for name, stride in zip(names, strides):
        by_stride[stride] = name  # the deepest module at each stride
    return [by_stride[_RESNET_STRIDES[layer]] for layer in resnet_layers]


# --- registry (timm-style: models found by a string) ----------------------------------------------

_REGISTRY: dict[str, type[AnomalyModel]] = {}


def register_model(cls: type[AnomalyModel]) -> type[AnomalyModel]:
    _REGISTRY[cls.name] = cls
    return cls


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_class(name: str) -> type[AnomalyModel]:
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown model '{name}'; available: {list_models()}") from None


def create_model(name: str, **kwargs: Any) -> AnomalyModel:
    return model_class(name)(**kwargs)
