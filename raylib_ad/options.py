"""Training options shared by `raylib-ad train`, jobs/train.py and the Tune sweeps."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from raylib_ad.errors import ConfigError

from raylib_ad.data.categories import SINGLE_CATEGORY
from raylib_ad.data.layouts import DATA_KINDS

# --category may be left out for these: the synthetic default, and datasets of a single category.
DEFAULT_CATEGORY = {**SINGLE_CATEGORY, "synthetic": "widget", "folder": "folder"}
# Settings that are not model hyperparameters but model-construction switches.
CONSTRUCTION_KEYS = ("pretrained", "weights")


@dataclass
class TrainOptions:
    model: str
    data: str = "synthetic"
    root: str = "datasets"
    category: str | None = None
    split_file: str | None = None
    normal_dir: str | None = None
    abnormal_dir: str | None = None
    mask_dir: str | None = None
    backbone: str | None = None
    layers: list[str] | None = None
    image_size: int = 256
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None
    batch_size: int | None = None  # None: the model's default_batch_size, else 32
    max_epochs: int | None = None
    max_steps: int | None = None
    max_minutes: float | None = None
    val_every_minutes: float | None = None
    patience: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    seed: int = 0
    val_fraction: float = 0.3
    out: str = "runs/latest"
    overwrite: bool = False
    local_ray: bool = False
    experiment: str = "raylib_ad"
    mlflow: bool = True
    progress: bool = True
    verbose: bool = False  # Ray's own output on the console too (it always goes to OUT/ray.log)

    def resolved_category(self) -> str:
        category = self.category or DEFAULT_CATEGORY.get(self.data)
        if not category:
            raise ConfigError(f"--category is required for --data {self.data}")
        return category

    @property
    def scoring_batch_size(self) -> int:
        return self.batch_size or 32

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for create_model(self.model, **kwargs)."""
        settings = dict(self.settings)
        construction = {k: settings.pop(k) for k in CONSTRUCTION_KEYS if k in settings}
        kwargs = {"backbone": self.backbone, "layers": self.layers, "image_size": self.image_size,
                  "seed": self.seed, "weights": self.weights, **construction, **settings}
        return {k: v for k, v in kwargs.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_settings(pairs: list[str] | None) -> dict[str, Any]:
    """`key=value` strings -> dict; values are YAML scalars (0.1, 9, true, [a, b])."""
    settings = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got '{pair}'")
        try:
            settings[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {pair}: cannot parse value '{value}': {err}") from err
    return settings


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model name, e.g. patchcore, padim, dfm, dfkde")
    parser.add_argument("--data", default="synthetic", choices=list(DATA_KINDS),
                        help="dataset layout; synthetic_video, ucsd_ped2, avenue and shanghaitech are videos, for "
                             "video models (clips of frames; --category: the ShanghaiTech scene, 01-13)")
    parser.add_argument("--root", default="datasets", help="dataset root folder")
    parser.add_argument("--category", help="category (MVTec name, or any name for synthetic)")
    parser.add_argument("--split-file", help="CSV split file (split,label,defect,image,mask), VisA-style")
    parser.add_argument("--normal-dir", help="--data folder: folder of normal images (relative to --root)")
    parser.add_argument("--abnormal-dir", help="--data folder: folder of anomalous images")
    parser.add_argument("--mask-dir", help="--data folder: folder of masks (<stem>.png or <stem>_mask.png)")
    parser.add_argument("--backbone", help="any timm model name (default: the model's anomalib default)")
    parser.add_argument("--layers", nargs="+", help="timm feature module names, e.g. blocks.2 blocks.4")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--cpus-per-worker", type=float,
                        help="default: every CPU but one, shared out in whole CPUs (a worker runs that many torch "
                        "threads); less than 1 on a small machine")
    parser.add_argument("--batch-size", type=int, help="global training batch, images per optimizer step (default: "
                        "anomalib's for the model, 32 for most; EfficientAD 1 per worker); also the scoring batch")
    parser.add_argument("--max-epochs", type=int, help="gradient models: epochs (default: the model's)")
    parser.add_argument("--max-steps", type=int, help="gradient models: optimizer steps of the main stage "
                        "(default: the model's step budget, if it has one)")
    parser.add_argument("--max-minutes", type=float, help="gradient models: stop after this much training time "
                        "(inside an epoch too)")
    parser.add_argument("--val-every-minutes", type=float, help="gradient models: also validate inside epochs this "
                        "often (the validation curve over a time budget, OUT/val_curve.json; the best point is kept)")
    parser.add_argument("--patience", type=int, help="gradient models: early stopping after this many epochs "
                        "without a better validation image AUROC (default: anomalib's patience for the model; 0: off)")
    parser.add_argument("--set", dest="settings", action="append", metavar="KEY=VALUE",
                        help="model setting by anomalib's name (repeatable), e.g. coreset_sampling_ratio=0.01")
    parser.add_argument("--weights", help="local backbone weights file (.pth/.safetensors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.3,
                        help="share of the test split carved out (seeded) to fit threshold and normalization")
    parser.add_argument("--out", default="runs/latest", help="output directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run in --out (its files are removed first); without it a "
                             "non-empty --out is refused")
    parser.add_argument("--experiment", default="raylib_ad", help="MLflow experiment name")
    parser.add_argument("--no-mlflow", dest="mlflow", action="store_false")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--verbose", action="store_true",
                        help="print Ray's own output (workers, Ray Train, Ray Data) as well; it always goes to "
                             "OUT/ray.log")
    parser.add_argument("--local-ray", action="store_true",
                        help="start a private local Ray even when a cluster runs on this machine (default: join it)")


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    names = TrainOptions.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in names}
    values["settings"] = parse_settings(args.settings)
    return TrainOptions(**values)
