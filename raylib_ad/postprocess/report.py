"""One call that turns test-split scores (and optionally maps) into the full metric report.

Lives in postprocess (not metrics) because it fits thresholds and normalization: metrics/ stays plain
functions that import nothing else of the package."""

from __future__ import annotations

import numpy as np

from raylib_ad.errors import ConfigError, DataError
from raylib_ad.metrics.aupro import aupro_from_split, check_masks_and_maps, split_pixels
from raylib_ad.metrics.classification import (
    auroc_sorted,
    check_binary,
    check_scores,
    f1_max_sorted,
    precision_recall_f1_at,
)
from raylib_ad.postprocess.normalization import fit_normalization
from raylib_ad.postprocess.threshold import (
    NORMAL_QUANTILE,
    fit_image_threshold,
    fit_pixel_threshold,
    quantile_threshold,
)
from raylib_ad.postprocess.validation_split import carve_validation

__all__ = ["evaluation_report", "threshold_free_metrics"]


def evaluation_report(
    labels,
    scores,
    masks=None,
    maps=None,
    val_fraction: float = 0.3,
    seed: int = 0,
    fpr_limit: float = 0.3,
    quantile: float = 0.99,
    val_idx=None,
    heldout_idx=None,
) -> dict:
    """Evaluate raw anomaly scores on a test split.

    A validation subset of the test split (``val_idx``, or carved here: stratified, ``val_fraction``,
    ``seed``) fits the deployment threshold and the normalization; a gradient run also chose its best
    epoch on it. So every headline metric uses only the HELD-OUT rest (``heldout_idx``):
    image_auroc, image_f1_max, pixel_auroc, pixel_aupro (threshold-free, needing masks with anomalous
    pixels for the pixel ones) and image_f1 / precision / recall, pixel_f1 at the fitted threshold.
    The same threshold-free figures over the whole split, as papers report them for models that choose
    nothing on test images, are kept as whole_split_image_auroc and so on.
    Threshold: F1-max on validation if it has anomalies, else the ``quantile`` of its normal scores.
    Normalization: min/max of validation scores (pixel stats: min/max of validation maps).
    ``maps`` without ``masks`` still yields pixel_stats (threshold = quantile of the pixels of normal
    validation images) but no pixel metrics.

    Returns {"metrics": {name: float}, "image_stats": dict, "pixel_stats": dict | None,
    "threshold_method": str, "pixel_threshold_method": str | None, "n_validation": int,
    "n_test_heldout": int, "val_idx": list[int], "heldout_idx": list[int]}.
    """
    is_anomalous = check_binary(labels, "labels").ravel()
    values = check_scores(scores, "scores").ravel()
    if is_anomalous.shape != values.shape:
        raise DataError(f"labels and scores differ in size: {is_anomalous.size} vs {values.size}")
    if masks is not None and maps is None:
        raise ConfigError("masks were given without maps; pass maps too (or neither)")
    if maps is not None:
        if masks is None:
            maps_arr = check_scores(maps, "maps")
        else:
            masks_arr, maps_arr = check_masks_and_maps(masks, maps)
        if maps_arr.ndim != 3 or maps_arr.shape[0] != values.size:
            raise DataError(
                f"maps must be (N, H, W) with N = {values.size} images, got shape {maps_arr.shape}"
            )

    if val_idx is None or heldout_idx is None:
        val_idx, heldout_idx = carve_validation(is_anomalous, val_fraction, seed)
    val_idx, heldout_idx = np.asarray(val_idx, dtype=np.int64), np.asarray(heldout_idx, dtype=np.int64)
    if val_idx.size == 0:
        raise DataError(
            f"no validation images could be carved from {values.size} test images "
            f"(val_fraction={val_fraction}); need at least 2 images of one class"
        )
    metrics = {}
    pixel_truth = masks_arr if masks is not None else None
    for prefix, rows in (("", heldout_idx), ("whole_split_", np.arange(values.size))):
        metrics.update(threshold_free_metrics(is_anomalous[rows], values[rows],
                                       None if pixel_truth is None else pixel_truth[rows],
                                       None if pixel_truth is None else maps_arr[rows], fpr_limit, prefix))
    has_pixel_truth = masks is not None and bool(masks_arr.any())
    threshold, method = fit_image_threshold(is_anomalous[val_idx], values[val_idx], quantile)
    image_stats = fit_normalization(values[val_idx], threshold)
    precision, recall, f1 = precision_recall_f1_at(
        is_anomalous[heldout_idx], values[heldout_idx], threshold
    )
    metrics.update(image_f1=f1, image_precision=precision, image_recall=recall)

    pixel_stats, pixel_method = None, None
    if maps is not None:
        val_maps = maps_arr[val_idx]
        if masks is not None:
            pixel_threshold, pixel_method = fit_pixel_threshold(
                masks_arr[val_idx], val_maps, quantile
            )
        else:
            normal_val = val_idx[~is_anomalous[val_idx]]
            if normal_val.size:
                pixel_threshold = quantile_threshold(maps_arr[normal_val], quantile)
                pixel_method = NORMAL_QUANTILE
        if pixel_method is not None:
            pixel_stats = fit_normalization(val_maps, pixel_threshold)
        if has_pixel_truth:
            metrics["pixel_f1"] = precision_recall_f1_at(
                masks_arr[heldout_idx], maps_arr[heldout_idx], pixel_threshold
            )[2]

    return {
        "metrics": {name: float(value) for name, value in metrics.items()},
        "image_stats": image_stats.to_dict(),
        "pixel_stats": None if pixel_stats is None else pixel_stats.to_dict(),
        "threshold_method": method,
        "pixel_threshold_method": pixel_method,
        "n_validation": int(val_idx.size),
        "n_test_heldout": int(heldout_idx.size),
        "val_idx": val_idx.tolist(),
        "heldout_idx": heldout_idx.tolist(),
    }


def threshold_free_metrics(is_anomalous, values, masks=None, maps=None, fpr_limit: float = 0.3, prefix: str = "") -> dict:
    """Image AUROC and F1-max, and pixel AUROC / AUPRO where the masks hold anomalous pixels."""
    metrics = {}
    if is_anomalous.any() and (~is_anomalous).any():
        normal_sorted = np.sort(values[~is_anomalous])
        metrics[f"{prefix}image_auroc"] = auroc_sorted(normal_sorted, values[is_anomalous])
        metrics[f"{prefix}image_f1_max"] = f1_max_sorted(normal_sorted, values[is_anomalous])[0]
    if masks is not None and bool(masks.any()) and not bool(masks.all()):
        pixels = split_pixels(masks, maps)  # the one big sort, shared by both metrics
        metrics[f"{prefix}pixel_auroc"] = auroc_sorted(pixels.normal_sorted, pixels.anomalous, "masks")
        metrics[f"{prefix}pixel_aupro"] = aupro_from_split(pixels, fpr_limit)
    return metrics
