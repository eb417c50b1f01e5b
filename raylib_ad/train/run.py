"""One training run, end to end: data -> Ray Train fit (the model's recipe) -> evaluation -> model
directory -> MLflow.

`raylib-ad train` and jobs/train.py both call `run_training`. Everything the user needs is on disk in
`out/` before tracking starts: out/model/ (loadable with raylib_ad.load), out/metrics.json, out/split.csv
(each image's role), plots. Headline metrics use only the held-out test images (train/prepare.py).
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from raylib_ad.artifact import read_model, write_stats
from raylib_ad.console import install_console
from raylib_ad.evaluation import score_split, split_scoring_on_ray
from raylib_ad.options import TrainOptions
from raylib_ad.postprocess.report import evaluation_report, threshold_free_metrics
from raylib_ad.tracking.mlflow_run import TrainingRun, run_params
from raylib_ad.outdir import mark_finished, mark_unfinished, prepare_out_dir, unfinished_fit
from raylib_ad.train.outputs import RANDOM_WEIGHTS_NOTE, evaluate_on_test, plot_history, random_weights, summary_table
from raylib_ad.train.outputs import threshold_warnings
from raylib_ad.train.stored import write_scores
# shared with `raylib-ad evaluate` / `threshold`, which write the same files
from raylib_ad.train.evaluate import deployment_stats as _deployment_stats
from raylib_ad.train.evaluate import write_metrics as _write_metrics
from raylib_ad.train.prepare import PreparedRun, prepare

WORKER_KEYS = ("fit_compute_seconds", "memory_bank_rows", "feature_seconds", "coreset_seconds", "best_epoch",
               "best_val_image_auroc", "epochs",
               # the kept weights and why training stopped (train/checkpoints.py kept_summary)
               "best_step", "best_val_pixel_auroc", "kept", "kept_by", "stop_reason", "stopped_because", "epochs_run",
               "steps_run", "val_ties", "validation_note")


def options_fingerprint(options: dict[str, Any]) -> str:
    """What makes two `train` commands the same run: the user's options (paths absolute), not the plumbing."""
    text = json.dumps(run_params(options), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_training(options: TrainOptions) -> dict[str, Any]:
    run = prepare(options)  # bad options fail here, before an earlier run in --out is touched
    fingerprint = options_fingerprint(options.to_dict())
    out = prepare_out_dir(options.out, options.overwrite, resume_fingerprint=fingerprint)
    run.resume_fit = unfinished_fit(out, fingerprint)  # an interrupted run of the same command: resumed
    if run.resume_fit:
        print(f"[raylib_ad] resuming the unfinished run in {out} from its latest checkpoint", file=sys.stderr)
    run.fingerprint = fingerprint
    run.write_split_csv(out)
    console = install_console(out / "ray.log", verbose=options.verbose, progress=options.progress)
    print(f"[raylib_ad] Ray's own output goes to {console.log_file} (--verbose prints it too)", file=sys.stderr)
    tracking = None
    if options.mlflow:  # opened now, so that the run's start, end and duration are the training's
        tracking = TrainingRun(experiment=options.experiment, run_name=f"{run.cls.name}-{options.data}-{run.category}",
                               params={**run_params(options.to_dict()), "category": run.category,
                                       "backbone": run.backbone},
                               tags={"model": run.cls.name, "dataset": options.data, "category": run.category})
    try:
        return _train_and_report(run, out, console, tracking)
    except BaseException:
        if tracking is not None:
            tracking.fail()
        raise


def _train_and_report(run: PreparedRun, out: Path, console, tracking: TrainingRun | None) -> dict[str, Any]:
    options = run.options
    fit = fit_on_cluster(run, out)

    model = read_model(fit.model_dir, device=_eval_device(options))
    with _scoring_on_cluster(options, run.test_rows.num_rows):
        evaluation = evaluate_on_test(model, run, out, batch_size=options.scoring_batch_size,
                                      progress=options.progress)
    report = evaluation["report"]
    metrics = {
        **evaluation["metrics"],
        "fit_seconds": fit.seconds,
        "peak_memory_mb": max([_rss_mb(), *fit.metrics.get("worker_peak_rss_mb", [])]),
        "n_train": run.train_rows.num_rows,
        "n_test": run.test_rows.num_rows,
        **{key: fit.metrics[key] for key in WORKER_KEYS if key in fit.metrics},
    }
    if fit.history:
        metrics["train_images_per_second"] = float(np.mean([h["train_images_per_second"] for h in fit.history]))
    if random_weights(model.settings, run.model_kwargs.get("pretrained", True) or run.backbone is None):
        metrics["random_weights"] = True
        metrics["random_weights_note"] = RANDOM_WEIGHTS_NOTE
    warnings = threshold_warnings(metrics)  # printed with the summary, kept in metrics.json
    if warnings:
        metrics["warnings"] = warnings
    final_dir = _install_model(fit.model_dir, out)
    write_stats(final_dir, _deployment_stats(report, metrics, options, run.category))
    # The test split's scores, once: `threshold` and `evaluate` reuse them instead of scoring again.
    write_scores(out, final_dir, run.test_rows, evaluation["scored"], run.val_idx, report)
    plots = evaluation["plots"]
    _write_metrics(out, metrics, evaluation["at_threshold"])

    if tracking is not None:
        run_id = tracking.finish(metrics=metrics, model_dir=final_dir, history=fit.history,
                                 artifacts=[out / "metrics.json", out / "split.csv", *plots],
                                 params={"layers": model.layers, "settings": model.settings})
        if run_id:
            metrics["mlflow_run_id"] = run_id
            metrics["mlflow_tracking_uri"] = tracking.uri
            _write_metrics(out, metrics, evaluation["at_threshold"])
    print(summary_table(run.cls.name, run.category, metrics), file=sys.stderr)
    console.close()  # on failure it stays, so that the CLI can print the end of Ray's log
    return metrics


def runner_config(run: PreparedRun):
    from raylib_ad.train.runner import RunnerConfig

    o = run.options
    return RunnerConfig(batch_size=run.batch_size, max_epochs=o.max_epochs, max_steps=o.max_steps,
                        patience=run.cls.default_patience if o.patience is None else (o.patience or None),
                        max_minutes=o.max_minutes, val_every_minutes=o.val_every_minutes, seed=o.seed, progress=o.progress,
                        train_images=run.train_rows.num_rows, image_size=o.image_size, mean=run.mean, std=run.std)


def fit_on_cluster(run: PreparedRun, out: Path, callbacks=None):
    """The Ray part of a run: deal the images to the workers, run the model's recipe, fetch the model."""
    from raylib_ad.train.ray_setup import cluster_cpus, ensure_ray, largest_node_cpus
    from raylib_ad.train.ray_train import fit_on_ray
    from raylib_ad.train.resources import cpus_per_worker

    from raylib_ad.console import current as current_console

    o = run.options
    ensure_ray(local=o.local_ray)
    console = current_console()
    if console is not None:
        console.attach_ray()
    fit_name = run.resume_fit or f"fit-{int(time.time())}"
    mark_unfinished(out, run.fingerprint, fit_name)  # until the run ends, the same command resumes it
    fit = fit_on_ray(run.cls.name, run.model_kwargs, run.train_rows, run.val_rows, runner_config(run),
                     workers=o.workers, gpus_per_worker=o.gpus_per_worker,
                     cpus_per_worker=cpus_per_worker(cluster_cpus(), o.workers, o.cpus_per_worker,
                                                     largest_node_cpus=largest_node_cpus()),
                     storage_path=str(out / "ray_results"), run_name=fit_name, callbacks=callbacks,
                     relay_progress=console is not None and o.progress)
    digests = fit.metrics.get("worker_digests")  # reported by recipes whose workers must agree bitwise
    if digests and len(set(digests)) != 1:
        raise RuntimeError(f"workers ended with different models (digests {digests}); "
                           "refusing to save")
    if fit.history:
        plot_history(fit.history, out, fit.val_curve, kept=fit.metrics)
    return fit


# --- sweeps: a trial is scored on the validation subset only; the held-out rest once, on winners ----------


def fit_and_validate(options: TrainOptions, *, callbacks: list | None = None,
                     validate_data: bool = True) -> dict[str, Any]:
    """A sweep trial: fit, then score ONLY the validation subset of the test split (the one run_training
    fits thresholds on). The held-out rest stays unseen until test_on_heldout, so selecting among trials
    never looks at the images the winner is finally measured on. Writes out/model."""
    run = prepare(options, validate=validate_data, quiet=True)
    out = Path(options.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run.write_split_csv(out)
    fit = fit_on_cluster(run, out, callbacks=callbacks)
    final_dir = _install_model(fit.model_dir, out)
    model = read_model(final_dir, device=_eval_device(options))
    with _scoring_on_cluster(options, run.val_rows.num_rows):
        scored = score_split(model, run.val_rows, batch_size=options.scoring_batch_size, progress=False)
    val = threshold_free_metrics(scored.labels.astype(bool), scored.scores, scored.masks, scored.maps, prefix="val_")
    return {"model_dir": str(final_dir), "val": val, "history": fit.history,
            "fit_seconds": fit.seconds, "worker_metrics": fit.metrics, "backbone": run.backbone,
            "layers": list(model.layers), "settings": dict(model.settings), "n_validation": int(run.val_idx.size)}


def test_on_heldout(options: TrainOptions, model_dir: str | Path) -> dict[str, Any]:
    """Score the whole test split once with a trained model: threshold and normalization are fitted on
    the validation subset (written into model_dir/stats.json so the directory serves as run_training's
    does); the returned metrics carry the same names as run_training's and use only the held-out images."""
    run = prepare(options, validate=False, quiet=True)
    model = read_model(model_dir, device=_eval_device(options))
    with _scoring_on_cluster(options, run.test_rows.num_rows):
        scored = score_split(model, run.test_rows, batch_size=options.scoring_batch_size, progress=options.progress)
    report = evaluation_report(scored.labels, scored.scores, scored.masks, scored.maps,
                               val_idx=run.val_idx, heldout_idx=run.heldout_idx)
    metrics = {**report["metrics"], "n_test_heldout": report["n_test_heldout"], "n_validation": report["n_validation"]}
    write_stats(model_dir, _deployment_stats(report, metrics, options, run.category))
    return metrics


def _install_model(fitted_dir: str | Path, out: Path) -> Path:
    """Move the fitted model directory out of Ray's checkpoint storage to out/model, then drop that storage:
    once the model directory is written, Ray's checkpoints (the same model, plus optimizer states) would
    only double the run's size on disk."""
    final_dir = out / "model"
    if final_dir.exists():
        shutil.rmtree(final_dir)
    shutil.move(str(fitted_dir), str(final_dir))  # a rename on the same file system
    shutil.rmtree(out / "ray_results", ignore_errors=True)
    mark_finished(out)  # nothing left to resume
    return final_dir


# Below this many images a split is scored in process: starting a pool of replicas (each imports torch and
# builds the model: ~5 s on 2 cores) would cost more than the scoring itself. 0: always on the cluster.
CLUSTER_SCORING_MIN_IMAGES = 200


def _scoring_on_cluster(options: TrainOptions, images: int):
    """With Ray up, a split's scoring runs on Ray Data with one model replica per training worker (the
    resources the fit just released), not on the driver; without Ray, or for a small split, in process."""
    import contextlib

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized() or images < CLUSTER_SCORING_MIN_IMAGES:
        return contextlib.nullcontext()
    from raylib_ad.scoring.pipeline import ReplicaPool

    return split_scoring_on_ray(ReplicaPool(actors=max(1, options.workers), cpus_per_actor=options.cpus_per_worker,
                                            gpus_per_actor=options.gpus_per_worker))


def _eval_device(options: TrainOptions) -> str:
    import torch

    return "cuda" if options.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


