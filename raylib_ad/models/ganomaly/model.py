"""GANomaly (Akcay et al., ACCV 2018, "GANomaly: Semi-Supervised Anomaly Detection via Adversarial
Training"), as anomalib implements it.

A generator encodes the image to a latent code, decodes it to a reconstruction and encodes that again;
a discriminator tells the images from the reconstructions. Trained on normal images only, the two codes
agree for normal images; the anomaly score is the mean squared difference between them. Image-level
scores only (no anomaly map).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ..base import AnomalyModel, AnomalyOutput, register_model
from ..recipe import Optimize, OptimizerSpec, Stage, StepContext
from .networks import Discriminator, Generator, pad_nextpow2, supported_image_size, supported_sizes_near


def _is_int(value, low: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low


def _is_number(value, low: float, high: float = math.inf, *, low_open: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return False
    return (low < value if low_open else low <= value) and value < high


def generator_loss(latent_i, latent_o, padded, fake, pred_real, pred_fake, *, wadv: float, wcon: float,
                   wenc: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """anomalib's generator loss: wadv * MSE(D(x), D(fake)) on the discriminator's probabilities (not
    the paper's feature matching) + wcon * L1(x, fake) + wenc * SmoothL1(code of x, code of fake)."""
    parts = {"adversarial": F.mse_loss(pred_real, pred_fake),
             "contextual": F.l1_loss(padded, fake),
             "encoder": F.smooth_l1_loss(latent_i, latent_o)}
    total = wadv * parts["adversarial"] + wcon * parts["contextual"] + wenc * parts["encoder"]
    return total, parts


def discriminator_loss(pred_real: torch.Tensor, pred_fake: torch.Tensor) -> torch.Tensor:
    """anomalib's: mean of BCE(D(x), 1) and BCE(D(fake), 0). In float32 outside autocast: torch refuses
    binary_cross_entropy under CUDA autocast (and its log needs the precision near 0 and 1)."""
    with torch.autocast(device_type=pred_real.device.type, enabled=False):
        real, fake = pred_real.float(), pred_fake.float()
        return 0.5 * (F.binary_cross_entropy(real, torch.ones_like(real))
                      + F.binary_cross_entropy(fake, torch.zeros_like(fake)))


@register_model
class Ganomaly(AnomalyModel):
    name = "ganomaly"
    default_backbone = None  # trained from scratch: no timm backbone, no weights to fetch
    default_layers = ()
    # anomalib gives GANomaly its default pre-processor: resize + ImageNet mean/std normalization
    # (AnomalibModule.configure_pre_processor; Ganomaly does not override it). Kept, although the
    # decoder's tanh cannot reach the normalized values outside [-1, 1]: the contextual L1 loss sees them.
    input_mean = (0.485, 0.456, 0.406)
    input_std = (0.229, 0.224, 0.225)
    produces_maps = False
    default_epochs = 100  # anomalib's max_epochs (with early stopping, patience 3 on image AUROC)
    default_patience = 3
    gradient_clip_val = None  # anomalib: gradient_clip_val=0, i.e. none
    # anomalib's defaults (examples/configs/model/ganomaly.yaml). Its batch_size (32) only sized unused
    # label tensors there; the batch is the runner's --batch-size here.
    defaults = {"n_features": 64, "latent_vec_size": 100, "extra_layers": 0, "add_final_conv_layer": True,
                "wadv": 1, "wcon": 50, "wenc": 1, "lr": 0.0002, "beta1": 0.5, "beta2": 0.999}
    # Sweep defaults (raylib_ad/tuning/space.py format): lr around anomalib's 2e-4 (Adam, DCGAN betas),
    # the code size and the network width, and the epochs (anomalib stops early, often well before 100).
    test_preset = {"n_features": 8, "latent_vec_size": 16}  # tests/test_zoo.py: a tiny offline instance
    search_space = {
        "lr": {"loguniform": [5e-5, 1e-3]},
        "latent_vec_size": {"choice": [50, 100, 200]},
        "n_features": {"choice": [32, 64]},
        "epochs": {"randint": [15, 100]},
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        s = self.settings
        for key in ("n_features", "latent_vec_size"):
            self._check_setting(key, _is_int(s[key], 1), "an integer >= 1")
        self._check_setting("extra_layers", _is_int(s["extra_layers"], 0), "an integer >= 0")
        for key in ("n_features", "latent_vec_size", "extra_layers"):
            s[key] = int(s[key])  # numpy integers from a sweep would not survive config.json
        # anomalib's decoder takes a latent_vec_size x 1 x 1 code, which only the final conv produces;
        # without it anomalib itself fails (its encoder reads a final layer it never created).
        self._check_setting("add_final_conv_layer", s["add_final_conv_layer"] is True,
                            "true (the decoder needs the final convolution's 1 x 1 code)")
        for key in ("wadv", "wcon", "wenc"):
            self._check_setting(key, _is_number(s[key], 0), "a number >= 0")
        self._check_setting("lr", _is_number(s["lr"], 0, low_open=True), "a number > 0")
        for key in ("beta1", "beta2"):
            self._check_setting(key, _is_number(s[key], 0, 1), "a number in [0, 1)")
        if not supported_image_size(self.image_size):
            raise ConfigError(
                f"{self.name}: image_size={self.image_size} is not supported: like anomalib, the networks "
                f"are built for the image size and inputs are zero-padded to the next power of two P, which "
                f"works for sizes in [5P/8, P] (20..32, 40..64, 80..128, 160..256, 320..512, ...); "
                f"nearest supported: {supported_sizes_near(self.image_size)}")
        # Random initial weights drawn from `seed` alone, so every DDP worker and every run builds the
        # same networks. PyTorch's default initialization, as in anomalib: its DCGAN weights_init is
        # called on the Generator / Discriminator objects themselves (not through .apply), whose class
        # names match neither "Conv" nor "BatchNorm", so it changes nothing there.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.generator = Generator(self.image_size, s["latent_vec_size"], 3, s["n_features"],
                                       s["extra_layers"], s["add_final_conv_layer"])
            self.discriminator = Discriminator(self.image_size, 3, s["n_features"], s["extra_layers"])

    # -- scoring -----------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        _, latent_i, latent_o = self.generator(pad_nextpow2(images))
        score = (latent_i - latent_o).pow(2).flatten(1).mean(dim=1)  # codes are (B, latent, 1, 1)
        return AnomalyOutput(score=score, anomaly_map=None)

    # -- training ----------------------------------------------------------------------------------
    def recipe(self) -> list[Stage]:
        s = self.settings
        betas = (float(s["beta1"]), float(s["beta2"]))
        optimizers = [
            OptimizerSpec("discriminator", torch.optim.Adam(self.discriminator.parameters(), lr=float(s["lr"]),
                                                            betas=betas)),
            OptimizerSpec("generator", torch.optim.Adam(self.generator.parameters(), lr=float(s["lr"]),
                                                        betas=betas)),
        ]
        return [Optimize("train", modules={"generator": self.generator, "discriminator": self.discriminator},
                         optimizers=optimizers, step=self.training_step, epochs=self.default_epochs,
                         main=True, loss_reduction="mean")]

    def training_step(self, ctx: StepContext) -> None:
        """anomalib's step: the generator first, then the discriminator on the detached fake.

        DDP: the generator loss reaches every parameter of both networks (the adversarial term goes
        through D(x) and D(fake)); its discriminator gradients are discarded by the discriminator's
        zero_grad, as in anomalib. The discriminator loss reaches every discriminator parameter and no
        generator one, and the generator takes no forward after its own backward. anomalib does not
        re-initialize a collapsed discriminator (the original GANomaly code does), so neither do we.
        """
        generator, discriminator = ctx.modules["generator"], ctx.modules["discriminator"]
        s = self.settings
        padded = pad_nextpow2(ctx.batch["image"])
        fake, latent_i, latent_o = generator(padded)
        pred_real, _ = discriminator(padded)
        pred_fake, _ = discriminator(fake)
        g_loss, parts = generator_loss(latent_i, latent_o, padded, fake, pred_real, pred_fake,
                                       wadv=float(s["wadv"]), wcon=float(s["wcon"]), wenc=float(s["wenc"]))
        # D(x)'s graph is kept for the discriminator loss below (anomalib reuses it the same way).
        ctx.optimize("generator", g_loss, retain_graph=True)
        pred_fake, _ = discriminator(fake.detach())
        ctx.optimize("discriminator", discriminator_loss(pred_real, pred_fake))
        # Named "<part>_loss", not "loss_<part>": the runner adds up "loss_*" values into train_loss.
        ctx.log(**{f"{name}_loss": value.detach() for name, value in parts.items()})
