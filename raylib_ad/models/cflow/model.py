"""C-Flow (Gudovskiy et al., WACV 2022, "CFLOW-AD: Real-Time Unsupervised Anomaly Detection with
Localization via Conditional Normalizing Flows").

A frozen pretrained encoder gives feature maps at a few scales. Per scale, a conditional normalizing flow
(FrEIA AllInOneBlocks with fully connected subnets) maps each position's feature vector, conditioned on a
2D sinusoidal encoding of the position, to a standard normal. It is trained on "fibers": the positions of
a batch are shuffled and cut into small fiber batches, and every fiber batch takes its own optimizer step.
A position's anomaly score is its low likelihood, normalised per scale and summed over scales.

Frozen-feature cache: applies (the encoder is frozen and the decoders train on its features alone).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from FrEIA.framework import SequenceINN
from torch import nn

from ... import distributed
from ..base import AnomalyModel, AnomalyOutput, register_model
from ..components.fast_flow import PermutingAllInOneBlock, adam
from ..components.flow_utils import check_layers, full_precision, is_int, is_number, seeded
from ..recipe import Calibrate, Optimize, OptimizerSpec, Stage, StepContext

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_EVAL_ROWS = 1 << 16  # positions per decoder call at inference: bounds memory, not results


def positional_encoding_2d(channels: int, height: int, width: int) -> torch.Tensor:
    """(channels, height, width) sinusoidal encoding: the first half of the channels encodes the column,
    the second half the row, each as interleaved sin/cos at geometrically spaced frequencies."""
    half = channels // 2
    freq = torch.exp(torch.arange(0, half, 2, dtype=torch.float32) * -(math.log(1e4) / half))
    cols = torch.arange(width, dtype=torch.float32)[:, None] * freq  # (W, half/2)
    rows = torch.arange(height, dtype=torch.float32)[:, None] * freq  # (H, half/2)
    encoding = torch.zeros(channels, height, width)
    encoding[0:half:2] = torch.sin(cols).T[:, None, :].expand(-1, height, -1)
    encoding[1:half:2] = torch.cos(cols).T[:, None, :].expand(-1, height, -1)
    encoding[half::2] = torch.sin(rows).T[:, :, None].expand(-1, -1, width)
    encoding[half + 1 :: 2] = torch.cos(rows).T[:, :, None].expand(-1, -1, width)
    return encoding


def _fc_subnet(in_features: int, out_features: int) -> nn.Module:
    # anomalib's subnet: Linear -> ReLU -> Linear with a hidden width of twice the input.
    return nn.Sequential(nn.Linear(in_features, 2 * in_features), nn.ReLU(),
                         nn.Linear(2 * in_features, out_features))


def cflow_decoder(channels: int, condition: int, blocks: int, clamp: float, permute_soft: bool) -> SequenceINN:
    """One scale's conditional flow over C-dimensional feature vectors."""
    flow = SequenceINN(channels)
    for _ in range(blocks):
        # FrEIA's AllInOneBlock with its hard permutation as a gather (components/fast_flow.py).
        flow.append(PermutingAllInOneBlock, cond=0, cond_shape=(condition,), subnet_constructor=_fc_subnet,
                    affine_clamping=clamp, global_affine_type="SOFTPLUS", permute_soft=permute_soft)
    return flow


def fiber_loss(decoder: nn.Module, embedding: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """anomalib's C-Flow loss on a fiber batch: mean of -log sigmoid(per-dimension log-likelihood)."""
    return -F.logsigmoid(per_dim_log_prob(decoder, embedding, condition)).mean()


def per_dim_log_prob(decoder: nn.Module, embedding: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """(N,) log-likelihood of N feature vectors under the flow and a standard normal, divided by C."""
    with full_precision(embedding):  # small matrices: bf16 would cost precision and save little
        z, log_jac = decoder(embedding.float(), c=[condition.float()])
    channels = embedding.shape[1]
    log_prob = -channels * _LOG_SQRT_2PI - 0.5 * z.float().pow(2).sum(dim=1) + log_jac.float()
    return log_prob / channels


@register_model
class Cflow(AnomalyModel):
    name = "cflow"
    default_backbone = "wide_resnet50_2"
    default_layers = ("layer2", "layer3", "layer4")
    # anomalib's defaults (Cflow): Adam(lr) over the decoders, no scheduler, no clipping.
    defaults = {"fiber_batch_size": 64, "decoder": "freia-cflow", "condition_vector": 128,
                "coupling_blocks": 8, "clamp_alpha": 1.9, "permute_soft": False, "lr": 1e-4}
    default_epochs = 50  # examples/configs/model/cflow.yaml (early stopping on pixel AUROC, patience 2)
    default_patience = 2  # anomalib's EarlyStopping patience for C-Flow
    has_frozen_part = True  # the encoder is frozen: its features are cached
    needs_images_with_frozen = False
    test_preset = {"condition_vector": 8, "coupling_blocks": 2, "fiber_batch_size": 16}  # tests/test_zoo.py: a tiny offline instance
    search_space = {
        "lr": {"loguniform": [3e-5, 1e-3]},
        "coupling_blocks": {"choice": [4, 8]},
        "epochs": {"randint": [3, 20]},
    }

    def __init__(self, backbone: str | None = None, layers: Iterable[str] | None = None, **kwargs):
        check_layers(self.name, backbone or self.default_backbone, list(layers) if layers else None,
                     "one or more feature layers of that backbone")
        super().__init__(backbone, layers, **kwargs)
        s = self.settings
        self._check_setting("fiber_batch_size", is_int(s["fiber_batch_size"], 1), "an integer >= 1")
        self._check_setting("decoder", s["decoder"] == "freia-cflow", "'freia-cflow' (the only decoder)")
        self._check_setting("condition_vector", is_int(s["condition_vector"], 4) and s["condition_vector"] % 4 == 0,
                            "a positive multiple of 4 (sin/cos encodings of row and column)")
        self._check_setting("coupling_blocks", is_int(s["coupling_blocks"], 1), "an integer >= 1")
        self._check_setting("clamp_alpha", is_number(s["clamp_alpha"], 0, low_open=True), "a number > 0")
        self._check_setting("permute_soft", isinstance(s["permute_soft"], bool), "true or false")
        self._check_setting("lr", is_number(s["lr"], 0, low_open=True), "a number > 0")
        with seeded(self.seed):
            self.decoders = nn.ModuleList(
                cflow_decoder(self.feature_extractor.channels[layer], s["condition_vector"], s["coupling_blocks"],
                              float(s["clamp_alpha"]), s["permute_soft"]) for layer in self.layers)
        # Per-scale maximum of the per-dimension log-likelihood over the training images (the Calibrate
        # stage). anomalib normalises each scale by its maximum over the current test batch instead, which
        # makes an image's score depend on the other images in its batch; before calibration (validation
        # during training) that is what this model does too.
        self.register_buffer("log_prob_max", torch.empty(0))

    # -- features -------------------------------------------------------------------------------------
    def frozen_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.feature_extractor(images)

    def fibers(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) -> embeddings (B*h*w, C) and their positional conditions (B*h*w, P)."""
        batch, channels, height, width = feature.shape
        encoding = positional_encoding_2d(self.settings["condition_vector"], height, width)
        condition = encoding.to(feature.device, feature.dtype).permute(1, 2, 0).reshape(1, height * width, -1)
        condition = condition.expand(batch, -1, -1).reshape(batch * height * width, -1)
        embedding = feature.permute(0, 2, 3, 1).reshape(batch * height * width, channels)
        return embedding, condition

    def layer_log_prob(self, index: int, feature: torch.Tensor, decoder: nn.Module | None = None) -> torch.Tensor:
        """(B, h, w) per-dimension log-likelihood of every position of one scale."""
        decoder = self.decoders[index] if decoder is None else decoder
        embedding, condition = self.fibers(feature)
        parts = [per_dim_log_prob(decoder, embedding[i : i + _EVAL_ROWS], condition[i : i + _EVAL_ROWS])
                 for i in range(0, len(embedding), _EVAL_ROWS)]
        return torch.cat(parts).view(feature.shape[0], *feature.shape[-2:])

    # -- inference ------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor | None, frozen: dict[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor] | AnomalyOutput:
        features = frozen if frozen is not None else self.frozen_features(images)
        if self.training:
            # Plain whole-batch likelihood loss (the runner trains with fiber steps, see train_step).
            total = sum(fiber_loss(self.decoders[i], *self.fibers(features[layer]))
                        for i, layer in enumerate(self.layers))
            return {"loss": total}
        calibrated = self.log_prob_max.numel() == len(self.layers)
        score_map = 0.0
        for i, layer in enumerate(self.layers):
            log_prob = self.layer_log_prob(i, features[layer])
            shift = self.log_prob_max[i] if calibrated else log_prob.max()
            probability = torch.exp(log_prob - shift)[:, None]
            # anomalib: bilinear with align_corners=True, then the scales are added.
            score_map = score_map + F.interpolate(probability, size=(self.image_size, self.image_size),
                                                  mode="bilinear", align_corners=True)
        # Likelihood -> anomaly: anomalib subtracts from the batch maximum; a constant (the number of
        # scales, the maximum on training images) keeps the ranking and makes scores batch-independent.
        anomaly_map = (len(self.layers) - score_map)[:, 0]
        return AnomalyOutput(score=anomaly_map.amax(dim=(-2, -1)), anomaly_map=anomaly_map)

    # -- training -------------------------------------------------------------------------------------
    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        # One Adam over all decoders, as anomalib. A fiber step backpropagates through one decoder only;
        # zero_grad(set_to_none) leaves the others' gradients None, so Adam leaves them untouched.
        params = [p for p in self.decoders.parameters() if p.requires_grad]
        # Fused Adam: same update, ~5x less time per fiber step's optimizer step (components/fast_flow.py).
        return adam(params, lr=float(self.settings["lr"])), None

    def recipe(self) -> list[Stage]:
        optimizer, _ = self.configure_optimizers()
        # Each decoder is its own DDP module: a fiber step's backward reaches every parameter of the
        # decoder it used and none of the others.
        modules = {f"decoder{i}": decoder for i, decoder in enumerate(self.decoders)}
        return [Optimize("train", modules=modules, optimizers=[OptimizerSpec("main", optimizer)],
                         step=self.train_step, epochs=self.default_epochs, main=True,
                         frozen_features=self.frozen_features, needs_images_with_frozen=False),
                Calibrate("log_prob_max", self.calibrate)]

    def train_step(self, ctx: StepContext) -> None:
        """anomalib's fiber training: per scale, shuffle the batch's positions and take one optimizer step
        per fiber batch (the remainder joins the last one).

        Distributed: each of N workers cuts its own positions into fiber batches of fiber_batch_size, and
        DDP averages the N fiber batches of a step: N workers take 1/N of the steps of one process, each on
        N x fiber_batch_size positions. (Cutting fiber_batch_size / N per worker would keep anomalib's step
        count, but a fiber step is so small that its fixed costs, autograd and Adam over the decoder and the
        all-reduce, dominate: 2 workers then train no faster than one; docs/benchmarks.md.) Every worker
        must call backward equally often, so the number of fiber steps is the maximum over workers; a
        worker with fewer positions (a shorter last batch) cycles through its own."""
        frozen = ctx.batch.get("frozen")
        features = frozen if frozen is not None else self.frozen_features(ctx.batch["image"])
        fiber = max(1, int(self.settings["fiber_batch_size"]))
        total, count = 0.0, 0
        for i, layer in enumerate(self.layers):
            embedding, condition = self.fibers(features[layer].detach())
            rows = embedding.shape[0]
            local_steps = rows // fiber
            steps = int(distributed.all_reduce_max(torch.tensor([max(local_steps, 1)]))[0])
            order = torch.randperm(rows, generator=ctx.generator, device=ctx.generator.device).to(embedding.device)
            decoder = ctx.modules[f"decoder{i}"]
            for step in range(steps):
                if step < local_steps - 1:
                    index = order[step * fiber : (step + 1) * fiber]
                elif step == local_steps - 1:
                    index = order[step * fiber :]
                else:
                    start = (step * fiber) % rows
                    index = order[(torch.arange(min(fiber, rows), device=order.device) + start) % rows]
                total += ctx.optimize("main", fiber_loss(decoder, embedding[index], condition[index]))
                count += 1
        ctx.log(loss=total / max(count, 1))

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor], progress: bool = False) -> None:
        """Per-scale maximum per-dimension log-likelihood over the training images, max-reduced across
        workers (exact: every worker ends with the global maximum)."""
        del progress
        maxima = torch.full((len(self.layers),), -math.inf, dtype=torch.float64)
        for images in batches:
            features = self.frozen_features(images.to(self.device))
            for i, layer in enumerate(self.layers):
                maxima[i] = max(maxima[i], float(self.layer_log_prob(i, features[layer]).max()))
        self.log_prob_max = distributed.all_reduce_max(maxima).float().to(self.device)
