"""Pixel-level metrics: pixel AUROC and AUPRO (area under the per-region-overlap curve).

AUPRO follows Bergmann et al. (MVTec AD) / anomalib:
  * regions = 8-connected components of each image's ground-truth mask;
  * FPR(t) = fraction of ALL normal pixels (mask 0, every image) with map >= t;
  * PRO(t) = mean over all regions of the fraction of the region's pixels with map >= t;
  * AUPRO = trapezoid area under PRO(FPR) from FPR 0 to ``fpr_limit`` (PRO linearly
    interpolated at exactly ``fpr_limit``), divided by ``fpr_limit``.

Exact and memory-bounded on e.g. 600 x 256 x 256 maps: the normal pixels (the vast
majority) are only value-sorted once (``np.sort`` is ~10x faster than ``argsort``);
only the few anomalous pixels are argsorted together with their region weights.
Every FPR value is then an integer count from a binary search in the sorted normals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from raylib_ad.errors import ConfigError, DataError
from raylib_ad.metrics.classification import auroc_sorted, check_binary, check_scores

__all__ = ["PixelScores", "split_pixels", "pixel_auroc", "pro_curve", "aupro", "aupro_from_split"]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class PixelScores:
    """Pixels of a set of anomaly maps, split by ground truth, ready for exact metrics.

    normal_sorted: scores of every mask-0 pixel, ascending.
    anomalous: scores of every mask-1 pixel (C order over images, rows, columns).
    region_ids: for each anomalous pixel, its region number in [0, n_regions).
    """

    normal_sorted: np.ndarray
    anomalous: np.ndarray
    region_ids: np.ndarray
    n_regions: int


def check_masks_and_maps(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes/values; masks come back as bool, maps keep their dtype (no float64 copy)."""
    maps_arr = check_scores(maps, "maps")
    masks_arr = check_binary(masks, "masks")
    if masks_arr.shape != maps_arr.shape:
        raise DataError(f"masks shape {masks_arr.shape} differs from maps shape {maps_arr.shape}")
    if maps_arr.ndim == 2:  # a single image is fine too
        masks_arr, maps_arr = masks_arr[None], maps_arr[None]
    if maps_arr.ndim != 3:
        raise DataError(f"maps must be (N, H, W) or (H, W), got shape {maps_arr.shape}")
    return masks_arr, maps_arr


def split_pixels(masks, maps) -> PixelScores:
    """Label regions and split pixels into sorted normal scores + anomalous scores/regions."""
    masks_arr, maps_arr = check_masks_and_maps(masks, maps)
    normal_sorted = maps_arr[~masks_arr]  # a copy, so sorting in place is safe
    normal_sorted.sort()
    anomalous = maps_arr[masks_arr]
    # Label each image on its own so regions never connect across images; the
    # concatenation order matches maps_arr[masks_arr] (C order).
    region_ids_per_image = []
    n_regions = 0
    for mask in masks_arr:
        if not mask.any():
            continue
        labelled, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        region_ids_per_image.append(labelled[mask].astype(np.int64) - 1 + n_regions)
        n_regions += count
    region_ids = (
        np.concatenate(region_ids_per_image) if region_ids_per_image else np.zeros(0, np.int64)
    )
    return PixelScores(normal_sorted, anomalous, region_ids, n_regions)


def pixel_auroc(masks, maps) -> float:
    """AUROC over all pixels (ties count half, as sklearn.metrics.roc_auc_score)."""
    pixels = split_pixels(masks, maps)
    return auroc_sorted(pixels.normal_sorted, pixels.anomalous, what="masks")


def _full_pro_curve(pixels: PixelScores) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO-vs-FPR polyline from (0, 0) to (1, 1), thresholds descending.

    For each distinct anomalous score u two points are emitted: (FPR(> u), PRO before u)
    where the normal pixels strictly above u have come in, then (FPR(>= u), PRO(u)) after
    the whole tie group at u. Between anomalous values PRO is flat, so these points give
    exactly the same trapezoid area as one point per distinct score of all pixels.
    """
    n_normal = pixels.normal_sorted.size
    if pixels.n_regions == 0:
        raise ConfigError(
            "masks contain no anomalous region (every mask is empty); AUPRO is undefined"
        )
    if n_normal == 0:
        raise ConfigError("masks contain no normal pixel (every mask is full); AUPRO is undefined")
    areas = np.bincount(pixels.region_ids, minlength=pixels.n_regions)
    # Each region counts equally however large it is: pixel weight 1 / (area * n_regions).
    weights = 1.0 / (areas[pixels.region_ids] * float(pixels.n_regions))
    order = np.argsort(pixels.anomalous, kind="stable")[::-1]
    scores = pixels.anomalous[order]
    pro_cumulative = np.cumsum(weights[order])
    group_ends = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])
    thresholds = scores[group_ends]
    pro_after = pro_cumulative[group_ends]
    pro_before = np.r_[0.0, pro_after[:-1]]
    normal_at_or_above = n_normal - np.searchsorted(pixels.normal_sorted, thresholds, side="left")
    normal_above = n_normal - np.searchsorted(pixels.normal_sorted, thresholds, side="right")

    n_points = 2 * thresholds.size + 2
    fpr = np.empty(n_points)
    pro = np.empty(n_points)
    fpr[0], pro[0] = 0.0, 0.0
    fpr[1:-1:2], pro[1:-1:2] = normal_above / n_normal, pro_before
    fpr[2:-1:2], pro[2:-1:2] = normal_at_or_above / n_normal, pro_after
    # Lowest threshold: every pixel is flagged. Pin PRO to exactly 1 (cumsum rounding).
    fpr[-1], pro[-1] = 1.0, 1.0
    return fpr, pro


def _truncate(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> tuple[np.ndarray, np.ndarray]:
    """Cut the curve at ``fpr_limit``, adding a linearly interpolated end point."""
    keep = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr[:keep] <= limit
    if keep == fpr.size:
        return fpr, pro
    x0, x1, y0, y1 = fpr[keep - 1], fpr[keep], pro[keep - 1], pro[keep]
    end = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)  # x1 > limit >= x0, so x1 > x0
    return np.r_[fpr[:keep], fpr_limit], np.r_[pro[:keep], end]


def _check_fpr_limit(fpr_limit: float) -> float:
    if not 0.0 < fpr_limit <= 1.0:
        raise ConfigError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    return float(fpr_limit)


def pro_curve(masks, maps, fpr_limit: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) points of the PRO curve from FPR 0 up to exactly ``fpr_limit`` (for plots)."""
    limit = _check_fpr_limit(fpr_limit)
    return _truncate(*_full_pro_curve(split_pixels(masks, maps)), limit)


def aupro_from_split(pixels: PixelScores, fpr_limit: float = 0.3) -> float:
    """AUPRO from an already split :class:`PixelScores` (lets callers sort only once)."""
    limit = _check_fpr_limit(fpr_limit)
    fpr, pro = _truncate(*_full_pro_curve(pixels), limit)
    area = 0.5 * float(np.sum(np.diff(fpr) * (pro[1:] + pro[:-1])))
    return area / limit


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Normalized area under the PRO curve up to ``fpr_limit`` (1.0 = perfect)."""
    return aupro_from_split(split_pixels(masks, maps), fpr_limit)
