"""Reverse Distillation (Deng & Li, CVPR 2022, "Anomaly Detection via Reverse Distillation from
One-Class Embedding").

A frozen pretrained encoder (teacher); a trainable one-class bottleneck compresses its multi-scale
features into one compact code, and a decoder (student) rebuilds the encoder's features from that
code alone. Trained on normal images, the decoder cannot rebuild what the code has never carried, so
1 - cosine(encoder, decoder) per position is high where the image is anomalous.

Two bottleneck + decoder pairs (setting `decoder`):
- "anomalib": anomalib's own (its OCBE and de_resnet, anomalib_decoder.py), for the ResNets it supports
  with layers layer1..3: the default there, so the default configuration is anomalib's architecture;
- "generic": built from the encoder's channels and strides (components.py), so any timm backbone and
  any layers work: the default everywhere else.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..base import AnomalyModel, AnomalyOutput, register_model
from ..components.blur import GaussianBlur2d
from ...errors import ConfigError
from . import anomalib_decoder
from .components import MirrorDecoder, OneClassBottleneck

_MAP_MODES = ("add", "multiply")
_DECODERS = ("auto", "anomalib", "generic")


def _number_in(value, low: float, high: float = math.inf, *, low_open: bool = False) -> bool:
    """A real number (not a bool or a string) in [low, high), or (low, high) when low_open."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return (low < value if low_open else low <= value) and value < high


@register_model
class ReverseDistillation(AnomalyModel):
    name = "reverse_distillation"
    has_frozen_part = True  # the pretrained backbone/teacher/encoder is frozen: its features are cached
    # Models saved before the `decoder` setting existed used the decoder built from the encoder's shapes.
    settings_added_later = {"decoder": "generic"}
    default_backbone = "wide_resnet50_2"
    default_layers = ("layer1", "layer2", "layer3")
    # anomalib: Adam(lr=0.005, betas=(0.5, 0.99)) over decoder + bottleneck; maps added by default.
    # decoder: "auto" = "anomalib" for the ResNets anomalib's decoder supports with layer1..3, else
    # "generic"; resolved when the model is built (config() records the choice).
    defaults = {"anomaly_map_mode": "add", "lr": 0.005, "beta1": 0.5, "beta2": 0.99, "decoder": "auto"}
    gradient_clip_val = None  # anomalib: gradient_clip_val=0, i.e. none
    needs_images_with_frozen = False  # trains on the encoder's features alone
    default_epochs = 200  # anomalib's max_epochs (its config validates every 200 epochs, patience 3)
    # anomalib's EarlyStopping patience (monitors pixel AUROC; we monitor validation image AUROC, the headline metric)
    default_patience = 3
    # Sweep defaults (raylib_ad/tuning/space.py format): lr brackets anomalib's 0.005 (Adam).
    # jobs/benchmark.py's configuration (tf_efficientnet_lite0 layers): the reference rows of docs/benchmarks.md
    benchmark_preset = {"settings": {}, "layers": ["blocks.1", "blocks.2", "blocks.4"]}
    search_space = {
        "lr": {"loguniform": [0.001, 0.01]},
        "epochs": {"randint": [3, 10]},
        "layers": {"choice": [["layer1", "layer2", "layer3"], ["layer2", "layer3"]]},
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_setting("anomaly_map_mode", self.settings["anomaly_map_mode"] in _MAP_MODES,
                            f"one of {list(_MAP_MODES)}")
        self._check_setting("lr", _number_in(self.settings["lr"], 0, low_open=True), "a number > 0")
        for beta in ("beta1", "beta2"):
            self._check_setting(beta, _number_in(self.settings[beta], 0, 1), "a number in [0, 1)")
        self._check_setting("decoder", self.settings["decoder"] in _DECODERS, f"one of {list(_DECODERS)}")
        channels = [self.feature_extractor.channels[layer] for layer in self.layers]
        strides = [self.feature_extractor.strides[layer] for layer in self.layers]
        self.settings["decoder"] = self._resolve_decoder(channels)
        # Built from `seed` alone so every DDP worker starts from identical weights; fork_rng leaves
        # the caller's global RNG as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if self.settings["decoder"] == "anomalib":
                self.bottleneck = anomalib_decoder.AnomalibBottleneck(self.backbone_name)
                self.decoder = anomalib_decoder.AnomalibDecoder(self.backbone_name)
            else:
                self.bottleneck = OneClassBottleneck(channels, strides)
                self.decoder = MirrorDecoder(self.bottleneck.out_channels, channels, strides)
        self.blur = GaussianBlur2d(sigma=4.0)

    def _resolve_decoder(self, channels: list[int]) -> str:
        supported = (self.backbone_name in anomalib_decoder.ARCHITECTURES
                     and tuple(self.layers) == anomalib_decoder.LAYERS
                     and channels == anomalib_decoder.encoder_channels(self.backbone_name))
        choice = self.settings["decoder"]
        if choice == "auto":
            return "anomalib" if supported else "generic"
        if choice == "anomalib" and not supported:
            raise ConfigError(
                f"{self.name}: setting decoder='anomalib' needs one of anomalib's ResNet backbones "
                f"{sorted(anomalib_decoder.ARCHITECTURES)} with layers {list(anomalib_decoder.LAYERS)}; got "
                f"backbone '{self.backbone_name}' with layers {self.layers}. Use decoder='generic' (any "
                "backbone and layers) or 'auto'")
        return choice

    @property
    def encoder(self):
        # The base class's frozen, pretrained extractor (an alias, not a second registered module,
        # which would duplicate its tensors in the state dict).
        return self.feature_extractor

    def frozen_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.encoder(images)

    def encode_decode(self, images: torch.Tensor | None, frozen: dict[str, torch.Tensor] | None = None
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        by_layer = frozen if frozen is not None else self.encoder(images)
        encoded = [by_layer[layer] for layer in self.layers]
        decoded = self.decoder(self.bottleneck(encoded), [f.shape[-2:] for f in encoded])
        return encoded, decoded

    def forward(self, images: torch.Tensor | None, frozen: dict[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor] | AnomalyOutput:
        encoded, decoded = self.encode_decode(images, frozen)
        if self.training:
            return {"loss": self.loss(encoded, decoded)}
        multiply = self.settings["anomaly_map_mode"] == "multiply"
        anomaly_map = None
        for enc, dec in zip(encoded, decoded):
            distance = 1 - F.cosine_similarity(enc, dec, dim=1).unsqueeze(1)
            # align_corners=True as in anomalib's RD map (its other models use False).
            distance = F.interpolate(distance, size=(self.image_size, self.image_size), mode="bilinear",
                                     align_corners=True)
            if anomaly_map is None:
                anomaly_map = distance
            else:
                anomaly_map = anomaly_map * distance if multiply else anomaly_map + distance
        anomaly_map = self.blur(anomaly_map)[:, 0]
        return AnomalyOutput(score=anomaly_map.amax(dim=(-2, -1)), anomaly_map=anomaly_map)

    @staticmethod
    def loss(encoded: list[torch.Tensor], decoded: list[torch.Tensor]) -> torch.Tensor:
        """anomalib's ReverseDistillationLoss: per layer, the batch mean of 1 - cosine similarity between
        each sample's whole encoder and decoder features flattened to C*h*w vectors; summed over layers.
        (The paper's eq. 2-3 and the anomaly map use one cosine per position instead; the authors' code
        and anomalib train with this one, and their lr and epochs go with it.) reshape, not view: the encoder's features are
        channels_last, and reshape flattens both sides in the same (C, h, w) order whatever the layout."""
        total = torch.zeros((), device=encoded[0].device)
        for enc, dec in zip(encoded, decoded):
            cosine = F.cosine_similarity(enc.reshape(enc.shape[0], -1), dec.reshape(dec.shape[0], -1), dim=1)
            total = total + (1 - cosine).mean()
        return total

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        params = [p for module in (self.bottleneck, self.decoder) for p in module.parameters()
                  if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=float(self.settings["lr"]),
                                     betas=(float(self.settings["beta1"]), float(self.settings["beta2"])))
        return optimizer, None
