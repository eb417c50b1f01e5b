"""Benchmark the memory-bank models: fit seconds, test images/second, peak memory, coreset time.

    # the issue's reference settings on Magnetic Tile (Huang et al., "Surface defect saliency of
    # magnetic tile", The Visual Computer 2020), 2 Ray Train workers:
    python jobs/benchmark.py --data magnetic_tile --root ../shared/datasets/magnetic_tile \
        --split-file ../shared/datasets/magnetic_tile_split.csv --workers 2 --out bench_out

    # the model code alone, no Ray (e.g. on a GPU machine that has no Ray installed):
    python jobs/benchmark.py --no-ray --device cuda ...

Prints a markdown table and writes DIR/results.json and DIR/results.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

# name -> (settings, layers) : the configurations of the reference table in docs/benchmarks.md
PRESETS = {
    "patchcore": ({"coreset_sampling_ratio": 0.001, "num_neighbors": 9}, ["blocks.2", "blocks.4"]),
    "padim": ({"n_features": 100}, ["blocks.1", "blocks.2", "blocks.4"]),
    "dfm": ({"pooling_kernel_size": 4, "pca_level": 0.97, "score_type": "fre"}, ["blocks.4"]),
    "dfkde": ({"n_pca_components": 16, "max_training_points": 40000}, ["blocks.6"]),
}
COLUMNS = ("image_auroc", "pixel_auroc", "pixel_aupro", "fit_seconds", "coreset_seconds",
           "test_images_per_second", "peak_memory_mb")


def hardware() -> str:
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}"


def run_with_ray(args, name: str) -> dict:
    from raylib_ad.options import TrainOptions
    from raylib_ad.train.run import run_training

    settings, layers = PRESETS[name]
    options = TrainOptions(model=name, data=args.data, root=args.root, category=args.category,
                           split_file=args.split_file, backbone=args.backbone, layers=layers,
                           image_size=args.image_size, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                           batch_size=args.batch_size, settings=dict(settings), out=f"{args.out}/{name}",
                           mlflow=False, progress=False)
    return run_training(options)


def run_without_ray(args, name: str) -> dict:
    """Single process: the same model code, fed by the same decoder, timed piece by piece."""
    import pyarrow.compute as pc
    import torch

    from raylib_ad.data import build_manifest
    from raylib_ad.data.transforms import decode_all
    from raylib_ad.evaluation import score_split
    from raylib_ad.metrics import evaluation_report
    from raylib_ad.models import create_model

    settings, layers = PRESETS[name]
    table = build_manifest(args.data, args.root, args.category, split_file=args.split_file)
    train = table.filter(pc.equal(table.column("split"), "train"))
    test = table.filter(pc.equal(table.column("split"), "test"))
    model = create_model(name, backbone=args.backbone, layers=layers, image_size=args.image_size, **settings)
    model = model.to(args.device)
    cfg = model.config()
    # Decode once up front so the fit time is the model's, not JPEG decoding's.
    images = [torch.from_numpy(b["image"]) for b in decode_all(train, args.image_size, cfg["mean"], cfg["std"],
                                                                batch_size=args.batch_size, with_masks=False)]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model.fit(images)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    fit_seconds = time.perf_counter() - start
    scored = score_split(model, test, batch_size=args.batch_size, progress=False)
    report = evaluation_report(scored.labels, scored.scores, scored.masks, scored.maps)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {**report["metrics"], "fit_seconds": fit_seconds, "test_images_per_second": scored.images_per_second,
            "peak_memory_mb": float(peak), **getattr(model, "fit_timings", {}),
            "n_train": sum(len(b) for b in images)}


def markdown(rows: dict[str, dict]) -> str:
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, metrics in rows.items():
        cells = [f"{metrics[c]:.3f}" if isinstance(metrics.get(c), float) else "–" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="patchcore,padim,dfm,dfkde")
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--root", default="datasets")
    parser.add_argument("--category")
    parser.add_argument("--split-file")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--no-ray", action="store_true", help="time the model code in this process only")
    parser.add_argument("--device", default="cpu", help="with --no-ray: cpu or cuda")
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args(argv)
    rows = {}
    for name in args.models.split(","):
        rows[name] = run_without_ray(args, name) if args.no_ray else run_with_ray(args, name)
        print(f"{name}: {json.dumps(rows[name])}", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mode = "single process, no Ray" if args.no_ray else f"Ray Train, {args.workers} workers"
    header = f"{args.data} {args.image_size}px, {args.backbone}, {mode}; {hardware()}"
    (out / "results.json").write_text(json.dumps({"setup": header, "results": rows}, indent=2))
    table = f"{header}\n\n{markdown(rows)}\n"
    (out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
