"""The trained model as one directory, loadable anywhere without Ray:

    config.json          model name, backbone, layers, image size, normalization mean/std, settings
    weights.safetensors  every tensor of the model (backbone included: no download at load time)
    stats.json           deployment threshold and normalization statistics (image and pixel), with the
                         evaluation metrics they came with

Directories are written to a temporary sibling and renamed into place, so a crash never leaves a
half-written model where a finished one is expected.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from raylib_ad.errors import DataError
from raylib_ad.models import AnomalyModel, create_model, model_class
from raylib_ad.postprocess.normalization import NormalizationStats, normalize

CONFIG_FILE, WEIGHTS_FILE, STATS_FILE = "config.json", "weights.safetensors", "stats.json"
# The one vocabulary of a prediction: TrainedModel.predict, `raylib-ad predict` and the HTTP API all
# answer with these names (README.md, "Outputs").
PREDICTION_FIELDS = ("score", "normalized_score", "is_anomalous", "threshold")


def make_readable(directory: str | os.PathLike) -> None:
    """The modes a folder made by mkdir would have (0755 / 0644 under the usual umask 022): mkdtemp makes
    its folders 0700, and safetensors writes 0600 files, so a folder staged there and renamed into place
    would be unreadable to every other user (a serving account, a colleague)."""
    umask = _umask()
    root = Path(directory)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _umask() -> int:
    try:  # Linux: read it without setting it (os.umask sets it, for every thread of the process)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_model_dir(model: AnomalyModel, directory: str | os.PathLike, stats: dict | None = None) -> Path:
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(model.config(), indent=2))
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        if stats is not None:
            (tmp / STATS_FILE).write_text(json.dumps(stats, indent=2))
        make_readable(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def write_stats(directory: str | os.PathLike, stats: dict) -> None:
    path = Path(directory) / STATS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(stats, indent=2))
    os.replace(tmp, path)


def read_model(directory: str | os.PathLike, device: str | torch.device = "cpu") -> AnomalyModel:
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise DataError(f"{directory} is not a raylib_ad model directory: {name} is missing")
    config = json.loads((directory / CONFIG_FILE).read_text())
    settings = {**model_class(config["model"]).settings_added_later, **config["settings"]}
    model = create_model(config["model"], backbone=config["backbone"], layers=config["layers"],
                         image_size=config["image_size"], seed=config.get("seed", 0), pretrained=False,
                         **settings)
    load_state_resizing(model, load_file(str(directory / WEIGHTS_FILE)))
    return model.to(device).eval()


def load_state_resizing(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict, except that buffers sized by the fit (memory banks, PCA components) take the
    saved shape instead of failing on the empty placeholder shape of a fresh model."""
    buffers = dict(module.named_buffers())
    for key, value in state.items():
        if key in buffers and buffers[key].shape != value.shape:
            owner_name, _, attr = key.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            owner._buffers[attr] = torch.empty_like(value)
    module.load_state_dict(state, strict=True)


class TrainedModel:
    """A fitted model plus its deployment threshold and normalization: what `raylib_ad.load` returns."""

    def __init__(self, model: AnomalyModel, stats: dict | None, directory: Path | None = None):
        self.model = model
        self.stats = stats or {}
        self.directory = directory
        self.image_stats = NormalizationStats.from_dict(self.stats["image_stats"]) if self.stats.get(
            "image_stats") else None
        self.pixel_stats = NormalizationStats.from_dict(self.stats["pixel_stats"]) if self.stats.get(
            "pixel_stats") else None
        cfg = model.config()
        self.image_size, self.mean, self.std = cfg["image_size"], cfg["mean"], cfg["std"]

    @property
    def name(self) -> str:
        return self.model.name

    def preprocess(self, images: Sequence[np.ndarray | str | os.PathLike]) -> torch.Tensor:
        """Paths or uint8 arrays (H, W, 3 or H, W) -> a normalized (N, 3, S, S) tensor."""
        from PIL import Image

        from raylib_ad.data.transforms import load_image, normalize as normalize_pixels

        arrays = []
        for item in images:
            if isinstance(item, (str, os.PathLike)):
                arrays.append(load_image(str(item), self.image_size))
            else:
                rgb = Image.fromarray(np.asarray(item, dtype=np.uint8)).convert("RGB")
                arrays.append(np.asarray(rgb.resize((self.image_size,) * 2, Image.BILINEAR)))
        return torch.from_numpy(normalize_pixels(np.stack(arrays), self.mean, self.std))

    @torch.no_grad()
    def forward_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Normalized float32 (B, 3, S, S) -> raw scores (B,) and raw maps (B, S, S) or None, as numpy.
        The one call batch scoring (raylib_ad/scoring) makes, so any backend offering it can score."""
        out = self.model(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.model.device))
        maps = None if out.anomaly_map is None else out.anomaly_map.float().cpu().numpy()
        return out.score.float().cpu().numpy(), maps

    @torch.no_grad()
    def predict(self, images: Iterable, with_maps: bool = False) -> list[dict[str, Any]]:
        """One dict per image with the PREDICTION_FIELDS: score (raw), normalized_score (0.5 = threshold),
        is_anomalous (score >= threshold), threshold; the last three are None without stats.json. With
        with_maps also anomaly_map and normalized_map as numpy arrays (None if the model has none). Region
        models (R-KDE) add boxes: [{"box": [x1, y1, x2, y2], "score": raw box score}] in the image's pixels."""
        images = list(images)
        batch = self.preprocess(images).to(self.model.device)
        out = self.model(batch)
        sizes = [_size_of(item) for item in images] if getattr(out, "boxes", None) is not None else None
        results = []
        for i, score in enumerate(out.score.float().cpu().tolist()):
            item: dict[str, Any] = {"score": score, "normalized_score": None, "is_anomalous": None,
                                    "threshold": None}
            if self.image_stats is not None:
                item["normalized_score"] = float(normalize(score, self.image_stats))
                item["is_anomalous"] = bool(score >= self.image_stats.threshold)
                item["threshold"] = self.image_stats.threshold
            if getattr(out, "boxes", None) is not None:  # region models (R-KDE): the boxes behind the score
                item["boxes"] = _boxes_json(out.boxes[i], out.box_scores[i], self.image_size, sizes[i])
            if with_maps:
                amap = None if out.anomaly_map is None else out.anomaly_map[i].float().cpu().numpy()
                item["anomaly_map"] = amap
                stats = self.pixel_stats or self.image_stats
                item["normalized_map"] = None if amap is None or stats is None else normalize(amap, stats)
            results.append(item)
        return results


def _size_of(item) -> tuple[int, int]:
    """(width, height) of an image path or array, as given (before the resize to the model's input)."""
    if isinstance(item, (str, os.PathLike)):
        from PIL import Image

        with Image.open(item) as im:
            return im.size
    array = np.asarray(item)
    return int(array.shape[1]), int(array.shape[0])


def _boxes_json(boxes: torch.Tensor, scores: torch.Tensor, input_size: int, size: tuple[int, int]) -> list[dict]:
    """Boxes (x1, y1, x2, y2 in the model's S x S input) -> [{"box": [x1, y1, x2, y2], "score"}] in the
    pixels of the image as given, highest score first."""
    sx, sy = size[0] / input_size, size[1] / input_size
    scale = torch.tensor([sx, sy, sx, sy])
    items = [{"box": [round(float(v), 1) for v in (box.float().cpu() * scale)], "score": float(score)}
             for box, score in zip(boxes, scores)]
    return sorted(items, key=lambda item: -item["score"])


def load(path: str | os.PathLike, device: str | torch.device = "cpu", *, tracking_uri: str | None = None
         ) -> TrainedModel:
    """Load a trained model directory (no Ray needed), or a registered version: `models:/<name>@<alias>`
    or `models:/<name>/<version>` from the MLflow registry at `tracking_uri` (default: MLFLOW_TRACKING_URI,
    else ./mlflow.db), downloaded once into $RAYLIB_AD_CACHE/registry/. An exported directory (export.json,
    see raylib_ad/export) gives an ExportedModel: the same predict / forward_batch, run by onnxruntime or
    openvino."""
    if isinstance(path, str) and path.startswith("models:/"):
        from raylib_ad.tracking.registry import download_model_version

        directory, _ = download_model_version(path, uri=tracking_uri)
    else:
        directory = Path(path)
    if (directory / "export.json").is_file():  # `raylib-ad export`'s directory: an ExportedModel, same API
        from raylib_ad.export.runtime import ExportedModel

        return ExportedModel(directory, device=str(device))
    stats_path = directory / STATS_FILE
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None
    return TrainedModel(read_model(directory, device), stats, directory)
