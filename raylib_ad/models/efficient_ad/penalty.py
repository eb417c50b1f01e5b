"""EfficientAD's penalty images, prepared as anomalib prepares them.

anomalib's transform for its Imagenette penalty images (efficient_ad/lightning_model.py,
prepare_imagenette_data): Resize((2S, 2S)) of the whole image (aspect ratio not kept), RandomGrayscale(p=0.3),
CenterCrop((S, S)): the central half of each side at twice the training images' scale, a 2x zoom. Here the
same pixels come from one PIL bilinear resize of the central box straight to S x S (the box of the source
that the crop keeps; PIL samples the same source positions with the same filter, so the values equal the
resize-then-crop up to rounding) without decoding a 2S x 2S image first. The grayscale draw happens in the
training step (model.random_grayscale), on the step's generator.

Which images: anomalib wraps the download folder in torchvision's ImageFolder, i.e. every image under it
(Imagenette's train and val folders), shuffled, one batch per training step, restarted when exhausted.
Here every worker cycles through the files in an order drawn from (seed, rank), redrawn every pass, as
raylib_ad/train/extra_streams.py does for other streams.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ... import distributed
from ...errors import DataError

ZOOM = 2  # anomalib: Resize to 2S, then CenterCrop S


def zoom_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The source box that Resize((2S, 2S)) + CenterCrop((S, S)) keeps, in source pixel coordinates.
    torchvision's CenterCrop starts at round((2S - S) / 2) on the resized grid."""
    big = ZOOM * size
    start = int(round((big - size) / 2.0))
    sx, sy = width / big, height / big
    return (start * sx, start * sy, (start + size) * sx, (start + size) * sy)


def load_penalty_image(path: str, size: int) -> np.ndarray:
    """(S, S, 3) uint8: the image's central box (zoom_box) resized bilinearly to S x S, RGB."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            out = rgb.resize((size, size), Image.BILINEAR, box=zoom_box(rgb.width, rgb.height, size))
    except Exception as exc:  # PIL raises many types for corrupt files
        raise DataError(f"cannot read penalty image {path}: {type(exc).__name__}: {exc}") from exc
    return np.asarray(out, dtype=np.uint8)


class PenaltyImages:
    """An endless, seeded stream of penalty images in [0, 1], (n, 3, S, S) per `take`."""

    def __init__(self, paths: Sequence[str], size: int, seed: int):
        if not paths:
            raise DataError("EfficientAD: no penalty images")
        self.paths, self.size, self.seed = list(paths), int(size), int(seed)
        self._order: list[int] = []
        self._generator: torch.Generator | None = None

    def _next_index(self) -> int:
        if self._generator is None:  # first use, on the worker: its rank is known by now
            self._generator = torch.Generator().manual_seed(self.seed * 7919 + distributed.rank())
        if not self._order:
            self._order = torch.randperm(len(self.paths), generator=self._generator).tolist()[::-1]
        return self._order.pop()

    def take(self, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        pixels = np.stack([load_penalty_image(self.paths[self._next_index()], self.size) for _ in range(count)])
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device).float().div_(255)
