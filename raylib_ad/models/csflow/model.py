"""CS-Flow (Rudolph et al., WACV 2022, "Fully Convolutional Cross-Scale-Flows for Image-based Defect
Detection").

One feature layer of a frozen pretrained backbone, taken on the image at three resolutions (full, 1/2,
1/4), is mapped jointly to a standard normal by a cross-scale normalizing flow (csflow/flow.py), trained by
maximum likelihood with gradient-norm clipping. A position is anomalous where its latent is far from 0.

Frozen-feature cache: applies (the three-scale features of the frozen backbone are the flow's only input).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from ..base import AnomalyModel, AnomalyOutput, register_model
from ..components.fast_flow import adam
from ..components.flow_utils import check_layers, feature_side, geometry_error, is_int, is_number, seeded
from ..recipe import Optimize, OptimizerSpec, Stage, StepContext
from .flow import CrossScaleFlow

N_SCALES = 3
_NEED = ("exactly one feature layer, whose maps at the image size, half and a quarter of it have sides "
         "s, s/2 and s/4 with s/4 >= 1 (image_size divisible by 4 x the layer's stride)")


@register_model
class Csflow(AnomalyModel):
    name = "csflow"
    # anomalib: torchvision EfficientNet-B5 'features.6.8' (stride 32, 304 channels). timm lists feature
    # layers only where the stride changes, so the stride-32 layer of tf_efficientnet_b5 is the next
    # stage's output (blocks.6, 512 channels); any timm backbone and layer can be chosen instead.
    default_backbone = "tf_efficientnet_b5"
    default_layers = ("layer4",)  # ResNet name for stride 32, translated per backbone
    # anomalib's defaults. lr is a setting here (anomalib hard-codes Adam(lr=2e-4, eps=1e-4,
    # weight_decay=1e-5, betas=(0.5, 0.9))) so that sweeps can search it.
    # log_jac_reduction: "batch_sum" is anomalib's CsFlowLoss (its coupling layers return log|det J| summed
    # over the batch and the scales, so the loss is mean(0.5 ||z||^2) - sum_batch(log|det J|), over the latent
    # size); "per_sample" is this project's earlier loss (the batch mean of 0.5 ||z||^2 - log|det J|), which
    # trained better in a short budget (docs/benchmarks.md), kept as a setting.
    defaults = {"cross_conv_hidden_channels": 1024, "n_coupling_blocks": 4, "clamp": 3, "num_channels": 3,
                "lr": 2e-4, "log_jac_reduction": "batch_sum"}
    settings_added_later = {"log_jac_reduction": "per_sample"}
    default_epochs = 240  # examples/configs/model/csflow.yaml (early stopping on pixel AUROC, patience 3)
    default_patience = 3  # anomalib's EarlyStopping patience for CS-Flow
    gradient_clip_val = 1.0  # anomalib's trainer argument gradient_clip_val=1 (norm)
    has_frozen_part = True
    needs_images_with_frozen = False
    test_preset = {"cross_conv_hidden_channels": 16, "n_coupling_blocks": 2, "layers": ["layer2"]}  # tests/test_zoo.py: a tiny offline instance
    search_space = {
        "lr": {"loguniform": [5e-5, 1e-3]},
        "cross_conv_hidden_channels": {"choice": [256, 512, 1024]},
        "epochs": {"randint": [5, 30]},
    }

    def __init__(self, backbone: str | None = None, layers: Iterable[str] | None = None, **kwargs):
        layers = list(layers) if layers else None
        check_layers(self.name, backbone or self.default_backbone, layers, _NEED)
        if layers is not None and len(layers) != 1:
            raise geometry_error(self.name, backbone or self.default_backbone, layers,
                                 kwargs.get("image_size", 256), f"{len(layers)} layers", _NEED)
        super().__init__(backbone, layers, **kwargs)
        s = self.settings
        self._check_setting("cross_conv_hidden_channels", is_int(s["cross_conv_hidden_channels"], 1),
                            "an integer >= 1")
        self._check_setting("n_coupling_blocks", is_int(s["n_coupling_blocks"], 1), "an integer >= 1")
        self._check_setting("clamp", is_number(s["clamp"], 0), "a number >= 0 (0: no soft clamping)")
        self._check_setting("num_channels", s["num_channels"] == 3, "3 (images are decoded as RGB)")
        self._check_setting("lr", is_number(s["lr"], 0, low_open=True), "a number > 0")
        self._check_setting("log_jac_reduction", s["log_jac_reduction"] in ("batch_sum", "per_sample"),
                            "'batch_sum' (anomalib's) or 'per_sample'")
        layer = self.layers[0]
        stride = self.feature_extractor.strides[layer]
        sides = [feature_side(self.image_size // 2**i, stride) for i in range(N_SCALES)]
        if self.image_size % 4 or sides[-1] < 1 or sides != [sides[0] // 2**i for i in range(N_SCALES)] \
                or sides[0] % 4:
            raise geometry_error(self.name, self.backbone_name, self.layers, self.image_size,
                                 f"feature maps of sides {sides} (stride {stride})", _NEED)
        self.channels = self.feature_extractor.channels[layer]
        with seeded(self.seed):
            self.flow = CrossScaleFlow(self.channels, s["n_coupling_blocks"], float(s["clamp"]),
                                       s["cross_conv_hidden_channels"])

    def frozen_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The layer's features of the image at full, half and quarter size (nearest resizing, as anomalib)."""
        layer, features = self.layers[0], {}
        for scale in range(N_SCALES):
            side = self.image_size // 2**scale
            scaled = images if scale == 0 else F.interpolate(images, size=(side, side))
            # contiguous: the extractor returns channels_last; the flow slices channels.
            features[f"scale{scale}"] = self.feature_extractor(scaled)[layer].contiguous()
        return features

    def latents(self, images: torch.Tensor | None, frozen: dict[str, torch.Tensor] | None = None,
                flow: torch.nn.Module | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        features = frozen if frozen is not None else self.frozen_features(images)
        flow = self.flow if flow is None else flow
        return flow([features[f"scale{i}"] for i in range(N_SCALES)])

    def forward(self, images: torch.Tensor | None, frozen: dict[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor] | AnomalyOutput:
        z, log_jac = self.latents(images, frozen)
        if self.training:
            return {"loss": self.loss(z, log_jac, self.settings["log_jac_reduction"])}
        flat = torch.cat([zi.flatten(1) for zi in z], dim=1)
        score = (flat.pow(2) / 2).mean(dim=1)  # anomalib: the image score is mean(z^2 / 2) over all latents
        anomaly_map = torch.ones(flat.shape[0], 1, self.image_size, self.image_size, device=flat.device)
        for zi in z:
            # anomalib's mode "all": the product over scales of the channel mean of z^2, upsampled.
            anomaly_map = anomaly_map * self.upsample(zi.pow(2).mean(dim=1, keepdim=True))
        return AnomalyOutput(score=score, anomaly_map=anomaly_map[:, 0])

    @staticmethod
    def loss(z: list[torch.Tensor], log_jac: torch.Tensor, log_jac_reduction: str = "batch_sum") -> torch.Tensor:
        """"batch_sum", anomalib's CsFlowLoss: (batch mean of 0.5 * ||z||^2 - batch SUM of log|det J|) / latent
        size. "per_sample": the batch mean of (0.5 * ||z||^2 - log|det J|) / latent size.

        Under DDP the runner averages per-sample-mean losses weighted by each worker's share, so "batch_sum" is
        written as the batch mean of (0.5 ||z_i||^2 - B * log|det J_i|) with B the global batch (this worker's
        batch x the world size): anomalib's loss in one process, and N workers x b step as one worker x N*b."""
        flat = torch.cat([zi.flatten(1) for zi in z], dim=1)
        if log_jac_reduction == "per_sample":
            return (0.5 * flat.pow(2).sum(dim=1) - log_jac).mean() / flat.shape[1]
        from ... import distributed

        global_batch = flat.shape[0] * distributed.world_size()
        return (0.5 * flat.pow(2).sum(dim=1) - global_batch * log_jac).mean() / flat.shape[1]

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        # Fused Adam (components/fast_flow.py): ~1 s less per step over the flow's ~290 M parameters.
        optimizer = adam(self.flow.parameters(), lr=float(self.settings["lr"]), eps=1e-4,
                         weight_decay=1e-5, betas=(0.5, 0.9))
        return optimizer, None

    def recipe(self) -> list[Stage]:
        optimizer, _ = self.configure_optimizers()
        # Only the flow is a DDP module: the frozen backbone has nothing to synchronise.
        return [Optimize("train", modules={"flow": self.flow}, epochs=self.default_epochs, main=True,
                         optimizers=[OptimizerSpec("main", optimizer, clip_grad_norm=self.gradient_clip_val)],
                         step=self.train_step, frozen_features=self.frozen_features,
                         needs_images_with_frozen=False)]

    def train_step(self, ctx: StepContext) -> None:
        z, log_jac = self.latents(ctx.batch.get("image"), ctx.batch.get("frozen"), flow=ctx.modules["flow"])
        ctx.optimize("main", self.loss(z, log_jac, self.settings["log_jac_reduction"]))
