"""U-Flow: our state dict (or gradients) -> anomalib 2.7's UflowModel (resnet18 / wide_resnet50_2
extractors: LayerNormFeatureExtractor)."""

from __future__ import annotations

from ..components import anomalib_keys


def to_anomalib(state: dict) -> dict:
    """Backbone -> feature_extractor.feature_extractor; our per-level LayerNorms (head.norms.i) live in
    anomalib's extractor (feature_extractor.feature_normalizations.i); the U-shaped FrEIA GraphINN is built
    in the same node order on both sides, so its module_list indices match (head.flow. -> flow.)."""
    return {**anomalib_keys.backbone(state),
            **anomalib_keys.renamed(state, {"head.norms.": "feature_extractor.feature_normalizations.",
                                            "head.flow.": "flow."})}
