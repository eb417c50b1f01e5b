"""FastFlow (Yu et al., 2021, "FastFlow: Unsupervised Anomaly Detection and Localization via 2D
Normalizing Flows").

Per feature level of a frozen pretrained backbone, a 2D normalizing flow (a sequence of FrEIA
AllInOneBlocks with convolutional subnets) maps the feature map to a standard normal, trained by
maximum likelihood on normal images. Low likelihood of a position's latent = anomalous.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch import nn

from ..base import AnomalyModel, AnomalyOutput, register_model


def _number_in(value, low: float, high: float = math.inf, *, low_open: bool = False) -> bool:
    """A real number (not a bool or a string) in [low, high), or (low, high) when low_open."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return (low < value if low_open else low <= value) and value < high


def subnet_constructor(kernel_size: int, hidden_ratio: float):
    """anomalib's coupling subnet: conv -> ReLU -> conv, 'same' padding, hidden width relative to the
    subnet's input (half the level's channels, as AllInOneBlock splits them)."""

    def build(in_channels: int, out_channels: int) -> nn.Module:
        hidden = int(in_channels * hidden_ratio)
        return nn.Sequential(nn.Conv2d(in_channels, hidden, kernel_size, padding=kernel_size // 2),
                             nn.ReLU(),
                             nn.Conv2d(hidden, out_channels, kernel_size, padding=kernel_size // 2))

    return build


def fastflow_block(dims: tuple[int, int, int], flow_steps: int, conv3x3_only: bool,
                   hidden_ratio: float, clamp: float = 2.0) -> SequenceINN:
    flow = SequenceINN(*dims)
    for step in range(flow_steps):
        # The paper alternates 3x3 and 1x1 subnets to halve the cost; conv3x3_only keeps them all 3x3.
        kernel = 1 if step % 2 == 1 and not conv3x3_only else 3
        flow.append(AllInOneBlock, subnet_constructor=subnet_constructor(kernel, hidden_ratio),
                    affine_clamping=clamp, permute_soft=False)
    return flow


@register_model
class Fastflow(AnomalyModel):
    name = "fastflow"
    has_frozen_part = True  # the pretrained backbone/teacher/encoder is frozen: its features are cached
    default_backbone = "resnet18"
    default_layers = ("layer1", "layer2", "layer3")
    # anomalib's defaults; optimizer Adam(lr=1e-3, weight_decay=1e-5), no scheduler.
    default_epochs = 500  # anomalib's max_epochs (its config adds early stopping, patience 3)
    # anomalib's EarlyStopping patience (monitors pixel AUROC; we monitor validation image AUROC, the headline metric)
    default_patience = 3
    defaults = {"flow_steps": 8, "conv3x3_only": False, "hidden_ratio": 1.0, "lr": 1e-3, "weight_decay": 1e-5}
    gradient_clip_val = None  # anomalib: gradient_clip_val=0, i.e. none
    needs_images_with_frozen = False  # trains on the backbone's features alone
    # Sweep defaults (raylib_ad/tuning/space.py format): lr brackets anomalib's 1e-3 (Adam).
    # jobs/benchmark.py's configuration (tf_efficientnet_lite0 layers): the reference rows of docs/benchmarks.md
    benchmark_preset = {"settings": {}, "layers": ["blocks.1", "blocks.2", "blocks.4"]}
    search_space = {
        "lr": {"loguniform": [1e-4, 1e-2]},
        "epochs": {"randint": [3, 10]},
        "layers": {"choice": [["layer1", "layer2", "layer3"], ["layer2", "layer3"]]},
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        s = self.settings
        steps = s["flow_steps"]
        self._check_setting("flow_steps", isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1,
                            "an integer >= 1")
        self._check_setting("conv3x3_only", isinstance(s["conv3x3_only"], bool), "true or false")
        self._check_setting("hidden_ratio", _number_in(s["hidden_ratio"], 0, low_open=True), "a number > 0")
        self._check_setting("lr", _number_in(s["lr"], 0, low_open=True), "a number > 0")
        self._check_setting("weight_decay", _number_in(s["weight_decay"], 0), "a number >= 0")
        self.norms, self.flows = nn.ModuleList(), nn.ModuleList()
        # Deterministic from `seed` so every DDP worker starts identical. AllInOneBlock draws its
        # channel permutation from numpy's global RNG, so that is seeded (and restored) too.
        numpy_state = np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                np.random.seed(self.seed)
                for layer in self.layers:
                    dims = self.level_shape(layer)
                    # anomalib's LayerNorm over (C, H, W) for CNN backbones: it fixes the input size,
                    # hence the grid is computed from image_size (ceil: what strided convs produce).
                    self.norms.append(nn.LayerNorm(list(dims), elementwise_affine=True))
                    self.flows.append(fastflow_block(dims, steps, bool(s["conv3x3_only"]),
                                                     float(s["hidden_ratio"])))
        finally:
            np.random.set_state(numpy_state)

    def level_shape(self, layer: str) -> tuple[int, int, int]:
        side = math.ceil(self.image_size / self.feature_extractor.strides[layer])
        return self.feature_extractor.channels[layer], side, side

    def frozen_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.feature_extractor(images)

    def latents(self, images: torch.Tensor | None, frozen: dict[str, torch.Tensor] | None = None
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: z (B, C, h, w) and log|det J| (B,)."""
        features = frozen if frozen is not None else self.feature_extractor(images)
        latents, log_jacobians = [], []
        for layer, norm, flow in zip(self.layers, self.norms, self.flows):
            # contiguous: the extractor returns channels_last, and LayerNorm/FrEIA's reshapes want NCHW.
            z, log_jac = flow(norm(features[layer].contiguous()))
            latents.append(z)
            log_jacobians.append(log_jac)
        return latents, log_jacobians

    def forward(self, images: torch.Tensor | None, frozen: dict[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor] | AnomalyOutput:
        latents, log_jacobians = self.latents(images, frozen)
        if self.training:
            return {"loss": self.loss(latents, log_jacobians)}
        level_maps = []
        for z in latents:
            log_prob = -0.5 * z.pow(2).mean(dim=1, keepdim=True)
            # anomalib's map: -likelihood, in [-1, 0); higher = more anomalous.
            level_maps.append(self.upsample(-torch.exp(log_prob)))
        anomaly_map = torch.stack(level_maps, dim=-1).mean(dim=-1)[:, 0]
        return AnomalyOutput(score=anomaly_map.amax(dim=(-2, -1)), anomaly_map=anomaly_map)

    @staticmethod
    def loss(latents: list[torch.Tensor], log_jacobians: list[torch.Tensor]) -> torch.Tensor:
        """anomalib's FastflowLoss: sum over levels of the batch mean of the negative log-likelihood
        under a standard normal, constants dropped: 0.5 * ||z||^2 - log|det J|."""
        total = torch.zeros((), device=latents[0].device)
        for z, log_jac in zip(latents, log_jacobians):
            total = total + (0.5 * z.pow(2).sum(dim=(1, 2, 3)) - log_jac).mean()
        return total

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        # Norms and flows only: the backbone is frozen, and AllInOneBlock's fixed permutation
        # matrices are parameters with requires_grad=False.
        params = [p for module in (self.norms, self.flows) for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=float(self.settings["lr"]),
                                     weight_decay=float(self.settings["weight_decay"]))
        return optimizer, None
