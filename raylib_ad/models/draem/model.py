"""DRAEM (Zavrtanik et al., ICCV 2021, "DRAEM - A discriminatively trained reconstruction embedding for
surface anomaly detection").

Training pastes synthetic anomalies (Perlin-noise masks filled with foreign textures) onto normal images;
a reconstructive network learns to restore the clean image and a discriminative network, looking at the
image and its restoration side by side, learns to segment what was pasted. At test time the
discriminative network's anomalous-class probability is the anomaly map and its maximum the score.
No pretrained backbone. The anomaly textures are anomalib's: the Describable Textures Dataset (DTD),
downloaded into the asset cache on the driver before any worker starts (raylib_ad/assets.py, asset "dtd";
offline and absent, an error names the file, its address and the fallback). `dtd_dir=FOLDER` takes any
folder of textures instead; the fallback `image_as_texture=true` pastes a shuffled, recoloured copy of a
training image (components/synthetic_anomaly.py, "self"), which needs no download but is not anomalib's method.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ..base import AnomalyModel, AnomalyOutput, register_model
from ..components.synthetic_anomaly import SyntheticAnomalyGenerator
from ..recipe import Optimize, OptimizerSpec, Stage
from .losses import focal_loss
from .networks import DiscriminativeNetwork, ReconstructiveNetwork

DTD_ASSET = "dtd"  # raylib_ad/assets.py


def _number_in(value, low: float, high: float = math.inf, *, low_open: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return (low < value if low_open else low <= value) and value <= high


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_image_size(model: AnomalyModel, multiple: int) -> None:
    if model.image_size <= 0 or model.image_size % multiple:
        raise ConfigError(f"{model.name}: image_size={model.image_size} is invalid; expected a positive multiple "
                          f"of {multiple} (the networks halve the resolution {int(math.log2(multiple))} times)")


@register_model
class Draem(AnomalyModel):
    name = "draem"
    default_backbone = None
    # anomalib's DRAEM pre-processor only resizes (its Draem.configure_pre_processor; on_train_start even
    # refuses a Normalize transform): the networks see raw [0, 1] pixels, and the synthetic textures are
    # blended in that space. Mean 0 / std 1 keeps the data pipeline's normalization a no-op.
    input_mean = (0.0, 0.0, 0.0)
    input_std = (1.0, 1.0, 1.0)
    default_epochs = 700  # anomalib examples/configs/model/draem.yaml: max_epochs 700
    default_patience = 20  # anomalib's EarlyStopping patience for DRAEM (examples/configs/model/draem.yaml)
    # anomalib: enable_sspcab=False, sspcab_lambda=0.1, beta=(0.1, 1.0), dtd_dir (None: DTD, downloaded;
    # or any folder), Adam lr 1e-4, MultiStepLR(milestones=[400, 600], gamma=0.1) per epoch; sub-network
    # widths 128 (reconstructive) and 64 (discriminative).
    defaults = {
        "enable_sspcab": False,
        "sspcab_lambda": 0.1,
        "beta": [0.1, 1.0],
        "dtd_dir": None,  # None: anomalib's DTD from the asset cache (downloaded when absent)
        "image_as_texture": False,  # fallback: textures cut from the training images (not anomalib's)
        "anomaly_probability": 0.5,  # anomalib's PerlinAnomalyGenerator probability
        "lr": 1e-4,
        "milestones": [400, 600],
        "gamma": 0.1,
        "reconstructive_base_width": 128,
        "discriminative_base_width": 64,
    }
    gradient_clip_val = None  # anomalib: gradient_clip_val=0
    test_preset = {"reconstructive_base_width": 4, "discriminative_base_width": 4,  # tests/test_zoo.py: a tiny offline instance
                   "image_as_texture": True}
    search_space = {
        "lr": {"loguniform": [3e-5, 3e-4]},
        "enable_sspcab": {"choice": [False, True]},
        "beta": {"choice": [[0.1, 1.0], [0.2, 1.0], [0.5, 1.0]]},
    }

    def __init__(self, backbone: str | None = None, layers=None, **kwargs):
        if backbone is not None:  # refused before the base class would build (and fetch) a backbone
            raise ConfigError(f"{self.name}: backbone={backbone!r} is invalid; {self.name} has no backbone")
        super().__init__(None, layers, **kwargs)
        s = self.settings
        check_image_size(self, 32)
        self._check_setting("enable_sspcab", isinstance(s["enable_sspcab"], bool), "true or false")
        self._check_setting("sspcab_lambda", _number_in(s["sspcab_lambda"], 0), "a number >= 0")
        beta = s["beta"]
        beta_ok = (_number_in(beta, 0, 1) if not isinstance(beta, (list, tuple)) else
                   len(beta) == 2 and all(_number_in(b, 0, 1) for b in beta) and beta[0] <= beta[1])
        self._check_setting("beta", beta_ok, "a number in [0, 1] or [low, high] with 0 <= low <= high <= 1")
        self._check_setting("dtd_dir", s["dtd_dir"] is None or (isinstance(s["dtd_dir"], str) and s["dtd_dir"] != ""),
                            "a folder of texture images, or null for DTD (anomalib's, downloaded)")
        self._check_setting("image_as_texture", isinstance(s["image_as_texture"], bool),
                            "true (fallback: textures cut from the training images, not DTD) or false")
        if s["image_as_texture"] and s["dtd_dir"]:
            raise ConfigError(f"{self.name}: image_as_texture=true and dtd_dir={s['dtd_dir']!r} contradict each "
                              f"other; drop one of them")
        self._check_setting("anomaly_probability", _number_in(s["anomaly_probability"], 0, 1), "a number in [0, 1]")
        self._check_setting("lr", _number_in(s["lr"], 0, low_open=True), "a number > 0")
        self._check_setting("milestones", isinstance(s["milestones"], (list, tuple))
                            and all(_positive_int(m) for m in s["milestones"]), "a list of positive epochs")
        self._check_setting("gamma", _number_in(s["gamma"], 0, 1, low_open=True), "a number in (0, 1]")
        for key in ("reconstructive_base_width", "discriminative_base_width"):
            self._check_setting(key, _positive_int(s[key]), "a positive integer")
        # Weights drawn from `seed` alone: every worker and every re-run builds the same network.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.reconstructive = ReconstructiveNetwork(s["reconstructive_base_width"], sspcab=s["enable_sspcab"])
            self.discriminative = DiscriminativeNetwork(s["discriminative_base_width"])
        # channels_last: oneDNN's convolutions (CPU) and cuDNN's tensor cores (GPU) are faster in NHWC, and
        # a layout set once here survives load_state_dict (copy_ keeps the destination's strides).
        self.to(memory_format=torch.channels_last)
        self._augmenter: SyntheticAnomalyGenerator | None = None

    # -- inference ---------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor] | AnomalyOutput:
        images = images.contiguous(memory_format=torch.channels_last)
        if self.training:
            reconstruction, pooled, bottleneck = self.reconstructive(images)
            logits = self.discriminative(torch.cat((images, reconstruction), dim=1))
            return {"reconstruction": reconstruction, "logits": logits, "sspcab_in": pooled, "sspcab_out": bottleneck}
        with torch.no_grad():
            reconstruction = self.reconstructive(images)[0]
            logits = self.discriminative(torch.cat((images, reconstruction), dim=1))
            # softmax over two classes, channel 1 == sigmoid of the logit difference (one pass, no 2-channel copy)
            anomaly_map = torch.sigmoid(logits[:, 1] - logits[:, 0]).contiguous()
        return AnomalyOutput(score=anomaly_map.amax(dim=(-2, -1)), anomaly_map=anomaly_map)

    # -- training ----------------------------------------------------------------------------------
    @classmethod
    def required_assets(cls, settings: dict, *, pretrained: bool = True, weights: str | None = None) -> list[str]:
        """The files anomalib downloads that these settings need (raylib_ad/assets.py; fetched on the driver)."""
        return [] if settings["image_as_texture"] or settings["dtd_dir"] else [DTD_ASSET]

    def texture_source(self) -> str:
        """The anomaly source: dtd_dir, else DTD's images from the asset cache (downloaded when absent), or
        "self" with image_as_texture."""
        if self.settings["image_as_texture"]:
            return "self"
        if self.settings["dtd_dir"]:
            return self.settings["dtd_dir"]
        from ...assets import fetch_asset

        return str(fetch_asset(DTD_ASSET))

    def augmenter(self) -> SyntheticAnomalyGenerator:
        """Built on first use (on the worker), not in __init__: a model directory read for serving must not
        need the texture folder it was trained with."""
        if self._augmenter is None:
            beta = self.settings["beta"]
            self._augmenter = SyntheticAnomalyGenerator(
                self.texture_source(), probability=self.settings["anomaly_probability"],
                blend=tuple(beta) if isinstance(beta, (list, tuple)) else float(beta), setting="dtd_dir")
        return self._augmenter

    def augment(self, batch: dict, generator: torch.Generator) -> dict:
        """Optimize.augment: adds the corrupted images ("augmented") and their masks ("mask"). Drawn per image
        from the runner's batch["generators"] (the same anomaly on any worker), else from `generator`."""
        augmented, masks = self.augmenter()(batch["image"], batch.get("generators", generator))
        return {**batch, "augmented": augmented, "mask": masks}

    def losses(self, images: torch.Tensor, out: dict[str, torch.Tensor],
               masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """anomalib's DraemLoss: MSE(reconstruction, image) + 2 * SSIM loss (kornia, window 11, i.e.
        (1 - SSIM) / 2 averaged) + focal loss (gamma 2, equal class weights; see losses.py) on the logits
        vs the mask; with SSPCAB, + sspcab_lambda * MSE(bottleneck input, bottleneck output)."""
        from kornia.losses import ssim_loss

        reconstruction = out["reconstruction"].float()
        images = images.float()
        parts = {
            "l2": F.mse_loss(reconstruction, images),
            "ssim": 2 * ssim_loss(reconstruction, images, window_size=11),
            "focal": focal_loss(out["logits"], masks[:, 0]),
        }
        if self.settings["enable_sspcab"]:
            parts["sspcab"] = self.settings["sspcab_lambda"] * F.mse_loss(out["sspcab_out"].float(),
                                                                          out["sspcab_in"].float())
        return parts

    def train_step(self, ctx) -> None:
        out = ctx.modules["model"](ctx.batch["augmented"])
        parts = self.losses(ctx.batch["image"], out, ctx.batch["mask"])
        ctx.optimize("main", sum(parts.values()))
        ctx.log(**{name: float(value.detach()) for name, value in parts.items()})

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=float(self.settings["lr"]))
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(self.settings["milestones"]),
                                                         gamma=float(self.settings["gamma"]))
        return optimizer, scheduler

    def recipe(self) -> list[Stage]:
        self.augmenter()  # a missing or empty texture folder fails here, before the first batch
        optimizer, scheduler = self.configure_optimizers()
        return [Optimize("train", modules={"model": self}, epochs=self.default_epochs, main=True,
                         optimizers=[OptimizerSpec("main", optimizer, scheduler, interval="epoch")],
                         step=self.train_step, augment=self.augment)]
