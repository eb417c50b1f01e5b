"""Anomaly-detection metrics on raw scores (exact, numpy in, python floats out)."""

from raylib_ad.metrics.at_threshold import confusion_at, defect_metrics_at, threshold_metrics, threshold_report
from raylib_ad.metrics.aupro import PixelScores, aupro, pixel_auroc, pro_curve, split_pixels
from raylib_ad.metrics.classification import (
    auroc,
    f1_at,
    f1_max,
    precision_recall_f1_at,
    roc_curve,
)

__all__ = [
    "PixelScores",
    "aupro",
    "auroc",
    "confusion_at",
    "defect_metrics_at",
    "f1_at",
    "f1_max",
    "pixel_auroc",
    "precision_recall_f1_at",
    "pro_curve",
    "roc_curve",
    "split_pixels",
    "threshold_metrics",
    "threshold_report",
]
