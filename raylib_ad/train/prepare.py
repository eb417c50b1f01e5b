"""Everything about a run that can be decided, or can fail, before any worker starts.

`prepare(options)` returns one `PreparedRun`: the manifest, its train and test rows, the validation
subset carved once from the test split (thresholds, normalization and a gradient run's best epoch are
chosen on it) and the held-out rest (every headline metric), the model's keyword arguments, and its
input normalization. `raylib-ad train`, a sweep trial and the sweep's held-out test all use it, so they
agree on which image plays which role; `split.csv` in the output directory records it.
"""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylib_ad.assets import prepare_model_assets
from raylib_ad.data import build_manifest, split_counts, validate_manifest
from raylib_ad.errors import ConfigError
from raylib_ad.models import AnomalyModel, model_class
from raylib_ad.options import TrainOptions
from raylib_ad.postprocess.validation_split import carve_validation

SPLIT_FILE = "split.csv"
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 4096


@dataclass
class PreparedRun:
    options: TrainOptions
    cls: type[AnomalyModel]
    category: str
    table: pa.Table  # the whole manifest
    train_rows: pa.Table
    test_rows: pa.Table
    val_idx: np.ndarray  # positions in test_rows of the validation subset
    heldout_idx: np.ndarray  # positions in test_rows of the held-out rest
    model_kwargs: dict[str, Any]
    backbone: str | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    batch_size: int  # the global training batch: --batch-size, else the model's default (at least 1 per worker)
    resume_fit: str | None = None  # the Ray Train run an interrupted run of the same command left in --out
    fingerprint: str = ""  # the options that make "the same command" (train/run.py options_fingerprint)

    @property
    def val_rows(self) -> pa.Table:
        return self.test_rows.take(self.val_idx)

    def write_split_csv(self, out: Path) -> Path:
        """path,role for every image: train, validation or heldout."""
        roles = np.full(self.test_rows.num_rows, "heldout", dtype=object)
        roles[self.val_idx] = "validation"
        path = Path(out) / SPLIT_FILE
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "role"])
            writer.writerows((p, "train") for p in self.train_rows.column("path").to_pylist())
            writer.writerows(zip(self.test_rows.column("path").to_pylist(), roles))
        return path


def prepare(options: TrainOptions, validate: bool = True, quiet: bool = False) -> PreparedRun:
    """Check every option and model setting, build and check the manifest, carve the validation subset.
    `validate=False` skips decoding every image once (a sweep validates each category once)."""
    check_options(options)
    cls = model_class(options.model)
    check_data_kind(cls, options.data)
    category = options.resolved_category()
    kwargs = options.model_kwargs()
    if "class_name" in cls.defaults and kwargs.get("class_name") is None:
        kwargs["class_name"] = category  # prompts of zero-shot models name the object (anomalib: the category)
    backbone = kwargs.get("backbone", cls.default_backbone)
    if kwargs.get("pretrained", True):  # offline without weights: fail now, not in a worker
        cls.check_weights(backbone, kwargs.get("weights"), {**cls.defaults, **options.settings})
    probe = _check_model(cls, kwargs)
    table = build_manifest(options.data, options.root, category, split_file=options.split_file, seed=options.seed,
                           normal_dir=options.normal_dir, abnormal_dir=options.abnormal_dir,
                           mask_dir=options.mask_dir, clip_length=cls.clip_length)
    if validate:
        validate_manifest(table, clip_length=cls.clip_length)
    train_rows = table.filter(pc.equal(table.column("split"), "train"))
    test_rows = table.filter(pc.equal(table.column("split"), "test"))
    if train_rows.num_rows < options.workers:
        raise ConfigError(f"--workers {options.workers}: the train split has only {train_rows.num_rows} images; "
                          f"use at most {max(train_rows.num_rows, 1)} workers")
    if test_rows.num_rows < 2:
        raise ConfigError(f"the test split of {options.data}/{category} has {test_rows.num_rows} images; "
                          "at least 2 are needed (validation subset + held-out images)")
    val_idx, heldout_idx = carve_validation(test_rows.column("label").to_numpy(), options.val_fraction, options.seed)
    if not quiet:
        print(f"[raylib_ad] {options.data}/{category}: {split_counts(table)}; test split: {val_idx.size} validation, "
              f"{heldout_idx.size} held-out", file=sys.stderr)
    # The files anomalib downloads (raylib_ad/assets.py), after every cheaper check: fetched into the cache now
    # (before any worker starts), or one error naming each missing file, its address and the fallback setting.
    prepare_model_assets(cls, options.settings, pretrained=kwargs.get("pretrained", True),
                         weights=kwargs.get("weights"))
    mean, std = probe.normalization
    return PreparedRun(options=options, cls=cls, category=category, table=table, train_rows=train_rows,
                       test_rows=test_rows, val_idx=val_idx, heldout_idx=heldout_idx, model_kwargs=kwargs,
                       backbone=backbone, mean=tuple(mean), std=tuple(std),
                       batch_size=options.batch_size or max(options.workers, cls.default_batch_size or 32))


def check_data_kind(cls: type[AnomalyModel], data: str) -> None:
    """Video models train on video datasets (clips of frames), image models on image datasets."""
    from raylib_ad.data import VIDEO_DATA_KINDS
    from raylib_ad.models import list_models

    if cls.clip_length is not None and data not in VIDEO_DATA_KINDS:
        raise ConfigError(f"--model {cls.name} is a video model (clips of {cls.clip_length} frames) but --data {data} "
                          f"is an image dataset; video datasets: {', '.join(VIDEO_DATA_KINDS)}")
    if cls.clip_length is None and data in VIDEO_DATA_KINDS:
        video_models = [name for name in list_models() if model_class(name).clip_length is not None]
        raise ConfigError(f"--model {cls.name} is an image model but --data {data} is a video dataset (clips of "
                          f"frames); video models: {', '.join(video_models) or 'none registered'}")


def _check_model(cls: type[AnomalyModel], kwargs: dict[str, Any]) -> AnomalyModel:
    """Build the model once on the driver, without pretrained weights, so that an unknown or invalid
    setting, an impossible image size for its layers or a missing layer fails here, not in every worker
    after Ray's start. Built on the meta device: no parameter memory is allocated or initialised (CS-Flow
    at 256 px: 0.9 s instead of 5.5 s, and none of its 491 M parameters; the CPU build peaked at 2.9 GiB
    RSS). Construction code that cannot run on meta tensors is retried on the CPU, so its real error,
    if any, is the one reported."""
    import torch

    from raylib_ad.errors import RaylibADError

    settings = {**kwargs, "pretrained": False}
    try:
        with torch.device("meta"):
            return cls(**settings)
    except RaylibADError:
        raise
    except Exception:  # noqa: BLE001 - a meta-device limitation, not the user's input
        return cls(**settings)


def check_options(options: TrainOptions) -> None:
    """One-line errors naming the option and its valid range."""

    def need(ok: bool, option: str, value: Any, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{option} {value!r} is invalid: expected {expected}")

    def integer(value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    need(integer(options.workers) and options.workers >= 1, "--workers", options.workers, "an integer >= 1")
    need(integer(options.image_size) and MIN_IMAGE_SIZE <= options.image_size <= MAX_IMAGE_SIZE, "--image-size",
         options.image_size, f"an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]")
    if options.batch_size is not None:
        need(integer(options.batch_size) and options.batch_size >= options.workers, "--batch-size",
             options.batch_size, f"an integer >= --workers ({options.workers}): it is the global batch, split "
             "over the workers")
    need(number(options.val_fraction) and 0 < options.val_fraction < 1, "--val-fraction", options.val_fraction,
         "a number in (0, 1)")
    need(number(options.gpus_per_worker) and options.gpus_per_worker >= 0, "--gpus-per-worker",
         options.gpus_per_worker, "a number >= 0")
    if options.cpus_per_worker is not None:
        need(number(options.cpus_per_worker) and options.cpus_per_worker > 0, "--cpus-per-worker",
             options.cpus_per_worker, "a number > 0")
    for option, value in (("--max-epochs", options.max_epochs), ("--max-steps", options.max_steps)):
        if value is not None:
            need(integer(value) and value >= 1, option, value, "an integer >= 1")
    if options.patience is not None:
        need(integer(options.patience) and options.patience >= 0, "--patience", options.patience,
             "an integer >= 0 (0: no early stopping)")
    if options.max_minutes is not None:
        need(number(options.max_minutes) and options.max_minutes > 0, "--max-minutes", options.max_minutes,
             "a number > 0")
    if options.val_every_minutes is not None:
        need(number(options.val_every_minutes) and options.val_every_minutes > 0, "--val-every-minutes",
             options.val_every_minutes, "a number > 0")
