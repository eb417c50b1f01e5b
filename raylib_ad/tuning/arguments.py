"""`raylib-ad sweep` flags. Kept apart from sweep.py so building the CLI parser imports no torch or Ray."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from raylib_ad.data.layouts import DATA_KINDS
from raylib_ad.options import TrainOptions, parse_settings


@dataclass
class SweepOptions:
    """A sweep's options: the models, the shared training options, the search and its resources."""

    models: list[str]
    base: TrainOptions
    categories: list[str] | None = None
    num_samples: int = 4
    search_space: str | None = None
    scheduler: str = "asha"
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    out: str = "runs/sweep"
    asha_grace_period: int = 2
    extra: dict[str, Any] = field(default_factory=dict)


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The sweep's own flags, plus the data/training flags of `raylib-ad train` that apply to every trial."""
    parser.add_argument("--model", required=True, help="model name(s), comma-separated: patchcore,padim")
    parser.add_argument("--data", default="synthetic", choices=list(DATA_KINDS))
    parser.add_argument("--root", default="datasets", help="dataset root folder")
    parser.add_argument("--categories", help="'all' (every category of --data: MVTec AD's 15, VisA's 12, ...) or c1,c2,...")
    parser.add_argument("--num-samples", type=int, default=4, help="trials per category and model "
                        "(the first is the model's default configuration)")
    parser.add_argument("--search-space", help="YAML file: model -> {key: distribution} (see tuning/space.py)")
    parser.add_argument("--scheduler", default="asha", choices=["asha", "fifo"])
    parser.add_argument("--gpus-per-trial", type=float, default=0.0, help="fractions allowed, e.g. 0.25")
    parser.add_argument("--max-concurrent", type=int, help="trials in flight (default: what the CPUs allow)")
    for flag, kw in (("--split-file", {}), ("--normal-dir", {}), ("--abnormal-dir", {}), ("--mask-dir", {}),
                     ("--backbone", {}), ("--weights", {}), ("--image-size", {"type": int, "default": 256}),
                     ("--workers", {"type": int, "default": 1}), ("--cpus-per-worker", {"type": float}),
                     ("--batch-size", {"type": int, "default": 32}), ("--max-epochs", {"type": int}),
                     ("--max-minutes", {"type": float}), ("--patience", {"type": int}),
                     ("--seed", {"type": int, "default": 0}), ("--val-fraction", {"type": float, "default": 0.3})):
        parser.add_argument(flag, **kw)
    parser.add_argument("--set", dest="settings", action="append", metavar="KEY=VALUE",
                        help="fixed setting for every model that has it (repeatable)")
    parser.add_argument("--out", default="runs/sweep", help="sweep directory (rerun with it to resume)")
    parser.add_argument("--experiment", default="raylib_ad", help="MLflow experiment name")
    parser.add_argument("--no-mlflow", dest="mlflow", action="store_false")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--verbose", action="store_true", help="print Ray's and Tune's own output as well (it "
                        "always goes to OUT/ray.log)")
    parser.add_argument("--local-ray", action="store_true",
                        help="start a private local Ray even when a cluster runs on this machine (default: join it)")


def options_from_args(args: argparse.Namespace):
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    names = TrainOptions.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in names and k not in ("model", "out")}
    values["settings"] = parse_settings(args.settings)
    base = TrainOptions(model=models[0] if models else "", **values)
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    return SweepOptions(models=models, base=base, categories=categories, num_samples=args.num_samples,
                        search_space=args.search_space, scheduler=args.scheduler, gpus_per_trial=args.gpus_per_trial,
                        max_concurrent=args.max_concurrent, out=args.out)


