"""Anomaly-detection metrics on raw scores (exact, numpy in, python floats out)."""

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
    "evaluation_report",
    "f1_at",
    "f1_max",
    "pixel_auroc",
    "precision_recall_f1_at",
    "pro_curve",
    "roc_curve",
    "split_pixels",
]


def __getattr__(name):
    # evaluation_report needs raylib_ad.postprocess, which itself imports these
    # metrics; loading it lazily keeps either package importable first.
    if name == "evaluation_report":
        from raylib_ad.metrics.evaluate import evaluation_report

        return evaluation_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
