"""Our side of each model's parity case: build our model with fixed settings, run it on the fixed batches,
and write the request for anomalib's side (its init arguments, our weights under anomalib's keys, the inputs
and every random draw). Each case returns our quantities under the names anomalib's side answers with.

Small on purpose (a few images at 64 px, tf_efficientnet_lite0 with its real ImageNet weights where a
backbone is used), so that the whole harness runs in minutes on 2 CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..models.base import create_model

LITE0 = "tf_efficientnet_lite0"


@dataclass
class Case:
    """What a case hands to the harness: the request for anomalib's side, our quantities, and per quantity an
    optional note / tolerance (a deliberate deviation must say so in its note)."""

    request: dict[str, Any]
    ours: dict[str, Any]
    notes: dict[str, str] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=dict)
    grads: dict[str, torch.Tensor] | None = None  # under anomalib's parameter names


def images(n: int, size: int, seed: int, anomaly: bool = False) -> torch.Tensor:
    """Smooth random textures (low-resolution noise upsampled, plus fine noise), normalized to zero mean and
    unit variance per channel; with `anomaly`, a bright square on every image."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 8, size // 8, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = x + 0.1 * torch.rand(n, 3, size, size, generator=g)
    if anomaly:
        s = size // 4
        x[:, :, s:2 * s, s:2 * s] = 1.5
    return ((x - 0.5) / 0.25).contiguous()


@dataclass
class Inputs:
    size: int = 64
    n_train: int = 16
    train: torch.Tensor = None
    test: torch.Tensor = None

    def __post_init__(self):
        if self.train is None:
            self.train = images(self.n_train, self.size, seed=1)
        if self.test is None:
            self.test = torch.cat([images(1, self.size, seed=2), images(1, self.size, seed=3, anomaly=True)])


def _ours(name: str, inputs: Inputs, layers=None, backbone: str | None = LITE0, **settings):
    kwargs = dict(image_size=inputs.size, seed=0, **settings)
    if backbone is not None:
        kwargs.update(backbone=backbone, layers=layers, pretrained=(backbone == LITE0))
    return create_model(name, **kwargs)


def _copy(state: dict) -> dict:
    """A snapshot: state_dict() values are the live tensors, which a later train-mode step (batch-norm
    running statistics) would change before the request is written."""
    return {k: v.detach().clone() for k, v in state.items()}


def _eval(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        out = model(x)
    result = {"score": out.score}
    if out.anomaly_map is not None:
        result["anomaly_map"] = out.anomaly_map
    return result


# --- memory banks ---------------------------------------------------------------------------------------

def padim(inputs: Inputs) -> Case:
    from ..models.padim.anomalib_keys import to_anomalib

    layers = ["blocks.1", "blocks.2", "blocks.4"]
    model = _ours("padim", inputs, layers, n_features=100)
    unfitted = _copy(to_anomalib(model.state_dict(), fitted=False))
    model.eval()
    with torch.no_grad():
        patches, (h, w) = model.embed(inputs.train)
    embedding = patches.transpose(1, 2).reshape(len(inputs.train), -1, h, w)  # anomalib's (B, C, h, w)
    model.fit([inputs.train])
    state = to_anomalib(model.state_dict())
    out = _eval(model, inputs.test)
    # anomalib stores each covariance in a float32 buffer and inverts it in float32; the same covariance (our
    # float64 moments, with anomalib's 0.01 + 1e-5 on the diagonal) inverted that way isolates the code from
    # that rounding.
    from ..models.components.gaussian import Moments
    from ..models.padim.model import _STABILIZER

    moments = Moments()
    moments.update(patches)
    _, cov = moments.mean_and_covariance(float(model.settings["covariance_regularization"]))
    inv32 = torch.linalg.inv(cov.float() + _STABILIZER * torch.eye(cov.shape[-1]))
    ours = {"embedding": embedding, "gaussian.mean": state["gaussian.mean"],
            "gaussian.inv_covariance(float32 inverse)": inv32,
            "gaussian.inv_covariance": state["gaussian.inv_covariance"], **out,
            "float32:gaussian.inv_covariance": state["gaussian.inv_covariance"],
            "float32:score": out["score"], "float32:anomaly_map": out["anomaly_map"]}
    f32 = ("anomalib end to end as it runs: its own float32 features and float32 fit; a per-position float32 "
           "inverse of covariances with condition numbers ~1e4 turns 1e-7 feature rounding into ~4e-3 "
           "(ours: float64 moments); the rows without 'float32:' fit anomalib's MultiVariateGaussian on our "
           "embedding in float64")
    request = {"init": {"backbone": LITE0, "layers": layers, "n_features": 100}, "state": unfitted,
               "inputs": {"train": inputs.train, "test": inputs.test, "embedding": embedding}}
    notes = {k: f32 for k in ours if k.startswith("float32:")}
    notes["gaussian.inv_covariance"] = (
        "deliberate: ours inverts in float64 (then stores float32), anomalib in float32 (its covariance buffer is "
        "float32): at condition numbers ~1e4 that rounding is ~4e-3 relative; the row above shows the same "
        "covariance inverted in float32 agrees")
    tolerances = {k: 1e-2 for k in notes}
    return Case(request, ours, notes=notes, tolerances=tolerances)


def patchcore(inputs: Inputs) -> Case:
    # Key map kept here, not in models/patchcore (owned by another change): backbone + the memory bank.
    from ..models.components import anomalib_keys

    layers = ["blocks.2", "blocks.4"]
    model = _ours("patchcore", inputs, layers, coreset_sampling_ratio=0.1, num_neighbors=9)
    model.eval()
    with torch.no_grad():
        embedding = model.embed(inputs.train)[0].flatten(0, 1)
    model.fit([inputs.train])
    state = anomalib_keys.backbone(model.state_dict())
    ours = {"embedding": embedding, **_eval(model, inputs.test)}
    # The same bank on both sides: ours (k-center greedy, our seed) is given to anomalib's model.
    request = {"init": {"backbone": LITE0, "layers": layers, "num_neighbors": 9}, "state": state,
               "inputs": {"train": inputs.train, "test": inputs.test, "memory_bank": model.memory_bank}}
    return Case(request, ours, notes={"score": "same coreset bank on both sides (ours, fed to anomalib)"})


def dfm(inputs: Inputs) -> Case:
    from ..models.dfm.anomalib_keys import to_anomalib

    layers = ["blocks.4"]
    model = _ours("dfm", inputs, layers, pooling_kernel_size=4, pca_level=0.97, score_type="fre")
    model.fit([inputs.train])
    ours = {"pca.mean": model.pca.mean, "pca.singular_values_sq": model.pca.explained_variance,
            "pca.components": model.pca.components, **_eval(model, inputs.test)}
    nll = _ours("dfm", inputs, layers, pooling_kernel_size=4, pca_level=0.97, score_type="nll")
    nll.fit([inputs.train])
    ours["nll_score_copies"] = _eval(nll, inputs.test)["score"]
    released = _ours("dfm", inputs, layers, pooling_kernel_size=4, pca_level=0.97, score_type="nll",
                     nll_centering="anomalib_2_7")
    released.fit([inputs.train])
    ours["nll_score"] = _eval(released, inputs.test)["score"]
    request = {"init": {"backbone": LITE0, "layer": layers[0], "pooling_kernel_size": 4, "n_comps": 0.97,
                        "score_type": "fre"}, "state": to_anomalib(model.state_dict()),
               "inputs": {"train": inputs.train, "test": inputs.test}}
    return Case(request, ours, notes={
        "nll_score": "ours with nll_centering=anomalib_2_7 against anomalib as released: a bug in anomalib 2.7 (its "
                     "fit centres the feature bank in place, PCA.fit: dataset -= mean, then PCA.transform subtracts "
                     "the mean again in place: the Gaussian is fitted on x - 2 mean); our default keeps the correct "
                     "centring (next row)",
        "nll_score_copies": "our default (nll_centering=centered) against anomalib's same code given copies (no "
                            "in-place double centring)",
        "pca.components": "rows sign-aligned to anomalib's (PCA sign is arbitrary)",
                                      "pca.singular_values_sq": "explained variance (anomalib: singular_values^2 / n)"})


def dfkde(inputs: Inputs) -> Case:
    from ..models.dfkde.anomalib_keys import to_anomalib

    layers = ["blocks.6"]
    model = _ours("dfkde", inputs, layers, n_pca_components=8, max_training_points=40000)
    model.fit([inputs.train])
    out = _eval(model, inputs.test)
    log_density = -out["score"]
    ours = {"max_length": model.max_length.reshape(()), "log_density": log_density,
            # anomalib's image score: 1 / (1 + exp(0.05 (log p - 12))) of the same log density
            "score": 1 / (1 + torch.exp(0.05 * (log_density - 12)))}
    request = {"init": {"backbone": LITE0, "layers": layers, "n_pca_components": 8},
               "state": to_anomalib(model.state_dict()), "inputs": {"train": inputs.train, "test": inputs.test}}
    return Case(request, ours, notes={
        "score": "ours is -log density; anomalib's probability 1/(1+exp(0.05(log p - 12))) computed from it "
                 "(a monotone map: the same ranking)"})


# --- gradient models --------------------------------------------------------------------------------------

def _loss_and_grads(model, loss_fn: Callable[[], torch.Tensor], to_anomalib) -> tuple[torch.Tensor, dict]:
    """One training loss on the batch (train mode) and the gradients of every trainable parameter, under
    anomalib's names."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), to_anomalib(grads)


def stfpm(inputs: Inputs) -> Case:
    from ..models.stfpm.anomalib_keys import to_anomalib

    layers = ["blocks.1", "blocks.2", "blocks.4"]
    model = _ours("stfpm", inputs, layers)
    state = _copy(to_anomalib(model.state_dict()))
    ours = _eval(model, inputs.test)  # the random student against the teacher: maps are far from zero
    # The training step in float64 on both sides: float32 gradients of the random student through its
    # batch-norm layers (batch statistics of 4 images) carry ~2e-2 of rounding at the stem (ours in float32
    # against ours in float64: 1.9e-2), which would hide a real difference.
    model.double()
    train = inputs.train[:4].double()
    ours["loss"], grads = _loss_and_grads(model, lambda: model(train)["loss"], to_anomalib)
    request = {"init": {"backbone": LITE0, "layers": layers}, "state": state, "train_dtype": "float64",
               "inputs": {"train": inputs.train[:4], "test": inputs.test}}
    return Case(request, ours, grads=grads, notes={
        "loss": "batch of 4, student in train mode (batch-norm batch statistics); loss and gradients in float64 "
                "on both sides (float32 stem gradients carry ~2e-2 rounding)"})


def fastflow(inputs: Inputs) -> Case:
    from ..models.fastflow.anomalib_keys import to_anomalib

    # anomalib's FastFlow takes only resnet18 / wide_resnet50_2 / two ViTs: resnet18, random weights copied.
    model = _ours("fastflow", inputs, ["layer1", "layer2", "layer3"], backbone="resnet18", flow_steps=4)
    state = _copy(to_anomalib(model.state_dict()))
    ours = _eval(model, inputs.test)
    ours["loss"], grads = _loss_and_grads(model, lambda: model(inputs.train[:4])["loss"], to_anomalib)
    request = {"init": {"backbone": "resnet18", "input_size": [inputs.size, inputs.size], "flow_steps": 4},
               "state": state, "inputs": {"train": inputs.train[:4], "test": inputs.test}}
    return Case(request, ours, grads=grads, notes={
        "score": "resnet18 with random weights (copied), 4 flow steps (anomalib refuses tf_efficientnet_lite0)"})


def uflow(inputs: Inputs) -> Case:
    from ..models.uflow.anomalib_keys import to_anomalib

    # anomalib's U-Flow extractors: mcait (CaiT at 448 px, no weights here) or resnet18 / wide_resnet50_2
    # layer1-3: resnet18, random weights copied.
    model = _ours("uflow", inputs, ["layer1", "layer2", "layer3"], backbone="resnet18")
    state = _copy(to_anomalib(model.state_dict()))
    ours = _eval(model, inputs.test)
    ours["loss"], grads = _loss_and_grads(model, lambda: model(inputs.train[:4])["loss"], to_anomalib)
    request = {"init": {"backbone": "resnet18", "input_size": [inputs.size, inputs.size], "flow_steps": 4},
               "state": state, "inputs": {"train": inputs.train[:4], "test": inputs.test}}
    return Case(request, ours, grads=grads, notes={
        "score": "resnet18 with random weights (copied); anomalib's default extractor is mcait at 448 px",
        "loss": "loss_z_reduction=batch_sum (the default, anomalib's)"})


def csflow(inputs: Inputs) -> Case:
    from ..models.csflow.anomalib_keys import to_anomalib

    # anomalib's layer on our side: tf_efficientnet_b5 `blocks.5.8` (304 channels, stride 32; a module layer),
    # random weights, at 128 px (anomalib's CrossScaleFlow fixes 304 channels and sides S/32, S/64, S/128).
    # The flow is compared on the same features (anomalib's extractor is torchvision's net, see the key map).
    size = 128
    test = torch.nn.functional.interpolate(inputs.test, size=(size, size), mode="bilinear", align_corners=False)
    train = torch.nn.functional.interpolate(inputs.train[:4], size=(size, size), mode="bilinear", align_corners=False)
    model = create_model("csflow", backbone="tf_efficientnet_b5", layers=["blocks.5.8"], pretrained=False,
                         image_size=size, seed=0, cross_conv_hidden_channels=32, n_coupling_blocks=4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # anomalib's gammas start at 0 (every coupling the identity): make them bite
        for coupling in model.flow.couplings:
            for net in (coupling.net1, coupling.net2):
                net.gammas.copy_(0.3 * torch.randn(3, generator=g))
    state = _copy(to_anomalib(model.state_dict()))
    model.eval()
    with torch.no_grad():
        frozen_test, frozen_train = model.frozen_features(test), model.frozen_features(train)
        out = model(None, frozen=frozen_test)
        z, log_jac = model.latents(None, frozen_test)
    # anomalib's GraphINN adds each coupling's batch-summed log|det J| to every sample: (B,) of the batch sum
    ours = {"z": torch.cat([zi.flatten(1) for zi in z], 1), "log_jac_sum": log_jac.sum().expand(len(log_jac)),
            "score": out.score,
            "anomaly_map": out.anomaly_map}
    ours["loss"], grads = _loss_and_grads(model, lambda: model(None, frozen=frozen_train)["loss"], to_anomalib)
    features = lambda f: [f[f"scale{i}"] for i in range(3)]  # noqa: E731
    request = {"init": {"input_dims": [3, size, size], "n_coupling_blocks": 4, "clamp": 3,
                        "cross_conv_hidden_channels": 32},
               "state": state, "inputs": {"test": features(frozen_test), "train": features(frozen_train)}}
    return Case(request, ours, grads=grads, notes={
        "z": "the flow alone, on the same tf_efficientnet_b5 blocks.5.8 features (random weights) at 3 scales",
        "log_jac_sum": "anomalib's couplings return log|det J| summed over the batch, which its graph adds to "
                       "every sample; ours per sample, summed over the batch here",
        "loss": "log_jac_reduction=batch_sum (the default, anomalib's); gammas set to random values on both sides"})


def cflow(inputs: Inputs) -> Case:
    from ..models.cflow.anomalib_keys import to_anomalib

    layers = ["blocks.2", "blocks.4", "blocks.6"]
    model = _ours("cflow", inputs, layers)  # not calibrated: the per-batch maximum, as anomalib
    state = _copy(to_anomalib(model.state_dict()))
    out = _eval(model, inputs.test)
    # anomalib's map is max(sum of probabilities) - sum; ours (layers - sum): the same up to one constant per
    # batch, which the minimum removes.
    ours = {"anomaly_map-min": out["anomaly_map"] - out["anomaly_map"].min(),
            "score-min": out["score"] - out["anomaly_map"].min()}
    request = {"init": {"backbone": LITE0, "layers": layers}, "state": state, "inputs": {"test": inputs.test}}
    note = ("ours: number of layers - sum of probabilities (batch-independent once calibrated), anomalib: the "
            "batch maximum of that sum - sum; compared after subtracting each side's minimum over the batch")
    return Case(request, ours, notes={"anomaly_map-min": note, "score-min": (
        "eval only: anomalib's training loss lives in its Lightning training_step (fiber batches drawn with "
        "torch.randperm, an optimizer step per fiber batch), not in the torch model; not compared")})


def ganomaly(inputs: Inputs) -> Case:
    from ..models.ganomaly.anomalib_keys import to_anomalib
    from ..models.ganomaly.model import discriminator_loss, generator_loss
    from ..models.ganomaly.networks import pad_nextpow2

    model = _ours("ganomaly", inputs, backbone=None)
    full = model.state_dict()
    state = _copy(to_anomalib(full))
    ours = _eval(model, inputs.test)
    # anomalib's training_step without the optimizer steps: the generator loss and its generator gradients,
    # then the discriminator loss on the detached fake and its discriminator gradients (in that order: the
    # batch norms run in train mode in the same sequence on both sides).
    model.train()
    model.zero_grad(set_to_none=True)
    s = model.settings
    padded = pad_nextpow2(inputs.train[:4])
    fake, latent_i, latent_o = model.generator(padded)
    pred_real, _ = model.discriminator(padded)
    pred_fake, _ = model.discriminator(fake)
    g_loss, _ = generator_loss(latent_i, latent_o, padded, fake, pred_real, pred_fake, wadv=float(s["wadv"]),
                               wcon=float(s["wcon"]), wenc=float(s["wenc"]))
    g_loss.backward(retain_graph=True)
    grads = {f"generator.{n}": p.grad.clone() for n, p in model.generator.named_parameters()}
    model.discriminator.zero_grad(set_to_none=True)
    pred_fake, _ = model.discriminator(fake.detach())
    d_loss = discriminator_loss(pred_real, pred_fake)
    d_loss.backward()
    grads.update({f"discriminator.{n}": p.grad.clone() for n, p in model.discriminator.named_parameters()})
    ours.update(generator_loss=g_loss.detach(), discriminator_loss=d_loss.detach())
    request = {"init": {"input_size": [inputs.size, inputs.size], "num_input_channels": 3, "n_features": 64,
                        "latent_vec_size": 100, "extra_layers": 0, "add_final_conv_layer": True},
               "weights": {"wadv": 1, "wcon": 50, "wenc": 1}, "state": state,
               "inputs": {"train": inputs.train[:4], "test": inputs.test}}
    return Case(request, ours, grads=to_anomalib(grads, full), notes={
        "gradients": "generator parameters from the generator loss, discriminator parameters from the "
                     "discriminator loss (each optimizer's gradients in anomalib's step)"})


def reverse_distillation(inputs: Inputs) -> Case:
    from ..models.reverse_distillation.anomalib_keys import ANOMALIB_UNUSED, to_anomalib

    # anomalib's RD takes ResNet encoders only (its OCBE and de_resnet decoder): resnet18, random weights
    model = _ours("reverse_distillation", inputs, ["layer1", "layer2", "layer3"], backbone="resnet18",
                  decoder="anomalib", anomaly_map_mode="add")
    state = _copy(to_anomalib(model.state_dict()))
    ours = _eval(model, inputs.test)
    # The training step in float64 on both sides, as STFPM's: in float32 the gradients of the random decoder
    # (batch-norm batch statistics of 4 images) differed by 1.8e-5 and 3.1e-4 of their scale in two runs.
    model.double()
    train = inputs.train[:4].double()
    ours["loss"], grads = _loss_and_grads(model, lambda: model(train)["loss"], to_anomalib)
    request = {"init": {"backbone": "resnet18", "input_size": [inputs.size, inputs.size],
                        "layers": ["layer1", "layer2", "layer3"], "anomaly_map_mode": "add"},
               "anomalib_unused": list(ANOMALIB_UNUSED), "state": state, "train_dtype": "float64",
               "inputs": {"train": inputs.train[:4], "test": inputs.test}}
    return Case(request, ours, grads=grads, notes={
        "score": "resnet18 with random weights (copied), decoder=anomalib; anomalib's OCBE conv4/bn4 are never "
                 "called in its forward and have no counterpart here",
        "loss": "loss and gradients in float64 on both sides (float32 gradients: 1.8e-5 / 3.1e-4 rounding)"})


CASES: dict[str, Callable[[Inputs], Case]] = {
    "padim": padim, "patchcore": patchcore, "dfm": dfm, "dfkde": dfkde, "stfpm": stfpm, "fastflow": fastflow,
    "reverse_distillation": reverse_distillation,
    "cflow": cflow, "csflow": csflow, "uflow": uflow, "ganomaly": ganomaly,
}
