"""Carve a labelled validation subset out of the test split (for thresholds/normalization)."""

from __future__ import annotations

import numpy as np

from raylib_ad.errors import ConfigError, DataError

__all__ = ["carve_validation"]


def carve_validation(labels, fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (val_idx, test_idx), stratified by label and reproducible.

    Each class contributes round(fraction * n_class) samples to validation, clamped so
    that a class with >= 2 samples keeps at least one on each side. A class with a
    single sample stays on the test side (thresholded metrics need it more).
    Both index arrays are sorted int64, disjoint, and together cover range(len(labels)).
    """
    try:
        in_range = 0.0 < float(fraction) < 1.0
    except (TypeError, ValueError):
        in_range = False
    if not in_range:
        raise ConfigError(f"validation fraction must be in (0, 1), got {fraction!r}")
    label_arr = np.asarray(labels).ravel()
    if label_arr.size == 0:
        raise DataError("labels is empty; nothing to split into validation and test")
    rng = np.random.default_rng(seed)
    val_parts = []
    for value in np.unique(label_arr):  # sorted, so the draw order is deterministic
        members = np.flatnonzero(label_arr == value)
        n_val = int(round(fraction * members.size))
        if members.size >= 2:
            n_val = min(max(n_val, 1), members.size - 1)
        else:
            n_val = 0
        val_parts.append(rng.permutation(members)[:n_val])
    val_idx = np.sort(np.concatenate(val_parts)).astype(np.int64)
    is_val = np.zeros(label_arr.size, dtype=bool)
    is_val[val_idx] = True
    test_idx = np.flatnonzero(~is_val).astype(np.int64)
    return val_idx, test_idx
