"""anomalib-style min-max normalization centred on the decision threshold.

normalized = clip((x - threshold) / (max - min) + 0.5, 0, 1)

so the threshold maps to exactly 0.5 and "anomalous" means normalized >= 0.5, for
image scores and anomaly maps alike. ``min``/``max`` come from validation scores.
"""

from __future__ import annotations

import math
import numbers
import sys
from dataclasses import asdict, dataclass

import numpy as np

from raylib_ad.errors import ConfigError, DataError
from raylib_ad.metrics.classification import check_scores

__all__ = ["NormalizationStats", "fit_normalization", "normalize"]


@dataclass(frozen=True)
class NormalizationStats:
    threshold: float
    min: float
    max: float

    def __post_init__(self):
        for field in ("threshold", "min", "max"):
            value = getattr(self, field)
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ConfigError(
                    f"NormalizationStats.{field} must be a finite number, got {value!r}"
                )
            object.__setattr__(self, field, float(value))
        if self.max < self.min:
            raise ConfigError(
                f"NormalizationStats.max ({self.max}) is below NormalizationStats.min ({self.min})"
            )

    @property
    def span(self) -> float:
        # A constant validation set (max == min) gives no scale; fall back to unit
        # scale so normalization stays finite and monotone (threshold still -> 0.5).
        return self.max - self.min if self.max > self.min else 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "NormalizationStats":
        missing = {"threshold", "min", "max"} - set(data)
        if missing:
            raise ConfigError(
                f"normalization stats lack key(s) {sorted(missing)}; got {sorted(data)}"
            )
        return cls(threshold=data["threshold"], min=data["min"], max=data["max"])


def fit_normalization(val_scores, threshold: float) -> NormalizationStats:
    """Stats from validation scores (or maps): their min and max, plus the chosen threshold."""
    values = check_scores(val_scores, "val_scores")
    if values.size == 0:
        raise DataError("val_scores is empty; cannot fit normalization stats")
    return NormalizationStats(
        threshold=float(threshold), min=float(values.min()), max=float(values.max())
    )


def _is_torch_tensor(x) -> bool:
    # Only look torch up if something already imported it: no import cost for numpy users.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def normalize(x, stats: NormalizationStats):
    """Map raw scores to [0, 1] with the threshold at 0.5.

    Keeps the input kind: torch tensor -> tensor (same device/dtype), numpy array ->
    array (floating dtype kept, integers -> float64), python/numpy scalar -> float.
    """
    if _is_torch_tensor(x):
        return ((x - stats.threshold) / stats.span + 0.5).clamp(0.0, 1.0)
    if isinstance(x, np.ndarray) and x.ndim > 0:
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
        out = (x - x.dtype.type(stats.threshold)) / x.dtype.type(stats.span) + x.dtype.type(0.5)
        return np.clip(out, 0.0, 1.0, out=out)
    value = (float(x) - stats.threshold) / stats.span + 0.5
    return min(max(value, 0.0), 1.0)
