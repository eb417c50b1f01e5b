"""Image-level (binary) metrics on raw anomaly scores: AUROC, ROC curve, F1.

All functions take numpy-compatible arrays (labels in {0, 1}, 1 = anomalous)
and return plain python floats. Everything is exact: score ties are handled
the way scikit-learn handles them (a tied normal/anomalous pair counts half
toward AUROC; a threshold t predicts "anomalous" for every score >= t).

The ``*_sorted`` helpers work on already-sorted normal scores so that
pixel-level callers (millions of pixels) sort the big array once with the
fast value sort (``np.sort``) instead of an ``argsort`` of everything.
"""

from __future__ import annotations

import numpy as np

from raylib_ad.errors import ConfigError, DataError

__all__ = ["auroc", "roc_curve", "f1_max", "f1_at", "precision_recall_f1_at"]


# --------------------------------------------------------------------------- input checks


def check_scores(scores, name: str = "scores") -> np.ndarray:
    """Return ``scores`` as a numpy array (dtype kept, no copy when possible); reject NaN."""
    arr = np.asarray(scores)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"{name} must be numeric, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
        raise DataError(f"{name} contains NaN ({int(np.isnan(arr).sum())} values)")
    return arr


def check_binary(values, name: str = "labels") -> np.ndarray:
    """Return ``values`` as a bool array; every value must be 0 or 1 (or bool)."""
    arr = np.asarray(values)
    if arr.dtype == bool:
        return arr
    if not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"{name} must be 0/1 values, got dtype {arr.dtype}")
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        example = arr[bad].flat[0]
        raise DataError(f"{name} must contain only 0 and 1, found {example!r}")
    return arr.astype(bool, copy=False)


def _check_pair(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    is_anomalous = check_binary(labels, "labels").ravel()
    values = check_scores(scores, "scores").ravel()
    if is_anomalous.shape != values.shape:
        raise DataError(
            f"labels and scores differ in size: {is_anomalous.size} labels vs {values.size} scores"
        )
    return is_anomalous, values


def require_both_classes(n_anomalous: int, n_normal: int, what: str = "labels") -> None:
    """AUROC/ROC are undefined with one class; say which one is missing."""
    if n_anomalous == 0:
        raise ConfigError(
            f"{what} contain no anomalous samples (label 1); AUROC and ROC need both classes"
        )
    if n_normal == 0:
        raise ConfigError(
            f"{what} contain no normal samples (label 0); AUROC and ROC need both classes"
        )


# --------------------------------------------------------------------------- sorted-array cores


def auroc_sorted(normal_sorted: np.ndarray, anomalous: np.ndarray, what: str = "labels") -> float:
    """AUROC from ascending-sorted normal scores and (unsorted) anomalous scores.

    AUROC = P(anomalous > normal) + 0.5 * P(anomalous == normal), counted exactly
    with two binary searches per anomalous score.
    """
    n_normal, n_anomalous = normal_sorted.size, anomalous.size
    require_both_classes(n_anomalous, n_normal, what)
    # Sorting the queries makes the binary searches walk memory in order (faster).
    queries = np.sort(anomalous)
    below = np.searchsorted(normal_sorted, queries, side="left")
    below_or_equal = np.searchsorted(normal_sorted, queries, side="right")
    # Twice the credit, in exact integers: 2 per normal below, 1 per tie.
    doubled_credit = int(below.sum(dtype=np.int64)) + int(below_or_equal.sum(dtype=np.int64))
    return doubled_credit / (2.0 * n_normal * n_anomalous)


def f1_max_sorted(
    normal_sorted: np.ndarray, anomalous: np.ndarray, what: str = "labels"
) -> tuple[float, float]:
    """Best F1 over thresholds "score >= t", from ascending-sorted normal scores.

    The optimum is always at one of the anomalous scores: raising t up to the next
    anomalous score only removes false positives. So only those candidates are tried.
    Among equal F1 values the highest threshold wins.
    """
    n_normal, n_anomalous = normal_sorted.size, anomalous.size
    if n_anomalous == 0:
        raise ConfigError(
            f"{what} contain no anomalous samples (label 1); F1-max needs at least one"
        )
    candidates, counts = np.unique(anomalous, return_counts=True)  # ascending
    candidates, counts = candidates[::-1], counts[::-1]
    true_pos = np.cumsum(counts)  # anomalous scores >= candidate
    false_pos = n_normal - np.searchsorted(normal_sorted, candidates, side="left")
    f1 = 2.0 * true_pos / (true_pos + false_pos + n_anomalous)
    best = int(np.argmax(f1))
    return float(f1[best]), float(candidates[best])


# --------------------------------------------------------------------------- public metrics


def auroc(labels, scores) -> float:
    """Area under the ROC curve; ties count half (matches sklearn.metrics.roc_auc_score)."""
    is_anomalous, values = _check_pair(labels, scores)
    return auroc_sorted(np.sort(values[~is_anomalous]), values[is_anomalous])


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points at every distinct score, highest threshold first.

    Same as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``: the first
    point is (0, 0) with threshold +inf, then one point per distinct score t with
    prediction ``score >= t``. Returns float64 arrays (fpr, tpr, thresholds).
    """
    is_anomalous, values = _check_pair(labels, scores)
    n_anomalous = int(is_anomalous.sum())
    require_both_classes(n_anomalous, is_anomalous.size - n_anomalous)
    order = np.argsort(values, kind="stable")[::-1]
    sorted_values = values[order]
    true_pos = np.cumsum(is_anomalous[order], dtype=np.int64)
    # Only the last index of each tie group is a reachable operating point.
    group_ends = np.flatnonzero(np.r_[sorted_values[1:] != sorted_values[:-1], True])
    true_pos = true_pos[group_ends]
    false_pos = group_ends + 1 - true_pos
    fpr = np.r_[0.0, false_pos / (is_anomalous.size - n_anomalous)]
    tpr = np.r_[0.0, true_pos / n_anomalous]
    thresholds = np.r_[np.inf, sorted_values[group_ends].astype(np.float64)]
    return fpr, tpr, thresholds


def f1_max(labels, scores) -> tuple[float, float]:
    """(best F1, threshold): the max F1 over all thresholds "score >= t".

    The threshold is the score value achieving it (the highest one on ties).
    Raises ConfigError when there is no anomalous sample.
    """
    is_anomalous, values = _check_pair(labels, scores)
    return f1_max_sorted(np.sort(values[~is_anomalous]), values[is_anomalous])


def precision_recall_f1_at(labels, scores, threshold: float) -> tuple[float, float, float]:
    """(precision, recall, F1) with prediction = score >= threshold.

    A ratio with a zero denominator is reported as 0.0 (sklearn's zero_division=0).
    """
    is_anomalous, values = _check_pair(labels, scores)
    predicted = values >= threshold
    true_pos = int(np.count_nonzero(predicted & is_anomalous))
    n_predicted = int(np.count_nonzero(predicted))
    n_anomalous = int(np.count_nonzero(is_anomalous))
    precision = true_pos / n_predicted if n_predicted else 0.0
    recall = true_pos / n_anomalous if n_anomalous else 0.0
    denominator = n_predicted + n_anomalous  # = 2TP + FP + FN
    f1 = 2.0 * true_pos / denominator if denominator else 0.0
    return precision, recall, f1


def f1_at(labels, scores, threshold: float) -> float:
    """F1 with prediction = score >= threshold (0.0 when nothing is positive anywhere)."""
    return precision_recall_f1_at(labels, scores, threshold)[2]
