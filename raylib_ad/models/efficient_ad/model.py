"""EfficientAD (Batzner et al., WACV 2024, "EfficientAD: Accurate Visual Anomaly Detection at
Millisecond-Level Latencies"), as anomalib implements it.

A frozen teacher PDN (patch description network), a student PDN with twice its channels and an
autoencoder. The student's first half learns the teacher's (channel-normalized) features on normal
images, the loss restricted to the hardest 0.1 % of feature values, while a penalty keeps its output
small on other images; the autoencoder learns the teacher's features of augmented images and the
student's second half learns the autoencoder's output. Anomaly map: the average of the
student-teacher map and the student-autoencoder map, each scaled by its 90 % and 99.5 % quantiles on
normal images.

Recipe: [distill (only with self_distilled_teacher)] -> collect teacher channel statistics ->
optimize student + autoencoder -> calibrate map quantiles (see teacher.py for the teacher's sources).

Defaults are anomalib's, with the files anomalib downloads (raylib_ad/assets.py; fetched on the driver
before any worker starts, an error naming the file, its address and the fallback setting when offline):
- the teacher: anomalib's pretrained PDN (small or medium). Fallback `self_distilled_teacher=true`: the
  teacher is distilled first from `distill_backbone` on the training images (or `distill_dir`);
- the penalty images: Imagenette with anomalib's 2x zoom crop (penalty.py). `penalty_dir=FOLDER` takes
  other images through the same transform; fallback `no_penalty=true`: no penalty term.

Batch size. anomalib trains with batch size 1 and refuses any other. Here the runner's --batch-size is
the global batch, split over workers (each takes batch_size // N). Every loss term is a mean over
images of anomalib's single-image term (the hard-feature threshold is taken per image, one penalty
image is drawn per training image), so a worker batch of b is the average of b anomalib steps and the
stage declares loss_reduction="mean": N workers x b images take exactly the step one process takes on
N x b images, and --batch-size 1 on one worker is anomalib's training. DDP cannot split a batch of 1:
with N workers the smallest global batch is N (one image each), i.e. N anomalib steps averaged into
one optimizer step, with the same lr and step budget. To keep anomalib's batch by default the runner
uses the per-model default (`default_batch_size = 1` below, at least 1 image per worker when
--batch-size is not given).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF

from ... import distributed
from ...errors import ConfigError
from ...progress import progress_bar
from ..base import AnomalyModel, AnomalyOutput, register_model
from ..components.quantile import distributed_quantiles
from ..recipe import Calibrate, Collect, ExtraStream, Optimize, OptimizerSpec, Stage, StepContext
from .networks import MIN_IMAGE_SIZE, PDN, AutoEncoder
from .penalty import PenaltyImages
from .teacher import (TEACHER_ASSET, DistillationTarget, anomalib_teacher_path, list_images, load_teacher,
                      local_anomalib_teacher, save_teacher)

PENALTY_ASSET = "imagenette"  # raylib_ad/assets.py

ANOMALIB_MAX_STEPS = 70000  # anomalib's trainer budget (examples/configs/model/efficient_ad.yaml)
# The original pretraining script: Adam(lr 1e-4, weight decay 1e-5), 60000 steps of 16 images, target
# statistics from 10000 images (here: the first distill_stats_steps steps), grayscale with p 0.1.
DISTILL_LR, DISTILL_WEIGHT_DECAY, DISTILL_GRAYSCALE = 1e-4, 1e-5, 0.1
PENALTY_GRAYSCALE = 0.3  # anomalib's RandomGrayscale(p=0.3) on the penalty images
HARD_QUANTILE = 0.999
MAP_QUANTILES = (0.9, 0.995)


def _number(value, low: float, *, low_open: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return low < value if low_open else low <= value


def _integer(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _optional_path(value) -> bool:
    return value is None or (isinstance(value, str) and value != "")


def hard_feature_loss(distance: torch.Tensor, quantile: float = HARD_QUANTILE) -> torch.Tensor:
    """anomalib's hard-feature loss per image (mean of the values at or above the image's 0.999
    quantile), averaged over images. Exact torch.quantile interpolation through topk, with no 2**24
    subsampling (anomalib subsamples above that size: never at 256 px)."""
    flat = distance.flatten(1).float()
    n = flat.shape[1]
    position = quantile * (n - 1)
    low = math.floor(position)
    top = torch.topk(flat, k=min(n, n - low), dim=1).values  # sorted descending; last = order stat `low`
    lower = top[:, -1]
    upper = top[:, -2] if top.shape[1] > 1 else lower
    threshold = lower + (position - low) * (upper - lower)
    mask = flat >= threshold[:, None]
    per_image = (flat * mask).sum(1) / mask.sum(1).clamp_min(1)
    return per_image.mean()


def random_grayscale(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomGrayscale per image (ITU-R 601 luma, 3 channels), drawn from `generator`."""
    pick = torch.rand(images.shape[0], generator=generator, device=generator.device) < p
    if not bool(pick.any()):
        return images
    gray = TF.rgb_to_grayscale(images, num_output_channels=3)
    return torch.where(pick.to(images.device).view(-1, 1, 1, 1), gray, images)


def random_color_jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """anomalib's autoencoder augmentation, per image: one of brightness, contrast, saturation with a
    factor drawn from U(0.8, 1.2)."""
    factors = 0.8 + 0.4 * torch.rand(images.shape[0], generator=generator, device=generator.device)
    kinds = torch.randint(0, 3, (images.shape[0],), generator=generator, device=generator.device)
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    return torch.stack([adjust[int(k)](image, float(f)) for image, k, f in zip(images, kinds, factors)])


class _DecayAt:
    """lr factor 0.1 from step `at` on (StepLR with one decay). A callable object, not a lambda, so
    that LambdaLR's state dict keeps `at` across a resume."""

    def __init__(self, at: int):
        self.at = int(at)

    def __call__(self, step: int) -> float:
        return 0.1 if step >= self.at else 1.0


@register_model
class EfficientAd(AnomalyModel):
    name = "efficient_ad"
    default_backbone = None  # the PDNs are not timm backbones (distill_backbone is a setting)
    # Inputs in [0, 1]: the networks apply ImageNet normalization themselves (anomalib's pre-processor
    # has no Normalize for EfficientAD), which also lets the augmentations work on plain pixel values.
    input_mean = (0.0, 0.0, 0.0)
    input_std = (1.0, 1.0, 1.0)
    default_epochs = 1000  # anomalib's max_epochs; its max_steps (70000) is the budget that ends first
    default_batch_size = 1  # anomalib's; with N workers the global batch is N, 1 image per worker (docstring)
    defaults = {
        "model_size": "small", "teacher_out_channels": 384, "lr": 1e-4, "weight_decay": 1e-5,
        "padding": False, "pad_maps": True,
        "penalty_dir": None,  # default: Imagenette (anomalib's, downloaded); or a folder of images
        "no_penalty": False,  # fallback: no penalty term (not anomalib's method)
        "teacher": None,  # a teacher file saved earlier (teacher.py); also --weights; default: anomalib's
        "self_distilled_teacher": False,  # fallback: distil the teacher first (not anomalib's teacher)
        "distill_dir": None,  # images to distil from (implies self_distilled_teacher); default: the training images
        "distill_backbone": "tf_efficientnet_lite0",
        "distill_steps": 60000,  # the original pretraining script's
        "distill_stats_steps": 625,  # 10000 images at 16 per step, as the original's statistics
        "distill_batch_size": 16,  # per worker, images drawn from distill_dir per step
    }
    test_preset = {"teacher_out_channels": 8, "distill_steps": 2, "distill_stats_steps": 1,  # tests/test_zoo.py: a tiny offline instance
                   "self_distilled_teacher": True, "no_penalty": True}
    search_space = {
        "lr": {"loguniform": [3e-5, 3e-4]},
        "model_size": {"choice": ["small", "medium"]},
        "weight_decay": {"loguniform": [1e-6, 1e-4]},
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        s = self.settings
        self._check_setting("model_size", s["model_size"] in ("small", "medium"), "'small' or 'medium'")
        self._check_setting("teacher_out_channels", _integer(s["teacher_out_channels"], 1), "an integer >= 1")
        self._check_setting("lr", _number(s["lr"], 0, low_open=True), "a number > 0")
        self._check_setting("weight_decay", _number(s["weight_decay"], 0), "a number >= 0")
        for key in ("padding", "pad_maps"):
            self._check_setting(key, isinstance(s[key], bool), "true or false")
        self._check_setting("no_penalty", isinstance(s["no_penalty"], bool),
                            "true (fallback: no penalty term, no Imagenette) or false")
        self._check_setting("self_distilled_teacher", isinstance(s["self_distilled_teacher"], bool),
                            "true (fallback: distil the teacher first, not anomalib's) or false")
        self._check_setting("penalty_dir", _optional_path(s["penalty_dir"]),
                            "a folder of images, or null for Imagenette (anomalib's, downloaded)")
        self._check_setting("teacher", _optional_path(s["teacher"]),
                            "a teacher file, or null for anomalib's pretrained teacher (downloaded)")
        self._check_setting("distill_dir", _optional_path(s["distill_dir"]), "a path or null")
        self._check_setting("distill_backbone", isinstance(s["distill_backbone"], str), "a timm model name")
        self._check_setting("distill_steps", _integer(s["distill_steps"], 1), "an integer >= 1")
        self._check_setting("distill_stats_steps", _integer(s["distill_stats_steps"], 1), "an integer >= 1")
        self._check_setting("distill_batch_size", _integer(s["distill_batch_size"], 1), "an integer >= 1")
        if s["no_penalty"] and s["penalty_dir"]:
            raise ConfigError(f"{self.name}: no_penalty=true and penalty_dir={s['penalty_dir']!r} contradict each "
                              f"other; drop one of them")
        if self.image_size < MIN_IMAGE_SIZE:
            raise ConfigError(f"{self.name}: image_size={self.image_size} is too small; the PDN's 33 x 33 "
                              f"receptive field needs image_size >= {MIN_IMAGE_SIZE}")
        self.out_channels = int(s["teacher_out_channels"])
        with torch.random.fork_rng(devices=[]):  # the same random networks on every worker, from `seed`
            torch.manual_seed(self.seed)
            self.teacher = PDN(self.out_channels, s["model_size"], s["padding"])
            self.student = PDN(2 * self.out_channels, s["model_size"], s["padding"])
            self.ae = AutoEncoder(self.out_channels, s["padding"])
        self.teacher.requires_grad_(False)
        # Fitted statistics; empty placeholders until their stage has run (sized by the fit).
        self.register_buffer("teacher_mean", torch.empty(0))  # (1, C, 1, 1)
        self.register_buffer("teacher_std", torch.empty(0))
        self.register_buffer("map_quantiles", torch.empty(0))  # (qa_st, qb_st, qa_ae, qb_ae)
        # Distillation target statistics (count, sum, sum of squares per channel, float64), summed over
        # workers at every statistics step so a checkpoint taken on rank 0 holds the global sums.
        self.register_buffer("distill_moments", torch.empty(0))
        self._penalty: PenaltyImages | None = None  # the train stage's penalty images (on the worker)
        self.teacher_source = self._load_teacher() if self.pretrained else None

    # -- the teacher -----------------------------------------------------------------------------
    def _load_teacher(self) -> str | None:
        """Load the teacher file (default: anomalib's, downloaded); returns its path, or None (distill)."""
        s = self.settings
        explicit = [p for p in (self.weights, s["teacher"]) if p]
        if len(set(explicit)) > 1:
            raise ConfigError(f"{self.name}: both --weights {self.weights!r} and teacher={s['teacher']!r} name a "
                              f"teacher file; give one")
        if explicit and self._self_distilled(s):
            wish = "self_distilled_teacher=true" if s["self_distilled_teacher"] else f"distill_dir={s['distill_dir']!r}"
            raise ConfigError(f"{self.name}: {wish} asks for a distillation, but a teacher file is given "
                              f"({explicit[0]}); drop one of them")
        if self._self_distilled(s):
            # Distillation ahead: fail now, not in a worker, if the backbone's weights cannot be had.
            from ..components.weights import resolve_weights

            resolve_weights(s["distill_backbone"])
            return None
        path = explicit[0] if explicit else anomalib_teacher_path(s["model_size"])
        load_teacher(self.teacher, path, s["model_size"])
        return str(path)

    @staticmethod
    def _self_distilled(settings: dict) -> bool:
        return bool(settings["self_distilled_teacher"] or settings["distill_dir"])

    @classmethod
    def required_assets(cls, settings: dict, *, pretrained: bool = True, weights: str | None = None) -> list[str]:
        """The files anomalib downloads that these settings need (raylib_ad/assets.py; fetched on the driver)."""
        needed = []
        if (pretrained and not (weights or settings["teacher"]) and not cls._self_distilled(settings)
                and local_anomalib_teacher(settings["model_size"]) is None):
            needed.append(TEACHER_ASSET)
        if not settings["no_penalty"] and not settings["penalty_dir"]:
            needed.append(PENALTY_ASSET)
        return needed

    def penalty_paths(self) -> list[str]:
        """The penalty image files: penalty_dir, else Imagenette from the asset cache (downloaded when absent);
        none with no_penalty."""
        s = self.settings
        if s["no_penalty"]:
            return []
        if s["penalty_dir"]:
            return list_images(s["penalty_dir"], "penalty_dir")
        from ...assets import fetch_asset

        return list_images(str(fetch_asset(PENALTY_ASSET)), "penalty_dir (Imagenette)")

    @property
    def distills(self) -> bool:
        return self.teacher_source is None

    def save_teacher(self, path) -> Any:
        """Write the teacher as safetensors, reusable with teacher=PATH (teacher.py)."""
        return save_teacher(self.teacher, path, self.settings["model_size"])

    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's features normalized by their channel statistics (no gradient)."""
        with torch.no_grad():
            out = self.teacher(images)
            return (out - self.teacher_mean) / self.teacher_std

    # -- recipe ----------------------------------------------------------------------------------
    def recipe(self) -> list[Stage]:
        stages: list[Stage] = [self._distill_stage()] if self.distills else []
        stages.append(Collect("teacher_statistics", self.fit_teacher_statistics))
        stages.append(self._train_stage())
        stages.append(Calibrate("map_quantiles", self.fit_map_quantiles))
        return stages

    def _train_stage(self) -> Optimize:
        params = list(self.student.parameters()) + list(self.ae.parameters())
        optimizer = torch.optim.Adam(params, lr=float(self.settings["lr"]),
                                     weight_decay=float(self.settings["weight_decay"]))
        # anomalib: StepLR(step_size=int(0.95 * steps), gamma=0.1), the paper's decay at 95 % of training.
        # It hands the scheduler to Lightning without an interval, so Lightning steps it once per EPOCH
        # against a step size counted in steps, and the decay never comes; here it is stepped per step,
        # as intended. The decay point is 95 % of the step budget the runner reports (ctx.total_steps)
        # or, until the runner reports one, of anomalib's 70000 steps.
        self._decay = _DecayAt(int(0.95 * ANOMALIB_MAX_STEPS))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._decay)
        # anomalib's penalty images: Imagenette resized to 2S, grayscale with p 0.3, center crop S (a 2x
        # zoom): read by the model itself (penalty.py), since the runner's ExtraStream decodes whole images.
        paths = self.penalty_paths()
        self._penalty = PenaltyImages(paths, self.image_size, self.seed) if paths else None
        return Optimize("train", modules={"student": self.student, "ae": self.ae},
                        optimizers=[OptimizerSpec("main", optimizer, scheduler, interval="step")],
                        step=self.train_step, epochs=self.default_epochs, steps=ANOMALIB_MAX_STEPS,
                        loss_reduction="mean", main=True,
                        frozen_features=lambda images: {"teacher": self.teacher_features(images)},
                        needs_images_with_frozen=True)

    def _distill_stage(self) -> Optimize:
        s = self.settings
        self.teacher.requires_grad_(True)
        optimizer = torch.optim.Adam(self.teacher.parameters(), lr=DISTILL_LR, weight_decay=DISTILL_WEIGHT_DECAY)
        streams = []
        if s["distill_dir"]:
            streams.append(ExtraStream("distill", list_images(s["distill_dir"], "distill_dir"),
                                       int(s["distill_batch_size"])))
        return Optimize("distill", modules={"teacher": self.teacher},
                        optimizers=[OptimizerSpec("distill", optimizer)], step=self.distill_step,
                        steps=int(s["distill_stats_steps"]) + int(s["distill_steps"]), loss_reduction="mean",
                        extra_streams=streams, validate=False)

    # -- distillation ----------------------------------------------------------------------------
    def _target(self, device: torch.device) -> DistillationTarget:
        # Built on first use and kept out of the state dict (object.__setattr__ skips module
        # registration): the backbone is needed only while distilling and is not part of the model.
        target = self.__dict__.get("_distill_target")
        if target is None:
            target = DistillationTarget(self.settings["distill_backbone"], self.out_channels,
                                        pretrained=self.pretrained).to(device)
            object.__setattr__(self, "_distill_target", target)
        return target

    def distill_step(self, ctx: StepContext) -> None:
        """The first distill_stats_steps steps sum the target's channel statistics (over workers); the
        rest train the teacher (padded, as the original) on the normalized target, MSE loss."""
        images = next(ctx.extra["distill"]) if "distill" in ctx.extra else ctx.batch["image"]
        images = random_grayscale(images, DISTILL_GRAYSCALE, ctx.generator)
        target = self._target(images.device)(images).float()
        if ctx.step < int(self.settings["distill_stats_steps"]):
            # A worker whose shard ran out joins the step on a stand-in batch with weight 0: count nothing.
            keep = 0.0 if getattr(ctx, "weight", 1.0) == 0 else 1.0
            moments = keep * torch.stack([torch.full((target.shape[1],), float(target[:, 0].numel()), dtype=torch.float64),
                                   target.double().sum((0, 2, 3)).cpu(), target.double().pow(2).sum((0, 2, 3)).cpu()])
            moments = distributed.all_reduce_sum(moments)
            if self.distill_moments.numel():
                moments = moments + self.distill_moments.cpu()
            self.distill_moments = moments.to(self.teacher_device())
            return
        count, total, squares = self.distill_moments.to(target.device)
        mean = total / count
        std = (squares / count - mean**2).clamp_min(1e-12).sqrt()
        target = ((target - mean.view(1, -1, 1, 1).float()) / std.view(1, -1, 1, 1).float())
        prediction = ctx.modules["teacher"](images, padding=True).float()
        if prediction.shape[-2:] != target.shape[-2:]:  # image sides not divisible by 8
            target = F.interpolate(target, size=prediction.shape[-2:], mode="bilinear", align_corners=False)
        ctx.optimize("distill", F.mse_loss(prediction, target))

    def teacher_device(self) -> torch.device:
        return self.teacher.conv1.weight.device

    # -- teacher statistics (Collect) ------------------------------------------------------------
    def fit_teacher_statistics(self, batches: Iterable[torch.Tensor], progress: bool = False) -> None:
        """anomalib's channel mean and std of the teacher's output over the training images, from sums
        (float64) over every worker's shard: the same statistics one process would compute."""
        self.teacher.requires_grad_(False)  # frozen from here on (it may have been distilled)
        channels = self.out_channels
        sums = torch.zeros(2 * channels + 1, dtype=torch.float64, device=self.teacher_device())
        for images in progress_bar(batches, desc="teacher statistics", enabled=progress):
            out = self.teacher(images.to(self.teacher_device())).double()
            sums[0] += out[:, 0].numel()
            sums[1 : channels + 1] += out.sum((0, 2, 3))
            sums[channels + 1 :] += out.pow(2).sum((0, 2, 3))
        sums = distributed.all_reduce_sum(sums)
        if sums[0] == 0:
            raise RuntimeError("EfficientAD: no training images reached the teacher statistics")
        mean = sums[1 : channels + 1] / sums[0]
        # Population std as anomalib; floored so that a dead channel cannot divide by zero.
        std = (sums[channels + 1 :] / sums[0] - mean**2).clamp_min(1e-12).sqrt()
        self.teacher_mean = mean.float().view(1, channels, 1, 1)
        self.teacher_std = std.float().view(1, channels, 1, 1)

    # -- training (Optimize) ---------------------------------------------------------------------
    def train_step(self, ctx: StepContext) -> None:
        """anomalib's step: loss_st (hard features + penalty) + loss_ae + loss_stae, one Adam step.

        Every student and autoencoder parameter gets a gradient in every step (DDP needs that): the
        student's first half through the hard loss, its second half through loss_stae, the whole
        autoencoder through loss_ae. The student runs three times before the backward (as in anomalib);
        autograd sums the three contributions before DDP's hook sees them.
        """
        student, ae = ctx.modules["student"], ctx.modules["ae"]
        images = ctx.batch["image"]
        frozen = ctx.batch.get("frozen")
        total_steps = getattr(ctx, "total_steps", None)
        if total_steps:
            self._decay.at = int(0.95 * total_steps)
        c = self.out_channels
        teacher = frozen["teacher"] if frozen is not None else self.teacher_features(images)
        # Dropout in the autoencoder draws from torch's global generator: seed it from the step's
        # generator so that a run is reproducible from its seed.
        seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator, device=ctx.generator.device))
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            student_out = student(images)
            loss_hard = hard_feature_loss((teacher.float() - student_out[:, :c].float()) ** 2)
            if not self.settings["no_penalty"] and ("penalty" in ctx.extra or self._penalty is not None):
                if "penalty" in ctx.extra:  # a stream of prepared images (a caller's, e.g. tests)
                    penalty = torch.cat([next(ctx.extra["penalty"]) for _ in range(images.shape[0])])
                else:
                    penalty = self._penalty.take(images.shape[0], images.device).to(images.dtype)
                penalty = random_grayscale(penalty, PENALTY_GRAYSCALE, ctx.generator)
                loss_penalty = student(penalty)[:, :c].float().pow(2).mean()
            else:
                loss_penalty = torch.zeros((), device=images.device)
            augmented = random_color_jitter(images, ctx.generator)
            ae_out = ae(augmented).float()
            teacher_aug = self.teacher_features(augmented).float()
            student_aug = student(augmented)[:, c:].float()
            loss_ae = (teacher_aug - ae_out).pow(2).mean()
            loss_stae = (ae_out - student_aug).pow(2).mean()
        ctx.optimize("main", loss_hard + loss_penalty + loss_ae + loss_stae)
        ctx.log(loss_hard=loss_hard.detach(), loss_penalty=loss_penalty.detach(), loss_ae=loss_ae.detach(),
                loss_stae=loss_stae.detach())

    # -- scoring ---------------------------------------------------------------------------------
    def maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw student-teacher and student-autoencoder maps at image size, (B, 1, H, W) each."""
        if self.teacher_mean.numel() == 0:
            raise RuntimeError("EfficientAD is not trained: run its recipe or load a trained model first")
        size = images.shape[-2:]
        student_out = self.student(images)
        map_st = (self.teacher_features(images) - student_out[:, : self.out_channels]).pow(2).mean(1, keepdim=True)
        map_ae = (self.ae(images) - student_out[:, self.out_channels :]).pow(2).mean(1, keepdim=True)
        # anomalib pads by 4 whenever pad_maps is set; its docstring (and the geometry: the unpadded
        # PDN loses 4 pixels of features per side) says only for padding=False, which is what we do.
        if self.settings["pad_maps"] and not self.settings["padding"]:
            map_st, map_ae = F.pad(map_st, (4, 4, 4, 4)), F.pad(map_ae, (4, 4, 4, 4))
        map_st = F.interpolate(map_st, size=size, mode="bilinear", align_corners=False)
        map_ae = F.interpolate(map_ae, size=size, mode="bilinear", align_corners=False)
        return map_st.float(), map_ae.float()

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        map_st, map_ae = self.maps(images)
        if self.map_quantiles.numel():
            qa_st, qb_st, qa_ae, qb_ae = self.map_quantiles
            # Floored denominators: a constant map on the normal images would otherwise divide by zero.
            map_st = 0.1 * (map_st - qa_st) / (qb_st - qa_st).clamp_min(1e-12)
            map_ae = 0.1 * (map_ae - qa_ae) / (qb_ae - qa_ae).clamp_min(1e-12)
        # Before calibration (validation during training) the raw maps are averaged unscaled.
        anomaly_map = (0.5 * map_st + 0.5 * map_ae)[:, 0]
        return AnomalyOutput(score=anomaly_map.amax(dim=(-2, -1)), anomaly_map=anomaly_map)

    # -- map quantiles (Calibrate) ---------------------------------------------------------------
    def fit_map_quantiles(self, batches: Iterable[torch.Tensor], progress: bool = False) -> None:
        """anomalib's 90 % and 99.5 % quantiles of both raw maps over normal images, exact over every
        worker's values (components/quantile.py). anomalib takes them on the good images of its
        validation set, subsampled beyond 2**24 values; here on the training images (normal by
        definition: the test split stays unseen), all values."""
        device = self.teacher_device()
        st, ae = [torch.empty(0, device=device)], [torch.empty(0, device=device)]
        for images in progress_bar(batches, desc="map quantiles", enabled=progress):
            map_st, map_ae = self.maps(images.to(device))
            st.append(map_st.flatten())
            ae.append(map_ae.flatten())
        q_st = distributed_quantiles(torch.cat(st), MAP_QUANTILES)
        q_ae = distributed_quantiles(torch.cat(ae), MAP_QUANTILES)
        self.map_quantiles = torch.cat([q_st, q_ae]).float().to(device)
