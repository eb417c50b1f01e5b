"""Post-processing of raw scores: validation carving, thresholds, normalization.

Plotting lives in :mod:`raylib_ad.postprocess.plots` and is not imported here, so
that serving code using ``normalize`` does not pay for importing matplotlib.
"""

from raylib_ad.postprocess.normalization import NormalizationStats, fit_normalization, normalize
from raylib_ad.postprocess.threshold import (
    fit_image_threshold,
    fit_pixel_threshold,
    fit_threshold,
    quantile_threshold,
)
from raylib_ad.postprocess.validation_split import carve_validation
from raylib_ad.postprocess.report import evaluation_report

__all__ = [
    "NormalizationStats",
    "carve_validation",
    "evaluation_report",
    "fit_image_threshold",
    "fit_normalization",
    "fit_pixel_threshold",
    "fit_threshold",
    "normalize",
    "quantile_threshold",
]
