"""Extra image streams of an Optimize stage (EfficientAD's penalty images), read on the worker. No Ray.

Each worker decodes the files itself (same size and normalization as the training images: on a cluster
the folder must be on shared storage, like the weights) and cycles through them forever, in an order
drawn from (seed, rank) and redrawn on every pass, so workers see different images at the same step.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from raylib_ad.data.transforms import load_image, normalize
from raylib_ad.errors import DataError
from raylib_ad.models.recipe import ExtraStream


def cycle_images(stream: ExtraStream, config, rank: int, device: torch.device) -> Iterator[torch.Tensor]:
    if not stream.paths:
        raise DataError(f"extra image stream '{stream.name}' has no images")
    generator = torch.Generator().manual_seed(config.seed * 7919 + rank)
    while True:
        order = torch.randperm(len(stream.paths), generator=generator).tolist()
        for start in range(0, len(order) - stream.batch_size + 1, stream.batch_size):
            chosen = [stream.paths[i] for i in order[start : start + stream.batch_size]]
            pixels = np.stack([load_image(path, config.image_size) for path in chosen])
            yield torch.from_numpy(normalize(pixels, config.mean, config.std)).to(device)
        if len(order) < stream.batch_size:
            raise DataError(f"extra image stream '{stream.name}' has {len(order)} images, fewer than its "
                            f"batch of {stream.batch_size}")
