"""A small synthetic video dataset, generated on demand, so video models run offline (`--data synthetic_video`).

A static street-like background with shapes (discs and squares, one per lane) drifting left to right at
walking speed, wrapping around at the edges. Each anomalous test video plants, for a window of frames,
one of three anomalies:
  * "wrong_way": an ordinary shape moving right to left;
  * "too_fast": an ordinary shape moving about five times faster than any normal one;
  * "odd_shape": a triangle in a colour no normal object has, moving at normal speed.
Masks are the planted object's pixels (it is drawn last, on top); a frame is anomalous exactly when its
mask has a pixel, as in the real datasets. One training video is written as an .avi file (MPEG-4), the
others as frame folders, so both ways in are exercised. Everything follows from (category, seed).

Layout: <root>/<category>/train/video_0/000.png ..., train/video_<n-1>.avi,
        test/<kind>_<i>/000.png ..., test/<kind>_<i>_gt/000.png (0/255 masks), generator.json.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DataError

DEFAULT_CATEGORY = "shapes"
TEST_KINDS = ("good", "wrong_way", "too_fast", "odd_shape")
GENERATOR_FILE = "generator.json"  # written last: its presence means the dataset is complete
NORMAL_COLOURS = ((40, 90, 200), (30, 160, 90), (220, 140, 40), (90, 90, 110))
ODD_COLOUR = (230, 30, 200)
FAST_FACTOR = 5.0


def ensure_synthetic_video(root: str | os.PathLike, category: str = DEFAULT_CATEGORY, *, seed: int = 0,
                           n_train: int = 4, n_test: int = 4, n_frames: int = 24, size: int = 64) -> Path:
    """Return ``root/category``, generating it first if absent (in a staging folder renamed into place)."""
    params = {"seed": seed, "n_train": n_train, "n_test": n_test, "n_frames": n_frames, "size": size}
    if n_train < 1 or n_test < 1 or n_frames < 8 or size < 32 or size % 2:
        raise DataError(f"synthetic video: {params} is too small (need n_train, n_test >= 1, n_frames >= 8, "
                        "an even size >= 32)")
    root = Path(root).absolute()
    target = root / category
    if not target.exists():
        root.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f".{category}.synthetic-video-", dir=root))
        try:
            staged = workdir / category
            _generate(staged, category, **params)
            (staged / GENERATOR_FILE).write_text(json.dumps(params, sort_keys=True))
            try:
                os.rename(staged, target)
            except OSError:
                if not target.is_dir():  # a concurrent run published the same dataset first
                    raise
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    marker = target / GENERATOR_FILE
    made = json.loads(marker.read_text()) if marker.is_file() else None
    if made != params:
        state = "is incomplete" if made is None else f"was made with other settings ({made})"
        raise DataError(f"synthetic video dataset {target} {state}; expected {params}; delete {target} to "
                        "regenerate it")
    return target


def _generate(out: Path, category: str, *, seed: int, n_train: int, n_test: int, n_frames: int, size: int) -> None:
    base_seed = zlib.crc32(category.encode("utf-8"))  # stable across processes, unlike hash()
    background = _background(np.random.default_rng([base_seed, seed, 0]), size)
    for i in range(n_train):
        frames, _ = _video(np.random.default_rng([base_seed, seed, 1, i]), background, n_frames, "good")
        if i == n_train - 1:
            _write_avi(out / "train" / f"video_{i}.avi", frames)
        else:
            _write_frames(out / "train" / f"video_{i}", frames)
    for j in range(n_test):
        kind = TEST_KINDS[j % len(TEST_KINDS)]
        frames, masks = _video(np.random.default_rng([base_seed, seed, 2, j]), background, n_frames, kind)
        name = f"{kind}_{j // len(TEST_KINDS)}"
        _write_frames(out / "test" / name, frames)
        _write_frames(out / "test" / f"{name}_gt", masks)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A grey-green ground with a darker road band per lane and a soft texture (float RGB in [0, 1])."""
    yy = np.linspace(0, 1, size, dtype=np.float32)[:, None]
    coarse = rng.standard_normal((5, 5)).astype(np.float32)
    texture = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))
    shade = 0.55 + 0.1 * yy + 0.03 * texture
    for lane in _lanes(size):
        shade = np.where(np.abs(np.arange(size)[:, None] - lane) < size * 0.09, shade - 0.12, shade)
    tint = np.array([0.95, 1.0, 0.9], dtype=np.float32)
    return np.clip(np.broadcast_to(shade, (size, size))[..., None] * tint, 0, 1).astype(np.float32)


def _lanes(size: int) -> list[float]:
    return [size * 0.25, size * 0.5, size * 0.75]


def _video(rng: np.random.Generator, background: np.ndarray, n_frames: int, kind: str):
    """(frames uint8 (T, S, S, 3), masks uint8 (T, S, S) of 0/255) for one video of this kind."""
    size = background.shape[0]
    scale = size / 64
    objects = [{"lane": y, "shape": rng.choice(["disc", "square"]), "colour": NORMAL_COLOURS[rng.integers(4)],
                "radius": scale * rng.uniform(3.5, 5.0), "x0": rng.uniform(0, size),
                "speed": scale * rng.uniform(0.8, 1.6)} for y in _lanes(size)]
    planted = None
    if kind != "good":
        speed = scale * rng.uniform(0.8, 1.6) * (FAST_FACTOR if kind == "too_fast" else 1.0)
        radius = scale * rng.uniform(4.0, 5.0)
        start = {"wrong_way": 0.85, "too_fast": 0.08, "odd_shape": 0.15}[kind] * size
        velocity = -speed if kind == "wrong_way" else speed
        length = min(max(4, n_frames // 3), int(0.7 * size / speed))  # the object stays in view throughout
        first = int(rng.integers(n_frames // 4, n_frames - length))
        planted = {"lane": _lanes(size)[int(rng.integers(3))] + scale * rng.uniform(-3, 3),
                   "shape": "triangle" if kind == "odd_shape" else rng.choice(["disc", "square"]),
                   "colour": ODD_COLOUR if kind == "odd_shape" else NORMAL_COLOURS[rng.integers(4)],
                   "radius": radius, "start": start, "velocity": velocity, "first": first, "last": first + length}
    frames = np.empty((n_frames, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n_frames, size, size), dtype=np.uint8)
    for t in range(n_frames):
        canvas = Image.fromarray(_to_uint8(background))
        draw = ImageDraw.Draw(canvas)
        for obj in objects:
            span = size + 2 * obj["radius"]
            x = (obj["x0"] + obj["speed"] * t + obj["radius"]) % span - obj["radius"]
            _shape(draw, obj["shape"], x, obj["lane"], obj["radius"], obj["colour"])
        image = np.asarray(canvas, dtype=np.float32) / 255
        if planted is not None and planted["first"] <= t < planted["last"]:
            x = planted["start"] + planted["velocity"] * (t - planted["first"])
            mask = Image.new("L", (size, size), 0)
            _shape(ImageDraw.Draw(mask), planted["shape"], x, planted["lane"], planted["radius"], 255)
            masks[t] = np.asarray(mask)
        noise = rng.normal(0, 0.01, image.shape).astype(np.float32)  # sensor noise, so no two frames are equal
        frames[t] = _to_uint8(image + noise)
        if masks[t].any():  # the object's exact pixels after noise (it is drawn on top of everything)
            frames[t][masks[t] > 0] = _to_uint8(np.array(planted["colour"], dtype=np.float32) / 255)
    return frames, masks


def _shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, fill) -> None:
    if shape == "disc":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        draw.rectangle([x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r], fill=fill)
    else:  # an upright triangle
        draw.polygon([(x, y - 1.2 * r), (x - 1.1 * r, y + 0.8 * r), (x + 1.1 * r, y + 0.8 * r)], fill=fill)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def _write_frames(folder: Path, frames: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{t:03d}.png")


def _write_avi(path: Path, frames: np.ndarray, fps: int = 10) -> None:
    """MPEG-4 Part 2 in AVI, as the real datasets ship (Avenue, ShanghaiTech), at a high bit rate."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000
        stream.thread_count = 1  # one thread: the same bytes on every run
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
