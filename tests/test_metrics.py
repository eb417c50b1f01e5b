"""Metrics against sklearn and against slow, obviously-correct reference implementations."""

from collections import deque

import numpy as np
import pytest
from sklearn import metrics as skm

from raylib_ad.errors import ConfigError, DataError
from raylib_ad.metrics import (
    aupro,
    auroc,
    f1_at,
    f1_max,
    pixel_auroc,
    precision_recall_f1_at,
    pro_curve,
    roc_curve,
)

# --------------------------------------------------------------------------- helpers


def tied_scores(rng, n, levels=7):
    """Scores on a coarse grid so that ties between classes are frequent."""
    return rng.integers(0, levels, n).astype(np.float32) / levels


def random_labels(rng, n, p=0.4):
    labels = (rng.random(n) < p).astype(int)
    labels[:2] = [0, 1]  # both classes always present
    return labels


def connected_regions(mask, eight_connected=True):
    """Independent flood-fill labelling: list of boolean masks, one per region."""
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if eight_connected:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        region = np.zeros_like(seen)
        queue = deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            region[y, x] = True
            for dy, dx in steps:
                ny, nx = y + dy, x + dx
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        regions.append(region)
    return regions


def brute_force_aupro(masks, maps, fpr_limit=0.3, eight_connected=True):
    """PRO curve evaluated at every distinct score, then trapezoid up to fpr_limit."""
    masks = masks.astype(bool)
    regions = [
        (i, region)
        for i in range(len(masks))
        for region in connected_regions(masks[i], eight_connected)
    ]
    normal_scores = maps[~masks]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(np.mean(normal_scores >= t))
        overlaps = []
        for i, region in regions:
            overlaps.append(np.mean(maps[i][region] >= t))
        pros.append(np.mean(overlaps))
    area = 0.0
    for k in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_end = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_end) / 2
            break
    return area / fpr_limit


def small_masks():
    """6 images 16x16: rectangles, single pixels, diagonal-only neighbours, empty images."""
    masks = np.zeros((6, 16, 16), dtype=np.uint8)
    masks[0, 2:6, 3:9] = 1  # one rectangle
    masks[0, 10, 10] = 1  # a lone pixel
    masks[1, 4, 4] = masks[1, 5, 5] = masks[1, 6, 6] = 1  # diagonal line: ONE region (8-conn)
    masks[1, 12:15, 1:3] = 1
    masks[2, 0:16, 0] = 1  # touching the border
    masks[2, 8, 8] = masks[2, 9, 7] = 1  # anti-diagonal pair
    masks[4, 5:12, 5:12] = 1
    # images 3 and 5 stay normal
    return masks


# --------------------------------------------------------------------------- image metrics


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = random_labels(rng, 300)
    scores = tied_scores(rng, 300)
    assert auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    continuous = rng.normal(size=300) + labels
    expected = skm.roc_auc_score(labels, continuous)
    assert auroc(labels, continuous) == pytest.approx(expected, abs=1e-12)


def test_auroc_extremes_and_types():
    labels = np.array([0, 0, 1, 1], dtype=bool)
    assert auroc(labels, [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc(labels, [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auroc(labels, [1, 1, 1, 1]) == 0.5
    assert isinstance(auroc(labels, np.float32([0.1, 0.2, 0.3, 0.4])), float)


@pytest.mark.parametrize("seed", range(3))
def test_roc_curve_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = random_labels(rng, 200)
    scores = tied_scores(rng, 200, levels=11)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    ref_fpr, ref_tpr, ref_thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    assert np.isinf(thresholds[0])
    np.testing.assert_allclose(thresholds[1:], ref_thresholds[1:], rtol=1e-6)


def brute_force_f1_max(labels, scores):
    best = (-1.0, None)
    for t in np.unique(scores):
        f1 = skm.f1_score(labels, scores >= t, zero_division=0)
        if f1 > best[0]:
            best = (f1, t)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = random_labels(rng, 150, p=0.2)
    scores = tied_scores(rng, 150, levels=9) + 0.3 * labels * rng.random(150)
    f1, threshold = f1_max(labels, scores)
    ref_f1, _ = brute_force_f1_max(labels, scores)
    assert f1 == pytest.approx(ref_f1, abs=1e-12)
    assert threshold in set(scores.tolist())  # a real score value
    assert f1_at(labels, scores, threshold) == pytest.approx(f1, abs=1e-12)


def test_f1_at_and_precision_recall_match_sklearn():
    rng = np.random.default_rng(7)
    labels = random_labels(rng, 100)
    scores = rng.random(100)
    for t in [0.0, 0.3, 0.5, 0.9, 2.0]:
        predicted = scores >= t
        precision, recall, f1 = precision_recall_f1_at(labels, scores, t)
        assert precision == pytest.approx(skm.precision_score(labels, predicted, zero_division=0))
        assert recall == pytest.approx(skm.recall_score(labels, predicted, zero_division=0))
        assert f1 == pytest.approx(skm.f1_score(labels, predicted, zero_division=0))
        assert f1_at(labels, scores, t) == f1


def test_image_metric_errors_name_the_problem():
    with pytest.raises(ConfigError, match="no anomalous"):
        auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ConfigError, match="no normal"):
        auroc([1, 1], [0.1, 0.2])
    with pytest.raises(ConfigError, match="no anomalous"):
        f1_max([0, 0], [0.1, 0.2])
    with pytest.raises(ConfigError, match="no normal"):
        roc_curve([1, 1], [0.1, 0.2])
    with pytest.raises(DataError, match="differ in size"):
        auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(DataError, match="NaN"):
        auroc([0, 1], [0.1, np.nan])
    with pytest.raises(DataError, match="only 0 and 1"):
        auroc([0, 2], [0.1, 0.2])


# --------------------------------------------------------------------------- pixel metrics


def test_pixel_auroc_matches_sklearn():
    rng = np.random.default_rng(3)
    masks = small_masks()
    maps = (tied_scores(rng, masks.size, levels=13).reshape(masks.shape) + 0.2 * masks).astype(
        np.float32
    )
    expected = skm.roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    as_bool_and_float64 = pixel_auroc(masks.astype(bool), maps.astype(np.float64))
    assert as_bool_and_float64 == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [5, 40, None])
def test_aupro_matches_brute_force(seed, levels):
    rng = np.random.default_rng(seed)
    masks = small_masks()
    if levels is None:
        maps = rng.random(masks.shape, dtype=np.float32)
    else:  # heavy ties, including ties between normal and region pixels
        maps = tied_scores(rng, masks.size, levels).reshape(masks.shape)
    maps = maps + 0.3 * masks * rng.random(masks.shape, dtype=np.float32)
    for limit in [0.3, 0.05, 1.0]:
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(
            brute_force_aupro(masks, maps, limit), abs=1e-9
        )


def test_aupro_uses_eight_connectivity():
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[0, 1, 1] = masks[0, 2, 2] = 1  # diagonal neighbours: one region, not two
    masks[1, 4:6, 4:6] = 1
    maps = np.zeros(masks.shape, dtype=np.float32)
    maps[0, 1, 1] = 1.0  # detects half of the diagonal region only
    maps[1, 4:6, 4:6] = 0.5
    maps[0, 5, 5] = 0.7  # a normal pixel in between, so thresholds matter
    eight = brute_force_aupro(masks, maps, 0.3, eight_connected=True)
    four = brute_force_aupro(masks, maps, 0.3, eight_connected=False)
    assert eight != pytest.approx(four)
    assert aupro(masks, maps) == pytest.approx(eight, abs=1e-12)


def test_aupro_perfect_and_inverted_maps():
    masks = small_masks()
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    assert aupro(masks, 1.0 - masks.astype(np.float32)) == pytest.approx(0.0)


def test_aupro_of_random_map_is_near_expectation():
    # For a map independent of the masks PRO(t) = FPR(t) in expectation, so the
    # normalized area up to 0.3 is 0.3 / 2 = 0.15.
    rng = np.random.default_rng(11)
    masks = np.zeros((40, 64, 64), dtype=np.uint8)
    for i in range(0, 40, 2):
        for _ in range(3):
            y, x = rng.integers(0, 54, 2)
            masks[i, y : y + rng.integers(2, 10), x : x + rng.integers(2, 10)] = 1
    maps = rng.random(masks.shape, dtype=np.float32)
    assert aupro(masks, maps) == pytest.approx(0.15, abs=0.02)


def test_pro_curve_ends_at_limit():
    rng = np.random.default_rng(0)
    masks = small_masks()
    fpr, pro = pro_curve(masks, rng.random(masks.shape, dtype=np.float32), fpr_limit=0.2)
    assert fpr[0] == 0.0 and pro[0] == 0.0
    assert fpr[-1] == pytest.approx(0.2)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)


def test_pixel_metric_errors():
    maps = np.random.default_rng(0).random((2, 8, 8), dtype=np.float32)
    with pytest.raises(ConfigError, match="no anomalous region"):
        aupro(np.zeros((2, 8, 8), np.uint8), maps)
    with pytest.raises(ConfigError, match="no normal pixel"):
        aupro(np.ones((2, 8, 8), np.uint8), maps)
    with pytest.raises(ConfigError, match="masks contain no anomalous"):
        pixel_auroc(np.zeros((2, 8, 8), np.uint8), maps)
    with pytest.raises(ConfigError, match="fpr_limit"):
        aupro(small_masks()[:2, :8, :8], maps, fpr_limit=0.0)
    with pytest.raises(DataError, match="shape"):
        aupro(np.zeros((2, 8, 7), np.uint8), maps)
    with pytest.raises(DataError, match="masks must contain only 0 and 1"):
        aupro(np.full((2, 8, 8), 255, np.uint8), maps)


def test_full_size_pixel_metrics_run():
    """600 x 256 x 256 (39M pixels), the typical test-split size: must simply work."""
    rng = np.random.default_rng(0)
    masks = np.zeros((600, 256, 256), dtype=np.uint8)
    for i in range(0, 600, 3):
        y, x = rng.integers(0, 200, 2)
        masks[i, y : y + rng.integers(4, 50), x : x + rng.integers(4, 50)] = 1
    maps = rng.random(masks.shape, dtype=np.float32)
    maps += 0.5 * masks
    value = aupro(masks, maps)
    assert 0.0 < value <= 1.0
    assert 0.5 < pixel_auroc(masks, maps) <= 1.0
