"""PaDiM: our state dict -> anomalib 2.7's PadimModel (anomalib.models.image.padim.torch_model)."""

from __future__ import annotations

from ..components import anomalib_keys


def to_anomalib(state: dict, fitted: bool = True) -> dict:
    """Backbone, the random channel subset (`feature_index` -> `idx`, ours sorted: the same channels in the
    same order as anomalib's index_select would take them) and, when fitted, the Gaussian: ours per position
    (P, C) and (P, C, C); anomalib's mean is (C, P)."""
    out = anomalib_keys.backbone(state)
    out["idx"] = state["feature_index"]
    if fitted and state["mean"].numel():
        out["gaussian.mean"] = state["mean"].T.contiguous()
        out["gaussian.inv_covariance"] = state["inv_covariance"]
    return out
