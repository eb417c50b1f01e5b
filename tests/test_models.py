"""Memory-bank models: fit, score, save and load, on tiny inputs with the offline backbone."""

from __future__ import annotations

import pytest
import torch

from raylib_ad.artifact import load, read_model, write_model_dir, write_stats
from raylib_ad.errors import ConfigError, DataError
from raylib_ad.models import create_model, list_models
from raylib_ad.models.base import default_layers_for

BACKBONE = "tf_efficientnet_lite0"
SIZE = 64


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def fitted(name: str, **settings):
    model = create_model(name, backbone=BACKBONE, image_size=SIZE, **settings)
    model.fit([images(6, 0), images(6, 1)])
    return model.eval()


@pytest.mark.parametrize("name", ["patchcore", "padim", "dfm", "dfkde"])
def test_fit_forward_save_load_roundtrip(name, tmp_path, lite0_available):
    model = fitted(name)
    test = images(3, 2)
    with torch.no_grad():
        out = model(test)
    assert out.score.shape == (3,) and torch.isfinite(out.score).all()
    if model.produces_maps:
        assert out.anomaly_map.shape == (3, SIZE, SIZE)
    else:
        assert out.anomaly_map is None
    write_model_dir(model, tmp_path / "m")
    reloaded = read_model(tmp_path / "m")
    with torch.no_grad():
        again = reloaded(test)
    torch.testing.assert_close(again.score, out.score, rtol=1e-4, atol=1e-4)
    assert reloaded.config() == model.config()


def test_models_are_registered_with_their_anomalib_defaults():
    assert {"patchcore", "padim", "dfm", "dfkde"} <= set(list_models())
    assert default_layers_for("wide_resnet50_2", ("layer2", "layer3")) == ["layer2", "layer3"]
    # Default layers follow the stride on other backbones (the figures use these).
    assert default_layers_for(BACKBONE, ("layer2", "layer3")) == ["blocks.2", "blocks.4"]
    assert default_layers_for(BACKBONE, ("layer1", "layer2", "layer3")) == ["blocks.1", "blocks.2", "blocks.4"]
    assert default_layers_for(BACKBONE, ("layer4",)) == ["blocks.6"]


def test_patchcore_bank_size_follows_the_sampling_ratio(lite0_available):
    model = fitted("patchcore", coreset_sampling_ratio=0.05)
    patches_per_image = (SIZE // 8) ** 2  # blocks.2 has stride 8
    assert model.memory_bank.shape == (int(12 * patches_per_image * 0.05), 40 + 112)


def test_patchcore_scores_an_outlier_higher(lite0_available):
    model = fitted("patchcore", coreset_sampling_ratio=0.5)
    normal = images(2, 0)
    odd = normal.clone()
    odd[:, :, 20:40, 20:40] = 4.0  # a bright square the training images never had
    with torch.no_grad():
        s_normal, s_odd = model(normal).score, model(odd).score
    assert (s_odd > s_normal).all()
    amap = model(odd).anomaly_map[0]
    assert amap[20:40, 20:40].mean() > amap[:10, :10].mean()


def test_padim_covariance_is_the_sample_covariance(lite0_available):
    model = create_model("padim", backbone=BACKBONE, image_size=SIZE, n_features=10)
    batches = [images(5, 0), images(7, 1)]
    model.fit(batches)
    with torch.no_grad():
        patches = torch.cat([model.embed(b)[0] for b in batches]).double()  # (N, P, C)
    p = 3
    ref = torch.cov(patches[:, p].T) + 0.01 * torch.eye(10, dtype=torch.float64)
    torch.testing.assert_close(torch.linalg.inv(model.inv_covariance[p].double()), ref, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(model.mean[p].double(), patches[:, p].mean(0), rtol=1e-5, atol=1e-5)


def test_dfm_moment_and_gather_paths_agree(lite0_available):
    small = fitted("dfm")  # dimension 112 * 1 * 1 -> moments path
    big = fitted("dfm", moments_max_dim=1)  # forces the all-gather path
    torch.testing.assert_close(small.pca.components, big.pca.components, rtol=1e-3, atol=1e-3)


def test_bad_settings_name_the_key_and_value():
    with pytest.raises(ConfigError, match="unknown setting.*'coreset_ratio'"):
        create_model("patchcore", backbone=BACKBONE, pretrained=False, coreset_ratio=0.1)
    with pytest.raises(ConfigError, match="coreset_sampling_ratio=1.5"):
        create_model("patchcore", backbone=BACKBONE, pretrained=False, coreset_sampling_ratio=1.5)
    with pytest.raises(ConfigError, match="score_type='mse'"):
        create_model("dfm", backbone=BACKBONE, pretrained=False, score_type="mse")
    with pytest.raises(ConfigError, match="unknown model 'patchkore'"):
        create_model("patchkore")


def test_unfitted_model_says_so():
    model = create_model("patchcore", backbone=BACKBONE, image_size=SIZE, pretrained=False)
    with pytest.raises(RuntimeError, match="empty memory bank"):
        model(images(1, 0))


def test_trained_model_predicts_with_threshold_and_maps(tmp_path, lite0_available):
    model = fitted("patchcore")
    write_model_dir(model, tmp_path / "m")
    write_stats(tmp_path / "m", {"image_stats": {"threshold": 1.0, "min": 0.0, "max": 2.0},
                                 "pixel_stats": {"threshold": 1.0, "min": 0.0, "max": 2.0}})
    trained = load(tmp_path / "m")
    import numpy as np

    gray = np.full((80, 100), 120, dtype=np.uint8)  # any size, grayscale: resized and replicated
    [result] = trained.predict([gray], with_maps=True)
    assert result["is_anomalous"] == (result["score"] >= 1.0)
    assert 0.0 <= result["normalized_score"] <= 1.0
    assert result["anomaly_map"].shape == (SIZE, SIZE)
    with pytest.raises(DataError, match="not a raylib_ad model directory"):
        load(tmp_path)
