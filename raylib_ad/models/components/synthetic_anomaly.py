"""Synthetic anomalies for the reconstruction models (DRAEM, DSR): Perlin-noise masks filled with an
out-of-place texture, made on the worker's device, a whole batch at a time, from a torch.Generator.

Follows anomalib's PerlinAnomalyGenerator (data/utils/generators/perlin.py) in what it draws:
- a Perlin noise field with a random lattice of 2**[0, 6) cells per axis, rotated by U(-90, 90) degrees
  (zeros fill the corners), thresholded at 0.5 (a field with no value above 0.5 is first stretched to
  [-1, 1]); up to 10 redraws for an empty mask;
- a texture per image, changed by 3 of anomalib's photometric/geometric augmentations;
- blended inside the mask only: image * (1 - m) + beta * texture * m + (1 - beta) * image * m, with beta
  drawn per image from `blend`, and applied to each image with probability `probability`.

Where the texture comes from:
- `texture_dir`: any folder of images (DRAEM's default is anomalib's: DTD, from the asset cache,
  raylib_ad/assets.py; any folder works here);
- "self": textures made from the batch itself: another image of the batch, cut into a grid of patches
  shuffled per image and recoloured (a channel permutation plus the augmentations). No download, and
  the textures have the statistics of the domain, but not anomalib's method (DRAEM's named fallback
  `image_as_texture=true`);
- "noise": the Perlin field itself as a grey texture (anomalib's generator without a source folder, which
  DSR's third phase uses).

Differences from anomalib, all for batching on the device: the random numbers come from the generator
passed in (reproducible), AutoAugment is left out of the augmentation list (its policies are built from
the same operations), and hue is rotated in YIQ space rather than HSV.

Given one generator, a batch is drawn at once. Given a list, one generator per image (the runner's
batch["generators"], seeded by the image's row in the training set), each image is drawn alone from its
own: its anomaly no longer depends on the worker or the batch it came in. The "self" texture of an image
drawn alone is cut from the image itself (there is no other image it could take without depending on
its batch).
Images are floats in [0, 1] (both models are trained on unnormalized images, as in anomalib).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
PERLIN_SCALE_EXPONENTS = (0, 6)  # lattice cells per axis: 2**randint(0, 6), as anomalib
MASK_THRESHOLD = 0.5
MAX_REDRAWS = 10  # anomalib redraws an empty mask up to 10 times


# --- random numbers from the caller's generator -------------------------------------------------------

def _rand(shape, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _uniform(shape, low: float, high: float, generator, device) -> torch.Tensor:
    return low + (high - low) * _rand(shape, generator, device)


def _randint(high: int, shape, generator, device, low: int = 0) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=generator, device=generator.device).to(device)


def _one_each(generators, batch: int) -> list[torch.Generator]:
    generators = list(generators)
    if len(generators) != batch:
        raise ValueError(f"{len(generators)} generators for {batch} images: give one generator, or one per image")
    return generators


# --- Perlin noise and masks ----------------------------------------------------------------------------

def perlin_noise(batch: int, height: int, width: int, generator: torch.Generator,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """(batch, height, width) Perlin noise, roughly in [-1, 1], each image with its own random lattice
    (2**[0, 6) cells per axis) and gradients. Computed on a power-of-two canvas and cropped, as anomalib."""
    device = torch.device(device)
    pad_h, pad_w = (1 << max(0, math.ceil(math.log2(max(height, 1)))),
                    1 << max(0, math.ceil(math.log2(max(width, 1)))))
    low, high = PERLIN_SCALE_EXPONENTS
    # A lattice finer than the canvas would have cells under one pixel: cap it (only tiny images).
    cells_y = 2 ** _randint(high, (batch,), generator, device, low).clamp(max=int(math.log2(pad_h)))
    cells_x = 2 ** _randint(high, (batch,), generator, device, low).clamp(max=int(math.log2(pad_w)))
    side = 2**high + 1  # gradients at (cells + 1)^2 lattice points; drawn at the largest size for batching
    angles = 2 * math.pi * _rand((batch, side, side), generator, device)
    gradients = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1).view(batch, side * side, 2)

    pos_y = torch.arange(pad_h, device=device, dtype=torch.float32)[None] * cells_y[:, None] / pad_h
    pos_x = torch.arange(pad_w, device=device, dtype=torch.float32)[None] * cells_x[:, None] / pad_w
    cell_y, cell_x = pos_y.floor().long(), pos_x.floor().long()  # (B, pad_h), (B, pad_w)
    frac_y = (pos_y - cell_y)[:, :, None].expand(batch, pad_h, pad_w)
    frac_x = (pos_x - cell_x)[:, None, :].expand(batch, pad_h, pad_w)

    def corner(dy: int, dx: int) -> torch.Tensor:
        index = ((cell_y + dy)[:, :, None] * side + (cell_x + dx)[:, None, :]).reshape(batch, -1, 1)
        grad = torch.gather(gradients, 1, index.expand(-1, -1, 2)).view(batch, pad_h, pad_w, 2)
        return grad[..., 0] * (frac_y - dy) + grad[..., 1] * (frac_x - dx)

    def fade(t: torch.Tensor) -> torch.Tensor:  # quintic smoothstep
        return t * t * t * (t * (t * 6 - 15) + 10)

    t_y, t_x = fade(frac_y), fade(frac_x)
    noise = math.sqrt(2.0) * torch.lerp(torch.lerp(corner(0, 0), corner(1, 0), t_y),
                                        torch.lerp(corner(0, 1), corner(1, 1), t_y), t_x)
    return noise[:, :height, :width]


def rotate(images: torch.Tensor, degrees: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Rotate each (C, H, W) image about its centre by its own angle; zeros fill what comes in."""
    batch, _, height, width = images.shape
    radians = degrees.to(images.dtype) * (math.pi / 180)
    cos, sin = torch.cos(radians), torch.sin(radians)
    # affine_grid works in [-1, 1] coordinates per axis: correct the off-diagonal terms by the aspect ratio.
    theta = torch.zeros(batch, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * height / width
    theta[:, 1, 0], theta[:, 1, 1] = sin * width / height, cos
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _perlin_fields(batch, height, width, generator, device, rotation) -> torch.Tensor:
    noise = perlin_noise(batch, height, width, generator, device)
    # A field that never exceeds the threshold would give an empty mask: stretch it to [-1, 1] first.
    flat = noise.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    stretched = 2 * (noise - low[:, None, None]) / (high - low).clamp_min(1e-12)[:, None, None] - 1
    noise = torch.where((high > MASK_THRESHOLD)[:, None, None], noise, stretched)
    angles = _uniform((batch,), rotation[0], rotation[1], generator, device)
    return rotate(noise[:, None], angles)[:, 0]


def perlin_masks(batch: int, height: int, width: int, generator: torch.Generator,
                 device: torch.device | str = "cpu", *, probability: float = 1.0,
                 rotation: tuple[float, float] = (-90.0, 90.0), redraw_empty: bool = True,
                 return_fields: bool = False):
    """(batch, 1, height, width) binary float masks: rotated Perlin noise > 0.5. Each image gets a mask
    with probability `probability` (else all zeros); `redraw_empty` redraws empty masks up to 10 times.
    With `return_fields`, also the (batch, height, width) noise fields the masks came from.
    `generator` may be a list of `batch` generators: each mask then comes from its own (module docstring)."""
    if not isinstance(generator, torch.Generator):
        drawn = [perlin_masks(1, height, width, g, device, probability=probability, rotation=rotation,
                              redraw_empty=redraw_empty, return_fields=True) for g in _one_each(generator, batch)]
        masks, fields = torch.cat([m for m, _ in drawn]), torch.cat([f for _, f in drawn])
        return (masks, fields) if return_fields else masks
    device = torch.device(device)
    fields = _perlin_fields(batch, height, width, generator, device, rotation)
    if redraw_empty:
        for _ in range(MAX_REDRAWS):
            empty = ~(fields > MASK_THRESHOLD).flatten(1).any(1)
            if not bool(empty.any()):
                break
            redrawn = _perlin_fields(int(empty.sum()), height, width, generator, device, rotation)
            fields = fields.clone()
            fields[empty] = redrawn
    masks = (fields > MASK_THRESHOLD).to(torch.float32)[:, None]
    applied = _rand((batch,), generator, device) < probability
    masks = masks * applied[:, None, None, None].to(masks.dtype)
    return (masks, fields) if return_fields else masks


# --- texture augmentations (anomalib's list, batched) -------------------------------------------------

def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def _contrast(x, g):
    factor = _uniform((len(x), 1, 1, 1), 0.5, 2.0, g, x.device)
    return (factor * x + (1 - factor) * _grey(x).mean(dim=(2, 3), keepdim=True)).clamp(0, 1)


def _brightness(x, g):
    return (x * _uniform((len(x), 1, 1, 1), 0.8, 1.2, g, x.device)).clamp(0, 1)


def _sharpen(x, g):
    # torchvision's adjust_sharpness(2): 2 * image - smoothed image, borders kept.
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device, dtype=x.dtype) / 13
    smooth = F.conv2d(x, kernel.expand(3, 1, 3, 3), padding=1, groups=3)
    out = x.clone()
    out[..., 1:-1, 1:-1] = (2 * x - smooth)[..., 1:-1, 1:-1]
    return out.clamp(0, 1)


def _hue_saturation(x, g):
    batch = len(x)
    hue = _uniform((batch,), -50 / 360, 50 / 360, g, x.device) * 2 * math.pi
    saturation = _uniform((batch, 1, 1, 1), 0.5, 1.5, g, x.device)
    grey = _grey(x)
    x = (saturation * x + (1 - saturation) * grey).clamp(0, 1)
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          device=x.device, dtype=x.dtype)
    cos, sin = torch.cos(hue), torch.sin(hue)
    turn = torch.zeros(batch, 3, 3, device=x.device, dtype=x.dtype)
    turn[:, 0, 0], turn[:, 1, 1], turn[:, 1, 2], turn[:, 2, 1], turn[:, 2, 2] = 1, cos, -sin, sin, cos
    matrix = torch.linalg.inv(to_yiq) @ turn @ to_yiq  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", matrix, x).clamp(0, 1)


def _solarize(x, g):
    threshold = _uniform((len(x), 1, 1, 1), 32 / 255, 128 / 255, g, x.device)
    return torch.where(x >= threshold, 1 - x, x)


def _posterize(x, g):
    return torch.bitwise_and((x * 255).round().to(torch.uint8), 0xF0).to(x.dtype) / 255


def _invert(x, g):
    return 1 - x


def _equalize(x, g):
    # Per-channel histogram equalization, torchvision's rule, all channels of the batch at once.
    batch, channels, height, width = x.shape
    values = (x * 255).round().long().clamp(0, 255).view(batch * channels, -1)
    hist = torch.zeros(batch * channels, 256, device=x.device, dtype=x.dtype)
    hist.scatter_add_(1, values, torch.ones_like(values, dtype=x.dtype))
    last = hist.gather(1, (values.max(1, keepdim=True).values))  # count of the brightest present value
    step = torch.div(height * width - last, 255, rounding_mode="floor")
    cdf = hist.cumsum(1) - hist  # exclusive
    lut = torch.div(cdf + torch.div(step, 2, rounding_mode="floor"), step.clamp_min(1),
                    rounding_mode="floor").clamp(0, 255)
    out = lut.gather(1, values) / 255
    return torch.where(step > 0, out, values.to(x.dtype) / 255).view_as(x)


def _rotate45(x, g):
    return rotate(x, _uniform((len(x),), -45.0, 45.0, g, x.device))


AUGMENTATIONS = (_contrast, _brightness, _sharpen, _hue_saturation, _solarize, _posterize, _invert, _equalize,
                 _rotate45)


def augment_textures(textures: torch.Tensor, generator: torch.Generator, count: int = 3) -> torch.Tensor:
    """Apply `count` different augmentations, chosen per image from AUGMENTATIONS, to (B, 3, H, W) in [0, 1]."""
    batch = len(textures)
    scores = _rand((batch, len(AUGMENTATIONS)), generator, textures.device)
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen.scatter_(1, scores.argsort(dim=1)[:, :count], True)
    out = textures.clone()
    for k, op in enumerate(AUGMENTATIONS):
        rows = chosen[:, k].nonzero().flatten()
        if len(rows):
            out[rows] = op(out[rows], generator).to(out.dtype)
    return out


def self_textures(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Textures from the batch itself: image i takes image i+1's content (i itself when alone), cut into a
    grid of 2, 4 or 8 patches per side shuffled per image, with its colour channels permuted."""
    batch, _, height, width = images.shape
    source = images.roll(1, dims=0)
    grid = int(2 ** _randint(4, (1,), generator, "cpu", 1))
    order = _rand((batch, grid * grid), generator, images.device).argsort(dim=1)  # (B, g*g)
    # Each output pixel reads the same place inside patch order[b, p] of the source.
    ys = (torch.arange(height, device=images.device) + 0.5) / height * grid
    xs = (torch.arange(width, device=images.device) + 0.5) / width * grid
    patch = ys.floor().long().clamp(max=grid - 1)[:, None] * grid + xs.floor().long().clamp(max=grid - 1)[None]
    src = order[:, patch.flatten()].view(batch, height, width)
    src_y = (src // grid).to(images.dtype) + (ys - ys.floor())[None, :, None]
    src_x = (src % grid).to(images.dtype) + (xs - xs.floor())[None, None, :]
    sample = torch.stack((src_x / grid * 2 - 1, src_y / grid * 2 - 1), dim=-1)
    shuffled = F.grid_sample(source, sample, mode="nearest", padding_mode="border", align_corners=False)
    perms = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]], device=images.device)
    perm = perms[_randint(6, (batch,), generator, images.device)]  # (B, 3)
    return torch.gather(shuffled, 1, perm[:, :, None, None].expand(-1, -1, height, width))


class TextureFolder:
    """Images of a folder (recursively, sorted), decoded on demand at the requested size and kept in a
    small least-recently-used cache (`cache_mb`), so a DTD-sized folder never sits whole in memory."""

    def __init__(self, directory: str | Path, cache_mb: float = 256, setting: str = "texture_dir"):
        self.directory = Path(directory).expanduser()
        if not self.directory.is_dir():
            raise ConfigError(f"{setting}={str(directory)!r}: not a directory (expected a folder of texture images)")
        self.paths = sorted(p for p in self.directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise ConfigError(f"{setting}={str(directory)!r}: no images found (suffixes {list(IMAGE_SUFFIXES)})")
        self._budget = int(cache_mb * 2**20)
        self._cache: OrderedDict[tuple[int, int, int], torch.Tensor] = OrderedDict()
        self._used = 0

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, height: int, width: int) -> torch.Tensor:
        """(3, height, width) uint8 tensor of image `index`."""
        key = (index, height, width)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        from PIL import Image

        with Image.open(self.paths[index]) as img:
            rgb = img.convert("RGB").resize((width, height), Image.BILINEAR)
        tensor = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()
        self._cache[key] = tensor
        self._used += tensor.numel()
        while self._used > self._budget and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._used -= dropped.numel()
        return tensor

    def batch(self, count: int, height: int, width: int, generator: torch.Generator, device) -> torch.Tensor:
        indices = _randint(len(self.paths), (count,), generator, "cpu").tolist()
        stacked = torch.stack([self.load(i, height, width) for i in indices])
        return stacked.to(device, non_blocking=True).to(torch.float32) / 255


class SyntheticAnomalyGenerator:
    """(images, generator) -> (augmented images, masks (B, 1, H, W) in {0, 1}); see the module docstring.

    `textures`: a folder path, "self" (patches of the training batch; of the image itself when drawn per
    image) or "noise" (the Perlin field).
    """

    def __init__(self, textures: str | Path = "self", *, probability: float = 0.5,
                 blend: tuple[float, float] | float = (0.1, 1.0), rotation: tuple[float, float] = (-90.0, 90.0),
                 augmentations: int = 3, cache_mb: float = 256, setting: str = "texture_dir"):
        self.probability = float(probability)
        self.blend = (float(blend), float(blend)) if isinstance(blend, (int, float)) else tuple(map(float, blend))
        self.rotation = tuple(map(float, rotation))
        self.augmentations = int(augmentations)
        if str(textures) in ("self", "noise"):
            self.mode, self.folder = str(textures), None
        else:
            self.mode, self.folder = "folder", TextureFolder(textures, cache_mb, setting)

    def textures(self, images: torch.Tensor, fields: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, _, height, width = images.shape
        if self.mode == "folder":
            source = self.folder.batch(batch, height, width, generator, images.device)
        elif self.mode == "self":
            source = self_textures(images.float().clamp(0, 1), generator)
        else:  # anomalib's texture without a source folder: the noise field, grey, in [0.25 - 0.5, 0.75]
            source = (fields[:, None] * 0.5 + 0.25).expand(-1, 3, -1, -1).clamp(0, 1)
        return augment_textures(source, generator, self.augmentations)

    def __call__(self, images: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`generator`: one for the whole batch, or a list with one per image (module docstring)."""
        if not isinstance(generator, torch.Generator):
            drawn = [self(images[i : i + 1], g) for i, g in enumerate(_one_each(generator, len(images)))]
            return torch.cat([a for a, _ in drawn]), torch.cat([m for _, m in drawn])
        batch, _, height, width = images.shape
        masks, fields = perlin_masks(batch, height, width, generator, images.device, probability=self.probability,
                                     rotation=self.rotation, return_fields=True)
        textures = self.textures(images, fields, generator).to(images.dtype)
        beta = _uniform((batch, 1, 1, 1), self.blend[0], self.blend[1], generator, images.device).to(images.dtype)
        masks = masks.to(images.dtype)
        inside = beta * textures + (1 - beta) * images
        return images * (1 - masks) + inside * masks, masks
