"""Run an exported raylib_ad model with numpy, Pillow and onnxruntime or openvino: no torch, no timm.

An export directory (written by `raylib-ad export`) holds the network (model.onnx, or model.xml/.bin),
export.json (pre-processing, output names, threshold and normalization statistics) and a copy of this
file. On a PC without raylib_ad:

    pip install numpy pillow onnxruntime          # or openvino, for --format openvino
    python EXPORT_DIR/raylib_ad_runtime.py EXPORT_DIR part1.png part2.png     # one JSON line per image

or `from raylib_ad_runtime import ExportedModel` in your own code. Inside raylib_ad, `raylib_ad.load`
returns an ExportedModel for such a directory; it answers like TrainedModel (raylib_ad/artifact.py).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

EXPORT_FILE = "export.json"
EXPORT_FORMAT_VERSION = 1
# The same names as raylib_ad.artifact.PREDICTION_FIELDS (not imported: artifact imports torch).
PREDICTION_FIELDS = ("score", "normalized_score", "is_anomalous", "threshold")
INSTALL = {"onnx": "onnxruntime", "openvino": "openvino"}

try:  # inside raylib_ad: the package's own statistics and errors (scipy, no torch)
    from raylib_ad.errors import ConfigError, DataError
    from raylib_ad.postprocess.normalization import NormalizationStats, normalize
except ImportError:  # this file copied alone onto a PC: the same arithmetic, self-contained

    class ConfigError(ValueError):
        pass

    class DataError(ValueError):
        pass

    @dataclass(frozen=True)
    class NormalizationStats:
        threshold: float
        min: float
        max: float

        @property
        def span(self) -> float:
            return self.max - self.min if self.max > self.min else 1.0

        @classmethod
        def from_dict(cls, data: dict) -> "NormalizationStats":
            return cls(float(data["threshold"]), float(data["min"]), float(data["max"]))

    def normalize(x, stats):
        """clip((x - threshold) / (max - min) + 0.5, 0, 1): the threshold maps to 0.5."""
        if isinstance(x, np.ndarray) and x.ndim > 0:
            if not np.issubdtype(x.dtype, np.floating):
                x = x.astype(np.float64)
            out = (x - x.dtype.type(stats.threshold)) / x.dtype.type(stats.span) + x.dtype.type(0.5)
            return np.clip(out, 0.0, 1.0, out=out)
        return min(max((float(x) - stats.threshold) / stats.span + 0.5, 0.0), 1.0)


def is_export_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / EXPORT_FILE).is_file()


def missing_package(fmt: str, package: str, err: Exception) -> ConfigError:
    return ConfigError(f"the {fmt} format needs the {package} package, which is not installed ({err}): "
                       f"pip install {package}  (or pip install raylib_ad[export])")


# -- pre-processing: the same arithmetic as raylib_ad/data/transforms.py load_image and normalize ----
def load_rgb(path: str, image_size: int) -> np.ndarray:
    """RGB uint8 (S, S, 3): grayscale and palette images expanded, resized bilinearly to S x S."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except Exception as exc:  # PIL raises many types for corrupt files
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def normalize_pixels(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (N, S, S, 3) -> float32 (N, 3, S, S), scaled to [0, 1] then standardised."""
    mean = np.asarray(mean, dtype=np.float32).reshape(1, 1, 1, 3)
    std = np.asarray(std, dtype=np.float32).reshape(1, 1, 1, 3)
    scaled = images.astype(np.float32) * np.float32(1 / 255)
    return np.ascontiguousarray(((scaled - mean) / std).transpose(0, 3, 1, 2))


# -- backends: (a function (B, 3, S, S) float32 -> the outputs in export.json's order, the network) ----
Backend = tuple[Callable[[np.ndarray], list[np.ndarray]], Any]


def _onnx_backend(path: Path, device: str, threads: int | None, arena: bool = True) -> Backend:
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise missing_package("onnx", "onnxruntime", err) from None
    available = ort.get_available_providers()
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if device == "cpu":
        providers: list = ["CPUExecutionProvider"]
    elif device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise ConfigError(f"device {device!r}: this onnxruntime has no CUDA provider (available: {available}); "
                              f"pip install onnxruntime-gpu, or use --device cpu")
        index = int(device.partition(":")[2] or 0)
        providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    else:
        raise ConfigError(f"device {device!r} is not known to the onnx runtime; expected cpu, cuda, cuda:N or auto")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # Without the arena a large intermediate (PatchCore's distance matrix) goes back to the OS after each
    # call; the arena keeps it and grows by powers of two (measured: 1.41 GB peak with it, 0.76 GB without)
    options.enable_cpu_mem_arena = arena
    session = ort.InferenceSession(str(path), options, providers=providers)
    input_name = session.get_inputs()[0].name
    return (lambda batch: session.run(None, {input_name: batch})), session


def _openvino_backend(path: Path, device: str, threads: int | None, arena: bool = True) -> Backend:
    try:
        import openvino as ov
    except ImportError as err:
        raise missing_package("openvino", "openvino", err) from None
    target = {"cpu": "CPU", "auto": "CPU", "gpu": "GPU", "npu": "NPU"}.get(device.lower(), device.upper())
    # f32 inference even where the CPU would pick bf16 (AMX) or f16: FP16 exports store FP16 weights,
    # computed in FP32, so the parity tolerance stated in export.json holds on every CPU.
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"} if target == "CPU" else {}
    if threads and target == "CPU":
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(path), target, config)
    outputs = list(compiled.outputs)

    def run(batch: np.ndarray) -> list[np.ndarray]:
        result = compiled.create_infer_request().infer({0: batch})  # a request per call: thread-safe
        return [np.asarray(result[out]) for out in outputs]

    return run, compiled


BACKENDS = {"onnx": _onnx_backend, "openvino": _openvino_backend}


class ExportedModel:
    """An exported model plus its threshold and normalization: TrainedModel's API without torch.
    preprocess returns a numpy array (TrainedModel: a torch tensor). `threads`: the runtime's CPU threads
    (default: its own choice, all cores)."""

    def __init__(self, directory: str | os.PathLike, device: str = "cpu", threads: int | None = None):
        self.directory = Path(directory)
        meta_path = self.directory / EXPORT_FILE
        if not meta_path.is_file():
            raise DataError(f"{self.directory} is not an exported model: {EXPORT_FILE} is missing")
        self.meta = meta = json.loads(meta_path.read_text())
        if meta.get("export_format_version", 0) > EXPORT_FORMAT_VERSION:
            raise DataError(f"{meta_path} is of export format {meta['export_format_version']}; this runtime reads "
                            f"up to {EXPORT_FORMAT_VERSION}: update raylib_ad (or its runtime file)")
        fmt = meta["format"]
        if fmt not in BACKENDS:
            raise DataError(f"{meta_path}: unknown format {fmt!r}; expected one of {sorted(BACKENDS)}")
        self.format = fmt
        self.image_size = int(meta["image_size"])
        self.mean, self.std = list(meta["mean"]), list(meta["std"])
        self.produces_maps = bool(meta["produces_maps"])
        self.outputs = list(meta["outputs"])
        self.max_batch = meta.get("max_batch")
        self.stats = meta.get("stats") or {}
        self.image_stats = NormalizationStats.from_dict(self.stats["image_stats"]) if self.stats.get(
            "image_stats") else None
        self.pixel_stats = NormalizationStats.from_dict(self.stats["pixel_stats"]) if self.stats.get(
            "pixel_stats") else None
        self.device = device
        # `model`: the runtime's network (onnxruntime InferenceSession / OpenVINO CompiledModel), where
        # TrainedModel has its torch module
        self._run, self.model = BACKENDS[fmt](self.directory / meta["network"], device, threads,
                                              bool(meta.get("cpu_memory_arena", True)))

    @property
    def name(self) -> str:
        return self.meta["model"]

    def preprocess(self, images: Sequence[np.ndarray | str | os.PathLike]) -> np.ndarray:
        """Paths or uint8 arrays (H, W, 3 or H, W) -> a normalized float32 (N, 3, S, S) array."""
        from PIL import Image

        arrays = []
        for item in images:
            if isinstance(item, (str, os.PathLike)):
                arrays.append(load_rgb(str(item), self.image_size))
            else:
                rgb = Image.fromarray(np.asarray(item, dtype=np.uint8)).convert("RGB")
                arrays.append(np.asarray(rgb.resize((self.image_size,) * 2, Image.BILINEAR)))
        return normalize_pixels(np.stack(arrays), self.mean, self.std)

    def forward_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Normalized float32 (B, 3, S, S) -> raw scores (B,) and raw maps (B, S, S) or None."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        step = int(self.max_batch or len(images) or 1)  # the graph has no memory-bounding chunks: feed slices
        parts = [self._run(images[i : i + step]) for i in range(0, len(images), step)]
        scores = np.concatenate([p[0] for p in parts]).astype(np.float32, copy=False)
        maps = np.concatenate([p[1] for p in parts]).astype(np.float32, copy=False) if self.produces_maps else None
        return scores, maps

    def predict(self, images: Iterable, with_maps: bool = False) -> list[dict[str, Any]]:
        """One dict per image with the PREDICTION_FIELDS (and anomaly_map / normalized_map with
        with_maps), exactly as TrainedModel.predict."""
        scores, maps = self.forward_batch(self.preprocess(list(images)))
        results = []
        for i, score in enumerate(scores.tolist()):
            item: dict[str, Any] = {"score": score, "normalized_score": None, "is_anomalous": None,
                                    "threshold": None}
            if self.image_stats is not None:
                item["normalized_score"] = float(normalize(score, self.image_stats))
                item["is_anomalous"] = bool(score >= self.image_stats.threshold)
                item["threshold"] = self.image_stats.threshold
            if with_maps:
                amap = None if maps is None else maps[i]
                item["anomaly_map"] = amap
                stats = self.pixel_stats or self.image_stats
                item["normalized_map"] = None if amap is None or stats is None else normalize(amap, stats)
            results.append(item)
        return results


def main(argv: list[str] | None = None) -> int:
    """python raylib_ad_runtime.py EXPORT_DIR IMAGE... [--device cpu]: one JSON line per image."""
    import argparse

    parser = argparse.ArgumentParser(description="Score images with an exported raylib_ad model.")
    parser.add_argument("export_dir")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        model = ExportedModel(args.export_dir, device=args.device)
        for start in range(0, len(args.images), args.batch_size):
            paths = args.images[start : start + args.batch_size]
            for path, result in zip(paths, model.predict(paths)):
                print(json.dumps({"path": path, **{k: result[k] for k in PREDICTION_FIELDS}}), flush=True)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
