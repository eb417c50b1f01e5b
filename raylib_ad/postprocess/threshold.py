"""Choose decision thresholds on raw scores from a validation subset.

Two situations:
  * validation contains anomalies -> the threshold maximizing F1 there ("f1_max");
  * validation is normal-only     -> a high quantile of the normal scores ("normal_quantile"),
    i.e. accept flagging about (1 - q) of normal samples.
"""

from __future__ import annotations

import numpy as np

from raylib_ad.errors import ConfigError, DataError
from raylib_ad.metrics.aupro import split_pixels
from raylib_ad.metrics.classification import check_binary, check_scores, f1_max, f1_max_sorted

__all__ = [
    "F1_MAX",
    "NORMAL_QUANTILE",
    "fit_threshold",
    "quantile_threshold",
    "fit_image_threshold",
    "fit_pixel_threshold",
]

F1_MAX = "f1_max"
NORMAL_QUANTILE = "normal_quantile"


def _check_quantile(q: float) -> float:
    try:
        in_range = 0.0 < float(q) <= 1.0
    except (TypeError, ValueError):
        in_range = False
    if not in_range:
        raise ConfigError(f"threshold quantile q must be in (0, 1], got {q!r}")
    return float(q)


def fit_threshold(labels, scores) -> float:
    """The F1-max threshold (prediction = score >= threshold); needs >= 1 anomalous sample."""
    return f1_max(labels, scores)[1]


def quantile_threshold(normal_scores, q: float = 0.99) -> float:
    """The q-quantile of normal scores (linear interpolation), for normal-only validation."""
    q = _check_quantile(q)
    values = check_scores(normal_scores, "normal_scores").ravel()
    if values.size == 0:
        raise DataError("normal_scores is empty; cannot take a quantile threshold")
    return float(np.quantile(values, q))


def fit_image_threshold(val_labels, val_scores, q: float = 0.99) -> tuple[float, str]:
    """(threshold, method): F1-max when validation has anomalies, else the normal quantile.

    With anomalous-only validation F1-max is still used (it flags every sample there),
    since there are no normal scores to take a quantile of.
    """
    q = _check_quantile(q)
    is_anomalous = check_binary(val_labels, "val_labels").ravel()
    values = check_scores(val_scores, "val_scores").ravel()
    if is_anomalous.shape != values.shape:
        raise DataError(
            f"val_labels and val_scores differ in size: {is_anomalous.size} vs {values.size}"
        )
    if values.size == 0:
        raise DataError("validation set is empty; cannot fit an image threshold")
    if is_anomalous.any():
        return fit_threshold(is_anomalous, values), F1_MAX
    return quantile_threshold(values, q), NORMAL_QUANTILE


def fit_pixel_threshold(val_masks, val_maps, q: float = 0.99) -> tuple[float, str]:
    """(threshold, method) over every validation pixel, exact (no subsampling).

    Same rule as :func:`fit_image_threshold`, but the big normal-pixel array is only
    value-sorted once, which keeps tens of millions of pixels to about a second.
    """
    q = _check_quantile(q)
    pixels = split_pixels(val_masks, val_maps)
    if pixels.anomalous.size:
        return f1_max_sorted(pixels.normal_sorted, pixels.anomalous, what="val_masks")[1], F1_MAX
    if pixels.normal_sorted.size == 0:
        raise DataError("validation maps are empty; cannot fit a pixel threshold")
    return float(np.quantile(pixels.normal_sorted, q)), NORMAL_QUANTILE
