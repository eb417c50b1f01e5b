"""C-Flow: our state dict -> anomalib 2.7's CflowModel."""

from __future__ import annotations

from ..components import anomalib_keys


def to_anomalib(state: dict) -> dict:
    """The frozen encoder (feature_extractor -> encoder) and the per-layer FrEIA decoders (`decoders.i`, the same
    SequenceINN keys on both sides). Our `log_prob_max` (the calibrated training maximum, this project's
    batch-independent map) has no anomalib counterpart and is left out."""
    return {**anomalib_keys.backbone(state, "feature_extractor.", "encoder."),
            **anomalib_keys.renamed(state, {"decoders.": "decoders."})}
