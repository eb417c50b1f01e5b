"""Scoring a short clip with a video model (AnomalyModel.clip_length = T): frames -> the clips of T
consecutive frames ending at each frame -> one forward pass per batch of clips -> a score per frame.

Frame t is scored from frames t-T+1 .. t, as in training. The first T-1 frames of a clip have no complete
history: their `score`, `normalized_score` and `is_anomalous` are None (null in JSON), never a guess.
Used by `raylib_ad.load(...)` users directly and by the HTTP app (serving/app.py) for video models. No Ray.
"""

from __future__ import annotations

import io
import os
from typing import Any, Sequence

import numpy as np
import torch

from raylib_ad.errors import ConfigError, DataError

# Frames one request may hold (a video file's frame count; multipart frames are capped by max_files).
MAX_CLIP_FRAMES = int(os.environ.get("RAYLIB_AD_SERVE_MAX_CLIP_FRAMES", "512"))


def clip_length_of(trained) -> int | None:
    """The frames per sample of a TrainedModel's model; None for an image model."""
    return getattr(trained.model, "clip_length", None)


def check_clip_frames(frames: Sequence[np.ndarray | str | os.PathLike], clip_length: int,
                      names: Sequence[str] | None = None) -> None:
    """DataError, naming the frames, for fewer frames than clip_length or frames of different sizes."""
    label = [names[i] if names else f"frame {i}" for i in range(len(frames))]
    if len(frames) < clip_length:
        raise DataError(f"the clip has {len(frames)} frame(s); the model scores clips of {clip_length} consecutive "
                        f"frames, so send at least {clip_length}")
    sizes = [_size(frame, name) for frame, name in zip(frames, label)]
    if len(set(sizes)) > 1:
        first = sizes[0]
        odd = next(i for i, size in enumerate(sizes) if size != first)
        raise DataError(f"frames of different sizes in one clip: {label[0]} is {first[0]}x{first[1]}, {label[odd]} is "
                        f"{sizes[odd][0]}x{sizes[odd][1]}; every frame of a clip must have the same size")


def _size(frame, name: str) -> tuple[int, int]:
    if isinstance(frame, (str, os.PathLike)):
        from PIL import Image

        try:
            with Image.open(frame) as im:
                return im.size
        except Exception as exc:  # PIL raises many types for corrupt files
            raise DataError(f"cannot read image {frame}: {type(exc).__name__}: {exc}") from exc
    array = np.asarray(frame)
    return int(array.shape[1]), int(array.shape[0])


@torch.no_grad()
def predict_clip(trained, frames: Sequence[np.ndarray | str | os.PathLike], *, with_maps: bool = False,
                 batch_size: int = 16, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One dict per frame, in order: `frame` (its index), the PREDICTION_FIELDS (score raw, normalized_score
    with 0.5 = threshold, is_anomalous, threshold; the last three None without stats.json), and with
    with_maps `anomaly_map` / `normalized_map`. Frames 0 .. T-2 get None scores (no complete clip).
    `trained`: a raylib_ad.load() result whose model is a video model; frames: paths or RGB uint8 arrays."""
    from raylib_ad.postprocess.normalization import normalize

    length = clip_length_of(trained)
    if length is None:
        raise ConfigError(f"model {trained.name} scores single images (it has no clip_length); use predict()")
    frames = list(frames)
    check_clip_frames(frames, length, names)
    pixels = trained.preprocess(frames)  # (N, 3, S, S), normalized as in training
    clips = pixels.unfold(0, length, 1).permute(0, 4, 1, 2, 3)  # (N-T+1, T, 3, S, S): clip i ends at frame i+T-1
    stats = trained.image_stats
    threshold = None if stats is None else stats.threshold
    results = [_prediction(i, None, threshold) for i in range(length - 1)]
    if with_maps:
        for item in results:
            item.update(anomaly_map=None, normalized_map=None)
    model = trained.model
    for start in range(0, len(clips), batch_size):
        out = model(clips[start : start + batch_size].contiguous().to(model.device))
        for k, score in enumerate(out.score.float().cpu().tolist()):
            item = _prediction(len(results), score, threshold)
            if stats is not None:
                item["normalized_score"] = float(normalize(score, stats))
                item["is_anomalous"] = bool(score >= stats.threshold)
            if with_maps:
                amap = None if out.anomaly_map is None else out.anomaly_map[k].float().cpu().numpy()
                pixel_stats = trained.pixel_stats or stats
                item["anomaly_map"] = amap
                item["normalized_map"] = None if amap is None or pixel_stats is None else normalize(amap, pixel_stats)
            results.append(item)
    return results


def _prediction(frame: int, score: float | None, threshold: float | None) -> dict[str, Any]:
    return {"frame": frame, "score": score, "normalized_score": None, "is_anomalous": None, "threshold": threshold}


def read_clip(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[np.ndarray]:
    """A video file, or a list of frame image files in time order -> RGB uint8 frames."""
    from raylib_ad.data.video import iter_video_frames

    if isinstance(source, (str, os.PathLike)):
        return list(iter_video_frames(source))
    from PIL import Image

    frames = []
    for path in source:
        try:
            with Image.open(path) as im:
                frames.append(np.asarray(im.convert("RGB")))
        except Exception as exc:  # PIL raises many types for corrupt files
            raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    return frames


# --- HTTP (serving/app.py calls this in a thread; Ray-free, so replicas import it like any module) ------------


def decode_clip_files(files: list[tuple[str | None, bytes]], max_pixels: int,
                      max_frames: int = MAX_CLIP_FRAMES) -> tuple[list[np.ndarray], list[str] | None]:
    """The request's payload as one clip: a single body or file is a video file; several multipart files are
    the frames, in the order sent. BadRequest / PayloadTooLarge (4xx) with a message for bad payloads."""
    from raylib_ad.data.video import VideoLimitError, iter_video_frames
    from raylib_ad.serving.decode import decode_image
    from raylib_ad.serving.errors import BadRequest, PayloadTooLarge

    if len(files) == 1:
        name, data = files[0]
        where = f"file {name!r}" if name is not None else "request body"
        if not data:
            raise BadRequest(f"{where} is empty: send a video file, or the frames as multipart files")
        try:
            return list(iter_video_frames(io.BytesIO(data), name=where, max_pixels=max_pixels,
                                          max_frames=max_frames)), None
        except VideoLimitError as exc:
            raise PayloadTooLarge(str(exc)) from None
        except DataError as exc:
            raise BadRequest(f"{exc}; send a video file (.avi, .mp4, ...), or the frames as several multipart "
                             "image files") from None
    names = [name or f"file {i}" for i, (name, _) in enumerate(files)]
    return [decode_image(data, max_pixels, f"file {name!r}") for name, (_, data) in zip(names, files)], names


def clip_response(slot, files: list[tuple[str | None, bytes]], max_pixels: int, with_map: bool) -> dict[str, Any]:
    """A video model's answer to POST .../predict: {"model", "clip_length", "frames": [one entry per frame:
    frame, filename (multipart), score, normalized_score, is_anomalous, threshold[, anomaly_map_png]]}.
    The first clip_length-1 frames have null scores (no complete clip ends there)."""
    from raylib_ad.serving.errors import BadRequest
    from raylib_ad.serving.responses import _bool_or_none, _float_or_none, map_png_base64

    trained, info = slot.snapshot()
    frames, names = decode_clip_files(files, max_pixels)
    try:
        predictions = predict_clip(trained, frames, with_maps=with_map, names=names)
    except DataError as exc:
        raise BadRequest(str(exc)) from None
    entries = []
    for prediction in predictions:
        entry: dict[str, Any] = {"frame": prediction["frame"]}
        if names is not None:
            entry["filename"] = names[prediction["frame"]]
        entry.update({"score": _float_or_none(prediction["score"]),
                      "normalized_score": _float_or_none(prediction["normalized_score"]),
                      "is_anomalous": _bool_or_none(prediction["is_anomalous"]),
                      "threshold": _float_or_none(prediction["threshold"])})
        if with_map:
            entry["anomaly_map_png"] = map_png_base64(prediction)
        entries.append(entry)
    return {"model": info.public(), "clip_length": clip_length_of(trained), "frames": entries}
