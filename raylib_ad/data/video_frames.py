"""Decoding video files with PyAV, and the on-disk caches that let workers read videos as image files.

Frames: $RAYLIB_AD_CACHE/video_frames/<name>-<hash of path, mtime, size>/000000.jpg (default
~/.cache/raylib_ad/...), decoded once on the driver while the manifest is built. Mask volumes (Avenue's
.mat, ShanghaiTech's .npy): $RAYLIB_AD_CACHE/video_masks/..., one 0/255 PNG per anomalous frame.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from ..errors import DataError

DONE_FILE = "done.json"  # written last into a cache folder: its presence means the folder is complete
JPEG_QUALITY = 95  # cached frames: ~6x smaller than PNG (Avenue: ~2 GB instead of ~12 GB); already lossy video


class VideoLimitError(DataError):
    """A video over a size limit (pixels per frame, frame count): the server answers 413, not 400."""


def iter_video_frames(source: str | os.PathLike | Any, *, name: str | None = None, max_pixels: int | None = None,
                      max_frames: int | None = None) -> Iterator[np.ndarray]:
    """RGB uint8 frames (H, W, 3) of a video file (a path or a binary file object), decoded with PyAV.
    Raises DataError naming the video when it cannot be decoded, or is over max_pixels / max_frames."""
    import av

    name = name or str(source)
    try:
        container = av.open(os.fspath(source) if isinstance(source, (str, os.PathLike)) else source)
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise DataError(f"video cannot be decoded: {name} ({type(exc).__name__}: {exc})") from exc
    with container:
        if not container.streams.video:
            raise DataError(f"video cannot be decoded: {name} has no video stream")
        stream = container.streams.video[0]
        count = 0
        try:
            for frame in container.decode(stream):
                if max_pixels is not None and frame.width * frame.height > max_pixels:
                    raise VideoLimitError(f"video {name}: frames of {frame.width}x{frame.height} pixels are over "
                                          f"the limit of {max_pixels}")
                count += 1
                if max_frames is not None and count > max_frames:
                    raise VideoLimitError(f"video {name} has more than {max_frames} frames (the limit)")
                yield frame.to_ndarray(format="rgb24")
        except (av.error.FFmpegError, OSError) as exc:
            raise DataError(f"video cannot be decoded: {name}, after {count} frame(s) ({type(exc).__name__}: "
                            f"{exc})") from exc
    if count == 0:
        raise DataError(f"video cannot be decoded: {name} has no frames")


def cache_root() -> Path:
    return Path(os.environ.get("RAYLIB_AD_CACHE", Path.home() / ".cache" / "raylib_ad"))


def cached_frames(video: str | os.PathLike) -> list[Path]:
    """The frames of a video file as image files in the frame cache, decoded on the first call."""
    video = Path(video).absolute()

    def write(folder: Path) -> dict:
        count = 0
        for count, frame in enumerate(iter_video_frames(video), start=1):
            Image.fromarray(frame).save(folder / f"{count - 1:06d}.jpg", quality=JPEG_QUALITY)
        return {"frames": count}

    folder, done = _cached(video, "video_frames", write)
    return [folder / f"{i:06d}.jpg" for i in range(done["frames"])]


def cached_masks(source: Path, load: Callable[[], np.ndarray]) -> tuple[list[int], list[Path | None]]:
    """Per-frame labels and mask files from a (frames, H, W) mask volume, written once to the cache as
    0/255 PNGs for the frames that have an anomalous pixel (anomalib's rule for a frame's label)."""

    def write(folder: Path) -> dict:
        volume = load()
        labels = []
        for t in range(len(volume)):
            mask = np.asarray(volume[t]) > 0
            labels.append(int(mask.any()))
            if labels[-1]:
                Image.fromarray(mask.astype(np.uint8) * np.uint8(255)).save(folder / f"{t:06d}.png")
        return {"labels": labels}

    folder, done = _cached(Path(source).absolute(), "video_masks", write)
    labels = [int(v) for v in done["labels"]]
    return labels, [folder / f"{t:06d}.png" if v else None for t, v in enumerate(labels)]


def _cached(source: Path, kind: str, write: Callable[[Path], dict]) -> tuple[Path, dict]:
    """A cache folder for `source`, keyed by its path, mtime and size; filled by `write` in a staging folder
    that is renamed into place, so an interrupted run never leaves half a cache behind."""
    try:
        st = source.stat()
    except OSError as exc:
        raise DataError(f"cannot read {source}: {exc}") from exc
    key = hashlib.sha1(f"{source}|{st.st_mtime_ns}|{st.st_size}".encode()).hexdigest()[:16]
    target = cache_root() / kind / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', source.stem)}-{key}"
    if (target / DONE_FILE).is_file():
        return target, json.loads((target / DONE_FILE).read_text())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        done = {**write(staging), "source": str(source)}
        (staging / DONE_FILE).write_text(json.dumps(done))
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / DONE_FILE).is_file():  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, json.loads((target / DONE_FILE).read_text())
