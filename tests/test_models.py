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


# --- fast scoring paths: equal to the plain computations up to float rounding ---------------------------


def unfolded_features(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The backbone as built (batch norm not folded), the whole batch at once."""
    fe = model.feature_extractor
    with torch.no_grad():
        return dict(zip(fe.layers, fe.model(x.contiguous(memory_format=torch.channels_last))))


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("upsample_mode", ["nearest", "bilinear"])
def test_patchcore_fast_forward_equals_the_plain_computation(upsample_mode, lite0_available):
    import torch.nn.functional as F

    from raylib_ad.models.components.embedding import concat_layers, to_patches

    model = fitted("patchcore", upsample_mode=upsample_mode)
    model.feature_extractor.cpu_chunk_pixels = SIZE * SIZE  # one image per backbone chunk
    x = images(3, 5)
    with torch.no_grad():
        out = model(x)
        feats = unfolded_features(model, x)
        pooled = {k: F.avg_pool2d(v, 3, stride=1, padding=1) for k, v in feats.items()}
        embedding = concat_layers(pooled, model.layers, mode="bilinear")
        patches = to_patches(embedding)
        dist, loc = torch.cdist(patches, model.memory_bank.expand(3, -1, -1)).min(-1)  # (B, P)
        h, w = embedding.shape[-2:]
        kwargs = {} if upsample_mode == "nearest" else {"align_corners": False}
        upsampled = F.interpolate(dist.view(3, 1, h, w), size=(SIZE, SIZE), mode=upsample_mode, **kwargs)
        expected_map = model.blur(upsampled)[:, 0]  # the full-resolution convolution
        expected_score = model.reweighted_score(dist, loc, patches)
    assert_close_rel(out.anomaly_map, expected_map)
    assert_close_rel(out.score, expected_score)


def test_padim_fast_forward_equals_the_plain_computation(lite0_available):
    from raylib_ad.models.components.embedding import concat_layers, to_patches

    model = fitted("padim")
    model.feature_extractor.cpu_chunk_pixels = SIZE * SIZE
    x = images(3, 5)
    with torch.no_grad():
        out = model(x)
        embedding = concat_layers(unfolded_features(model, x), model.layers, mode="nearest")
        embedding = embedding.index_select(1, model.feature_index)
        delta = to_patches(embedding) - model.mean.unsqueeze(0)
        dist = torch.einsum("bpc,pcd,bpd->bp", delta, model.inv_covariance, delta).clamp_min(0).sqrt()
        h, w = embedding.shape[-2:]
        expected_map = model.blur(model.upsample(dist.view(3, 1, h, w)))[:, 0]
        torch.testing.assert_close(model.embed(x)[0], to_patches(embedding), rtol=1e-4, atol=1e-4)
    assert_close_rel(out.anomaly_map, expected_map)
    assert_close_rel(out.score, expected_map.amax(dim=(1, 2)))


@pytest.mark.parametrize("name", ["dfm", "dfkde"])
def test_folded_chunked_backbone_scores_as_the_plain_one(name, lite0_available):
    model = fitted(name)
    x = images(3, 5)
    with torch.no_grad():
        fast = model(x)
        model.feature_extractor.cpu_chunk_pixels = 10**9  # whole batch ...
        model.feature_extractor._inference_model = lambda images: model.feature_extractor.model  # ... unfolded
        plain = model(x)
    assert_close_rel(fast.score, plain.score)
    if plain.anomaly_map is not None:
        assert_close_rel(fast.anomaly_map, plain.anomaly_map)


def test_folded_backbone_follows_new_weights_and_is_not_saved(lite0_available):
    import copy

    model = fitted("dfm")
    fe = model.feature_extractor
    x = images(2, 7)
    with torch.no_grad():
        before = fe(x)
    assert not any("_folded" in key for key in model.state_dict())
    # New batch-norm statistics (as a checkpoint load would copy in): the folded copy is rebuilt from them.
    state = {k: (v * 1.5 if k.endswith("running_var") else v) for k, v in fe.state_dict().items()}
    fe.load_state_dict(state)
    with torch.no_grad():
        after = fe(x)
        expected = unfolded_features(model, x)
    layer = fe.layers[0]
    assert not torch.allclose(after[layer], before[layer], rtol=1e-3, atol=1e-3)
    assert_close_rel(after[layer], expected[layer])
    clone = copy.deepcopy(fe)  # the cached copy is not carried along; the clone builds its own
    assert clone.__dict__["_folded"] is None
    with torch.no_grad():
        assert_close_rel(clone(x)[layer], after[layer])


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("grid,size", [((8, 8), (64, 64)), ((4, 6), (64, 64)), ((5, 5), (9, 9))])
def test_blur_as_matrices_equals_upsample_then_blur(mode, grid, size):
    import torch.nn.functional as F

    from raylib_ad.models.components.blur import GaussianBlur2d

    blur = GaussianBlur2d(sigma=4.0)
    maps = torch.rand(3, 1, *grid, generator=torch.Generator().manual_seed(0)) * 10
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    expected = blur(F.interpolate(maps, size=size, mode=mode, **kwargs))
    assert_close_rel(blur.upsample_and_blur(maps, size, mode), expected)


def test_nearest_neighbors_match_brute_force():
    from raylib_ad.models.components.nearest_neighbors import nearest_neighbors

    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(3000, 16, generator=g), torch.randn(700, 16, generator=g)
    full = torch.cdist(queries, bank)
    for k in (1, 4):
        dist, idx = nearest_neighbors(queries, bank, k=k, query_chunk=1000, bank_chunk=300)
        expected = full.topk(k, dim=1, largest=False)
        torch.testing.assert_close(dist, expected.values, rtol=1e-4, atol=1e-4)
        assert (idx == expected.indices).float().mean() > 0.999


def test_models_name_lists_every_setting_with_its_default_and_range(capsys):
    from raylib_ad.cli import main
    from raylib_ad.models import model_class

    assert main(["models", "uflow"]) == 0
    out = capsys.readouterr().out
    for key, value in model_class("uflow").defaults.items():
        line = next(line for line in out.splitlines() if line.split()[:1] == [key])
        assert str(value).lower().replace("'", '"') in line.lower() or f'"{value}"' in line, line
    assert "a number in (0, 1)" in out  # nfa_probability_thr's range, as the model checks it
    assert "pretrained" in out and "200 epochs" in out
    assert main(["models", "nosuch"]) == 2
