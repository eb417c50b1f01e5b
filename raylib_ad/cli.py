"""The `raylib-ad` command: train, predict, models, export, evaluate, threshold, sweep, serve. jobs/*.py call the
same functions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raylib_ad.errors import RaylibADError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raylib-ad", description="Visual anomaly detection on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    from raylib_ad.options import add_train_arguments

    train = sub.add_parser("train", help="train and evaluate one model on one category")
    add_train_arguments(train)

    predict = sub.add_parser("predict", help="score images with a trained model directory: JSON lines in process, "
                             "or with --out a Parquet file written by a pool of model replicas on Ray Data")
    predict.add_argument("--model", required=True, help="model directory written by train (DIR/model), "
                         "models:/<name>@<alias> or models:/<name>/<version>")
    predict.add_argument("images", nargs="+", help="image files, folders (searched recursively), globs (quoted; "
                         "** recurses) or manifests (.csv/.parquet with a path column)")
    predict.add_argument("--maps", help="write anomaly-map PNGs into this folder")
    predict.add_argument("--device", default="cpu", help="in-process scoring only (with --out: --gpus-per-actor)")
    predict.add_argument("--batch-size", type=int, default=16)
    predict.add_argument("--out", metavar="FILE.parquet", help="score on Ray Data into this Parquet file (path, "
                         "score, normalized_score, is_anomalous, threshold, error, anomaly_map_file); resumable: "
                         "a rerun skips the images already written")
    predict.add_argument("--actors", type=int, default=1, help="--out: model replicas (Ray actors)")
    predict.add_argument("--gpus-per-actor", type=float, default=0.0, help="--out: GPUs per replica")
    predict.add_argument("--cpus-per-actor", type=float, help="--out: CPUs per replica (default: an even share "
                         "of the cluster's CPUs, a quarter kept for decoding; 1 with GPUs)")
    predict.add_argument("--local-ray", action="store_true", help="--out: start a private local Ray even when a "
                         "cluster is running")
    predict.add_argument("--no-progress", dest="progress", action="store_false")
    predict.add_argument("--verbose", action="store_true", help="--out: print Ray's own output too (it always goes "
                         "to FILE.parquet.ray.log)")

    models = sub.add_parser("models", help="list the available models; with a NAME, every setting of that model "
                            "(--set key=value) with its default and valid values")
    models.add_argument("name", nargs="?", help="a model name: list its settings")

    export = sub.add_parser("export", help="export a trained model for machines without torch (ONNX / OpenVINO); "
                            "raylib_ad.load, predict and serve run the export directory")
    export.add_argument("--model", required=True, help="model directory (DIR/model of a run) or models:/...")
    export.add_argument("--format", required=True, choices=["onnx", "openvino"],
                        help="onnx (onnxruntime) or openvino (OpenVINO IR)")
    export.add_argument("--half", action="store_true", help="store the weights in FP16 (half the size; computed "
                        "in FP32; looser parity bound, see README)")
    export.add_argument("--out", required=True, help="export directory to write")

    evaluate = sub.add_parser("evaluate", help="score a trained model on a dataset without training: the "
                              "metrics, plots and MLflow run of train")
    _add_evaluation_arguments(evaluate)
    evaluate.add_argument("--out", required=True, help="output directory (metrics.json, split.csv, plots)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    evaluate.add_argument("--experiment", default="raylib_ad", help="MLflow experiment name")
    evaluate.add_argument("--no-mlflow", dest="mlflow", action="store_false")

    threshold = sub.add_parser("threshold", help="fit the image threshold on the validation images for a recall "
                               "or false-positive-rate goal and write it into the model")
    _add_evaluation_arguments(threshold)
    goal = threshold.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-recall", type=float, metavar="R",
                      help="the highest threshold flagging at least R of the anomalous validation images")
    goal.add_argument("--target-fpr", type=float, metavar="F",
                      help="the lowest threshold flagging at most F of the normal validation images")
    goal.add_argument("--label-free", type=float, nargs="?", const=1.0, metavar="EPSILON",
                      help="the model's own threshold, which needs no labels (U-Flow with --set "
                           "anomaly_map_mode=nfa: -log10 NFA > -log10 EPSILON, default EPSILON 1: one false "
                           "detection expected per image); image and pixel decisions")
    threshold.add_argument("--experiment", default="raylib_ad",
                           help="MLflow experiment of the run behind a new registry version")

    from raylib_ad.tuning.arguments import add_sweep_arguments

    sweep = sub.add_parser("sweep", help="Tune sweep over categories x models; registers a champion per category")
    add_sweep_arguments(sweep)

    from raylib_ad.serving.cli import add_serve_arguments

    serve = sub.add_parser("serve", help="serve champion models / model directories over HTTP (Ray Serve)")
    add_serve_arguments(serve)

    args = parser.parse_args(argv)
    from raylib_ad.console import current as current_console

    earlier = current_console()  # a console this command installs is closed when it ends
    try:
        if args.command == "serve":
            from raylib_ad.serving.cli import run_serve

            return run_serve(args)
        if args.command == "train":
            return _train(args)
        if args.command == "predict":
            return _predict(args)
        if args.command == "models":
            return _models(args.name)
        if args.command == "export":
            return _export(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "threshold":
            return _threshold(args)
        if args.command == "sweep":
            from raylib_ad.tuning.sweep import main_sweep

            return main_sweep(args)
    except RaylibADError as err:
        _print_ray_log_tail(earlier)
        print(f"raylib-ad: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # Ctrl-C: one line, no traceback (nothing went wrong)
        said = str(interrupt)  # what the interrupted step left, where it says (scoring/batch.py)
        print(f"\nraylib-ad: interrupted{'; ' + said if said else _resume_hint(args)}", file=sys.stderr)
        return 130
    except BaseException:
        _print_ray_log_tail(earlier)
        raise
    finally:
        console = current_console()
        if console is not None and console is not earlier:
            console.close()
    return 1


def _resume_hint(args) -> str:
    """What an interrupted command left, where it matters."""
    if args.command == "predict" and getattr(args, "out", None):
        return (f"; the images scored so far are kept in {args.out}: the same command again scores only the "
                "rest")
    return ""


def _print_ray_log_tail(earlier=None, lines: int = 30) -> None:
    """On failure, the end of Ray's own output (workers, Ray Train), which the quiet console of this command
    kept in a file."""
    from raylib_ad.console import current

    console = current()
    if console is None or console is earlier or console.verbose:
        return
    tail = console.tail(lines)
    if tail:
        print(f"--- the last lines of Ray's output (all of it: {console.log_file}) ---\n{tail}\n---", file=sys.stderr)


def _train(args) -> int:
    from raylib_ad.options import options_from_args
    from raylib_ad.train.run import run_training

    metrics = run_training(options_from_args(args))
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}))
    return 0


def _add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, the data (as for train; omitted ones: those the model was trained on) and the split."""
    parser.add_argument("--model", required=True,
                        help="model directory (DIR/model of a run), models:/<name>@<alias> or "
                             "models:/<name>/<version>")
    parser.add_argument("--data", choices=["mvtec", "folder", "magnetic_tile", "synthetic",
                                           "synthetic_video", "ucsd_ped2", "avenue", "shanghaitech"],
                        help="default: the data the model was trained on (its stats.json)")
    parser.add_argument("--root", help="dataset root folder (default: the training run's)")
    parser.add_argument("--category", help="category (default: the training run's, with the same --data)")
    parser.add_argument("--split-file", help="CSV split file (split,label,defect,image,mask), VisA-style "
                        "(default: the training run's)")
    parser.add_argument("--normal-dir", help="--data folder: folder of normal images (relative to --root)")
    parser.add_argument("--abnormal-dir", help="--data folder: folder of anomalous images")
    parser.add_argument("--mask-dir", help="--data folder: folder of masks")
    parser.add_argument("--seed", type=int, help="split seed (default: the training run's, so that the "
                        "validation subset and held-out images are the training run's)")
    parser.add_argument("--val-fraction", type=float,
                        help="share of the test split carved out (seeded) as the validation subset (default: "
                             "the training run's, else 0.3)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def _evaluation_options(args):
    from dataclasses import fields

    from raylib_ad.train.evaluate import EvaluationOptions

    names = {f.name for f in fields(EvaluationOptions)}
    return EvaluationOptions(**{k: v for k, v in vars(args).items() if k in names})


def _evaluate(args) -> int:
    from raylib_ad.train.evaluate import run_evaluation

    metrics = run_evaluation(_evaluation_options(args))
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}))
    return 0


def _threshold(args) -> int:
    from raylib_ad.train.evaluate import run_threshold

    result = run_threshold(_evaluation_options(args), target_recall=args.target_recall, target_fpr=args.target_fpr,
                           label_free=args.label_free)
    print(json.dumps(result))
    return 0


def _predict(args) -> int:
    from raylib_ad.artifact import load
    from raylib_ad.errors import ConfigError
    from raylib_ad.scoring.inputs import expand_inputs

    for name in ("batch_size", "actors"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    paths = expand_inputs(args.images)  # a folder or glob matching nothing fails here, before any model loads
    if args.out is None:
        return _predict_in_process(load(args.model, device=args.device), paths, args)
    from raylib_ad.scoring.batch import score_to_parquet
    from raylib_ad.scoring.pipeline import ReplicaPool
    from raylib_ad.train.ray_setup import ensure_ray

    trained = load(args.model)  # fails here on a bad model, before Ray starts
    from raylib_ad.console import install_console

    # Ray's own output (Ray Data, the replicas) beside the Parquet file; the console keeps the bar and summary.
    console = install_console(Path(f"{args.out}.ray.log"), verbose=args.verbose, progress=args.progress)
    ensure_ray(local=args.local_ray)
    console.attach_ray()
    pool = ReplicaPool(actors=args.actors, cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor)
    summary = score_to_parquet(trained, paths, args.out, maps_dir=args.maps, pool=pool, batch_size=args.batch_size,
                               progress=args.progress)
    if summary["errors"]:
        print(f"raylib-ad: {summary['errors']} of {summary['scored']} images could not be read; their rows in "
              f"{args.out} carry the reason in the error column", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def _predict_in_process(trained, paths: list[str], args) -> int:
    from raylib_ad.artifact import PREDICTION_FIELDS
    from raylib_ad.postprocess.plots import anomaly_map_png, image_size

    maps_dir = Path(args.maps) if args.maps else None
    if maps_dir:
        maps_dir.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(paths), args.batch_size):
        batch = paths[start : start + args.batch_size]
        for path, result in zip(batch, trained.predict(batch, with_maps=maps_dir is not None)):
            # The same field names as TrainedModel.predict and the HTTP API (README.md, "Outputs").
            line = {"path": path, **{name: result[name] for name in PREDICTION_FIELDS}}
            if "boxes" in result:
                line["boxes"] = result["boxes"]
            if maps_dir is not None and result.get("normalized_map") is not None:
                png = maps_dir / f"{Path(path).stem}_map.png"
                # at the image's own size, the deployment threshold (0.5 once normalized) outlined
                png.write_bytes(anomaly_map_png(result["normalized_map"], vmin=0.0, vmax=1.0,
                                                size=image_size(path), threshold=0.5))
                line["anomaly_map_file"] = str(png)
            print(json.dumps(line), flush=True)
    return 0


def _export(args) -> int:
    from raylib_ad.export import export_model

    out = export_model(args.model, fmt=args.format, out_dir=args.out, half=args.half)
    meta = json.loads((out / "export.json").read_text())
    print(json.dumps({"export_dir": str(out), "model": meta["model"], "format": meta["format"], "half": meta["half"],
                      "parity": meta["parity"]}))
    return 0


def _models(name: str | None = None) -> int:
    from raylib_ad.models import list_models, model_class

    if name:
        print(_model_settings(model_class(name)))
        return 0
    for name in list_models():
        cls = model_class(name)
        training = f"{cls.default_epochs} epochs" if cls.trains_by_gradient() else "one pass or none"
        print(f"{name:22s} {training:18s} backbone={cls.default_backbone} layers={list(cls.default_layers)}")
    return 0


def _model_settings(cls) -> str:
    """`raylib-ad models NAME`: the model's training defaults and every --set key, its default and range."""
    from raylib_ad.models.base import setting_ranges

    ranges = setting_ranges(cls)
    training = f"{cls.default_epochs} epochs" if cls.trains_by_gradient() else "one pass or none (no epochs)"
    lines = [f"{cls.name}: {training}; backbone {cls.default_backbone} (--backbone), layers "
             f"{list(cls.default_layers)} (--layers)"]
    if cls.default_batch_size:
        lines.append(f"default --batch-size {cls.default_batch_size}")
    if cls.default_patience:
        lines.append(f"default --patience {cls.default_patience}")
    rows = [(key, json.dumps(value), ranges.get(key, "not range-checked: a value of the default's type"))
            for key, value in sorted(cls.defaults.items())]
    if cls.default_backbone is not None or "pretrained" in cls.defaults:
        rows += [("pretrained", "true", "true or false (false: random weights, offline)"),
                 ("weights", "null", "a local weights file for the backbone")]
    if not rows:
        lines.append("no settings")
        return "\n".join(lines)
    width = max(len(k) for k, _, _ in rows)
    shown = max(len("default"), *(len(d) for _, d, _ in rows))
    lines.append(f"settings (--set key=value):\n  {'key':<{width}}  {'default':<{shown}}  valid")
    lines += [f"  {key:<{width}}  {default:<{shown}}  {valid}" for key, default, valid in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
