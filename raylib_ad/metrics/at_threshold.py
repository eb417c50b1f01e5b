"""What a chosen image threshold does: operating point, confusion matrix, recall per defect type.

Threshold-free metrics (AUROC) say how well scores rank; a quality engineer deploys one
threshold and needs to know what it catches and what it misses. Prediction is
``score >= threshold`` everywhere, as in classification.py. Every function returns plain
python numbers, so the results go straight into metrics.json and MLflow.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from raylib_ad.errors import DataError
from raylib_ad.metrics.classification import check_binary, check_scores

__all__ = ["confusion_at", "defect_metrics_at", "threshold_report", "threshold_metrics"]

GOOD = "good"


def _labels_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    is_anomalous = check_binary(labels, "labels").ravel()
    values = check_scores(scores, "scores").ravel()
    if is_anomalous.shape != values.shape:
        raise DataError(f"labels and scores differ in size: {is_anomalous.size} vs {values.size}")
    return is_anomalous, values


def _ratio(numerator: int, denominator: int) -> float | None:
    # None, not 0.0, when there is nothing to divide: "no anomalous images" is not "recall 0".
    return numerator / denominator if denominator else None


def confusion_at(labels, scores, threshold: float) -> dict:
    """Confusion matrix and operating point of ``score >= threshold``.

    Returns {"threshold", "tp", "fp", "tn", "fn", "tpr", "fpr", "precision",
    "matrix": [[tn, fp], [fn, tp]], "rows": true classes, "columns": predicted classes};
    a rate whose denominator is zero is None.
    """
    is_anomalous, values = _labels_scores(labels, scores)
    predicted = values >= threshold
    tp = int(np.count_nonzero(predicted & is_anomalous))
    fp = int(np.count_nonzero(predicted & ~is_anomalous))
    fn = int(np.count_nonzero(~predicted & is_anomalous))
    tn = int(np.count_nonzero(~predicted & ~is_anomalous))
    return {
        "threshold": float(threshold),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "tpr": _ratio(tp, tp + fn),
        "fpr": _ratio(fp, fp + tn),
        "precision": _ratio(tp, tp + fp),
        "matrix": [[tn, fp], [fn, tp]],
        "rows": ["true normal", "true anomalous"],
        "columns": ["predicted normal", "predicted anomalous"],
    }


def defect_metrics_at(defects: Sequence[str], labels, scores, threshold: float, good: str = GOOD) -> dict:
    """Per defect type: how many images, how many flagged, recall; for good images: false positives.

    ``defects`` is the manifest's defect column for the same images (normal images carry
    ``good``). Returns {"threshold", "defects": {name: {"n", "detected", "missed", "recall"}},
    "good": {"n", "false_positives", "false_positive_rate"}}; defect names sorted.
    """
    is_anomalous, values = _labels_scores(labels, scores)
    names = np.asarray([str(d) for d in defects], dtype=object)
    if names.shape != values.shape:
        raise DataError(f"defects and scores differ in size: {names.size} vs {values.size}")
    predicted = values >= threshold
    per_defect = {}
    for name in sorted(set(names[is_anomalous].tolist())):
        rows = is_anomalous & (names == name)
        n, detected = int(rows.sum()), int(np.count_nonzero(predicted[rows]))
        per_defect[name] = {"n": n, "detected": detected, "missed": n - detected, "recall": _ratio(detected, n)}
    normal = ~is_anomalous
    n_good, false_pos = int(normal.sum()), int(np.count_nonzero(predicted[normal]))
    return {
        "threshold": float(threshold),
        "defects": per_defect,
        good: {"n": n_good, "false_positives": false_pos, "false_positive_rate": _ratio(false_pos, n_good)},
    }


def threshold_report(labels, scores, threshold: float, defects: Sequence[str] | None = None) -> dict:
    """Both of the above in one JSON-able dict: {"threshold", "n_images", "confusion", "per_defect"}.

    ``per_defect`` is None without ``defects``. Pass the images the threshold was NOT fitted
    on (the held-out test images), or the numbers flatter the threshold.
    """
    confusion = confusion_at(labels, scores, threshold)
    return {
        "threshold": float(threshold),
        "n_images": confusion["tp"] + confusion["fp"] + confusion["tn"] + confusion["fn"],
        "confusion": confusion,
        "per_defect": None if defects is None else defect_metrics_at(defects, labels, scores, threshold),
    }


def _metric_name(defect: str) -> str:
    # MLflow metric names allow letters, digits, _ - . / and spaces; keep it to the safe subset.
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", defect).strip("_") or "unnamed"


def threshold_metrics(report: dict, prefix: str = "image_") -> dict[str, float | int]:
    """Flat metrics from threshold_report, for metrics.json / MLflow / the summary: rates as floats,
    counts (tp/fp/tn/fn, good_false_positives) as ints.

    Keys: image_threshold, image_tpr, image_fpr, image_tp/fp/tn/fn, image_good_false_positives,
    image_good_fpr, image_recall_<defect> (a rate that is undefined is left out, not NaN).
    """
    confusion = report["confusion"]
    flat: dict[str, float | int] = {f"{prefix}threshold": float(report["threshold"])}
    for key in ("tpr", "fpr"):
        if confusion[key] is not None:
            flat[f"{prefix}{key}"] = float(confusion[key])
    for key in ("tp", "fp", "tn", "fn"):
        flat[f"{prefix}{key}"] = int(confusion[key])
    per_defect = report.get("per_defect")
    if per_defect:
        for name, values in per_defect["defects"].items():
            if values["recall"] is not None:
                flat[f"{prefix}recall_{_metric_name(name)}"] = float(values["recall"])
        good = per_defect[GOOD]
        flat[f"{prefix}good_false_positives"] = int(good["false_positives"])
        if good["false_positive_rate"] is not None:
            flat[f"{prefix}good_fpr"] = float(good["false_positive_rate"])
    return flat
