"""U-Flow (Tailanian et al., 2022, "U-Flow: A U-shaped Normalizing Flow for Anomaly Detection with
Unsupervised Threshold").

Multi-scale features of a frozen pretrained backbone (layer-normalised, with learned affine) enter a
U-shaped normalizing flow: the coarsest scale goes through a flow stage, half of its output is emitted as
that scale's latent and the other half is upsampled (invertibly) and concatenated with the next finer
scale, and so on down to the finest. Trained by maximum likelihood with a learning rate decaying linearly
per iteration. The anomaly map is 1 - the mean over scales of each position's likelihood; alternatively
(anomaly_map_mode="nfa") -log10 NFA, whose threshold 0 needs no labels (uflow/nfa.py).

Frozen-feature cache: applies (the raw backbone features are cached; the LayerNorms train with the flow).
"""

from __future__ import annotations

from typing import Iterable

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
from torch import nn

from ..base import AnomalyModel, AnomalyOutput, register_model
from ..components.fast_flow import PermutingAllInOneBlock, adam
from ..components.flow_utils import check_layers, feature_side, geometry_error, is_int, is_number, seeded
from ..recipe import Optimize, OptimizerSpec, Stage, StepContext
from . import nfa

_NEED = ("feature layers whose maps halve from one to the next (e.g. layer1, layer2, layer3: strides "
         "s, 2s, 4s) at an image size divisible by the deepest stride")
LR_DECAY_STEPS = 25000  # anomalib/paper: LinearLR from 1.0 to 0.4 of the learning rate over 25000 iterations


def affine_subnet(kernel_size: int, channels_ratio: float):
    """The coupling subnet: conv -> ReLU -> conv, 'same' padding, hidden width relative to the input."""

    def build(in_channels: int, out_channels: int) -> nn.Module:
        hidden = max(1, int(in_channels * channels_ratio))
        return nn.Sequential(nn.Conv2d(in_channels, hidden, kernel_size, padding="same"), nn.ReLU(),
                             nn.Conv2d(hidden, out_channels, kernel_size, padding="same"))

    return build


def build_uflow_graph(dims: list[tuple[int, int, int]], flow_steps: int, clamp: float, channels_ratio: float,
                      permute_soft: bool) -> Ff.GraphINN:
    """The U-shaped flow over levels `dims` (C, h, w), finest first. Outputs: one latent per level, finest
    first."""

    def stage(node, tag: str) -> list[Ff.Node]:
        nodes = []
        for step in range(flow_steps):
            # 3x3 and 1x1 subnets alternate, as in anomalib and the paper.
            # FrEIA's AllInOneBlock, hard permutation as a gather (components/fast_flow.py).
            nodes.append(Ff.Node(node, PermutingAllInOneBlock, {
                "subnet_constructor": affine_subnet(3 if step % 2 == 0 else 1, channels_ratio),
                "affine_clamping": clamp, "permute_soft": permute_soft}, name=f"flow{tag}_step{step}"))
            node = nodes[-1]
        return nodes

    inputs = [Ff.InputNode(*d, name=f"input{i}") for i, d in enumerate(dims)]
    nodes, outputs = [], []
    current = inputs[-1]
    for level in reversed(range(1, len(dims))):
        flows = stage(current, str(level))
        channels = flows[-1].output_dims[0][0]
        up_channels = channels // 8 * 4  # half of the volume (rounded to a multiple of 4) goes up a level
        split = Ff.Node(flows[-1], Fm.Split, {"section_sizes": (up_channels, channels - up_channels), "dim": 0},
                        name=f"split{level}")
        outputs.append(Ff.OutputNode(split.out1, name=f"latent{level}"))
        up = Ff.Node(split.out0, Fm.IRevNetUpsampling, {}, name=f"up{level}")
        current = Ff.Node([inputs[level - 1].out0, up.out0], Fm.Concat, {"dim": 0}, name=f"cat{level - 1}")
        nodes.extend([*flows, split, up, current])
    flows = stage(current, "0")
    nodes.extend(flows)
    outputs.append(Ff.OutputNode(flows[-1], name="latent0"))
    return Ff.GraphINN(inputs + nodes + outputs[::-1])


class UflowHead(nn.Module):
    """The trainable part: per-level LayerNorm over (C, h, w) and the U-shaped flow."""

    def __init__(self, dims: list[tuple[int, int, int]], flow_steps: int, clamp: float, channels_ratio: float,
                 permute_soft: bool):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(list(d), elementwise_affine=True) for d in dims)
        self.flow = build_uflow_graph(dims, flow_steps, clamp, channels_ratio, permute_soft)

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        normed = [norm(f.contiguous()) for norm, f in zip(self.norms, features)]
        z, log_jac = self.flow(normed)
        return (list(z) if isinstance(z, (list, tuple)) else [z]), log_jac


@register_model
class Uflow(AnomalyModel):
    name = "uflow"
    # anomalib's default is "mcait" (two CaiT transformers at 448 px), not a timm feature backbone;
    # resnet18 with layer1..3 is anomalib's other tested extractor and the default here.
    default_backbone = "resnet18"
    default_layers = ("layer1", "layer2", "layer3")
    # anomalib's defaults. lr is a setting here (anomalib hard-codes Adam(lr=1e-3, weight_decay=1e-5)).
    # anomaly_map_mode is this project's: "likelihood" (anomalib's map) or "nfa" (-log10 NFA, threshold 0).
    # loss_z_reduction: "batch_sum" is anomalib's UFlowLoss (the 0.5 ||z||^2 term summed over levels AND the
    # batch, minus the batch mean of log|det J|: the z-term weighs B times the log-det); "per_sample" is
    # this project's earlier loss (both terms averaged per sample), kept as a setting.
    defaults = {"flow_steps": 4, "permute_soft": False, "affine_clamp": 2.0, "affine_subnet_channels_ratio": 1.0,
                "lr": 1e-3, "anomaly_map_mode": "likelihood", "nfa_window_size": 7, "nfa_probability_thr": 0.5,
                "loss_z_reduction": "batch_sum"}
    settings_added_later = {"loss_z_reduction": "per_sample"}
    default_epochs = 200  # examples/configs/model/uflow.yaml (early stopping on pixel AUROC, patience 20)
    default_patience = 20  # anomalib's EarlyStopping patience for U-Flow
    has_frozen_part = True
    needs_images_with_frozen = False
    test_preset = {"flow_steps": 2, "affine_subnet_channels_ratio": 0.5}  # tests/test_zoo.py: a tiny offline instance
    search_space = {
        "lr": {"loguniform": [1e-4, 3e-3]},
        "flow_steps": {"choice": [2, 4, 6]},
        "epochs": {"randint": [5, 30]},
    }

    def __init__(self, backbone: str | None = None, layers: Iterable[str] | None = None, **kwargs):
        check_layers(self.name, backbone or self.default_backbone, list(layers) if layers else None, _NEED)
        super().__init__(backbone, layers, **kwargs)
        s = self.settings
        self._check_setting("flow_steps", is_int(s["flow_steps"], 1), "an integer >= 1")
        self._check_setting("permute_soft", isinstance(s["permute_soft"], bool), "true or false")
        self._check_setting("affine_clamp", is_number(s["affine_clamp"], 0, low_open=True), "a number > 0")
        self._check_setting("affine_subnet_channels_ratio",
                            is_number(s["affine_subnet_channels_ratio"], 0, low_open=True), "a number > 0")
        self._check_setting("lr", is_number(s["lr"], 0, low_open=True), "a number > 0")
        self._check_setting("anomaly_map_mode", s["anomaly_map_mode"] in ("likelihood", "nfa"),
                            "'likelihood' or 'nfa'")
        self._check_setting("loss_z_reduction", s["loss_z_reduction"] in ("batch_sum", "per_sample"),
                            "'batch_sum' (anomalib's) or 'per_sample'")
        self._check_setting("nfa_window_size", is_int(s["nfa_window_size"], 3), "an integer >= 3")
        self._check_setting("nfa_probability_thr", is_number(s["nfa_probability_thr"], 0, 1, low_open=True)
                            and s["nfa_probability_thr"] < 1, "a number in (0, 1)")
        extractor = self.feature_extractor
        strides = [extractor.strides[layer] for layer in self.layers]
        sides = [feature_side(self.image_size, stride) for stride in strides]
        halving = all(a == 2 * b for a, b in zip(sides, sides[1:]))
        if not halving or self.image_size % strides[-1] or min(sides) < 1:
            raise geometry_error(self.name, self.backbone_name, self.layers, self.image_size,
                                 f"feature maps of sides {sides} (strides {strides})", _NEED)
        dims = [(extractor.channels[layer], side, side) for layer, side in zip(self.layers, sides)]
        with seeded(self.seed):
            self.head = UflowHead(dims, s["flow_steps"], float(s["affine_clamp"]),
                                  float(s["affine_subnet_channels_ratio"]), s["permute_soft"])

    def frozen_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.feature_extractor(images)

    def latents(self, images: torch.Tensor | None, frozen: dict[str, torch.Tensor] | None = None,
                head: nn.Module | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per level (finest first): z (B, C', h, w), and log|det J| (B,)."""
        features = frozen if frozen is not None else self.frozen_features(images)
        head = self.head if head is None else head
        return head([features[layer] for layer in self.layers])

    def forward(self, images: torch.Tensor | None, frozen: dict[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor] | AnomalyOutput:
        z, log_jac = self.latents(images, frozen)
        if self.training:
            return {"loss": self.loss(z, log_jac, self.settings["loss_z_reduction"])}
        if self.settings["anomaly_map_mode"] == "nfa":
            anomaly_map = self.minus_log10_nfa(z)
        else:
            likelihoods = [self.upsample(torch.exp(-0.5 * zi.pow(2).mean(dim=1, keepdim=True))) for zi in z]
            anomaly_map = 1 - torch.stack(likelihoods, dim=-1).mean(dim=-1)[:, 0]
        return AnomalyOutput(score=anomaly_map.amax(dim=(-2, -1)), anomaly_map=anomaly_map)

    # -- the unsupervised threshold ----------------------------------------------------------------
    def minus_log10_nfa(self, z: list[torch.Tensor]) -> torch.Tensor:
        return nfa.minus_log10_nfa(z, self.image_size, window_size=self.settings["nfa_window_size"],
                                   probability_thr=float(self.settings["nfa_probability_thr"]))

    def label_free_threshold(self, epsilon: float = 1.0) -> float | None:
        """The threshold on this model's scores and maps that needs no labels: -log10(epsilon) when they
        are -log10 NFA (anomaly_map_mode="nfa"), else None (use F1 or a normal quantile)."""
        return nfa.nfa_threshold(epsilon) if self.settings["anomaly_map_mode"] == "nfa" else None

    @torch.no_grad()
    def segment(self, images: torch.Tensor, epsilon: float = 1.0) -> nfa.NfaDecision:
        """Label-free segmentation and image decision of `images` (whatever the map mode)."""
        z, _ = self.latents(images)
        return nfa.decide(self.minus_log10_nfa(z), epsilon)

    # -- training ----------------------------------------------------------------------------------
    @staticmethod
    def loss(z: list[torch.Tensor], log_jac: torch.Tensor, z_reduction: str = "batch_sum") -> torch.Tensor:
        """"batch_sum", anomalib's UFlowLoss: sum over levels and the batch of 0.5 * ||z||^2, minus the batch
        mean of log|det J|. "per_sample": the batch mean of (sum over levels of 0.5 * ||z||^2 - log|det J|).

        Under DDP the runner averages gradients of a per-sample-mean loss weighted by each worker's share, so
        "batch_sum" is written as the batch mean of (B * lpz_i - log|det J_i|) with B the global batch (this
        worker's batch x the world size): equal to anomalib's loss in one process, and N workers x b take the
        step one worker x N*b takes (an epoch's last, uneven batch counted as even)."""
        lpz = sum(0.5 * zi.pow(2).sum(dim=(1, 2, 3)) for zi in z)
        if z_reduction == "per_sample":
            return (lpz - log_jac).mean()
        from ... import distributed

        global_batch = lpz.shape[0] * distributed.world_size()
        return (global_batch * lpz - log_jac).mean()

    def configure_optimizers(self):
        lr = float(self.settings["lr"])
        params = [p for p in self.head.parameters() if p.requires_grad]  # not the fixed permutations
        optimizer = adam([{"params": params, "initial_lr": lr}], lr=lr, weight_decay=1e-5)  # fused: fast_flow.py
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.4,
                                                      total_iters=LR_DECAY_STEPS)
        return optimizer, scheduler

    def recipe(self) -> list[Stage]:
        optimizer, scheduler = self.configure_optimizers()
        # Per-iteration decay, as the paper's code intends (its total_iters counts iterations; Lightning
        # stepping it per epoch in anomalib leaves the rate nearly constant).
        spec = OptimizerSpec("main", optimizer, scheduler, interval="step")
        return [Optimize("train", modules={"head": self.head}, optimizers=[spec], step=self.train_step,
                         epochs=self.default_epochs, main=True, frozen_features=self.frozen_features,
                         needs_images_with_frozen=False)]

    def train_step(self, ctx: StepContext) -> None:
        z, log_jac = self.latents(ctx.batch.get("image"), ctx.batch.get("frozen"), head=ctx.modules["head"])
        ctx.optimize("main", self.loss(z, log_jac, self.settings["loss_z_reduction"]))
