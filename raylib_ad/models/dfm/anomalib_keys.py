"""DFM: our state dict -> anomalib 2.7's DFMModel. Only the backbone: the PCA is fitted on both sides from
the same features and compared (parity harness), not copied."""

from __future__ import annotations

from ..components import anomalib_keys


def to_anomalib(state: dict) -> dict:
    return anomalib_keys.backbone(state)
