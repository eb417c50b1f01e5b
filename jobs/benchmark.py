"""Benchmark the models: accuracy, fit seconds, test images/second, peak memory, coreset time; for the
gradient-trained models also training images/second (per worker) and its scaling over worker counts.

    # the issue's reference settings on Magnetic Tile (Huang et al., "Surface defect saliency of
    # magnetic tile", The Visual Computer 2020), 2 Ray Train workers:
    python jobs/benchmark.py --data magnetic_tile --root ../shared/datasets/magnetic_tile \
        --split-file ../shared/datasets/magnetic_tile_split.csv --workers 2 --out bench_out

    # gradient models, scaling from 1 to 2 workers (2 epochs: the streamed first and a cached second)
    python jobs/benchmark.py --models stfpm,reverse_distillation,fastflow --workers 1,2 --max-epochs 2 ...

    # the model code alone, no Ray (e.g. on a GPU machine that has no Ray installed):
    python jobs/benchmark.py --no-ray --device cuda ...

    # latency and batch throughput of trained models (model directories of `raylib-ad train`) beside the
    # bare backbone (timm's whole classifier at the same image size), 2 CPU threads:
    python jobs/benchmark.py --latency runs/efficient_ad/model runs/patchcore/model --backbone tf_efficientnet_lite0

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

COLUMNS = ("image_auroc", "pixel_auroc", "pixel_aupro", "fit_seconds", "coreset_seconds",
           "test_images_per_second", "peak_memory_mb")
GRADIENT_COLUMNS = ("workers", "epochs", "best_epoch", "image_auroc", "pixel_auroc", "pixel_aupro", "fit_seconds",
                    "train_images_per_second", "first_epoch_images_per_second", "cached_epoch_images_per_second",
                    "train_images_per_second_per_worker")


def hardware() -> str:
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}"


def run_with_ray(args, name: str, workers: int) -> dict:
    from raylib_ad.models import model_class
    from raylib_ad.options import TrainOptions
    from raylib_ad.train.run import run_training

    settings, layers = preset(name)
    out = Path(args.out) / f"{name}_w{workers}"
    options = TrainOptions(model=name, data=args.data, root=args.root, category=args.category,
                           split_file=args.split_file, layers=layers, patience=args.patience,
                           backbone=args.backbone if model_class(name).default_backbone else None,
                           image_size=args.image_size, workers=workers, gpus_per_worker=args.gpus_per_worker,
                           batch_size=args.batch_size, settings=dict(settings), out=str(out),
                           max_epochs=args.max_epochs, mlflow=False, progress=False)
    metrics = run_training(options)
    if model_class(name).trains_by_gradient():
        metrics.update(epoch_throughput(json.loads((out / "history.json").read_text()), workers))
    return metrics


def epoch_throughput(history: list[dict], workers: int) -> dict:
    """Training images/second of the first (streamed, decoding) epoch and of the later epochs served
    from the workers' frozen-feature cache, which is what a long run mostly consists of."""
    cached = [h["train_images_per_second"] for h in history if h.get("from_feature_cache")]
    mean = sum(h["train_images_per_second"] for h in history) / len(history)
    return {"workers": workers, "first_epoch_images_per_second": history[0]["train_images_per_second"],
            "cached_epoch_images_per_second": sum(cached) / len(cached) if cached else None,
            "train_images_per_second_per_worker": mean / workers}


def run_without_ray(args, name: str) -> dict:
    """Single process: the same model code, fed by the same decoder, timed piece by piece."""
    import pyarrow.compute as pc
    import torch

    from raylib_ad.data import build_manifest
    from raylib_ad.data.transforms import decode_all
    from raylib_ad.evaluation import score_split
    import numpy as np

    from raylib_ad.models import create_model, model_class
    from raylib_ad.postprocess import carve_validation, evaluation_report
    from raylib_ad.train.in_process import fit_in_process

    settings, layers = preset(name)
    table = build_manifest(args.data, args.root, args.category, split_file=args.split_file)
    train = table.filter(pc.equal(table.column("split"), "train"))
    test = table.filter(pc.equal(table.column("split"), "test"))
    val_idx, heldout_idx = carve_validation(test.column("label").to_numpy(), 0.3, 0)
    backbone = args.backbone if model_class(name).default_backbone else None
    model = create_model(name, backbone=backbone, layers=layers, image_size=args.image_size, **settings)
    mean, std = model.normalization
    # Decode once up front so the fit time is the model's, not JPEG decoding's.
    images = torch.cat([torch.from_numpy(b["image"]) for b in decode_all(
        train, args.image_size, mean, std, batch_size=args.batch_size, with_masks=False)])
    val = None
    if model_class(name).trains_by_gradient():
        batches = list(decode_all(test.take(val_idx), args.image_size, mean, std, batch_size=args.batch_size))
        val = {k: torch.from_numpy(np.concatenate([b[k] for b in batches])) for k in ("image", "label", "mask")}
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fit = fit_in_process(model, images, val, device=args.device, batch_size=args.batch_size,
                         max_epochs=args.max_epochs, patience=args.patience or None, progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    fit_seconds = time.perf_counter() - start
    scored = score_split(model, test, batch_size=args.batch_size, progress=False)
    report = evaluation_report(scored.labels, scored.scores, scored.masks, scored.maps, val_idx=val_idx,
                               heldout_idx=heldout_idx)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    extra = {}
    if fit.history:
        extra = {"epochs": len(fit.history), "best_epoch": fit.metrics.get("best_epoch"),
                 "train_images_per_second": float(np.mean([h["train_images_per_second"] for h in fit.history]))}
    return {**report["metrics"], "fit_seconds": fit_seconds, "test_images_per_second": scored.images_per_second,
            "peak_memory_mb": float(peak), **getattr(model, "fit_timings", {}), "n_train": len(images), **extra}


def preset(name: str) -> tuple[dict, list | None]:
    """The model's benchmark configuration (declared next to the model: benchmark_preset)."""
    from raylib_ad.models import model_class

    declared = model_class(name).benchmark_preset
    return dict(declared.get("settings", {})), declared.get("layers")


def markdown(rows: dict[str, dict], columns=COLUMNS) -> str:
    lines = ["| run | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in rows.items():
        cells = [f"{metrics[c]:.3f}" if isinstance(metrics.get(c), float) else str(metrics.get(c, "–"))
                 for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaling(rows: dict[str, dict]) -> str:
    """Per gradient model: training images/second at each worker count, and the speed-up over the run
    with the fewest workers (ideal: the ratio of worker counts)."""
    lines = ["| model | workers | train img/s | per worker | speed-up | cached-epoch img/s |", "|---" * 6 + "|"]
    by_model: dict[str, list[dict]] = {}
    for key, metrics in rows.items():
        if "workers" in metrics:
            by_model.setdefault(key.rsplit("_w", 1)[0], []).append(metrics)
    for name, runs in by_model.items():
        runs.sort(key=lambda m: m["workers"])
        base = runs[0]["train_images_per_second"]  # the run with the fewest workers
        for m in runs:
            cached = m.get("cached_epoch_images_per_second")
            lines.append(f"| {name} | {m['workers']} | {m['train_images_per_second']:.2f} | "
                         f"{m['train_images_per_second_per_worker']:.2f} | "
                         f"{m['train_images_per_second'] / base:.2f}x | {f'{cached:.2f}' if cached else '–'} |")
    return "\n".join(lines)


def _timed(forward, images, repeats: int, device: str) -> list[float]:
    import torch

    seconds = []
    with torch.inference_mode():
        forward(images)  # warm-up: first-call allocations, oneDNN kernel selection
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            forward(images)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    return seconds


def latency_table(args) -> int:
    """Single-image latency (p50/p90 of 30 calls) and batch throughput of each trained model's forward
    (pre-processed input: decoding is the same for every model) beside the bare backbone."""
    import numpy as np
    import timm
    import torch

    from raylib_ad.artifact import read_model

    torch.set_num_threads(args.threads)
    models = [read_model(d, device=args.device) for d in args.latency]
    candidates = [(f"{m.name} ({Path(d).resolve().parent.name})", m) for d, m in zip(args.latency, models)]
    backbone = timm.create_model(args.backbone, pretrained=False).eval().to(args.device)
    candidates.append((f"bare {args.backbone} (timm classifier)", backbone))
    rows = []
    for name, model in candidates:
        model.eval()
        size = getattr(model, "image_size", args.image_size)
        one = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(args.device)
        batch = one.expand(args.batch_size, -1, -1, -1).contiguous()
        single = np.array(_timed(model, one, 30, args.device)) * 1000
        batched = _timed(model, batch, 3, args.device)
        rows.append({"model": name, "image_size": size, "latency_ms_p50": float(np.percentile(single, 50)),
                     "latency_ms_p90": float(np.percentile(single, 90)),
                     "batch_images_per_second": args.batch_size / float(np.median(batched)),
                     "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6})
        print(json.dumps(rows[-1]), flush=True)
    header = (f"latency: {args.device}, {args.threads} threads, batch {args.batch_size}; {hardware()}")
    lines = [header, "", "| model | px | latency p50 ms | p90 ms | batch img/s | params M |", "|---" * 6 + "|"]
    lines += [f"| {r['model']} | {r['image_size']} | {r['latency_ms_p50']:.1f} | {r['latency_ms_p90']:.1f} | "
              f"{r['batch_images_per_second']:.1f} | {r['parameters_m']:.1f} |" for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps({"setup": header, "results": rows}, indent=2))
    (out / "latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


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
    parser.add_argument("--workers", default="2", help="Ray Train workers; a list (1,2) measures scaling")
    parser.add_argument("--max-epochs", type=int, help="gradient models: epochs (default: the model's)")
    parser.add_argument("--patience", type=int, help="gradient models: early stopping (default: the model's "
                        "anomalib patience; 0: off)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--no-ray", action="store_true", help="time the model code in this process only")
    parser.add_argument("--device", default="cpu", help="with --no-ray: cpu or cuda")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--latency", nargs="+", metavar="MODEL_DIR", help="only time these trained models "
                        "and the bare --backbone: single-image latency and --batch-size throughput")
    parser.add_argument("--threads", type=int, default=2, help="with --latency: torch CPU threads")
    args = parser.parse_args(argv)
    if args.latency:
        return latency_table(args)
    from raylib_ad.models import model_class

    worker_counts = [int(w) for w in str(args.workers).split(",")]
    rows = {}
    for name in args.models.split(","):
        if args.no_ray:
            rows[name] = run_without_ray(args, name)
            continue
        for workers in worker_counts:
            key = f"{name}_w{workers}"
            rows[key] = run_with_ray(args, name, workers)
            print(f"{key}: {json.dumps(rows[key], default=str)}", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mode = "single process, no Ray" if args.no_ray else f"Ray Train, workers {args.workers}"
    header = f"{args.data} {args.image_size}px, {args.backbone}, {mode}; {hardware()}"
    (out / "results.json").write_text(json.dumps({"setup": header, "results": rows}, indent=2, default=str))
    memory_rows = {k: v for k, v in rows.items() if not model_class(k.rsplit("_w", 1)[0]).trains_by_gradient()}
    gradient_rows = {k: v for k, v in rows.items() if k not in memory_rows}
    table = header + "\n"
    if memory_rows:
        table += f"\n{markdown(memory_rows)}\n"
    if gradient_rows:
        table += f"\n{markdown(gradient_rows, GRADIENT_COLUMNS)}\n\n{scaling(gradient_rows)}\n"
    (out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
