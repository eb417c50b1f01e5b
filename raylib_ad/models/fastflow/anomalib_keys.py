"""FastFlow: our state dict (or gradients) -> anomalib 2.7's FastflowModel (CNN backbones)."""

from __future__ import annotations

from ..components import anomalib_keys


def to_anomalib(state: dict) -> dict:
    """anomalib keeps the bare timm features-only net as `feature_extractor` (no wrapper); the per-level
    LayerNorms are `norms.i` on both sides, the flows `flows.i` -> `fast_flow_blocks.i` (FrEIA SequenceINN,
    the same AllInOneBlock keys, fixed permutations included)."""
    return anomalib_keys.renamed(state, {"feature_extractor.model.": "feature_extractor.", "norms.": "norms.",
                                         "flows.": "fast_flow_blocks."})
