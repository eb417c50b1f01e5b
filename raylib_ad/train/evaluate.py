"""A trained model on a dataset, without training: `raylib-ad evaluate` and `raylib-ad threshold`.

The model is a model directory or a registry URI (`models:/<name>@<alias>`, `models:/<name>/<version>`,
downloaded once into the cache, tracking/registry.py). The data go through the same `prepare()` as
`raylib-ad train`, with the trained model's own settings, seed (by default) and `--val-fraction`, so on
the training data the validation subset and the held-out images are those of the training run.

- `run_evaluation`: the held-out metrics, plots, split.csv and MLflow run (tag kind=evaluation) that
  `train` writes (train/outputs.py evaluate_on_test), plus how the model's own deployed threshold does
  on those held-out images. The model is not changed.
- `run_threshold`: the image threshold for a stated goal on the validation images (recall or FPR),
  written into the model directory's stats.json; a registry model gets a new version instead.

Also holds the two helpers `train/run.py` shares with these: `write_metrics` and `deployment_stats`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raylib_ad.errors import ConfigError
from raylib_ad.options import TrainOptions

SPLIT_KEYS = ("split_file", "normal_dir", "abnormal_dir", "mask_dir")  # data options besides data/root/category
MIN_VALIDATION_IMAGES = 10  # fewer anomalous (or, for an FPR goal, normal) ones: the threshold means little


# --- shared with train/run.py ---------------------------------------------------------------------------


def write_metrics(out: Path, metrics: dict[str, Any], at_threshold: dict[str, Any], **sections: Any) -> None:
    """metrics.json: the flat held-out metrics, plus the confusion matrix and per-defect table (and any
    further named sections)."""
    (out / "metrics.json").write_text(json.dumps({**metrics, "at_threshold": at_threshold, **sections}, indent=2))


def deployment_stats(report: dict[str, Any], metrics: dict[str, Any], options: TrainOptions,
                     category: str) -> dict[str, Any]:
    """stats.json: threshold and normalization from the validation subset, the metrics, the data (with
    what decides the split, so `evaluate` / `threshold` find the same validation and held-out images)."""
    stats = {key: report[key] for key in ("image_stats", "pixel_stats", "threshold_method")}
    stats["metrics"] = metrics
    stats["data"] = {"data": options.data, "category": category, "root": str(Path(options.root).resolve()),
                     "seed": options.seed, "val_fraction": options.val_fraction,
                     **{key: getattr(options, key) for key in SPLIT_KEYS if getattr(options, key) is not None}}
    if options.split_file:
        stats["data"]["split_file"] = str(Path(options.split_file).resolve())
    return stats


# --- which model, which data ------------------------------------------------------------------------------


@dataclass
class EvaluationOptions:
    """What `evaluate` and `threshold` are asked. Data options left None are the training run's (the data,
    seed and val fraction recorded in the model's stats.json), see train_options."""

    model: str  # a model directory or models:/<name>@<alias> | models:/<name>/<version>
    data: str | None = None
    root: str | None = None
    category: str | None = None
    split_file: str | None = None
    normal_dir: str | None = None
    abnormal_dir: str | None = None
    mask_dir: str | None = None
    seed: int | None = None
    val_fraction: float | None = None
    batch_size: int = 32
    device: str = "auto"
    out: str | None = None
    overwrite: bool = False
    experiment: str = "raylib_ad"
    mlflow: bool = True
    progress: bool = True
    tracking_uri: str | None = None


@dataclass
class ModelSource:
    """A trained model found: its local directory (for a registry model, the cached download of the
    version, never written to), config.json and stats.json."""

    spec: str  # as given
    directory: Path
    config: dict[str, Any]
    stats: dict[str, Any] | None
    registered: Any = None  # tracking.registry.RegisteredVersion for a models:/ URI


def resolve_model(spec: str, tracking_uri: str | None = None) -> ModelSource:
    from raylib_ad.artifact import CONFIG_FILE, STATS_FILE
    from raylib_ad.tracking.registry import download_model_version, is_registry_uri

    registered = None
    if is_registry_uri(spec):
        directory, registered = download_model_version(spec, uri=tracking_uri)
    else:
        directory = Path(spec).expanduser().absolute()
    if not (directory / CONFIG_FILE).is_file():
        raise ConfigError(f"--model {spec}: not a model directory ({CONFIG_FILE} is missing); give the model/ "
                          f"folder of a run or models:/<name>@<alias>")
    stats_path = directory / STATS_FILE
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None
    return ModelSource(spec, directory, json.loads((directory / CONFIG_FILE).read_text()), stats, registered)


def train_options(opts: EvaluationOptions, source: ModelSource) -> TrainOptions:
    """Options for prepare(): the trained model's own name and settings (checked there, built without
    pretrained weights: the weights come from the directory), the data asked for or trained on. Options
    not given are the training run's (stats.json "data") when the data are the same, else train's defaults."""
    config, trained_on = source.config, (source.stats or {}).get("data") or {}
    data = opts.data or trained_on.get("data")
    if not data:
        raise ConfigError(f"--data is required: {source.spec} has no stats.json saying which data it was trained on")
    same = trained_on if data == trained_on.get("data") else {}

    def given(key: str, default: Any = None) -> Any:
        value = getattr(opts, key)
        return value if value is not None else same.get(key, default)

    return TrainOptions(
        model=config["model"], data=data, root=given("root", "datasets"), category=given("category"),
        **{key: given(key) for key in SPLIT_KEYS}, backbone=config.get("backbone"), layers=config.get("layers"),
        image_size=config["image_size"], settings={**config.get("settings", {}), "pretrained": False},
        batch_size=opts.batch_size, seed=given("seed", config.get("seed", 0)), val_fraction=given("val_fraction", 0.3),
        experiment=opts.experiment, mlflow=opts.mlflow, progress=opts.progress)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _model_section(source: ModelSource) -> dict[str, Any]:
    section = {"source": source.spec, "directory": str(source.directory), "name": source.config["model"]}
    if source.registered is not None:
        section["registered"] = {"name": source.registered.name, "version": source.registered.version,
                                 "alias": source.registered.alias}
    return section


# --- raylib-ad evaluate --------------------------------------------------------------------------------------


def run_evaluation(opts: EvaluationOptions) -> dict[str, Any]:
    """Score the model on the data's test split as `train` does after fitting; returns the metrics."""
    from raylib_ad.artifact import read_model
    from raylib_ad.metrics import threshold_metrics, threshold_report
    from raylib_ad.outdir import prepare_out_dir
    from raylib_ad.tracking.mlflow_run import log_training_run
    from raylib_ad.train.outputs import evaluate_on_test, summary_table
    from raylib_ad.train.prepare import prepare

    if not opts.out:
        raise ConfigError("--out is required: the directory for metrics.json, split.csv and the plots")
    source = resolve_model(opts.model, opts.tracking_uri)
    options = train_options(opts, source)
    run = prepare(options)  # bad data fail here, before an earlier run in --out is touched
    out = prepare_out_dir(opts.out, opts.overwrite)
    run.write_split_csv(out)
    model = read_model(source.directory, device=_device(opts.device))
    scored, pixel, reused = _stored_or_new_scores(model, run, source, opts, out)
    evaluation = evaluate_on_test(model, run, out, batch_size=opts.batch_size, progress=opts.progress, scored=scored,
                                  pixel=pixel)
    metrics = {**evaluation["metrics"], "n_train": run.train_rows.num_rows, "n_test": run.test_rows.num_rows,
               "reused_scores": reused}
    trained_metrics = (source.stats or {}).get("metrics") or {}
    if trained_metrics.get("random_weights"):  # said by the training run (stats.json): random networks
        metrics.update(random_weights=True, random_weights_note=trained_metrics.get("random_weights_note"))

    # The model as deployed: its own stats.json threshold on the same held-out images (the threshold above
    # is fitted afresh on this data's validation subset; on the training data the two agree).
    sections: dict[str, Any] = {"model": _model_section(source)}
    deployed = ((source.stats or {}).get("image_stats") or {}).get("threshold")
    if deployed is not None:
        held = np.asarray(evaluation["report"]["heldout_idx"], dtype=np.int64)
        scored, defects = evaluation["scored"], run.test_rows.column("defect").to_pylist()
        report = threshold_report(scored.labels[held], scored.scores[held], deployed, [defects[i] for i in held])
        metrics.update(threshold_metrics(report, prefix="deployed_image_"))
        sections["at_deployed_threshold"] = report
    from raylib_ad.train.outputs import threshold_warnings

    warnings = threshold_warnings({k[len("deployed_"):]: v for k, v in metrics.items() if k.startswith("deployed_")}
                                  if deployed is not None else metrics)
    if warnings:  # printed with the summary
        metrics["warnings"] = warnings
    write_metrics(out, metrics, evaluation["at_threshold"], **sections)

    if opts.mlflow:
        tags = {"kind": "evaluation", "model": run.cls.name, "dataset": options.data, "category": run.category,
                "model_source": source.spec}
        if source.registered is not None:
            tags.update(registered_model=source.registered.name, registered_version=str(source.registered.version))
        run_id = log_training_run(
            experiment=opts.experiment, run_name=f"evaluate-{run.cls.name}-{options.data}-{run.category}",
            params={"model_source": source.spec, "data": options.data, "root": str(Path(options.root).resolve()),
                    "category": run.category, "split_file": options.split_file and str(Path(options.split_file).resolve()),
                    "seed": options.seed,
                    "val_fraction": options.val_fraction, "config": source.config},
            metrics=metrics, model_dir=None, artifacts=[out / "metrics.json", out / "split.csv", *evaluation["plots"]],
            tags=tags, uri=opts.tracking_uri)
        if run_id:
            metrics["mlflow_run_id"] = run_id
            write_metrics(out, metrics, evaluation["at_threshold"], **sections)
    print(summary_table(run.cls.name, run.category, metrics), file=sys.stderr)
    return metrics


def _stored_or_new_scores(model, run, source: ModelSource, opts: EvaluationOptions, out: Path):
    """The test split's ScoredSplit for `evaluate`: the scores the training run stored for these weights
    (train/stored.py) where they cover the image, the rest scored now, on Ray Data across the cluster when
    there are enough of them (as `train` scores), else in process. Returns (scored, pixel, reused): `pixel`
    holds the stored run's pixel figures when the stored scores cover this very split; a model with maps
    whose split is not covered is scored whole (its pixel metrics need every map)."""
    from raylib_ad.evaluation import ScoredSplit
    from raylib_ad.train.stored import covers, read_scores

    stored = read_scores(source.directory)
    if stored is not None and covers(stored, run.test_rows, run.val_idx):
        maps = None if stored.small_maps is None else stored.small_maps.astype(np.float32)
        scored = ScoredSplit(labels=stored.labels, scores=stored.scores, masks=None, maps=maps, seconds=0.0)
        print(f"[raylib_ad] reusing the {len(stored.paths)} scores the training run stored "
              f"({source.directory.parent / 'scores.npz'}); nothing to score", file=sys.stderr)
        return scored, {"pixel_metrics": stored.meta.get("pixel_metrics"),
                        "pixel_stats": stored.meta.get("pixel_stats")}, len(stored.paths)
    paths = run.test_rows.column("path").to_pylist()
    known = {} if stored is None or model.produces_maps else stored.index()
    new = np.asarray([i for i, path in enumerate(paths) if path not in known], dtype=np.int64)
    with _scoring_context(opts, out, new.size):
        fresh = _score(model, run.test_rows.take(new) if new.size < len(paths) else run.test_rows, opts) \
            if new.size else None
    if new.size == len(paths):
        return fresh, None, 0
    labels = np.asarray(run.test_rows.column("label").to_pylist(), dtype=np.int64)
    scores = np.empty(len(paths), dtype=np.float32)
    old = np.asarray([i for i, path in enumerate(paths) if path in known], dtype=np.int64)
    scores[old] = stored.scores[[known[paths[i]] for i in old]]
    if fresh is not None:
        scores[new] = fresh.scores
    print(f"[raylib_ad] reused {old.size} stored scores, scored {new.size} new images", file=sys.stderr)
    return ScoredSplit(labels=labels, scores=scores, masks=None, maps=None,
                       seconds=fresh.seconds if fresh is not None else 0.0), None, int(old.size)


def _score(model, table, opts: EvaluationOptions):
    from raylib_ad.evaluation import score_split

    return score_split(model, table, batch_size=opts.batch_size, progress=opts.progress)


def _scoring_context(opts: EvaluationOptions, out: Path | None, images: int):
    """Ray Data scoring (train's split_scoring_on_ray, one replica per worker of the cluster's CPUs) for a
    split big enough to be worth starting replicas (train/run.py CLUSTER_SCORING_MIN_IMAGES); Ray's own
    output goes to OUT/ray.log as in `train`."""
    import contextlib

    from raylib_ad.train.run import CLUSTER_SCORING_MIN_IMAGES

    if images < max(1, CLUSTER_SCORING_MIN_IMAGES):
        return contextlib.nullcontext()
    return _on_ray(opts, out)


@contextlib.contextmanager
def _on_ray(opts: EvaluationOptions, out: Path | None):
    from raylib_ad.console import current, install_console
    from raylib_ad.evaluation import split_scoring_on_ray
    from raylib_ad.scoring.pipeline import ReplicaPool
    from raylib_ad.train.ray_setup import ensure_ray

    console = current()
    if console is None and out is not None:
        console = install_console(out / "ray.log", progress=opts.progress)  # closed by the CLI when it ends
        print(f"[raylib_ad] Ray's own output goes to {console.log_file}", file=sys.stderr)
    ensure_ray()
    if console is not None:
        console.attach_ray()
    gpu = _device(opts.device).startswith("cuda")
    with split_scoring_on_ray(ReplicaPool(actors=1, gpus_per_actor=1.0 if gpu else 0.0)):
        yield


# --- raylib-ad threshold -------------------------------------------------------------------------------------


def _rates(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    from raylib_ad.metrics.at_threshold import confusion_at

    c = confusion_at(labels, scores, threshold)
    return {"n_anomalous": c["tp"] + c["fn"], "n_normal": c["fp"] + c["tn"], "recall": c["tpr"], "fpr": c["fpr"],
            "precision": c["precision"], "tp": c["tp"], "fp": c["fp"], "tn": c["tn"], "fn": c["fn"]}


def goal_warnings(n_anomalous: int, n_normal: int, target_recall: float | None) -> list[str]:
    """Why a threshold fitted on these validation counts means little, one sentence each."""
    warnings = []
    if n_anomalous < MIN_VALIDATION_IMAGES:
        warnings.append(f"the validation subset holds only {n_anomalous} anomalous images (fewer than "
                        f"{MIN_VALIDATION_IMAGES}): recall there moves in steps of 1/{max(n_anomalous, 1)}, so the "
                        "threshold and its recall mean little; add anomalous test images or raise --val-fraction")
    if target_recall is None and n_normal < MIN_VALIDATION_IMAGES:
        warnings.append(f"the validation subset holds only {n_normal} normal images (fewer than "
                        f"{MIN_VALIDATION_IMAGES}): the false-positive rate there moves in steps of "
                        f"1/{max(n_normal, 1)}; add normal test images or raise --val-fraction")
    return warnings


def run_threshold(opts: EvaluationOptions, *, target_recall: float | None = None,
                  target_fpr: float | None = None, label_free: float | None = None) -> dict[str, Any]:
    """Fit the image threshold for the goal on the validation images and write it with the model (a
    directory: its stats.json; a registry model: a new version, the alias it was named by moved to it).
    `label_free=epsilon` takes the model's own label-free threshold instead (U-Flow with
    anomaly_map_mode=nfa: -log10 NFA > -log10 epsilon, no labels used), for image and pixel decisions.
    Returns what `raylib-ad threshold` prints."""
    from raylib_ad.artifact import read_model, write_stats
    from raylib_ad.evaluation import ScoredSplit
    from raylib_ad.postprocess.threshold import fit_goal_threshold
    from raylib_ad.train.prepare import prepare
    from raylib_ad.train.stored import covers, read_scores

    if sum(goal is not None for goal in (target_recall, target_fpr, label_free)) != 1:
        raise ConfigError("give exactly one goal: --target-recall R, --target-fpr F or --label-free")
    source = resolve_model(opts.model, opts.tracking_uri)
    options = train_options(opts, source)
    # A run's model directory has its test scores beside it (train/stored.py): then nothing is scored, and
    # the images, which that run decoded and checked, are not decoded again either.
    stored = read_scores(source.directory) if source.registered is None else None
    needs_maps = label_free is not None and source.config.get("model") is not None and stored is not None \
        and stored.small_maps is not None  # the label-free pixel normalization is fitted on whole maps
    model = None
    label_free_threshold = None
    if label_free is not None:
        model = read_model(source.directory, device=_device(opts.device))
        find = getattr(model, "label_free_threshold", None)
        label_free_threshold = find(label_free) if find is not None else None
        if label_free_threshold is None:
            raise ConfigError(f"{model.name} has no label-free threshold; U-Flow trained with "
                              "--set anomaly_map_mode=nfa has one (-log10 NFA, the U-Flow paper's a contrario test)")
    run = prepare(options, validate=stored is None)
    if stored is not None and not needs_maps and covers(stored, run.test_rows, run.val_idx):
        scored = ScoredSplit(labels=stored.labels, scores=stored.scores, masks=None, maps=None, seconds=0.0)
        print(f"[raylib_ad] using the scores the training run stored ({source.directory.parent / 'scores.npz'}): "
              "nothing to score", file=sys.stderr)
    else:
        model = model or read_model(source.directory, device=_device(opts.device))
        with _scoring_context(opts, None, run.test_rows.num_rows):
            scored = _score(model, run.test_rows, opts)
    val, held = run.val_idx, run.heldout_idx
    if label_free_threshold is not None:
        threshold, method = float(label_free_threshold), "nfa"
    else:
        threshold, method = fit_goal_threshold(scored.labels[val], scored.scores[val], target_recall=target_recall,
                                               target_fpr=target_fpr)
    validation = _rates(scored.labels[val], scored.scores[val], threshold)
    heldout = _rates(scored.labels[held], scored.scores[held], threshold)
    warnings = [] if label_free is not None else goal_warnings(validation["n_anomalous"], validation["n_normal"],
                                                                target_recall)
    goal = {key: value for key, value in (("target_recall", target_recall), ("target_fpr", target_fpr),
                                          ("label_free_epsilon", label_free)) if value is not None}
    previous = ((source.stats or {}).get("image_stats") or {}).get("threshold")
    stats = _stats_with_threshold(source, run, options, scored, threshold, method)
    if label_free is not None and scored.maps is not None:
        # Pixels are decided by the same test: the map normalization puts the NFA threshold at 0.5 too.
        from raylib_ad.postprocess.normalization import fit_normalization

        stats["pixel_stats"] = fit_normalization(scored.maps[val], threshold).to_dict()
        stats["pixel_threshold_method"] = method
    stats["threshold_goal"] = {**goal, "data": options.data, "category": run.category, "seed": options.seed,
                               "val_fraction": options.val_fraction, "validation": validation, "heldout": heldout,
                               "previous_threshold": previous}
    result = {"model": source.spec, "threshold": threshold, "previous_threshold": previous, "goal": goal,
              "validation": validation, "heldout": heldout, "normalization": stats["image_stats"],
              "model_dir": str(source.directory), "registered": None, "warnings": warnings}
    for warning in warnings:
        print(f"[raylib_ad] WARNING: {warning}", file=sys.stderr)
    if source.registered is None:
        write_stats(source.directory, stats)
        result["updated"] = _update_run(source, stats, run, scored, stored, threshold, opts)
    else:
        result.update(_register_new_version(source, stats, result, opts, run))
    print(_threshold_line(result), file=sys.stderr)
    return result


# metrics.json entries that are not flat metrics
SECTIONS = ("at_threshold", "warnings", "threshold_goal", "model", "at_deployed_threshold")
THRESHOLD_KEYS = {"image_threshold", "image_tpr", "image_fpr", "image_tp", "image_fp", "image_tn", "image_fn",
                  "image_precision", "image_recall", "image_f1", "image_good_false_positives", "image_good_fpr"}


def _depends_on_threshold(key: str) -> bool:
    return key in THRESHOLD_KEYS or key.startswith("image_recall_")


def _update_run(source: ModelSource, stats: dict[str, Any], run, scored, stored, threshold: float,
                opts: EvaluationOptions) -> list[str]:
    """A run's model directory got a new threshold: bring the rest of the run with it, so that nothing
    shows the old one: metrics.json (its threshold-dependent metrics, the confusion matrix and per-defect
    table, the warnings), roc.png, threshold.png, heatmaps.png, and the training run's MLflow copy (its
    model/stats.json, which the registered versions of that run point to, its metrics.json, plots and
    metrics). Returns what was updated."""
    from raylib_ad.evaluation import ScoredSplit
    from raylib_ad.metrics import threshold_report
    from raylib_ad.train.outputs import _write_plots, threshold_warnings

    run_dir = source.directory.parent
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        return []  # a model directory on its own: its stats.json is all there is
    document = json.loads(metrics_path.read_text())
    held = np.asarray(run.heldout_idx, dtype=np.int64)
    defects = run.test_rows.column("defect").to_pylist()
    at_threshold = threshold_report(scored.labels[held], scored.scores[held], threshold, [defects[i] for i in held])
    flat = {k: v for k, v in document.items() if k not in SECTIONS and not _depends_on_threshold(k)}
    flat.update({k: v for k, v in stats["metrics"].items() if _depends_on_threshold(k)})
    warnings = threshold_warnings(flat)
    if warnings:
        flat["warnings"] = warnings
        for warning in warnings:
            print(f"[raylib_ad] WARNING: {warning}", file=sys.stderr)
    sections = {k: document[k] for k in SECTIONS if k in document and k not in ("at_threshold", "warnings")}
    sections["threshold_goal"] = stats["threshold_goal"]
    write_metrics(run_dir, flat, at_threshold, **sections)
    updated = [str(metrics_path)]
    maps = None
    if stored is not None and stored.small_maps is not None:
        maps = stored.small_maps.astype(np.float32)
    elif scored.maps is not None:
        maps = scored.maps
    plotted = ScoredSplit(labels=scored.labels, scores=scored.scores, masks=None, maps=maps, seconds=0.0)
    report = {"heldout_idx": held.tolist(), "image_stats": stats["image_stats"], "pixel_stats": stats.get("pixel_stats")}
    plots = [p for p in _write_plots(run_dir, run, plotted, report, at_threshold)
             if p.name != "training_curves.png"]  # (listed by _write_plots when present; it does not change)
    updated += [str(p) for p in plots]
    run_id = document.get("mlflow_run_id")
    if run_id:
        updated += _update_mlflow_copy(run_id, document.get("mlflow_tracking_uri") or opts.tracking_uri,
                                       source.directory, metrics_path, plots, flat)
    return updated


def _update_mlflow_copy(run_id: str, uri: str | None, model_dir: Path, metrics_path: Path, plots, flat) -> list[str]:
    """The training run's artifacts rewritten in place: model/stats.json (registered versions of the run
    read their files from there), metrics.json, the plots; its threshold metrics logged again."""
    from raylib_ad.artifact import STATS_FILE
    from raylib_ad.tracking.mlflow_run import tracking_uri

    uri = uri or tracking_uri()
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        client.log_artifact(run_id, str(model_dir / STATS_FILE), artifact_path="model")
        client.log_artifact(run_id, str(metrics_path))
        for path in plots:
            client.log_artifact(run_id, str(path), artifact_path="plots")
        for key, value in flat.items():
            if key.startswith("image_") and isinstance(value, (int, float)) and not isinstance(value, bool):
                client.log_metric(run_id, key, float(value))
        return [f"mlflow run {run_id} ({uri})"]
    except Exception as err:  # the model directory and the run's files have it: say so, do not fail
        print(f"[raylib_ad] the MLflow copy of run {run_id} at {uri} still has the old threshold "
              f"({type(err).__name__}: {err})", file=sys.stderr)
        return []


def _stats_with_threshold(source, run, options, scored, threshold, method) -> dict[str, Any]:
    """The model's stats.json with the new image threshold (its normalization re-fitted on the validation
    scores so the threshold maps to 0.5) and the threshold-dependent held-out metrics updated. Pixel
    statistics are kept; a directory without stats.json gets the full set from this data."""
    from raylib_ad.metrics import threshold_metrics, threshold_report
    from raylib_ad.metrics.classification import precision_recall_f1_at
    from raylib_ad.postprocess.normalization import fit_normalization
    from raylib_ad.postprocess.report import evaluation_report

    val, held = run.val_idx, run.heldout_idx
    if source.stats is not None:
        stats = json.loads(json.dumps(source.stats))  # a deep copy
    else:
        report = evaluation_report(scored.labels, scored.scores, scored.masks, scored.maps, val_idx=val,
                                   heldout_idx=held)
        stats = deployment_stats(report, dict(report["metrics"]), options, run.category)
    stats["image_stats"] = fit_normalization(scored.scores[val], threshold).to_dict()
    stats["threshold_method"] = method
    metrics = {k: v for k, v in (stats.get("metrics") or {}).items()
               if not k.startswith(("image_recall_", "image_good_"))}  # per-defect keys of the old threshold
    defects = run.test_rows.column("defect").to_pylist()
    metrics.update(threshold_metrics(threshold_report(scored.labels[held], scored.scores[held], threshold,
                                                      [defects[i] for i in held])))
    precision, recall, f1 = precision_recall_f1_at(scored.labels[held], scored.scores[held], threshold)
    metrics.update(image_precision=precision, image_recall=recall, image_f1=f1)
    stats["metrics"] = metrics
    return stats


def _register_new_version(source: ModelSource, stats, result, opts: EvaluationOptions, run) -> dict[str, Any]:
    """Log the re-thresholded model directory in an MLflow run (kind=threshold) and register it as a new
    version of the same registered model; the cached copy of the old version is never modified."""
    from raylib_ad.artifact import write_stats
    from raylib_ad.errors import RaylibADError
    from raylib_ad.tracking.mlflow_run import log_training_run
    from raylib_ad.tracking.registry import RegisteredVersion, register_version, version_dir

    old = source.registered
    staged = Path(tempfile.mkdtemp(prefix=f".{old.name}.threshold.", dir=source.directory.parent))
    shutil.copytree(source.directory, staged / "model")
    write_stats(staged / "model", stats)
    metrics = {"image_threshold": result["threshold"], "from_version": old.version,
               **{f"validation_{k}": v for k, v in result["validation"].items() if v is not None},
               **{f"heldout_{k}": v for k, v in result["heldout"].items() if v is not None}}
    run_id = log_training_run(
        experiment=opts.experiment, run_name=f"threshold-{old.name}-v{old.version}",
        params={"model_source": source.spec, **result["goal"], "data": run.options.data, "category": run.category,
                "seed": run.options.seed, "val_fraction": run.options.val_fraction},
        metrics=metrics, model_dir=staged / "model", artifacts=[],
        tags={"kind": "threshold", "registered_model": old.name, "from_version": str(old.version)},
        uri=opts.tracking_uri)
    if run_id is None:
        raise RaylibADError(f"the new threshold could not be logged to MLflow, so no version was registered; the "
                            f"model directory with it is at {staged / 'model'}")
    number = register_version(run_id, old.name, uri=opts.tracking_uri, alias=old.alias,
                              tags={"threshold_method": stats["threshold_method"], "from_version": str(old.version)})
    new = RegisteredVersion(old.name, number, run_id, "", old.alias)
    target = version_dir(new, uri=opts.tracking_uri)
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staged / "model"), str(target))  # the cache now holds the new version as registered
    shutil.rmtree(staged, ignore_errors=True)
    return {"model_dir": str(target), "mlflow_run_id": run_id,
            "registered": {"name": old.name, "version": number, "from_version": old.version, "alias": old.alias,
                           "uri": new.uri}}


def _threshold_line(result: dict[str, Any]) -> str:
    def rates(part: dict[str, Any]) -> str:
        recall = "n/a" if part["recall"] is None else f"{part['recall']:.3f} ({part['tp']}/{part['n_anomalous']})"
        fpr = "n/a" if part["fpr"] is None else f"{part['fpr']:.3f} ({part['fp']}/{part['n_normal']})"
        return f"recall {recall}, FPR {fpr}"

    goal = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in result["goal"].items())
    line = (f"[raylib_ad] threshold {result['threshold']:.6g} ({goal}): validation {rates(result['validation'])}; "
            f"held-out {rates(result['heldout'])}")
    registered = result.get("registered")
    if registered:
        moved = f", alias '{registered['alias']}' moved to it" if registered["alias"] else " (no alias moved)"
        line += f"\n[raylib_ad] registered {registered['uri']} from version {registered['from_version']}{moved}"
    else:
        line += f"\n[raylib_ad] written to {Path(result['model_dir']) / 'stats.json'}"
    return line
