"""DSR (Zavrtanik et al., ECCV 2022, "DSR - A dual subspace re-projection network for surface anomaly
detection").

A VQ-VAE with two codebooks describes images as codes; anomalies are simulated in code space (codes
inside a Perlin mask swapped for other, not-too-near codes). Subspace restriction modules learn to map
codes back to normal ones, an object-specific decoder turns those into the image as it should look,
and an anomaly detection module compares it with the general decoder's rendering of the input. An
upsampling module, trained last on image-space anomalies, refines the map to full resolution.

Training (anomalib's phases as stages):
  latent   (our addition, only with category_trained_vq_model) train the VQ-VAE on the training images
  main     restriction modules, object-specific decoder, detection module; Adam 2e-4, StepLR at 80%
  upsample the upsampling module on Perlin anomalies; Adam 2e-4
The latent model is anomalib's, pretrained on ImageNet (the default), in order of preference:
`weights=PATH`, $RAYLIB_AD_WEIGHTS_DIR/dsr_vq_model.{safetensors,pth,pt}, the asset cache, where anomalib's
file is downloaded from anomalib's address on the driver before any worker starts (raylib_ad/assets.py,
asset "dsr_vq_model"; offline and absent, an error names the file, its address and the fallback).
Fallback `category_trained_vq_model=true`: the latent model is trained on the category's own normal images
first (stage "latent"), which needs no download but is not anomalib's method (its codes are specific to
the category; the ImageNet codebook is general). With pretrained=False (read_model, tests) no file is read:
a model trained that way trains its latent model too.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ...errors import ConfigError, WeightsUnavailableError
from ..base import AnomalyModel, AnomalyOutput, register_model
from ..components.synthetic_anomaly import SyntheticAnomalyGenerator, perlin_masks
from ..components.weights import read_state_dict
from ..draem.losses import focal_loss
from ..draem.model import check_image_size
from ..recipe import Optimize, OptimizerSpec, Stage
from .latent import DiscreteLatentModel
from .latent_anomaly import latent_anomalies
from .modules import AnomalyDetectionModule, ImageReconstructionNetwork, SubspaceRestrictionNetwork, UpsamplingModule

WEIGHTS_NAME = "dsr_vq_model"  # $RAYLIB_AD_WEIGHTS_DIR/dsr_vq_model.{safetensors,pth,pt}
_SUFFIXES = (".safetensors", ".pth", ".pt")
_TRAINED = ("subspace_restriction_module_hi", "subspace_restriction_module_lo", "image_reconstruction_network",
            "anomaly_detection_module")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number_in(value, low: float, high: float) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and low <= value <= high


VQ_ASSET = "dsr_vq_model"  # raylib_ad/assets.py


def local_latent_weights() -> str | None:
    """$RAYLIB_AD_WEIGHTS_DIR/dsr_vq_model.*, if there."""
    directory = os.environ.get("RAYLIB_AD_WEIGHTS_DIR")
    for suffix in _SUFFIXES if directory else ():
        candidate = Path(directory) / f"{WEIGHTS_NAME}{suffix}"
        if candidate.is_file():
            return str(candidate)
    return None


def find_latent_weights(weights: str | None, category_trained: bool = False) -> str | None:
    """The pretrained latent-model file: `weights` (must exist: it was asked for), else
    $RAYLIB_AD_WEIGHTS_DIR/dsr_vq_model.*, else anomalib's from the asset cache (downloaded when absent);
    None with `category_trained` (the recipe then trains the latent model)."""
    if weights and category_trained:
        raise ConfigError(f"dsr: category_trained_vq_model=true asks for a latent model trained on the category, "
                          f"but a latent model file is given ({weights}); drop one of them")
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(
                f"dsr: latent model weights file not found: {path}. Ways out:\n"
                f"  - pass an existing file: weights=PATH (--weights PATH), a state dict of DSR's discrete latent "
                f"model, e.g. anomalib's vq_model_pretrained_128_4096.pckl;\n"
                f"  - put it at $RAYLIB_AD_WEIGHTS_DIR/{WEIGHTS_NAME}.pth;\n"
                f"  - give no weights: anomalib's ImageNet latent model is then used (downloaded);\n"
                f"  - or --set category_trained_vq_model=true: the latent model is trained on the training images "
                f"first (stage 'latent', --set vq_epochs=N), not anomalib's method.")
        return str(path)
    if category_trained:
        return None
    local = local_latent_weights()
    if local is not None:
        return local
    from ...assets import fetch_asset

    return str(fetch_asset(VQ_ASSET))


@register_model
class Dsr(AnomalyModel):
    name = "dsr"
    default_backbone = None
    # anomalib's DSR pre-processor only resizes (Dsr.configure_pre_processor; on_train_start refuses a
    # Normalize): the VQ-VAE, pretrained or not, sees raw [0, 1] pixels. Mean 0 / std 1 keeps it so.
    input_mean = (0.0, 0.0, 0.0)
    input_std = (1.0, 1.0, 1.0)
    default_epochs = 700  # anomalib examples/configs/model/dsr.yaml: max_epochs 700, split 0.7 / 0.3
    defaults = {
        "latent_anomaly_strength": 0.2,
        "upsampling_train_ratio": 0.7,
        "lr": 2e-4,  # both of anomalib's Adam optimizers
        # anomalib's DsrModel architecture arguments (128, 4096, 128, 2, 64; detection/upsampling U-Nets 64)
        "embedding_dim": 128,
        "num_embeddings": 4096,
        "num_hiddens": 128,
        "num_residual_layers": 2,
        "num_residual_hiddens": 64,
        "base_width": 64,
        # Fallback (not anomalib's method): train the latent model on the category instead of anomalib's
        # ImageNet one, with VQ-VAE-2's recipe (Adam 3e-4, commitment cost 0.25, moving-average decay 0.99).
        "category_trained_vq_model": False,
        "vq_epochs": 100,
        "vq_lr": 3e-4,
        "commitment_cost": 0.25,
        "vq_decay": 0.99,
    }
    test_preset = {"embedding_dim": 8, "num_embeddings": 32, "num_hiddens": 8, "num_residual_hiddens": 4, "base_width": 4,  # tests/test_zoo.py: a tiny offline instance
                   "category_trained_vq_model": True}
    search_space = {
        "latent_anomaly_strength": {"uniform": [0.1, 0.4]},
        "upsampling_train_ratio": {"uniform": [0.5, 0.8]},
        "lr": {"loguniform": [1e-4, 5e-4]},
    }

    def __init__(self, backbone: str | None = None, layers=None, **kwargs):
        if backbone is not None:
            raise ConfigError(f"{self.name}: backbone={backbone!r} is invalid; {self.name} has no backbone")
        super().__init__(None, layers, **kwargs)
        s = self.settings
        check_image_size(self, 32)
        self._check_setting("latent_anomaly_strength", _number_in(s["latent_anomaly_strength"], 0, 1),
                            "a number in [0, 1]")
        self._check_setting("upsampling_train_ratio", _number_in(s["upsampling_train_ratio"], 0, 1),
                            "a number in [0, 1]")
        for key in ("lr", "vq_lr"):
            self._check_setting(key, _number_in(s[key], 0, math.inf) and s[key] > 0, "a number > 0")
        for key in ("embedding_dim", "num_hiddens", "num_residual_hiddens", "base_width", "num_residual_layers"):
            self._check_setting(key, _positive_int(s[key]), "a positive integer")
        self._check_setting("num_hiddens", s["num_hiddens"] % 2 == 0, "an even positive integer")
        self._check_setting("num_embeddings", _positive_int(s["num_embeddings"]) and s["num_embeddings"] >= 2,
                            "an integer >= 2")
        self._check_setting("vq_epochs", isinstance(s["vq_epochs"], int) and s["vq_epochs"] >= 0, "an integer >= 0")
        self._check_setting("category_trained_vq_model", isinstance(s["category_trained_vq_model"], bool),
                            "true (fallback: train the VQ model on the category, not anomalib's) or false")
        self._check_setting("commitment_cost", _number_in(s["commitment_cost"], 0, math.inf), "a number >= 0")
        self._check_setting("vq_decay", _number_in(s["vq_decay"], 0, 1) and s["vq_decay"] < 1, "a number in [0, 1)")
        arch = (s["num_hiddens"], s["num_residual_layers"], s["num_residual_hiddens"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # the same networks on every worker and every re-run
            self.discrete_latent_model = DiscreteLatentModel(*arch, s["num_embeddings"], s["embedding_dim"])
            self.subspace_restriction_module_hi = SubspaceRestrictionNetwork(s["embedding_dim"])
            self.subspace_restriction_module_lo = SubspaceRestrictionNetwork(s["embedding_dim"])
            self.image_reconstruction_network = ImageReconstructionNetwork(2 * s["embedding_dim"], *arch)
            self.anomaly_detection_module = AnomalyDetectionModule(s["base_width"])
            self.upsampling_module = UpsamplingModule(s["base_width"])
        # Contiguous (NCHW), unlike DRAEM: every InstanceNorm makes an NCHW copy of a channels_last input.
        self.latent_from_file: str | None = None
        self._perlin: SyntheticAnomalyGenerator | None = None  # phase-3 augmentation, built on first use
        if self.pretrained:
            path = find_latent_weights(self.weights, s["category_trained_vq_model"])
            if path is not None:
                self.load_latent_model(path)

    # -- the pretrained latent model -----------------------------------------------------------------
    @classmethod
    def required_assets(cls, settings: dict, *, pretrained: bool = True, weights: str | None = None) -> list[str]:
        """The files anomalib downloads that these settings need (raylib_ad/assets.py; fetched on the driver)."""
        if not pretrained or weights or settings["category_trained_vq_model"] or local_latent_weights():
            return []
        return [VQ_ASSET]

    def load_latent_model(self, path: str) -> None:
        state = read_state_dict(path)
        state = state.get("state_dict", state)
        try:
            self.discrete_latent_model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise WeightsUnavailableError(
                f"dsr: {path} is not a latent model for these settings (embedding_dim, num_embeddings, "
                f"num_hiddens, num_residual_layers, num_residual_hiddens must match the file; anomalib's is "
                f"128, 4096, 128, 2, 64): {str(err).splitlines()[0]}") from None
        self.latent_from_file = path

    # -- inference -----------------------------------------------------------------------------------
    def _restore(self, q_top: torch.Tensor, q_bot: torch.Tensor, modules=None):
        """Codes -> restricted codes -> object-specific image. `modules`: the (DDP-wrapped) trained parts."""
        m = modules or {name: getattr(self, name) for name in _TRAINED}
        latent = self.discrete_latent_model
        feat_hi = m["subspace_restriction_module_hi"](q_bot)
        feat_lo = m["subspace_restriction_module_lo"](q_top)
        codes_hi, codes_lo = latent.vq_bot(feat_hi), latent.vq_top(feat_lo)
        joined = torch.cat((latent.upsample_top(codes_lo, frozen=True), codes_hi), dim=1)
        return m["image_reconstruction_network"](joined), feat_hi, feat_lo

    def _detect(self, images: torch.Tensor):
        """Frozen path of inference and of the upsampling phase: (object-specific image, general image,
        detection softmax)."""
        latent = self.discrete_latent_model(images)
        specific = self._restore(latent["quantized_t"], latent["quantized_b"])[0]
        general = latent["recon_image"]
        detection = torch.softmax(self.anomaly_detection_module(specific, general), dim=1)
        return specific, general, detection

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        with torch.no_grad():
            specific, general, detection = self._detect(images)
            logits = self.upsampling_module(specific, general, detection)
            anomaly_map = torch.sigmoid(logits[:, 1] - logits[:, 0]).contiguous()  # softmax channel 1
            # anomalib: image score = max of the detection module's anomalous probability smoothed by a
            # 21x21 mean filter (not the upsampled map)
            smoothed = F.avg_pool2d(detection[:, 1:], 21, stride=1, padding=10)
        return AnomalyOutput(score=smoothed.amax(dim=(1, 2, 3)), anomaly_map=anomaly_map)

    # -- training ------------------------------------------------------------------------------------
    def latent_step(self, ctx) -> None:
        """Our VQ-VAE stage: reconstruction MSE + commitment losses; codebooks follow moving averages."""
        images = ctx.batch["image"]
        latent = self.discrete_latent_model
        if ctx.step == 0:  # codebooks start at encoder outputs of the first batch
            with torch.no_grad():
                first = latent(images)
            latent.vq_top.initialize_from(first["z_top"], ctx.generator)
            latent.vq_bot.initialize_from(latent.bottom_features(first["enc_b"], latent.vq_top(first["z_top"])),
                                          ctx.generator)
        out = ctx.modules["discrete_latent_model"](images)
        recon = F.mse_loss(out["recon_image"].float(), images.float())
        beta = float(self.settings["commitment_cost"])
        commit = beta * (F.mse_loss(out["z_top"].float(), out["quantized_t"].detach().float())
                         + F.mse_loss(out["z_bot"].float(), out["quantized_b"].detach().float()))
        ctx.optimize("latent", recon + commit)
        decay = float(self.settings["vq_decay"])
        latent.vq_top.ema_update(out["z_top"], out["index_top"], ctx.generator, decay=decay)
        latent.vq_bot.ema_update(out["z_bot"], out["index_bot"], ctx.generator, decay=decay)
        ctx.log(recon=float(recon.detach()), commitment=float(commit.detach()))

    def latent_masks(self, batch: dict, generator: torch.Generator) -> dict:
        """Phase-2 augmentation: anomalib's DsrAnomalyGenerator, Perlin masks on half of the images."""
        images = batch["image"]
        masks = perlin_masks(len(images), images.shape[-2], images.shape[-1], batch.get("generators", generator),
                             images.device, probability=0.5, redraw_empty=False)
        return {**batch, "mask": masks}

    def main_step(self, ctx) -> None:
        """anomalib's phase 2 (DsrSecondStageLoss)."""
        images = ctx.batch["image"]
        with torch.no_grad():
            sim = latent_anomalies(self.discrete_latent_model, images, ctx.batch["mask"],
                                   float(self.settings["latent_anomaly_strength"]),
                                   ctx.batch.get("generators", ctx.generator))
        specific, feat_hi, feat_lo = self._restore(sim["anomaly_top"], sim["anomaly_bot"], ctx.modules)
        logits = ctx.modules["anomaly_detection_module"](specific.detach(), sim["recon_image"])
        parts = {
            "feature_hi": F.mse_loss(feat_hi.float(), sim["quantized_b"].float()),
            "feature_lo": F.mse_loss(feat_lo.float(), sim["quantized_t"].float()),
            "image": 10 * F.mse_loss(specific.float(), images.float()),
            # anomalib passes the softmax to kornia's focal loss, which applies a softmax again; the
            # original DSR takes the focal loss of the softmax once: logits here, softmax inside.
            "focal": focal_loss(logits, sim["anomaly_mask"][:, 0]),
        }
        ctx.optimize("main", sum(parts.values()))
        ctx.log(**{k: float(v.detach()) for k, v in parts.items()})

    def image_anomalies(self, batch: dict, generator: torch.Generator) -> dict:
        """Phase-3 augmentation: anomalib's PerlinAnomalyGenerator defaults (no source folder: the noise
        itself is the texture; probability 0.5, blend (0.2, 1.0))."""
        if self._perlin is None:
            self._perlin = SyntheticAnomalyGenerator("noise", probability=0.5, blend=(0.2, 1.0))
        augmented, masks = self._perlin(batch["image"], batch.get("generators", generator))
        return {**batch, "augmented": augmented, "mask": masks}

    def upsampling_step(self, ctx) -> None:
        """anomalib's phase 3 (DsrThirdStageLoss): focal loss of the upsampling module's map."""
        with torch.no_grad():
            specific, general, detection = self._detect(ctx.batch["augmented"])
        logits = ctx.modules["upsampling_module"](specific, general, detection)
        ctx.optimize("upsampling", focal_loss(logits, ctx.batch["mask"][:, 0]))

    def recipe(self, max_epochs: int | None = None) -> list[Stage]:
        """`max_epochs` (default 700) is split between the main and the upsampling phase by
        upsampling_train_ratio, as anomalib splits its trainer's max_epochs."""
        s = self.settings
        total = max_epochs or self.default_epochs
        main_epochs = max(1, int(total * s["upsampling_train_ratio"]))
        upsampling_epochs = max(1, total - main_epochs)
        stages: list[Stage] = []
        if self.latent_from_file is None and s["vq_epochs"] > 0:
            latent = self.discrete_latent_model
            params = [p for p in latent.parameters() if p.requires_grad]
            stages.append(Optimize("latent", modules={"discrete_latent_model": latent}, epochs=s["vq_epochs"],
                                   optimizers=[OptimizerSpec("latent", torch.optim.Adam(params, lr=s["vq_lr"]))],
                                   step=self.latent_step, validate=False))
        main_params = [p for name in _TRAINED for p in getattr(self, name).parameters()]
        main_optimizer = torch.optim.Adam(main_params, lr=s["lr"])
        # anomalib: StepLR(step_size=int(0.8 * phase-2 epochs), gamma=0.1). anomalib's manual optimization
        # never steps it; stepped per epoch here, as the original DSR schedule intends.
        scheduler = torch.optim.lr_scheduler.StepLR(main_optimizer, step_size=max(1, int(0.8 * main_epochs)), gamma=0.1)
        stages.append(Optimize("main", modules={name: getattr(self, name) for name in _TRAINED}, epochs=main_epochs,
                               optimizers=[OptimizerSpec("main", main_optimizer, scheduler, interval="epoch")],
                               step=self.main_step, augment=self.latent_masks, main=True))
        upsampling_optimizer = torch.optim.Adam(self.upsampling_module.parameters(), lr=s["lr"])
        # validate=False: the validation score (image AUROC) does not depend on the upsampling module, so
        # "best epoch" would always be the first one and undo this phase.
        stages.append(Optimize("upsample", modules={"upsampling_module": self.upsampling_module},
                               epochs=upsampling_epochs, optimizers=[OptimizerSpec("upsampling", upsampling_optimizer)],
                               step=self.upsampling_step, augment=self.image_anomalies, validate=False))
        return stages
