"""One training run, end to end: data -> Ray Train fit -> evaluation -> model directory -> MLflow.

`raylib-ad train` and jobs/train.py both call `run_training`. Everything the user needs is on disk in
`out/` before tracking starts: out/model/ (loadable with raylib_ad.load), out/metrics.json, plots.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from raylib_ad.artifact import read_model, write_stats
from raylib_ad.data import build_manifest, split_counts, validate_manifest
from raylib_ad.evaluation import overlay_indices, score_split
from raylib_ad.metrics import evaluation_report
from raylib_ad.models import model_class
from raylib_ad.models.components.feature_extractor import backbone_mean_std
from raylib_ad.models.components.weights import resolve_weights
from raylib_ad.options import TrainOptions
from raylib_ad.postprocess.validation_split import carve_validation
from raylib_ad.tracking.mlflow_run import log_training_run

SUMMARY_KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1", "fit_seconds", "test_images_per_second",
                "peak_memory_mb")


def prepare(options: TrainOptions, validate: bool = True):
    """Everything that can fail on bad input, done before any worker starts. `validate=False` skips
    decoding every image once (a sweep validates each category once, not once per trial)."""
    cls = model_class(options.model)
    category = options.resolved_category()
    table = build_manifest(options.data, options.root, category, split_file=options.split_file, seed=options.seed,
                           normal_dir=options.normal_dir, abnormal_dir=options.abnormal_dir,
                           mask_dir=options.mask_dir)
    if validate:
        validate_manifest(table)
    kwargs = options.model_kwargs()
    backbone = kwargs.get("backbone", cls.default_backbone)
    if kwargs.get("pretrained", True):
        resolve_weights(backbone, kwargs.get("weights"))  # offline without weights: fail now, not in a worker
    return cls, category, table, kwargs, backbone


def run_training(options: TrainOptions) -> dict[str, Any]:
    cls, category, table, kwargs, backbone = prepare(options)
    out = Path(options.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train_rows = table.filter(_split_mask(table, "train"))
    test_rows = table.filter(_split_mask(table, "test"))
    print(f"[raylib_ad] {options.data}/{category}: {json.dumps(split_counts(table))}", file=sys.stderr)

    labels = test_rows.column("label").to_numpy()
    val_idx, heldout = carve_validation(labels, options.val_fraction, options.seed)
    fit = _fit_on_ray(options, cls, kwargs, backbone, train_rows, test_rows.take(val_idx), out)

    model = read_model(fit["model_dir"], device=_eval_device(options))
    keep = set(overlay_indices(labels, heldout))
    scored = score_split(model, test_rows, batch_size=options.batch_size, keep_images=keep,
                         progress=options.progress)
    report = evaluation_report(scored.labels, scored.scores, scored.masks, scored.maps,
                               val_fraction=options.val_fraction, seed=options.seed)
    worker = fit["worker_metrics"]
    metrics = {
        **report["metrics"],
        "fit_seconds": fit["seconds"],
        "test_images_per_second": scored.images_per_second,
        "peak_memory_mb": max([_rss_mb(), *worker.get("worker_peak_rss_mb", [])]),
        "n_train": train_rows.num_rows,
        "n_test": test_rows.num_rows,
        "n_validation": report["n_validation"],
    }
    for key in ("fit_compute_seconds", "memory_bank_rows", "feature_seconds", "coreset_seconds", "best_epoch",
                "best_val_image_auroc"):
        if key in worker:
            metrics[key] = worker[key]
    if fit["history"]:
        metrics["epochs"] = len(fit["history"])
        metrics["train_images_per_second"] = float(np.mean([h["train_images_per_second"] for h in fit["history"]]))
    final_dir = _install_model(fit["model_dir"], out)
    write_stats(final_dir, _deployment_stats(report, metrics, options, category))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plots = _write_plots(out, scored, report)

    if options.mlflow:
        run_id = log_training_run(
            experiment=options.experiment, run_name=f"{cls.name}-{options.data}-{category}",
            params={**options.to_dict(), "category": category, "backbone": backbone,
                    "layers": model.layers, "settings": model.settings},
            metrics=metrics, model_dir=final_dir, artifacts=[out / "metrics.json", *plots], history=fit["history"],
            tags={"model": cls.name, "dataset": options.data, "category": category})
        if run_id:
            metrics["mlflow_run_id"] = run_id
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(summary_table(cls.name, category, metrics), file=sys.stderr)
    return metrics


def _fit_on_ray(options, cls, kwargs, backbone, train_rows, val_rows, out, callbacks=None) -> dict[str, Any]:
    """The Ray part of a run: shard the images, fit on the workers, fetch the model directory."""
    from raylib_ad.data.ray_dataset import manifest_to_dataset
    from raylib_ad.train.ray_setup import cluster_cpus, ensure_ray
    from raylib_ad.train.resources import cpus_per_worker

    ensure_ray()
    mean, std = backbone_mean_std(backbone)
    common = dict(workers=options.workers, gpus_per_worker=options.gpus_per_worker, batch_size=options.batch_size,
                  cpus_per_worker=cpus_per_worker(cluster_cpus(), options.workers, options.cpus_per_worker),
                  storage_path=str(out / "ray_results"), run_name=f"fit-{int(time.time())}")
    train = manifest_to_dataset(train_rows, options.image_size, mean, std)
    start = time.perf_counter()
    if cls.learning_type == "gradient":
        from raylib_ad.train.gradient import fit_gradient

        val = manifest_to_dataset(val_rows, options.image_size, mean, std, with_masks=True)
        model_dir, worker_metrics, history = fit_gradient(
            cls.name, kwargs, train, val, max_epochs=options.max_epochs or cls.default_epochs,
            patience=options.patience, max_minutes=options.max_minutes, callbacks=callbacks, **common)
        _plot_history(history, out)
    else:
        from raylib_ad.train.memory_bank import fit_memory_bank

        model_dir, worker_metrics = fit_memory_bank(cls.name, kwargs, train, progress=options.progress,
                                                    callbacks=callbacks, **common)
        history = []
        digests = set(worker_metrics["worker_digests"])
        if len(digests) != 1:
            raise RuntimeError(f"workers ended with different models (digests {sorted(digests)}); refusing to save")
    return {"model_dir": model_dir, "worker_metrics": worker_metrics, "history": history,
            "seconds": time.perf_counter() - start}


# --- sweeps: a trial is scored on the validation subset only; the held-out rest once, on winners ----------


def fit_and_validate(options: TrainOptions, *, callbacks: list | None = None,
                     validate_data: bool = True) -> dict[str, Any]:
    """A sweep trial: fit, then score ONLY the validation subset of the test split (the one run_training
    fits thresholds on). The held-out rest stays unseen until test_on_heldout, so selecting among trials
    never looks at the images the winner is finally measured on. Writes out/model."""
    cls, category, table, kwargs, backbone = prepare(options, validate=validate_data)
    out = Path(options.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    test_rows = table.filter(_split_mask(table, "test"))
    val_idx, _ = carve_validation(test_rows.column("label").to_numpy(), options.val_fraction, options.seed)
    val_rows = test_rows.take(val_idx)
    fit = _fit_on_ray(options, cls, kwargs, backbone, table.filter(_split_mask(table, "train")), val_rows, out,
                      callbacks=callbacks)
    final_dir = _install_model(fit["model_dir"], out)
    model = read_model(final_dir, device=_eval_device(options))
    scored = score_split(model, val_rows, batch_size=options.batch_size, progress=False)
    return {"model_dir": str(final_dir), "val": _threshold_free(scored, "val_"), "history": fit["history"],
            "fit_seconds": fit["seconds"], "worker_metrics": fit["worker_metrics"], "backbone": backbone,
            "layers": list(model.layers), "settings": dict(model.settings), "n_validation": int(val_idx.size)}


def test_on_heldout(options: TrainOptions, model_dir: str | Path) -> dict[str, Any]:
    """Score the whole test split once with a trained model: threshold and normalization are fitted on
    the validation subset (written into model_dir/stats.json so the directory serves as run_training's
    does); the returned test_* metrics use only the held-out images outside that subset."""
    cls, category, table, kwargs, backbone = prepare(options, validate=False)
    test_rows = table.filter(_split_mask(table, "test"))
    model = read_model(model_dir, device=_eval_device(options))
    scored = score_split(model, test_rows, batch_size=options.batch_size, progress=options.progress)
    report = evaluation_report(scored.labels, scored.scores, scored.masks, scored.maps,
                               val_fraction=options.val_fraction, seed=options.seed)
    held = np.asarray(report["heldout_idx"], dtype=np.int64)
    sub = type(scored)(labels=scored.labels[held], scores=scored.scores[held],
                       masks=None if scored.masks is None else scored.masks[held],
                       maps=None if scored.maps is None else scored.maps[held], seconds=scored.seconds)
    metrics = {**_threshold_free(sub, "test_"), "test_image_f1": report["metrics"]["image_f1"],
               "n_test_heldout": int(held.size), "n_validation": report["n_validation"]}
    write_stats(model_dir, _deployment_stats(report, metrics, options, category))
    return metrics


def _install_model(fitted_dir: str | Path, out: Path) -> Path:
    """Copy the fitted model directory out of Ray's checkpoint storage to out/model."""
    final_dir = out / "model"
    if final_dir.exists():
        shutil.rmtree(final_dir)
    shutil.copytree(fitted_dir, final_dir)
    return final_dir


def _deployment_stats(report: dict[str, Any], metrics: dict[str, Any], options: TrainOptions,
                      category: str) -> dict[str, Any]:
    """stats.json: threshold and normalization from the validation subset, the metrics, the data."""
    stats = {key: report[key] for key in ("image_stats", "pixel_stats", "threshold_method")}
    stats["metrics"] = metrics
    stats["data"] = {"data": options.data, "category": category, "root": str(Path(options.root).resolve())}
    return stats


def _threshold_free(scored, prefix: str) -> dict[str, float]:
    """Image AUROC, and pixel AUROC/AUPRO where the masks hold anomalous pixels, on raw scores."""
    from raylib_ad.metrics import aupro, auroc, pixel_auroc

    metrics = {f"{prefix}image_auroc": float(auroc(scored.labels, scored.scores))}
    if scored.masks is not None and scored.maps is not None and bool(np.asarray(scored.masks).any()):
        metrics[f"{prefix}pixel_auroc"] = float(pixel_auroc(scored.masks, scored.maps))
        metrics[f"{prefix}pixel_aupro"] = float(aupro(scored.masks, scored.maps))
    return metrics


def _plot_history(history: list[dict[str, Any]], out: Path) -> None:
    """training_curves.png: train loss and validation AUROCs per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o")
    left.set(title="train loss", xlabel="epoch")
    for key in ("val_image_auroc", "val_pixel_auroc"):
        if key in history[0]:
            right.plot(epochs, [h[key] for h in history], marker="o", label=key)
    right.set(title="validation", xlabel="epoch", ylim=(0, 1))
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=100)
    plt.close(fig)
    (out / "history.json").write_text(json.dumps(history, indent=2, default=float))


def _split_mask(table, split: str):
    import pyarrow.compute as pc

    return pc.equal(table.column("split"), split)


def _eval_device(options: TrainOptions) -> str:
    import torch

    return "cuda" if options.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_plots(out: Path, scored, report) -> list[Path]:
    from raylib_ad.postprocess.plots import plot_roc, save_overlay_grid

    paths = [plot_roc(scored.labels, scored.scores, out / "roc.png", title="image ROC (test split)")]
    if (out / "training_curves.png").is_file():
        paths.append(out / "training_curves.png")
    if scored.maps is not None and scored.images:
        idx = sorted(scored.images, key=lambda i: -scored.labels[i])
        stats = report.get("pixel_stats") or report["image_stats"]
        masks = [scored.masks[i] if scored.masks is not None else None for i in idx]
        paths.append(save_overlay_grid([scored.images[i] for i in idx], [scored.maps[i] for i in idx], masks,
                                       [float(scored.scores[i]) for i in idx], [int(scored.labels[i]) for i in idx],
                                       out / "heatmaps.png", vmin=stats["min"], vmax=stats["max"]))
    return [Path(p) for p in paths]


def summary_table(model: str, category: str, metrics: dict[str, Any]) -> str:
    rows = [(k, metrics[k]) for k in SUMMARY_KEYS if k in metrics]
    width = max(len(k) for k, _ in rows)
    lines = [f"\n{model} on {category}", "-" * (width + 14)]
    lines += [f"{k:<{width}}  {v:>10.4f}" if isinstance(v, float) else f"{k:<{width}}  {v:>10}" for k, v in rows]
    return "\n".join(lines)

