"""STFPM: our state dict (or gradients) -> anomalib 2.7's STFPMModel."""

from __future__ import annotations

from ..components import anomalib_keys


def to_anomalib(state: dict) -> dict:
    """Teacher: our frozen `feature_extractor` -> `teacher_model`; student -> `student_model` (both timm
    features-only nets with the same keys)."""
    return {**anomalib_keys.backbone(state, "feature_extractor.", "teacher_model."),
            **anomalib_keys.backbone(state, "student.", "student_model.")}
