"""The two stages of a scoring pipeline, as plain callables Ray Data runs (and tests call directly):

    decode_paths   (CPU tasks)    path -> uint8 pixels, or an error string for an unreadable file
    ModelReplica   (actor pool)   pixels / normalized images -> raw scores, normalized fields, maps

A replica uses nothing of the model but `forward_batch`, `image_size`, `mean`, `std`, `image_stats` and
`pixel_stats`, so a TrainedModel and an exported model (onnx/openvino) are scored the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raylib_ad.data.transforms import load_image, normalize as normalize_pixels
from raylib_ad.scoring.payload import load_payload


def decode_paths(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Decode a batch of paths into uint8 (B, S, S, 3) pixels, with each image's own (width, height) for
    its map PNG. A file that cannot be read becomes a row with zero pixels, size (0, 0) and its error
    message, so one bad image in a million does not stop the run."""
    from raylib_ad.postprocess.plots import image_size as original_size

    paths = batch["path"]
    pixels = np.zeros((len(paths), image_size, image_size, 3), dtype=np.uint8)
    sizes = np.zeros((len(paths), 2), dtype=np.int32)
    errors = np.full(len(paths), "", dtype=object)
    for i, path in enumerate(paths):
        try:
            pixels[i] = load_image(str(path), image_size)
            sizes[i] = original_size(str(path)) or (image_size, image_size)
        except Exception as exc:  # DataError for unreadable files; anything else is this file's problem too
            errors[i] = str(exc) if type(exc).__name__ == "DataError" else f"cannot read image {path}: {exc!r}"
    return {"path": np.asarray(paths, dtype=object), "pixels": pixels, "size": sizes, "error": errors}


def encode_maps(maps: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Maps for the trip back to the driver: float16 after dividing each map by its largest magnitude
    (float16 alone overflows above 65504, and raw map scales differ per model), or float32 as is."""
    if dtype == "float32":
        return maps.astype(np.float32, copy=False), np.ones(len(maps), dtype=np.float32)
    scale = np.abs(maps).reshape(len(maps), -1).max(axis=1).astype(np.float32)
    scale[~np.isfinite(scale) | (scale == 0)] = 1.0
    return (maps / scale[:, None, None]).astype(np.float16), scale


def decode_maps(maps: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return maps.astype(np.float32) * np.asarray(scale, dtype=np.float32)[:, None, None]


class ModelReplica:
    """One model per actor, loaded once from bytes that came through the object store.

    mode "predict": input path/pixels/error (decode_paths), output a pyarrow table in the PREDICTION_FIELDS
    vocabulary plus path, error and (with_maps) the map as PNG bytes, encoded here so the driver only
    writes files.
    mode "split": input index/image/mask (BatchDecoder + index), output index, score, mask and map
    (encode_maps) for the driver to put back in row order.
    """

    def __init__(self, payload: Any, *, mode: str = "predict", device: str = "cpu", threads: int | None = None,
                 with_maps: bool = False, map_dtype: str = "float16"):
        if threads:
            try:
                import torch
            except ImportError:  # a replica serving an exported model may run without torch
                torch = None
            if torch is not None:
                torch.set_num_threads(int(threads))
        if not isinstance(payload, dict):  # an ObjectRef: the model's bytes, put once by the driver
            import ray

            payload = ray.get(payload)
        self.model = load_payload(payload, device)
        self.mode, self.with_maps, self.map_dtype = mode, with_maps, map_dtype

    def __call__(self, batch: dict[str, np.ndarray]):
        return self._predict(batch) if self.mode == "predict" else self._split(batch)

    def _split(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scores, maps = self.model.forward_batch(np.asarray(batch["image"], dtype=np.float32))
        out = {"index": np.asarray(batch["index"], dtype=np.int64), "score": np.asarray(scores, dtype=np.float32)}
        if "mask" in batch:
            out["mask"] = np.asarray(batch["mask"], dtype=np.uint8)
        if maps is not None:
            out["map"], out["map_scale"] = encode_maps(np.asarray(maps), self.map_dtype)
        return out

    def _predict(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa

        from raylib_ad.postprocess.normalization import normalize

        model = self.model
        paths = [str(p) for p in batch["path"]]
        errors = [None if e is None or str(e) == "" else str(e) for e in batch["error"]]
        ok = np.asarray([e is None for e in errors], dtype=bool)
        n = len(paths)
        scores: list[float | None] = [None] * n
        maps = None
        if ok.any():
            images = normalize_pixels(np.asarray(batch["pixels"])[ok], model.mean, model.std)
            raw, maps = model.forward_batch(images)
            for i, value in zip(np.flatnonzero(ok), np.asarray(raw, dtype=np.float64)):
                scores[i] = float(value)
        stats = model.image_stats
        columns: dict[str, list] = {
            "path": paths,
            "score": scores,
            "normalized_score": [None if s is None or stats is None else float(normalize(s, stats)) for s in scores],
            "is_anomalous": [None if s is None or stats is None else bool(s >= stats.threshold) for s in scores],
            "threshold": [None if s is None or stats is None else stats.threshold for s in scores],
            "error": errors,
        }
        if self.with_maps:
            columns["map_png"] = self._map_pngs(ok, maps, batch.get("size"))
        schema = pa.schema([("path", pa.string()), ("score", pa.float64()), ("normalized_score", pa.float64()),
                            ("is_anomalous", pa.bool_()), ("threshold", pa.float64()), ("error", pa.string())]
                           + ([("map_png", pa.binary())] if self.with_maps else []))
        return pa.table(columns, schema=schema)

    def _map_pngs(self, ok: np.ndarray, maps: np.ndarray | None, sizes: np.ndarray | None) -> list[bytes | None]:
        """As `raylib-ad predict --maps` writes them in process: the normalized map (pixel stats, else
        image stats), colorized on [0, 1], at the image's own size (decode_paths' size), the threshold
        (0.5) outlined; no PNG without maps or without stats."""
        stats = self.model.pixel_stats or self.model.image_stats
        pngs: list[bytes | None] = [None] * len(ok)
        if maps is None or stats is None:
            return pngs
        from raylib_ad.postprocess.normalization import normalize
        from raylib_ad.postprocess.plots import anomaly_map_png

        for i, amap in zip(np.flatnonzero(ok), np.asarray(maps, dtype=np.float32)):
            size = None if sizes is None or not np.asarray(sizes[i]).all() else tuple(int(v) for v in sizes[i])
            pngs[i] = anomaly_map_png(normalize(amap, stats), vmin=0.0, vmax=1.0, size=size, threshold=0.5)
        return pngs
