"""DFKDE: our state dict -> anomalib 2.7's DfkdeModel. Only the backbone: PCA and KDE are fitted on both
sides from the same features and compared (parity harness)."""

from __future__ import annotations

from ..components import anomalib_keys


def to_anomalib(state: dict) -> dict:
    return anomalib_keys.backbone(state)
