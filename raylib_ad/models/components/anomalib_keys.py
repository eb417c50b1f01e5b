"""Shared pieces of the per-model key maps (raylib_ad/models/<name>/anomalib_keys.py): our state-dict keys
to anomalib 2.7's, for the parity harness (raylib_ad/parity). Pure functions over state dicts; nothing here
imports anomalib."""

from __future__ import annotations

from typing import Mapping

import torch


def backbone(state: Mapping[str, torch.Tensor], ours: str = "feature_extractor.",
             theirs: str = "feature_extractor.") -> dict[str, torch.Tensor]:
    """Our FeatureExtractor (prefix `ours`, the timm features-only net under `.model.`) -> anomalib's
    TimmFeatureExtractor (prefix `theirs`, the same timm net under `.feature_extractor.`): the timm keys are
    the same on both sides, only the wrapper differs."""
    head = f"{ours}model."
    return {f"{theirs}feature_extractor.{k[len(head):]}": v for k, v in state.items() if k.startswith(head)}


def renamed(state: Mapping[str, torch.Tensor], prefixes: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Keys under each of our prefixes moved under anomalib's (longest prefix first)."""
    out = {}
    for key, value in state.items():
        for ours in sorted(prefixes, key=len, reverse=True):
            if key.startswith(ours):
                out[prefixes[ours] + key[len(ours):]] = value
                break
    return out
