"""The stage runner in this process (world size 1): the code a Ray Train worker runs, fed from tensors or
a manifest, reports kept in memory. Used by the tests and `jobs/benchmark.py --no-ray`. No Ray here."""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from raylib_ad.train.runner import FINAL_MODEL, PROGRESS, RunnerConfig, run_recipe


class InProcessIO:
    """WorkerIO for one process: training images from a tensor or a manifest, reports kept in memory."""

    rank, world_size = 0, 1

    def __init__(self, train, val=None, *, device="cpu", config: RunnerConfig):
        self.device = torch.device(device)
        self._train, self._val, self._config = train, val, config
        self.reports: list[dict[str, Any]] = []
        self.final_dir: Path | None = None
        self._keep = Path(tempfile.mkdtemp(prefix="raylib_ad_inprocess_"))

    def train_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        if isinstance(self._train, torch.Tensor):
            for start in range(0, len(self._train), batch_size):
                yield self._train[start : start + batch_size]
            return
        for batch in self._decoded(self._train, batch_size, with_masks=False):
            images = torch.from_numpy(batch["image"])
            yield {"image": images, "video": torch.from_numpy(batch["video"])} if "video" in batch else images

    def val_batches(self, batch_size: int):
        if self._val is None:
            return None
        if isinstance(self._val, dict):
            n = len(self._val["image"])
            return ({k: v[s : s + batch_size].to(self.device) for k, v in self._val.items()}
                    for s in range(0, n, batch_size))
        return ({k: torch.from_numpy(v).to(self.device) for k, v in b.items() if k != "index"}
                for b in self._decoded(self._val, batch_size, with_masks=True))

    def _decoded(self, table, batch_size, with_masks):
        from raylib_ad.data.transforms import decode_all

        cfg = self._config
        return decode_all(table, cfg.image_size, cfg.mean, cfg.std, batch_size, with_masks=with_masks)

    def restore(self) -> Path | None:
        return None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir is not None:
            if metrics.get("final"):
                target = self._keep / "final"
                shutil.rmtree(target, ignore_errors=True)
                shutil.move(checkpoint_dir, target)
                self.final_dir = target
            else:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)


@dataclass
class InProcessFit:
    model: Any
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    model_dir: Path | None
    val_curve: list[dict[str, Any]] = field(default_factory=list)  # every validation, as RayFit.val_curve


def fit_in_process(model, train, val=None, *, device: str = "cpu", **config: Any) -> InProcessFit:
    """Train `model` by its recipe in this process (the code a Ray Train worker runs, at world size 1).
    `train`: a (N, 3, H, W) tensor of normalized images, or a manifest table; `val`: a dict of tensors
    ("image", "label", "mask") or a manifest table. Used by the tests and `jobs/benchmark.py --no-ray`."""
    cfg = RunnerConfig(**{"image_size": model.image_size, "mean": model.normalization[0], "std": model.normalization[1],
                          "seed": model.seed, "train_images": len(train) if isinstance(train, torch.Tensor)
                          else train.num_rows, **config})
    model.to(device)
    io = InProcessIO(train, val, device=device, config=cfg)
    metrics = run_recipe(model, io, cfg)
    history = [r for r in io.reports if "epoch" in r and not r.get("final")]
    progress = json.loads((io.final_dir / PROGRESS).read_text()) if io.final_dir is not None else {}
    return InProcessFit(model=model, metrics=metrics, history=copy.deepcopy(history),
                        model_dir=None if io.final_dir is None else io.final_dir / FINAL_MODEL,
                        val_curve=progress.get("val_curve", []))
