"""Where our models must compute what anomalib computes: PatchCore's map, Reverse Distillation's loss and
decoder, DFM's PCA component count, and the defaults of the seven classic models. Offline (resnet18 with
pretrained=False), tiny inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raylib_ad.artifact import read_model, write_model_dir
from raylib_ad.errors import ConfigError
from raylib_ad.models import create_model, model_class
from raylib_ad.models.components.pca import PCA
from raylib_ad.models.reverse_distillation import ReverseDistillation
from raylib_ad.models.reverse_distillation.anomalib_decoder import AnomalibBottleneck, AnomalibDecoder

SIZE = 64


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# --- PatchCore ------------------------------------------------------------------------------------

def anomalib_blur(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """anomalib's GaussianBlur2d as it is used for PatchCore: a 2D kernel of side 2 * int(4 sigma + 0.5) + 1,
    normalized, reflect padding to the same size."""
    side = 2 * int(4.0 * sigma + 0.5) + 1
    x = torch.arange(side, dtype=torch.float64) - side // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = torch.outer(g, g)
    kernel = (kernel / kernel.sum()).float().view(1, 1, side, side)
    return F.conv2d(F.pad(maps, (side // 2,) * 4, mode="reflect"), kernel)


@pytest.fixture(scope="module")
def patchcore():
    model = create_model("patchcore", backbone="resnet18", pretrained=False, image_size=SIZE,
                         coreset_sampling_ratio=0.5, coreset_projection_dim=0, upsample_mode="nearest")
    model.fit([images(4, 0)])
    return model.eval()


def test_patchcore_map_is_nearest_upsampling_then_blur_and_score_is_anomalibs(patchcore):
    test = images(2, 1)
    with torch.no_grad():
        out = patchcore(test)
        patches, (h, w) = patchcore.embed(test)
    bank = patchcore.memory_bank
    dist = torch.cdist(patches.double(), bank.double().unsqueeze(0))  # (B, P, M)
    patch_scores, locations = dist.min(-1)
    expected_map = anomalib_blur(F.interpolate(patch_scores.float().view(2, 1, h, w), size=(SIZE, SIZE)))[:, 0]
    torch.testing.assert_close(out.anomaly_map, expected_map, rtol=1e-4, atol=1e-4)
    bilinear = anomalib_blur(patchcore.upsample(patch_scores.float().view(2, 1, h, w)))[:, 0]
    assert (out.anomaly_map - bilinear).abs().max() > 1e-3  # the two modes do differ on this map
    # Our default (measured better on Magnetic Tile): bilinear, the rest identical.
    patchcore.settings["upsample_mode"] = "bilinear"
    try:
        with torch.no_grad():
            default = patchcore(test)
    finally:
        patchcore.settings["upsample_mode"] = "nearest"
    torch.testing.assert_close(default.anomaly_map, bilinear, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(default.score, out.score)

    # Image score: the paper's reweighting of the largest patch distance, as anomalib computes it.
    k = patchcore.settings["num_neighbors"]
    rows = torch.arange(2)
    worst = patch_scores.argmax(1)
    score = patch_scores[rows, worst]
    nn_sample = bank[locations[rows, worst]].double()
    support = torch.cdist(nn_sample, bank.double()).topk(k, largest=False).indices
    support_dist = torch.linalg.norm(patches.double()[rows, worst].unsqueeze(1) - bank.double()[support], dim=-1)
    expected_score = (1 - torch.softmax(support_dist, 1))[:, 0] * score
    torch.testing.assert_close(out.score.double(), expected_score, rtol=1e-4, atol=1e-4)


# --- Reverse Distillation -------------------------------------------------------------------------

def build_rd(**kwargs) -> ReverseDistillation:
    kwargs.setdefault("backbone", "resnet18")
    return ReverseDistillation(pretrained=False, image_size=SIZE, **kwargs)


@pytest.mark.parametrize("decoder", ["anomalib", "generic"])
def test_reverse_distillation_decoders_shapes_and_gradients(decoder):
    model = build_rd(decoder=decoder)
    assert model.settings["decoder"] == decoder
    model.train()
    batch = images(2)
    encoded, decoded = model.encode_decode(batch)
    assert [d.shape for d in decoded] == [e.shape for e in encoded]
    assert [e.shape[1:] for e in encoded] == [(64, 16, 16), (128, 8, 8), (256, 4, 4)]
    model.loss(encoded, decoded).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert trainable and not missing, f"parameters without a finite gradient (DDP would fail): {missing[:5]}"
    optimizer, _ = model.configure_optimizers()
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for _, p in trainable}
    model.eval()
    with torch.no_grad():
        out = model(images(2, 1))
    assert out.anomaly_map.shape == (2, SIZE, SIZE) and out.score.shape == (2,)


def test_reverse_distillation_picks_anomalibs_decoder_where_it_exists():
    default = build_rd()
    assert default.settings["decoder"] == "anomalib" and isinstance(default.decoder, AnomalibDecoder)
    assert build_rd(layers=["layer2", "layer3"]).settings["decoder"] == "generic"
    with pytest.raises(ConfigError, match="decoder='anomalib'"):
        build_rd(decoder="anomalib", layers=["layer2", "layer3"])
    with pytest.raises(ConfigError, match="decoder"):
        build_rd(decoder="unet")


def test_anomalib_decoder_has_anomalibs_size():
    # Parameter counts of anomalib's own get_bottleneck_layer / get_decoder modules (bottleneck without
    # the conv4/bn4 pair its forward never uses); outputs were also compared equal with copied weights.
    assert sum(p.numel() for p in AnomalibBottleneck("resnet18").parameters()) == 11_680_000
    assert sum(p.numel() for p in AnomalibDecoder("resnet18").parameters()) == 3_703_168
    assert sum(p.numel() for p in AnomalibDecoder("wide_resnet50_2").parameters()) == 24_917_504


def test_reverse_distillation_loss_is_anomalibs():
    gen = torch.Generator().manual_seed(0)
    encoded = [torch.randn(3, c, s, s, generator=gen) for c, s in ((8, 8), (16, 4))]
    decoded = [e + 0.7 * torch.randn(e.shape, generator=gen) for e in encoded]
    encoded[0] = encoded[0].contiguous(memory_format=torch.channels_last)  # as the extractor returns them
    expected = 0.0
    for e, d in zip(encoded, decoded):  # per layer: mean over samples of 1 - cos of the C*H*W vectors
        per_sample = [1 - torch.dot(a.flatten(), b.flatten()) / (a.norm() * b.norm()) for a, b in zip(e, d)]
        expected += sum(per_sample) / len(per_sample)
    torch.testing.assert_close(ReverseDistillation.loss(encoded, decoded), torch.as_tensor(expected))


def test_reverse_distillation_anomalib_decoder_round_trip(tmp_path):
    model = build_rd(seed=3).eval()
    write_model_dir(model, tmp_path / "m")
    again = read_model(tmp_path / "m")
    assert again.settings["decoder"] == "anomalib" and again.config() == model.config()
    with torch.no_grad():
        torch.testing.assert_close(again(images(1, 2)).score, model(images(1, 2)).score)


# --- DFM / PCA ------------------------------------------------------------------------------------

def anomalib_count(variances: list[float], level: float) -> int:
    """anomalib's PCA: cumulative variance ratios, and the index of the first one >= level."""
    total, running = sum(variances), 0.0
    for index, v in enumerate(variances):
        running += v
        if running / total >= level:
            return index
    raise AssertionError("level never reached")


def data_with_spectrum(variances: list[float], n: int = 400, seed: int = 0) -> torch.Tensor:
    """n rows whose biased covariance has exactly these eigenvalues, in a random orientation."""
    gen = torch.Generator().manual_seed(seed)
    d = len(variances)
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z = z - z.mean(0)
    q, _ = torch.linalg.qr(z)  # orthonormal, zero-mean columns
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return (q * math.sqrt(n)) * torch.tensor(variances, dtype=torch.float64).sqrt() @ rotation.T + 3.0


@pytest.mark.parametrize("level", [0.6, 0.85, 0.93, 0.97, 0.99])
def test_pca_count_follows_anomalibs_rule(level):
    spectrum = [5.0, 3.0, 1.0, 0.5, 0.3, 0.2]  # cumulative ratios 0.5, 0.8, 0.9, 0.95, 0.98, 1.0
    data = data_with_spectrum(spectrum)
    expected = anomalib_count(spectrum, level)
    assert PCA(level).fit(data).components.shape[0] == expected
    x = data.double()
    assert PCA(level).fit_from_moments(len(x), x.sum(0), x.T @ x).components.shape[0] == expected


def test_pca_level_one_keeps_every_nonzero_component():
    spectrum = [5.0, 3.0, 1.0, 0.5, 0.3, 0.2]
    assert anomalib_count(spectrum, 0.4) == 0  # anomalib would keep none: at least one is kept here
    assert PCA(0.4).fit(data_with_spectrum(spectrum)).components.shape[0] == 1
    full = data_with_spectrum(spectrum)
    assert PCA(1.0).fit(full).components.shape[0] == 6
    # Fewer rows than dimensions: rank n - 1 after centering, by either fit.
    wide = torch.randn(9, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 5.0
    assert PCA(1.0).fit(wide).components.shape[0] == 8
    assert PCA(1.0).fit_from_moments(9, wide.sum(0), wide.T @ wide).components.shape[0] == 8
    assert PCA(1).fit(full).components.shape[0] == 1  # an int is a count


def test_dfm_pca_level_one_keeps_all_and_bad_levels_are_refused():
    model = create_model("dfm", backbone="resnet18", pretrained=False, image_size=SIZE, pca_level=1.0)
    model.fit([images(5, 0), images(5, 1)])  # layer3: 256 channels, pooled to 1x1 at 64 px
    assert model.pca.components.shape == (9, 256)  # 10 images: rank 9 after centering
    as_int = create_model("dfm", backbone="resnet18", pretrained=False, image_size=SIZE, pca_level=1)
    assert as_int.pca.n_components == 1.0  # anomalib: a level <= 1 is a variance fraction
    count = create_model("dfm", backbone="resnet18", pretrained=False, image_size=SIZE, pca_level=3)
    assert count.pca.n_components == 3
    for bad in (0, -0.5, 2.5, "high", True):
        with pytest.raises(ConfigError, match="pca_level"):
            create_model("dfm", backbone="resnet18", pretrained=False, image_size=SIZE, pca_level=bad)


# --- defaults -------------------------------------------------------------------------------------

ANOMALIB_DEFAULTS = {  # anomalib's lightning_model.py defaults and examples/configs/model/<name>.yaml
    "patchcore": ("wide_resnet50_2", ("layer2", "layer3"), None,
                  {"coreset_sampling_ratio": 0.1, "num_neighbors": 9}),
    "padim": ("resnet18", ("layer1", "layer2", "layer3"), None, {"n_features": None}),
    "dfm": ("resnet50", ("layer3",), None, {"pooling_kernel_size": 4, "pca_level": 0.97, "score_type": "fre"}),
    "dfkde": ("resnet18", ("layer4",), None,
              {"n_pca_components": 16, "feature_scaling_method": "scale", "max_training_points": 40000}),
    "stfpm": ("resnet18", ("layer1", "layer2", "layer3"), 100, {"lr": 0.4, "momentum": 0.9, "weight_decay": 1e-3}),
    "reverse_distillation": ("wide_resnet50_2", ("layer1", "layer2", "layer3"), 200,
                             {"anomaly_map_mode": "add", "lr": 0.005, "beta1": 0.5, "beta2": 0.99}),
    "fastflow": ("resnet18", ("layer1", "layer2", "layer3"), 500,
                 {"flow_steps": 8, "conv3x3_only": False, "hidden_ratio": 1.0, "lr": 1e-3, "weight_decay": 1e-5}),
}


@pytest.mark.parametrize("name", sorted(ANOMALIB_DEFAULTS))
def test_defaults_are_anomalibs(name):
    backbone, layers, epochs, settings = ANOMALIB_DEFAULTS[name]
    cls = model_class(name)
    assert (cls.default_backbone, tuple(cls.default_layers), cls.default_epochs) == (backbone, layers, epochs)
    assert {k: cls.defaults[k] for k in settings} == settings
    assert cls.gradient_clip_val is None  # anomalib: gradient_clip_val=0 for all seven
