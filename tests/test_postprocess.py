"""Validation carving, thresholds, normalization, plots and the evaluation report."""

import io

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from raylib_ad.errors import ConfigError, DataError
from raylib_ad.metrics import aupro, auroc, f1_at, f1_max, pixel_auroc
from raylib_ad.postprocess import evaluation_report
from raylib_ad.postprocess import (
    NormalizationStats,
    carve_validation,
    fit_image_threshold,
    fit_normalization,
    fit_pixel_threshold,
    fit_threshold,
    normalize,
    quantile_threshold,
)
from raylib_ad.postprocess.plots import (
    anomaly_map_png,
    heatmap_overlay,
    plot_pro,
    plot_roc,
    save_overlay_grid,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- validation split


def test_carve_validation_is_a_stratified_seeded_partition():
    labels = np.array([0] * 70 + [1] * 30)
    val, test = carve_validation(labels, fraction=0.3, seed=4)
    assert np.intersect1d(val, test).size == 0
    np.testing.assert_array_equal(np.sort(np.r_[val, test]), np.arange(100))
    assert (labels[val] == 0).sum() == 21 and (labels[val] == 1).sum() == 9
    again_val, again_test = carve_validation(labels, fraction=0.3, seed=4)
    np.testing.assert_array_equal(val, again_val)
    np.testing.assert_array_equal(test, again_test)
    assert not np.array_equal(val, carve_validation(labels, fraction=0.3, seed=5)[0])


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.99])
def test_each_class_keeps_a_sample_on_each_side(fraction):
    labels = np.array([0] * 10 + [1] * 2)
    val, test = carve_validation(labels, fraction=fraction, seed=0)
    for value in (0, 1):
        assert (labels[val] == value).sum() >= 1
        assert (labels[test] == value).sum() >= 1


def test_a_single_sample_class_stays_on_the_test_side():
    labels = np.array([0, 0, 0, 0, 1])
    val, test = carve_validation(labels, fraction=0.5)
    assert 4 in test and 4 not in val


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, "half", None])
def test_carve_validation_rejects_bad_fraction(fraction):
    with pytest.raises(ConfigError, match="fraction"):
        carve_validation([0, 1, 0, 1], fraction=fraction)


# --------------------------------------------------------------------------- thresholds


def test_threshold_choices():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.6, 0.5, 0.9])
    assert fit_threshold(labels, scores) == f1_max(labels, scores)[1]
    assert fit_image_threshold(labels, scores) == (fit_threshold(labels, scores), "f1_max")
    normal = np.linspace(0, 1, 101)
    assert quantile_threshold(normal, q=0.9) == pytest.approx(0.9)
    threshold, method = fit_image_threshold(np.zeros(101), normal, q=0.95)
    assert method == "normal_quantile" and threshold == pytest.approx(0.95)
    with pytest.raises(ConfigError, match="quantile q"):
        quantile_threshold(normal, q=0.0)
    with pytest.raises(DataError, match="empty"):
        fit_image_threshold([], [])


def test_pixel_threshold_is_exact_f1_max_or_normal_quantile():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 16, 16), dtype=np.uint8)
    masks[0, 3:8, 3:8] = 1
    maps = (rng.integers(0, 20, masks.shape) / 20 + 0.3 * masks).astype(np.float32)
    threshold, method = fit_pixel_threshold(masks, maps)
    assert method == "f1_max"
    assert threshold == f1_max(masks.ravel(), maps.ravel())[1]
    threshold, method = fit_pixel_threshold(np.zeros_like(masks), maps, q=0.9)
    assert method == "normal_quantile"
    assert threshold == pytest.approx(np.quantile(maps, 0.9))


# --------------------------------------------------------------------------- normalization


def test_normalization_maps_threshold_to_half_and_clips():
    stats = NormalizationStats(threshold=2.0, min=0.0, max=4.0)
    assert normalize(2.0, stats) == 0.5
    assert normalize(np.float32(2.0), stats) == 0.5
    assert normalize(3.0, stats) == 0.75
    assert normalize(100.0, stats) == 1.0 and normalize(-100.0, stats) == 0.0
    values = np.array([-10, 1, 2, 3, 10], dtype=np.float32)
    out = normalize(values, stats)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(normalize(np.array([2, 6]), stats), [0.5, 1.0])  # ints work
    tensor = normalize(torch.tensor([[1.0, 2.0], [3.0, 9.0]]), stats)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
    np.testing.assert_allclose(tensor.numpy(), [[0.25, 0.5], [0.75, 1.0]])


def test_normalization_guards_and_round_trip():
    flat = NormalizationStats(threshold=1.0, min=1.0, max=1.0)
    assert normalize(1.0, flat) == 0.5
    assert np.isfinite(normalize(np.array([0.0, 1.0, 2.0]), flat)).all()
    stats = fit_normalization(np.array([0.5, 3.0, 1.5]), threshold=1.0)
    assert stats == NormalizationStats(threshold=1.0, min=0.5, max=3.0)
    assert NormalizationStats.from_dict(stats.to_dict()) == stats
    assert stats.to_dict() == {"threshold": 1.0, "min": 0.5, "max": 3.0}
    with pytest.raises(ConfigError, match="max"):
        NormalizationStats(threshold=0.0, min=2.0, max=1.0)
    with pytest.raises(ConfigError, match="threshold"):
        NormalizationStats(threshold=float("nan"), min=0.0, max=1.0)
    with pytest.raises(ConfigError, match="min"):
        NormalizationStats.from_dict({"threshold": 0.0, "max": 1.0})


# --------------------------------------------------------------------------- plots


def assert_png_file(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([0] * 10 + [1] * 10)
    scores = rng.random(20) + labels
    assert_png_file(plot_roc(labels, scores, tmp_path / "roc.png", title="bottle"))
    masks = np.zeros((4, 32, 32), dtype=np.uint8)
    masks[0, 5:15, 5:15] = 1
    maps = rng.random(masks.shape, dtype=np.float32) + masks
    assert_png_file(plot_pro(masks, maps, tmp_path / "sub" / "pro.png"))
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    tile_scores = maps.max(axis=(1, 2))
    grid = save_overlay_grid(images, maps, masks, tile_scores, [1, 0, 0, 0], tmp_path / "grid.png")
    assert_png_file(grid)
    bare = save_overlay_grid(images, maps, None, None, None, tmp_path / "bare.png", max_items=3)
    assert_png_file(bare)


def test_heatmap_overlay_blends_and_outlines_the_mask():
    image = np.full((20, 20, 3), 100, dtype=np.uint8)
    amap = np.zeros((20, 20), dtype=np.float32)
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[5:10, 5:10] = 1
    out = heatmap_overlay(image, amap, vmin=0.0, vmax=1.0, mask=mask)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert tuple(out[5, 5]) == (0, 255, 0)  # region border
    assert tuple(out[7, 7]) != (0, 255, 0)  # region interior is not drawn over
    assert tuple(out[0, 0]) != (0, 255, 0)
    assert heatmap_overlay(image[..., 0], amap).shape == (20, 20, 3)  # grayscale input
    with pytest.raises(DataError, match="does not match"):
        heatmap_overlay(image, np.zeros((10, 10)))


def test_anomaly_map_png_decodes_to_the_map_size():
    data = anomaly_map_png(np.random.default_rng(0).random((24, 40)), vmin=0.0, vmax=1.0)
    assert data[:8] == PNG_MAGIC
    assert imread(io.BytesIO(data), format="png").shape[:2] == (24, 40)


def test_anomaly_map_png_at_the_image_size_with_the_threshold_outlined():
    from PIL import Image

    amap = np.zeros((16, 16), dtype=np.float32)
    amap[4:12, 4:12] = 1.0  # above the threshold in the middle
    data = anomaly_map_png(amap, vmin=0.0, vmax=1.0, size=(120, 90), threshold=0.5)
    png = Image.open(io.BytesIO(data))
    assert png.size == (120, 90)  # (width, height) of the scored image, not the model's 16 x 16
    assert "threshold" in png.text["Threshold"] and "0.5" in png.text["Threshold"]
    assert png.text["Scale"] == "blue = 0, red = 1"
    rgb = np.asarray(png.convert("RGB"))
    white = np.all(rgb == 255, axis=-1)
    rows, cols = np.nonzero(white)
    assert white.any() and 20 <= rows.min() and rows.max() <= 70 and 25 <= cols.min() and cols.max() <= 95
    assert not white[45, 60] and not white[0, 0]  # the outline, not the region or the background
    plain = Image.open(io.BytesIO(anomaly_map_png(amap, vmin=0.0, vmax=1.0)))
    assert plain.size == (16, 16) and not np.all(np.asarray(plain.convert("RGB")) == 255, axis=-1).any()


# --------------------------------------------------------------------------- evaluation report


def test_report_keys_and_disjoint_split():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 40 + [1] * 20)
    scores = rng.random(60) + labels
    masks = np.zeros((60, 16, 16), dtype=np.uint8)
    masks[40:, 4:9, 4:9] = 1
    maps = rng.random(masks.shape, dtype=np.float32) + 0.5 * masks
    report = evaluation_report(labels, scores, masks, maps)
    assert set(report) >= {
        "metrics", "image_stats", "pixel_stats", "threshold_method", "n_validation",
        "n_test_heldout", "val_idx", "heldout_idx",
    }
    threshold_free = {"image_auroc", "image_f1_max", "pixel_auroc", "pixel_aupro"}
    assert set(report["metrics"]) == threshold_free | {f"whole_split_{k}" for k in threshold_free} | {
        "image_f1", "image_precision", "image_recall", "pixel_f1"}
    assert all(isinstance(v, float) for v in report["metrics"].values())
    val, heldout = set(report["val_idx"]), set(report["heldout_idx"])
    assert not val & heldout and val | heldout == set(range(60))
    assert (report["n_validation"], report["n_test_heldout"]) == (len(val), len(heldout))
    # Headline metrics use the held-out images only (the validation subset fitted the threshold);
    # the whole split's figures keep a name that says so.
    held = report["heldout_idx"]
    assert report["metrics"]["image_auroc"] == auroc(labels[held], scores[held])
    assert report["metrics"]["pixel_auroc"] == pytest.approx(pixel_auroc(masks[held], maps[held]))
    assert report["metrics"]["pixel_aupro"] == pytest.approx(aupro(masks[held], maps[held]))
    assert report["metrics"]["whole_split_image_auroc"] == auroc(labels, scores)
    assert report["metrics"]["whole_split_pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps))
    assert NormalizationStats.from_dict(report["pixel_stats"]).max == pytest.approx(
        maps[report["val_idx"]].max()
    )


def test_report_thresholded_metrics_use_heldout_images_only():
    labels = np.array([0] * 20 + [1] * 10)
    val_idx, heldout_idx = carve_validation(labels, 0.3, seed=0)
    scores = np.zeros(30)
    # Validation: anomalies score 1.0, normals 0.0 -> F1-max threshold is 1.0.
    scores[val_idx] = labels[val_idx].astype(float)
    # Held-out: anomalies score 0.8, below that threshold -> nothing detected there.
    scores[heldout_idx] = 0.8 * labels[heldout_idx]
    report = evaluation_report(labels, scores, val_fraction=0.3, seed=0)
    assert report["val_idx"] == val_idx.tolist()
    assert report["threshold_method"] == "f1_max"
    assert report["image_stats"]["threshold"] == 1.0
    metrics = report["metrics"]
    assert metrics["image_f1"] == 0.0 and metrics["image_recall"] == 0.0
    # On all images (validation included) the same threshold would give a positive F1.
    assert f1_at(labels, scores, 1.0) > 0.0
    assert metrics["image_f1"] == f1_at(labels[heldout_idx], scores[heldout_idx], 1.0)
    assert metrics["image_auroc"] == 1.0 and metrics["image_f1_max"] == 1.0  # whole split
    assert report["pixel_stats"] is None and "pixel_auroc" not in metrics


def test_report_with_maps_but_no_masks_and_normal_only_pixels():
    rng = np.random.default_rng(1)
    labels = np.array([0] * 10 + [1] * 5)
    scores = rng.random(15) + labels
    maps = rng.random((15, 8, 8), dtype=np.float32)
    report = evaluation_report(labels, scores, maps=maps)
    assert report["pixel_threshold_method"] == "normal_quantile"
    assert report["pixel_stats"] is not None and "pixel_auroc" not in report["metrics"]
    empty_masks = np.zeros((15, 8, 8), dtype=np.uint8)
    report = evaluation_report(labels, scores, masks=empty_masks, maps=maps)
    assert "pixel_aupro" not in report["metrics"] and report["pixel_stats"] is not None
    with pytest.raises(ConfigError, match="masks were given without maps"):
        evaluation_report(labels, scores, masks=empty_masks)
    with pytest.raises(DataError, match="N = 15"):
        evaluation_report(labels, scores, masks=empty_masks[:3], maps=maps[:3])
