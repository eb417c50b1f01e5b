"""Combining feature maps of several layers into one embedding per spatial position."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def concat_layers(features: dict[str, torch.Tensor], layers: list[str], mode: str = "bilinear") -> torch.Tensor:
    """Resize every layer's map to the first layer's size and concatenate channels: (B, sum C, h, w)."""
    base = features[layers[0]]
    size = base.shape[-2:]
    maps = [base]
    for layer in layers[1:]:
        x = features[layer]
        if x.shape[-2:] != size:
            kwargs = {} if mode == "nearest" else {"align_corners": False}
            x = F.interpolate(x, size=size, mode=mode, **kwargs)
        maps.append(x)
    return torch.cat(maps, dim=1)


def to_patches(embedding: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C)."""
    return embedding.flatten(2).transpose(1, 2)
