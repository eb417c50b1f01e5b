"""Reverse Distillation (decoder="anomalib"): our state dict (or gradients) -> anomalib 2.7's
ReverseDistillationModel (ResNet encoders: OCBE bottleneck + de_resnet decoder)."""

from __future__ import annotations

import re

from ..components import anomalib_keys

# our one-class bottleneck (named by role) -> anomalib's OCBE (named as in the paper's code)
_BOTTLENECK = {"from_layer1.0": "conv1", "from_layer1.1": "bn1", "from_layer1.3": "conv2", "from_layer1.4": "bn2",
               "from_layer2.0": "conv3", "from_layer2.1": "bn3"}
# anomalib's OCBE defines conv4/bn4 (1x1, 1024 -> 512) and never calls them in forward; ours leaves them out
ANOMALIB_UNUSED = ("bottleneck.conv4.", "bottleneck.bn4.")


def to_anomalib(state: dict) -> dict:
    out = anomalib_keys.backbone(state, "feature_extractor.", "encoder.")
    for key, value in state.items():
        if key.startswith("bottleneck.embed."):
            out["bottleneck.bn_layer." + key[len("bottleneck.embed."):]] = value
        elif key.startswith("bottleneck."):
            module, param = key[len("bottleneck."):].rsplit(".", 1)
            out[f"bottleneck.{_BOTTLENECK[module]}.{param}"] = value
        elif key.startswith("decoder.stages."):
            match = re.fullmatch(r"decoder\.stages\.(\d+)\.(.+)", key)
            rest = match.group(2).replace(".shortcut.", ".upsample.")
            out[f"decoder.layer{int(match.group(1)) + 1}.{rest}"] = value
    return out
