"""The numbers behind the decision plots: operating point, confusion matrix, per-defect recall, heatmap tiles."""

import json

import numpy as np
import pytest
from PIL import Image

from raylib_ad.errors import DataError
from raylib_ad.metrics import confusion_at, defect_metrics_at, roc_curve, threshold_metrics, threshold_report
from raylib_ad.postprocess.heatmap_grid import HeatmapTile, heatmap_indices, save_heatmap_grid, tile_image
from raylib_ad.postprocess.plots import plot_roc, plot_threshold_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# 4 good, 3 crack, 3 spot; threshold 0.5: good 0.6 is a false alarm, crack 0.2 and spot 0.4 are missed.
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
DEFECTS = ["good"] * 4 + ["crack"] * 3 + ["spot"] * 3
SCORES = np.array([0.1, 0.2, 0.3, 0.6, 0.2, 0.7, 0.9, 0.4, 0.8, 0.5])
THRESHOLD = 0.5


def png_size(path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        return im.size


def test_confusion_counts_and_operating_point():
    point = confusion_at(LABELS, SCORES, THRESHOLD)
    assert (point["tn"], point["fp"], point["fn"], point["tp"]) == (3, 1, 2, 4)
    assert point["matrix"] == [[3, 1], [2, 4]]
    assert point["tpr"] == pytest.approx(4 / 6) and point["fpr"] == pytest.approx(1 / 4)
    assert point["precision"] == pytest.approx(4 / 5)
    # score == threshold counts as anomalous (the spot at 0.5), as in every thresholded metric.
    assert confusion_at([1], [0.5], 0.5)["tp"] == 1
    # The marked operating point lies on the ROC curve drawn from the same images.
    fpr, tpr, _ = roc_curve(LABELS, SCORES)
    assert any(np.isclose(f, point["fpr"]) and np.isclose(t, point["tpr"]) for f, t in zip(fpr, tpr))


def test_rates_without_a_class_are_none_not_zero():
    point = confusion_at([0, 0], [0.1, 0.9], 0.5)
    assert point["tpr"] is None and point["fpr"] == 0.5


def test_recall_per_defect_type_and_false_positives_on_good():
    result = defect_metrics_at(DEFECTS, LABELS, SCORES, THRESHOLD)
    assert result["defects"] == {
        "crack": {"n": 3, "detected": 2, "missed": 1, "recall": pytest.approx(2 / 3)},
        "spot": {"n": 3, "detected": 2, "missed": 1, "recall": pytest.approx(2 / 3)},
    }
    assert result["good"] == {"n": 4, "false_positives": 1, "false_positive_rate": 0.25}
    with pytest.raises(DataError, match="defects and scores differ in size"):
        defect_metrics_at(DEFECTS[:-1], LABELS, SCORES, THRESHOLD)


def test_threshold_report_is_json_and_flattens_to_rates_and_counts():
    report = threshold_report(LABELS, np.float32(SCORES), THRESHOLD, DEFECTS)
    assert json.loads(json.dumps(report)) == report  # metrics.json and MLflow take it as is
    assert report["n_images"] == 10
    flat = threshold_metrics(report)
    assert flat["image_threshold"] == THRESHOLD
    assert flat["image_tpr"] == pytest.approx(4 / 6) and flat["image_fpr"] == 0.25
    assert (flat["image_tp"], flat["image_fp"], flat["image_tn"], flat["image_fn"]) == (4, 1, 3, 2)
    assert flat["image_recall_crack"] == pytest.approx(2 / 3)
    assert flat["image_good_false_positives"] == 1 and flat["image_good_fpr"] == 0.25
    counts = {"image_tp", "image_fp", "image_tn", "image_fn", "image_good_false_positives"}
    assert all(type(flat[k]) is int for k in counts)  # metrics.json and the summary say 24, not 24.0
    assert all(isinstance(v, float) for k, v in flat.items() if k not in counts)
    odd = threshold_metrics(threshold_report([1, 0], [1.0, 0.0], 0.5, ["MT Blow/hole", "good"]))
    assert "image_recall_MT_Blow_hole" in odd


def test_roc_and_threshold_plots_write_pngs(tmp_path):
    assert png_size(plot_roc(LABELS, SCORES, tmp_path / "roc.png", threshold=THRESHOLD)) == (500, 500)
    assert png_size(plot_roc(LABELS, SCORES, tmp_path / "plain.png"))  # threshold stays optional
    report = threshold_report(LABELS, SCORES, THRESHOLD, DEFECTS)
    assert png_size(plot_threshold_report(report, tmp_path / "threshold.png"))[0] == 1000
    bare = threshold_report(LABELS, SCORES, THRESHOLD)  # no defect column: the matrix alone
    assert png_size(plot_threshold_report(bare, tmp_path / "bare.png"))[0] == 450


def write_pair(tmp_path, name, size, box):
    """An image of ``size`` (w, h) and its mask with ``box`` = (x0, y0, x1, y1) set."""
    w, h = size
    Image.new("RGB", size, (90, 90, 90)).save(tmp_path / f"{name}.png")
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[box[1]:box[3], box[0]:box[2]] = 255
    Image.fromarray(mask).save(tmp_path / f"{name}_mask.png")
    return str(tmp_path / f"{name}.png"), str(tmp_path / f"{name}_mask.png")


def test_tile_is_drawn_at_the_images_own_size_with_the_map_resized_onto_it(tmp_path):
    image, mask = write_pair(tmp_path, "wide", (120, 40), (60, 0, 120, 40))
    amap = np.zeros((16, 16), dtype=np.float32)
    amap[:, 8:] = 1.0  # the right half of the square model input is hot
    stats = {"threshold": 0.5, "min": 0.0, "max": 1.0}
    tile = tile_image(HeatmapTile(image, amap, 1.0, 1, "crack", mask), stats)
    assert tile.shape == (40, 120, 3)  # not squashed to the model's square
    left, right = tile[20, 20].astype(int), tile[20, 100].astype(int)
    assert right[0] > right[2] and left[2] > left[0]  # hot = red on the right, cold = blue on the left
    assert tuple(tile[20, 60]) == (255, 255, 255)  # mask border outlined where the mask starts
    assert tuple(tile[20, 90]) != (255, 255, 255)  # inside the region is not painted over


def test_heatmap_grid_png_and_tile_choice(tmp_path):
    tiles = []
    for k, size in enumerate([(120, 40), (40, 90), (64, 64)]):
        image, mask = write_pair(tmp_path, f"im{k}", size, (5, 5, 20, 20))
        tiles.append(HeatmapTile(image, np.random.default_rng(k).random((16, 16), dtype=np.float32),
                                 score=[0.9, 0.1, 0.7][k], label=[1, 1, 0][k], defect="crack",
                                 mask_path=mask if k < 2 else None))
    path = save_heatmap_grid(tiles, tmp_path / "grid.png", {"threshold": 0.5, "min": 0.0, "max": 1.0},
                             columns=2, title="held-out")
    width, height = png_size(path)
    assert height > width / 2  # two rows of tiles
    with pytest.raises(DataError, match="no images"):
        save_heatmap_grid([], tmp_path / "none.png", {"threshold": 0.5, "min": 0.0, "max": 1.0})

    chosen = heatmap_indices(LABELS, SCORES, THRESHOLD, defects=DEFECTS, max_items=6)
    assert chosen[:3] == [4, 7, 3]  # missed crack (0.2), missed spot (0.4), then the false alarm (0.6)
    assert len(chosen) == len(set(chosen)) == 6
    assert {DEFECTS[i] for i in chosen} == {"good", "crack", "spot"}
    held = [0, 1, 5, 6]
    assert set(heatmap_indices(LABELS, SCORES, THRESHOLD, candidates=held)) <= set(held)


def test_summary_prints_counts_as_integers_and_says_what_peak_memory_is():
    from raylib_ad.train.outputs import summary_table

    table = summary_table("stfpm", "widget", {"image_auroc": 0.91, "peak_memory_mb": 6612.4,
                                              "image_good_false_positives": 24.0, "image_recall_crack": 0.5})
    rows = {line.split()[0]: line for line in table.splitlines() if line.strip()}
    assert rows["image_good_false_positives"].split()[1] == "24"  # a float read back from JSON, too
    assert rows["image_auroc"].split()[1] == "0.9100"
    peak = rows["peak_memory_mb"]
    assert peak.split()[1] == "6612" and "largest single process" in peak and "not a sum" in peak
