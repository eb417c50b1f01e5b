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
    "TARGET_RECALL",
    "TARGET_FPR",
    "recall_threshold",
    "fpr_threshold",
    "fit_goal_threshold",
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


# --- a threshold for a stated goal (`raylib-ad threshold`) ------------------------------------------------
#
# The extreme threshold meeting a goal sits exactly on one validation score (recall) or just above one
# (FPR). Every threshold between that score and its neighbouring validation score gives the same
# validation outcome, so the midpoint is returned: the outcome is the extreme one's, and an image scored
# again a rounding error lower (another batch, another device) does not flip at the boundary.

TARGET_RECALL = "target_recall"
TARGET_FPR = "target_fpr"
_EPS = 1e-9  # so that 0.9 * 10 counts as 9, not 8.999999


def _goal_inputs(labels, scores, target: float, name: str, low_ok: bool) -> tuple[np.ndarray, np.ndarray]:
    ok = isinstance(target, (int, float)) and not isinstance(target, bool) and (
        (0.0 <= target < 1.0) if low_ok else (0.0 < target <= 1.0))
    if not ok:
        raise ConfigError(f"{name} {target!r} is invalid: expected a number in {'[0, 1)' if low_ok else '(0, 1]'}")
    is_anomalous = check_binary(labels, "labels").ravel()
    values = check_scores(scores, "scores").ravel().astype(np.float64)
    if is_anomalous.shape != values.shape:
        raise DataError(f"labels and scores differ in size: {is_anomalous.size} vs {values.size}")
    return is_anomalous, values


def recall_threshold(labels, scores, target_recall: float) -> float:
    """The highest threshold (prediction: score >= threshold) whose recall on the anomalous samples is
    >= target_recall; returned as the midpoint down to the next lower score (same outcome, see above)."""
    is_anomalous, values = _goal_inputs(labels, scores, target_recall, "target recall", low_ok=False)
    anomalous = np.sort(values[is_anomalous])[::-1]
    if anomalous.size == 0:
        raise DataError("no anomalous validation images: a recall target cannot be met or measured; "
                        "add anomalous images or raise --val-fraction")
    needed = min(int(np.ceil(target_recall * anomalous.size - _EPS)), anomalous.size)
    deciding = anomalous[max(needed, 1) - 1]
    below = values[values < deciding]
    return float((deciding + below.max()) / 2) if below.size else float(deciding)


def fpr_threshold(labels, scores, target_fpr: float) -> float:
    """The lowest threshold (prediction: score >= threshold) whose false-positive rate on the normal
    samples is <= target_fpr; returned as the midpoint up to the next higher score (see above)."""
    is_anomalous, values = _goal_inputs(labels, scores, target_fpr, "target FPR", low_ok=True)
    normal = np.sort(values[~is_anomalous])[::-1]
    if normal.size == 0:
        raise DataError("no normal validation images: a false-positive-rate target cannot be met or measured; "
                        "add normal images or raise --val-fraction")
    allowed = min(int(np.floor(target_fpr * normal.size + _EPS)), normal.size - 1)
    deciding = normal[allowed]  # the highest normal score that must NOT be flagged
    above = values[values > deciding]
    return float((deciding + above.min()) / 2) if above.size else float(np.nextafter(deciding, np.inf))


def fit_goal_threshold(labels, scores, *, target_recall: float | None = None,
                       target_fpr: float | None = None) -> tuple[float, str]:
    """(threshold, method) for exactly one goal: TARGET_RECALL or TARGET_FPR."""
    if (target_recall is None) == (target_fpr is None):
        raise ConfigError("give exactly one goal: --target-recall R or --target-fpr F")
    if target_recall is not None:
        return recall_threshold(labels, scores, target_recall), TARGET_RECALL
    return fpr_threshold(labels, scores, target_fpr), TARGET_FPR
