"""CS-Flow: our cross-scale flow (state dict or gradients) -> anomalib 2.7's CsFlowModel.graph (CrossScaleFlow,
a FrEIA GraphINN of ParallelPermute / ParallelGlowCouplingLayer nodes).

Only the flow: anomalib's extractor is torchvision's EfficientNet-B5 `features.6.8` (ImageNet weights fetched by
torchvision), ours a timm backbone (`tf_efficientnet_b5` `blocks.5.8` is the same block); the two nets differ
in padding, so the parity harness feeds both flows the same features."""

from __future__ import annotations

import re

# our CrossConvolutions -> anomalib's
_CONVS = {"first.0": "conv_scale0_0", "first.1": "conv_scale1_0", "first.2": "conv_scale2_0",
          "second.0": "conv_scale0_1", "second.1": "conv_scale1_1", "second.2": "conv_scale2_1",
          "up_from_1": "up_conv10", "up_from_2": "up_conv21", "down_from_0": "down_conv01", "down_from_1": "down_conv12"}


def to_anomalib(state: dict) -> dict:
    """flow.couplings.<b>.net<k>.<conv>.<w> -> graph.graph.module_list.<2b+1>.cross_convolution<k>.<conv>.<w>
    (the graph's module list alternates permutation and coupling nodes); our `gammas` (3,) -> gamma0..2 (1,)
    each. Our permutations are not in the state dict: both sides draw them from numpy's default_rng(block)."""
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"flow\.couplings\.(\d+)\.net([12])\.(.+)", key)
        if not match:
            continue
        block, net, rest = int(match.group(1)), match.group(2), match.group(3)
        head = f"graph.graph.module_list.{2 * block + 1}.cross_convolution{net}."
        if rest == "gammas":
            for i in range(3):
                out[f"{head}gamma{i}"] = value[i : i + 1]
            continue
        conv, param = rest.rsplit(".", 1)
        out[f"{head}{_CONVS[conv]}.{param}"] = value
    return out
