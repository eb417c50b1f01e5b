"""A small synthetic MVTec-layout dataset, generated on demand, so raylib_ad runs offline.

Each category is a textured industrial-looking surface (smooth noise + a periodic
grain + fine grit, tinted per category). Test images carry two kinds of planted defects:
  * "scratch": a thin, slightly curved line darker or brighter than its surroundings;
  * "spot": a blob re-textured with another hue at about the same brightness,
    so it is visible in colour and texture but not by thresholding grey levels.
Masks are exact: a pixel is 255 in the mask if and only if the defect changed it.
"""

from __future__ import annotations

import colorsys
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DataError

DEFECT_KINDS = ("scratch", "spot")


def ensure_synthetic(
    root: str | os.PathLike,
    category: str,
    *,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 20,
    image_size: int = 128,
) -> Path:
    """Return ``root/category``, generating it first if absent.

    Generation happens in a temporary sibling directory that is renamed into place,
    so an interrupted run never leaves a half-written dataset behind.
    """
    root = Path(root).absolute()
    target = root / category
    expected = _expected_files(n_train, n_test_good, n_test_defect)
    if target.exists():
        _check_complete(target, expected)
        return target

    root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{category}.synthetic-", dir=root))
    try:
        staged = workdir / category
        _generate(staged, category, n_train, n_test_good, n_test_defect, image_size)
        try:
            os.rename(staged, target)
        except OSError:
            # A concurrent worker published the same category first; its copy is identical.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    _check_complete(target, expected)
    return target


def _expected_files(n_train: int, n_test_good: int, n_test_defect: int) -> list[str]:
    files = [f"train/good/{i:03d}.png" for i in range(n_train)]
    files += [f"test/good/{i:03d}.png" for i in range(n_test_good)]
    for kind, count in _defect_counts(n_test_defect).items():
        files += [f"test/{kind}/{i:03d}.png" for i in range(count)]
        files += [f"ground_truth/{kind}/{i:03d}_mask.png" for i in range(count)]
    return files


def _defect_counts(n_test_defect: int) -> dict[str, int]:
    base, extra = divmod(n_test_defect, len(DEFECT_KINDS))
    return {kind: base + (i < extra) for i, kind in enumerate(DEFECT_KINDS)}


def _check_complete(target: Path, expected: list[str]) -> None:
    missing = [name for name in expected if not (target / name).is_file()]
    if missing:
        raise DataError(
            f"synthetic dataset {target} is incomplete or was made with other sizes: "
            f"{len(missing)} expected file(s) missing, e.g. {target / missing[0]}; "
            f"delete {target} to regenerate it"
        )


def _generate(out: Path, category: str, n_train: int, n_test_good: int, n_test_defect: int, size: int) -> None:
    # crc32, unlike hash(), is stable across processes and Python versions.
    seed = zlib.crc32(category.encode("utf-8"))
    style = _Style(np.random.default_rng([seed, 0]))

    def rng(group: int, index: int) -> np.random.Generator:
        return np.random.default_rng([seed, group, index])

    for i in range(n_train):
        _save(out / "train/good" / f"{i:03d}.png", style.surface(rng(1, i), size))
    for i in range(n_test_good):
        _save(out / "test/good" / f"{i:03d}.png", style.surface(rng(2, i), size))
    for k, (kind, count) in enumerate(_defect_counts(n_test_defect).items()):
        plant = _scratch if kind == "scratch" else _spot
        for i in range(count):
            r = rng(3 + k, i)
            image, mask = plant(style, r, style.surface(r, size))
            _save(out / "test" / kind / f"{i:03d}.png", image)
            _save(out / "ground_truth" / kind / f"{i:03d}_mask.png", mask)


class _Style:
    """What all images of one category share: tint, grain direction and frequency."""

    def __init__(self, rng: np.random.Generator):
        hue, sat = rng.uniform(0, 1), rng.uniform(0.15, 0.45)
        self.hue = hue
        self.tint = np.array(colorsys.hsv_to_rgb(hue, sat, 1.0), dtype=np.float32)
        self.angle = rng.uniform(0, np.pi)
        self.periods = rng.uniform(10, 18)  # grain periods across the image
        self.grain = rng.uniform(0.06, 0.10)
        self.mottle = rng.uniform(0.08, 0.12)

    def shading(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """Grey level in about [0.2, 0.8] with per-image noise, phase and brightness."""
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        along = xx * np.cos(self.angle) + yy * np.sin(self.angle)
        wobble = 0.02 * _smooth_noise(rng, size, 4)
        grain = np.sin(2 * np.pi * (self.periods * (along + wobble) + rng.uniform(0, 1)))
        mottle = _smooth_noise(rng, size, 6) + 0.5 * _smooth_noise(rng, size, 16)
        grit = rng.normal(0, 0.025, (size, size))
        level = 0.5 + rng.uniform(-0.03, 0.03)
        return (level + self.grain * grain + self.mottle * mottle + grit).astype(np.float32)

    def surface(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return _colourise(self.shading(rng, size), self.tint)


def _colourise(shade: np.ndarray, tint: np.ndarray) -> np.ndarray:
    """Float RGB in [0, 1]; the tint is scaled to unit luma so brightness = shade."""
    luma = 0.299 * tint[0] + 0.587 * tint[1] + 0.114 * tint[2]
    return np.clip(shade[..., None] * (tint / luma), 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Unit-variance-ish noise that varies over about size/cells pixels."""
    coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))


def _scratch(style: _Style, rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    length = rng.uniform(0.25, 0.5) * size
    theta = rng.uniform(0, np.pi)
    start = rng.uniform(0.2, 0.8, 2) * size
    direction = np.array([np.cos(theta), np.sin(theta)])
    bend = np.array([-direction[1], direction[0]]) * rng.uniform(-0.08, 0.08) * length
    points = [start, start + 0.5 * length * direction + bend, start + length * direction]
    points = [tuple(np.clip(p, 0, size - 1)) for p in points]
    mask = _draw(size, lambda d: d.line(points, fill=255, width=max(1, round(size / 90)), joint="curve"))
    # Real scratches shift brightness by a fraction of the surface's own range.
    delta = rng.choice([-1.0, 1.0]) * rng.uniform(0.22, 0.32)
    out = image.copy()
    out[mask > 0] = np.clip(out[mask > 0] + delta, 0.0, 1.0)
    return out, _exact_mask(image, out)


def _spot(style: _Style, rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    centre = rng.uniform(0.25, 0.75, 2) * size
    radius = rng.uniform(0.06, 0.11) * size
    angles = np.linspace(0, 2 * np.pi, 14, endpoint=False)
    radii = radius * rng.uniform(0.7, 1.3, angles.size)
    polygon = [(centre[0] + r * np.cos(a), centre[1] + r * np.sin(a)) for r, a in zip(radii, angles)]
    mask = _draw(size, lambda d: d.polygon(polygon, fill=255))
    # The surface's own brightness, recoloured with another hue plus a fine grain: a stain
    # or corrosion patch, which grey-level thresholding cannot see.
    hue = (style.hue + rng.uniform(0.3, 0.7)) % 1.0
    tint = np.array(colorsys.hsv_to_rgb(hue, 0.6, 1.0), dtype=np.float32)
    luma = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    shade = luma + 0.08 * _smooth_noise(rng, size, 32) + rng.normal(0, 0.03, (size, size))
    patch = _colourise(shade.astype(np.float32), tint)
    out = image.copy()
    out[mask > 0] = patch[mask > 0]
    return out, _exact_mask(image, out)


def _draw(size: int, paint) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    paint(ImageDraw.Draw(canvas))
    return np.asarray(canvas)


def _exact_mask(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """255 exactly where the saved 8-bit image changed, so masks never over-claim."""
    changed = np.any(_to_uint8(before) != _to_uint8(after), axis=-1)
    return np.where(changed, 255, 0).astype(np.uint8)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = array if array.dtype == np.uint8 else _to_uint8(array)
    Image.fromarray(data).save(path)
