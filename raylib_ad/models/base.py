"""What every model in the zoo is: a plain torch module with a name, defaults and a forward pass.

A model declares its anomalib-named settings with defaults, how it is trained as a recipe of stages
(`recipe()`, see models/recipe.py: collect, optimize, calibrate), and returns an `AnomalyOutput` from
`forward(images)` in eval mode. The defaults of `recipe()` cover the two common shapes: a memory-bank
model's `fit(batches)` becomes one Collect stage; a model with `default_epochs` and
`configure_optimizers()` becomes one Optimize stage with a single loss.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .components.feature_extractor import FeatureExtractor
from .recipe import Collect, Optimize, OptimizerSpec, Stage


@dataclass
class AnomalyOutput:
    score: torch.Tensor  # (B,) raw image scores: higher = more anomalous
    anomaly_map: torch.Tensor | None  # (B, H, W) raw pixel scores at input resolution, or None


class AnomalyModel(nn.Module):
    name: ClassVar[str]
    # None: the model has no timm backbone (GANomaly, DRAEM): no weights needed, inputs normalized with
    # `input_mean` / `input_std`.
    default_backbone: ClassVar[str | None]
    default_layers: ClassVar[tuple[str, ...]] = ()
    input_mean: ClassVar[tuple[float, ...]] = (0.485, 0.456, 0.406)
    input_std: ClassVar[tuple[float, ...]] = (0.229, 0.224, 0.225)
    # anomalib's parameter names and defaults; `--set key=value` may override any of them.
    defaults: ClassVar[dict[str, Any]] = {}
    produces_maps: ClassVar[bool] = True
    # Video models: frames per sample. Each sample is then a clip of this many consecutive frames ending
    # at the frame being scored, and the model takes (B, clip_length, 3, S, S). None: an image model.
    clip_length: ClassVar[int | None] = None
    # Models trained by gradient: epochs of the main Optimize stage when --max-epochs is not given
    # (anomalib's max_epochs). None: the model has no Optimize stage (memory banks, zero-shot).
    default_epochs: ClassVar[int | None] = None
    # anomalib's training batch when --batch-size is not given (None: 32, the project's default).
    default_batch_size: ClassVar[int | None] = None
    # anomalib's early stopping (its EarlyStopping patience) when --patience is not given; None: none.
    default_patience: ClassVar[int | None] = None
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
    # State-dict prefixes of pretrained parts the fit never changes (left out of the workers' digests).
    pretrained_prefixes: ClassVar[tuple[str, ...]] = ("feature_extractor.",)
    # Settings added after models were first saved, with the value that reproduces those older models
    # (read_model fills them in when a saved config.json lacks them).
    settings_added_later: ClassVar[dict[str, Any]] = {}
    # Keyword arguments that make a tiny, offline instance for the zoo-wide tests (tests/test_zoo.py):
    # merged over {"backbone": "resnet18" (models with a backbone), "pretrained": False, "image_size": 64}.
    test_preset: ClassVar[dict[str, Any]] = {}
    # jobs/benchmark.py's configuration for this model: {"settings": {...}, "layers": [...] or None}.
    benchmark_preset: ClassVar[dict[str, Any]] = {"settings": {}, "layers": None}

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
        self.weights = weights
        if self.backbone_name is None:
            self.feature_extractor = None
            self.normalization = (tuple(self.input_mean), tuple(self.input_std))
        else:
            self.feature_extractor = FeatureExtractor(self.backbone_name, self.layers, pretrained=pretrained,
                                                      weights=weights)
            self.normalization = (tuple(self.feature_extractor.mean), tuple(self.feature_extractor.std))

    # -- description -----------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this model (the weights come separately)."""
        return {"model": self.name, "backbone": self.backbone_name, "layers": self.layers,
                "image_size": self.image_size, "seed": self.seed, "settings": dict(self.settings),
                "mean": list(self.normalization[0]), "std": list(self.normalization[1])}

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    @classmethod
    def check_weights(cls, backbone: str | None, weights: str | None, settings: dict[str, Any]) -> None:
        """Raise WeightsUnavailableError, naming the ways out, when the pretrained weights this model would
        load cannot be had. Runs on the driver before any worker starts; must be fast."""
        if backbone is not None:
            from .components.weights import resolve_weights

            resolve_weights(backbone, weights)

    # -- training --------------------------------------------------------------------------------
    @classmethod
    def trains_by_gradient(cls) -> bool:
        """Whether the recipe has an Optimize stage with an epoch budget (--max-epochs, sweeps' "epochs")."""
        return cls.default_epochs is not None

    def recipe(self) -> list[Stage]:
        """How this model is trained, as ordered stages (models/recipe.py). Called on the worker after the
        model is on its device. Default: a memory-bank fit as one Collect stage, or, for a model with
        `default_epochs`, one Optimize stage over `configure_optimizers()` with the train-mode forward's loss."""
        if not self.trains_by_gradient():
            return [Collect("fit", self.fit)]
        optimizer, scheduler = self.configure_optimizers()
        return [Optimize("train", modules={"model": self}, epochs=self.default_epochs, main=True,
                         optimizers=[OptimizerSpec("main", optimizer, scheduler, interval="epoch",
                                                   clip_grad_norm=self.gradient_clip_val)],
                         loss_reduction=self.loss_reduction,
                         frozen_features=self.frozen_features if self.has_frozen_part else None,
                         needs_images_with_frozen=self.needs_images_with_frozen)]

    # Whether frozen_features() returns the output of a frozen pretrained part (cacheable).
    has_frozen_part: ClassVar[bool] = False

    def fit(self, batches: Iterable[torch.Tensor], progress: bool = False) -> None:
        """Memory-bank models: one pass over the (sharded) training images, then a reduction across
        workers through raylib_ad.distributed. Every worker ends with the same fitted model."""
        raise NotImplementedError(f"{self.name} declares no fit(); see its recipe()")

    def configure_optimizers(self):
        raise NotImplementedError(f"{self.name} declares no configure_optimizers(); see its recipe()")

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


def setting_ranges(cls: type[AnomalyModel]) -> dict[str, str]:
    """Each setting's valid values, in the words of the model's own checks (the `expected` of its
    _check_setting calls): the model is built once with its defaults, on the meta device and without
    pretrained weights, with every check recorded instead of enforced. A setting no check covers is absent."""
    import torch

    seen: dict[str, str] = {}

    def record(self, key: str, ok: bool, expected: str) -> None:
        seen.setdefault(key, expected)

    probe = type(f"{cls.__name__}SettingsProbe", (cls,), {"_check_setting": record})
    try:
        with torch.device("meta"):
            probe(pretrained=False)
    except Exception:  # noqa: BLE001 - a model whose construction needs real tensors: try on the CPU
        try:
            probe(pretrained=False)
        except Exception:  # noqa: BLE001 - the listing still shows names and defaults
            pass
    return seen


# Default layers are written with ResNet names; on another backbone the same strides are used.
_RESNET_STRIDES = {"act1": 2, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


def default_layers_for(backbone: str | None, resnet_layers: Iterable[str]) -> list[str]:
    """anomalib's default layers, translated by stride to `backbone`'s feature modules
    (tf_efficientnet_lite0: layer1..4 -> blocks.1, blocks.2, blocks.4, blocks.6)."""
    from .components.feature_extractor import feature_layers

    if backbone is None:
        return []
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


def _import_family(name: str) -> None:
    """Import the family package that registers model `name` (every model of the zoo lives in the package of
    its own name). A Ray Train worker builds one model: importing only its family instead of the whole zoo
    (open_clip, torchvision's detectors, FrEIA...) saves ~1 s of start-up per worker process on 2 cores."""
    if not name.isidentifier() or name == "components":
        return
    module = f"{__package__}.{name}"
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module:  # the family exists but one of its own imports is missing: say so
            raise


def _import_all_families() -> None:
    package = importlib.import_module(__package__)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.ispkg and info.name != "components":
            importlib.import_module(f"{__package__}.{info.name}")


def list_models() -> list[str]:
    _import_all_families()
    return sorted(_REGISTRY)


def model_class(name: str) -> type[AnomalyModel]:
    key = name.lower()
    if key not in _REGISTRY:
        _import_family(key)
    try:
        return _REGISTRY[key]
    except KeyError:
        raise ConfigError(f"unknown model '{name}'; available: {list_models()}") from None


def create_model(name: str, **kwargs: Any) -> AnomalyModel:
    return model_class(name)(**kwargs)
