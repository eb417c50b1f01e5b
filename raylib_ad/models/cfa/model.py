"""CFA (Lee et al., 2022, "CFA: Coupled-hypersphere-based Feature Adaptation for Target-Oriented Anomaly
Localization").

Patch descriptors (3x3-averaged features of a frozen pretrained backbone, the deeper layers resized to the
first one's grid, concatenated, then a 1x1 CoordConv) are adapted so that normal descriptors fall inside
small hyperspheres around a memory of normal patch centres. The memory is the mean descriptor of every
grid position over the training images (optionally compressed by k-means), computed once before training.
At test time a patch's score is its softmin-weighted distance to its nearest memory centres.

Frozen-feature cache: applies (the backbone is frozen; the descriptor trains on its features alone).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed
from ...progress import progress_bar
from ..base import AnomalyModel, AnomalyOutput, register_model
from ..components.blur import GaussianBlur2d
from ..components.fast_flow import adam
from ..components.flow_utils import (check_layers, feature_side, full_precision, geometry_error, is_int, is_number,
                                     seeded)
from ..recipe import Collect, Optimize, OptimizerSpec, Stage, StepContext

_NEED = ("feature layers whose first (finest) grid holds at least "
         "(num_nearest_neighbors + num_hard_negative_features) x gamma_c positions")
REPULSION_MARGIN = 0.1  # the paper's alpha
LOSS_SCALE = 1000.0  # anomalib/paper scale the loss by 1000
_RANK_ROWS = 1024  # patches ranked per gemm block in _nearest: bounds memory, not results


class CoordConv1x1(nn.Module):
    """A 1x1 convolution over the input plus two coordinate channels in [-1, 1] (row, column).
    anomalib's CoordConv2d subclasses nn.Conv2d and never uses the inherited weight, which DDP rejects
    as a parameter without gradient; this one owns exactly the convolution it applies."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 2, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        rows = torch.linspace(-1, 1, height, device=x.device, dtype=x.dtype) if height > 1 else x.new_full((1,), -1)
        cols = torch.linspace(-1, 1, width, device=x.device, dtype=x.dtype) if width > 1 else x.new_full((1,), -1)
        coords = torch.stack([rows[:, None].expand(height, width), cols[None, :].expand(height, width)])
        return self.conv(torch.cat([x, coords[None].expand(batch, -1, -1, -1)], dim=1))


class Descriptor(nn.Module):
    """Multi-layer patch features -> target-oriented descriptors (B, C // gamma_d, h, w)."""

    def __init__(self, layers: list[str], in_channels: int, gamma_d: int):
        super().__init__()
        self.layers = layers
        self.coord_conv = CoordConv1x1(in_channels, in_channels // gamma_d)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = [F.avg_pool2d(features[layer].float(), 3, 1, 1) for layer in self.layers]
        size = pooled[0].shape[-2:]
        patches = torch.cat([pooled[0]] + [F.interpolate(p, size=size, mode="bilinear") for p in pooled[1:]], dim=1)
        return self.coord_conv(patches.contiguous())


class _SelectedDistances(torch.autograd.Function):
    """Selected squared distances (B, P, M) between patches f (B, P, C) and memory centres c (N, C), given
    their values and centre indices, with the gradient of |f|^2 + |c|^2 - 2 f.c w.r.t. f: 2 (f - c)."""

    @staticmethod
    def forward(ctx, patches, memory, values, index):
        ctx.save_for_backward(patches, memory, index)
        return values

    @staticmethod
    def backward(ctx, grad):
        patches, memory, index = ctx.saved_tensors
        pulled = torch.zeros_like(patches)
        for m in range(index.shape[-1]):  # one (B, P, C) gather at a time keeps memory small
            pulled += grad[..., m : m + 1] * memory[index[..., m]]
        return 2 * (patches * grad.sum(dim=-1, keepdim=True) - pulled), None, None, None


@register_model
class Cfa(AnomalyModel):
    name = "cfa"
    default_backbone = "wide_resnet50_2"
    default_layers = ("layer1", "layer2", "layer3")
    # anomalib's defaults. lr is a setting here (anomalib hard-codes AdamW(lr=1e-3, weight_decay=5e-4,
    # amsgrad=True)).
    defaults = {"gamma_c": 1, "gamma_d": 1, "num_nearest_neighbors": 3, "num_hard_negative_features": 3,
                "radius": 1e-5, "lr": 1e-3}
    default_epochs = 30  # examples/configs/model/cfa.yaml (early stopping on pixel AUROC, patience 5)
    default_patience = 5  # anomalib's EarlyStopping patience for CFA
    has_frozen_part = True
    needs_images_with_frozen = False
    test_preset = {"lr": 1e-4}  # tests/test_zoo.py: a tiny offline instance
    search_space = {
        "lr": {"loguniform": [1e-4, 3e-3]},
        "gamma_d": {"choice": [1, 2, 4]},
        "epochs": {"randint": [3, 30]},
    }

    def __init__(self, backbone: str | None = None, layers: Iterable[str] | None = None, **kwargs):
        check_layers(self.name, backbone or self.default_backbone, list(layers) if layers else None, _NEED)
        super().__init__(backbone, layers, **kwargs)
        s = self.settings
        for key in ("gamma_c", "gamma_d", "num_nearest_neighbors"):
            self._check_setting(key, is_int(s[key], 1), "an integer >= 1")
        self._check_setting("num_hard_negative_features", is_int(s["num_hard_negative_features"], 0),
                            "an integer >= 0")
        self._check_setting("radius", is_number(s["radius"], 0), "a number >= 0")
        self._check_setting("lr", is_number(s["lr"], 0, low_open=True), "a number > 0")
        channels = sum(self.feature_extractor.channels.values())
        self._check_setting("gamma_d", s["gamma_d"] <= channels,
                            f"an integer in [1, {channels}] (the descriptor has {channels} input channels)")
        side = feature_side(self.image_size, self.feature_extractor.strides[self.layers[0]])
        self.grid = (side, side)
        neighbours = s["num_nearest_neighbors"] + s["num_hard_negative_features"]
        if (side * side) // s["gamma_c"] < max(neighbours, 1):
            raise geometry_error(self.name, self.backbone_name, self.layers, self.image_size,
                                 f"a {side}x{side} grid, {(side * side) // s['gamma_c']} memory centres with "
                                 f"gamma_c={s['gamma_c']}", f"{_NEED} = {neighbours * s['gamma_c']}")
        with seeded(self.seed):
            self.descriptor = Descriptor(self.layers, channels, s["gamma_d"])
        self.blur = GaussianBlur2d(sigma=4.0)
        self.register_buffer("memory_bank", torch.empty(0))  # (N, C') centres, set by init_memory

    def frozen_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.feature_extractor(images)

    # -- memory ------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_memory(self, batches: Iterable[torch.Tensor], progress: bool = False) -> None:
        """The mean descriptor per grid position over all training images (anomalib's running mean of
        batch means equals it when batches are equal). Sums and counts are summed across workers in
        float64, so 1 and N workers give the same memory; k-means (gamma_c > 1) runs on rank 0 and is
        broadcast."""
        total, count = None, torch.zeros(1, dtype=torch.float64)
        for images in progress_bar(batches, desc="cfa memory", enabled=progress):
            with torch.no_grad():
                descriptors = self.descriptor(self.frozen_features(images.to(self.device))).double()
            total = descriptors.sum(dim=0) if total is None else total + descriptors.sum(dim=0)
            count += descriptors.shape[0]
        if total is None:  # an empty shard still joins the reduction
            total = torch.zeros(self.descriptor.coord_conv.conv.out_channels, *self.grid, dtype=torch.float64)
        total = distributed.all_reduce_sum(total.cpu())
        count = distributed.all_reduce_sum(count)
        if float(count) == 0:
            raise RuntimeError("cfa: no training images to initialise the memory from")
        mean = (total / count).float()
        centres = mean.flatten(1).T.contiguous()  # (h*w, C')
        gamma_c = int(self.settings["gamma_c"])
        if gamma_c > 1:
            if distributed.rank() == 0:
                centres = self._kmeans(centres, (self.grid[0] * self.grid[1]) // gamma_c)
            centres = distributed.broadcast(centres)
        self.memory_bank = centres.to(self.device)  # (N, C'); anomalib keeps the transpose

    def _kmeans(self, points: torch.Tensor, clusters: int) -> torch.Tensor:
        from sklearn.cluster import KMeans  # only for gamma_c > 1

        fitted = KMeans(n_clusters=clusters, max_iter=3000, random_state=self.seed, n_init="auto").fit(points.numpy())
        return torch.from_numpy(fitted.cluster_centers_).float()

    # -- distances, scores, loss -------------------------------------------------------------------
    def distances(self, descriptors: torch.Tensor) -> torch.Tensor:
        """(B, C', h, w) -> (B, h*w, N) squared distances to every memory centre."""
        patches, memory = self._patches_and_memory(descriptors)
        with full_precision(patches):  # |f|^2 + |c|^2 - 2 f.c cancels badly in bf16
            return patches.pow(2).sum(dim=2, keepdim=True) + memory.pow(2).sum(dim=1) - 2 * patches @ memory.T

    def _patches_and_memory(self, descriptors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.memory_bank.numel() == 0:
            raise RuntimeError("CFA's memory is not initialised: run its recipe (init_memory) or load a model")
        return descriptors.flatten(2).transpose(1, 2).float(), self.memory_bank.float()  # (B, h*w, C'), (N, C')

    @torch.no_grad()
    def _nearest(self, descriptors: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The `count` smallest squared distances of each patch (B, h*w, count), ascending, and the indices
        of their centres: topk of distances(), up to float rounding. |f|^2 is the same for all centres of a
        patch, so the ranking runs on |c|^2 - 2 f.c, one gemm that starts from |c|^2 (no other pass over the
        (B, h*w, N) matrix), and |f|^2 is added to the `count` selected values only. Measured (lite0, 256
        px, 1 thread): the full-matrix sum, difference, clamp and sqrt took ~60% of CFA's scoring time."""
        patches, memory = self._patches_and_memory(descriptors)
        batch, positions, channels = patches.shape
        rows = patches.reshape(batch * positions, channels)
        squared_norms = memory.pow(2).sum(dim=1)
        values, index = [], []
        with full_precision(patches):
            # _RANK_ROWS patches at a time: a (rows, N) block stays small and reused (the full matrix was 1 GB
            # for 16 images at 256 px, its page faults ~20% of the time); the result is the same bit for bit.
            # A traced graph (ONNX export) takes all rows at once: a loop or slice would fix the batch size.
            tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
            for block in [rows] if tracing else rows.split(_RANK_ROWS):
                top = torch.addmm(squared_norms, block, memory.T, alpha=-2).topk(count, largest=False)
                values.append(top.values)
                index.append(top.indices)
            values = torch.cat(values).view(batch, positions, count) + patches.pow(2).sum(dim=2, keepdim=True)
        return values, torch.cat(index).view(batch, positions, count)

    def nearest_distances(self, descriptors: torch.Tensor, count: int) -> torch.Tensor:
        """(B, h*w, count) the `count` smallest squared distances of each patch, ascending, with gradient
        to the descriptors: distances(...).topk(count, largest=False).values, forward and backward, up to
        float rounding, but autograd never holds the (B, h*w, N) matrix: the ranking runs without gradient,
        and the gradient of d = |f|^2 + |c|^2 - 2 f.c, 2 (f - c), is applied for the selected centres only
        (measured: the full-matrix backward was most of a training step)."""
        values, index = self._nearest(descriptors.detach(), count)
        patches, memory = self._patches_and_memory(descriptors)
        return _SelectedDistances.apply(patches, memory, values, index)

    def loss(self, distance: torch.Tensor, *, nearest: bool = False) -> torch.Tensor:
        """anomalib's CfaLoss: attract the K nearest centres inside radius^2, repel the hard negatives (the
        last K+J-J of the K+J nearest) beyond radius^2 + margin; scaled by 1000. `distance`: all squared
        distances (B, h*w, N), or (nearest=True) the K+J smallest ascending (nearest_distances)."""
        k, j = int(self.settings["num_nearest_neighbors"]), int(self.settings["num_hard_negative_features"])
        r2 = float(self.settings["radius"]) ** 2
        nearest = distance if nearest else distance.topk(k + j, largest=False).values
        attraction = F.relu(nearest[:, :, :k] - r2).mean()
        repulsion = F.relu(r2 - nearest[:, :, j:] - REPULSION_MARGIN).mean()
        return (attraction + repulsion) * LOSS_SCALE

    def descriptor_loss(self, descriptors: torch.Tensor) -> torch.Tensor:
        """loss(distances(descriptors)), without the full distance matrix in autograd."""
        count = int(self.settings["num_nearest_neighbors"]) + int(self.settings["num_hard_negative_features"])
        return self.loss(self.nearest_distances(descriptors, count), nearest=True)

    def forward(self, images: torch.Tensor | None, frozen: dict[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor] | AnomalyOutput:
        features = frozen if frozen is not None else self.frozen_features(images)
        descriptors = self.descriptor(features)
        if self.training:
            return {"loss": self.descriptor_loss(descriptors)}
        k = int(self.settings["num_nearest_neighbors"])
        # The K smallest squared distances, then clamp (the expanded form can dip below 0 by rounding, and
        # sqrt would give NaN) and sqrt: both monotone, so this is anomalib's topk of the clamped sqrt of
        # all distances, with two passes over K instead of N values per patch.
        nearest = self._nearest(descriptors, k)[0].clamp_min(0).sqrt()  # (B, h*w, K)
        score = F.softmin(nearest, dim=-1)[:, :, 0] * nearest[:, :, 0]
        score_map = score.view(-1, 1, *descriptors.shape[-2:])
        # Bilinear upsampling then the Gaussian blur, as two small matrix products (equal up to rounding).
        anomaly_map = self.blur.upsample_and_blur(score_map, (self.image_size, self.image_size))[:, 0]
        return AnomalyOutput(score=anomaly_map.amax(dim=(-2, -1)), anomaly_map=anomaly_map)

    # -- training ----------------------------------------------------------------------------------
    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, None]:
        optimizer = adam(self.descriptor.parameters(), decoupled=True, lr=float(self.settings["lr"]),
                         weight_decay=5e-4, amsgrad=True)  # fused AdamW: components/fast_flow.py
        return optimizer, None

    def recipe(self) -> list[Stage]:
        optimizer, _ = self.configure_optimizers()
        # The memory is collected with the freshly initialised descriptor (seeded: identical on every
        # worker), then stays fixed while the descriptor adapts to it. Only the descriptor is a DDP module,
        # so the (large) memory buffer is never broadcast.
        return [Collect("memory", self.init_memory),
                Optimize("train", modules={"descriptor": self.descriptor}, epochs=self.default_epochs, main=True,
                         optimizers=[OptimizerSpec("main", optimizer)], step=self.train_step,
                         frozen_features=self.frozen_features, needs_images_with_frozen=False)]

    def train_step(self, ctx: StepContext) -> None:
        # The runner keeps the model in eval mode (frozen parts) and only the descriptor in train mode,
        # so the loss is computed here rather than through forward()'s train-mode branch.
        frozen = ctx.batch.get("frozen")
        features = frozen if frozen is not None else self.frozen_features(ctx.batch["image"])
        ctx.optimize("main", self.descriptor_loss(ctx.modules["descriptor"](features)))
