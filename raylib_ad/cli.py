"""The `raylib-ad` command: train, predict, models, evaluate, threshold, sweep, serve. jobs/*.py call the
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

    predict = sub.add_parser("predict", help="score images with a trained model directory")
    predict.add_argument("--model", required=True, help="model directory written by train (DIR/model)")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--maps", help="write anomaly-map PNGs into this folder")
    predict.add_argument("--device", default="cpu")
    predict.add_argument("--batch-size", type=int, default=16)

    sub.add_parser("models", help="list the available models")

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
    threshold.add_argument("--experiment", default="raylib_ad",
                           help="MLflow experiment of the run behind a new registry version")

    from raylib_ad.tuning.arguments import add_sweep_arguments

    sweep = sub.add_parser("sweep", help="Tune sweep over categories x models; registers a champion per category")
    add_sweep_arguments(sweep)

    from raylib_ad.serving.cli import add_serve_arguments

    serve = sub.add_parser("serve", help="serve champion models / model directories over HTTP (Ray Serve)")
    add_serve_arguments(serve)

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            from raylib_ad.serving.cli import run_serve

            return run_serve(args)
        if args.command == "train":
            return _train(args)
        if args.command == "predict":
            return _predict(args)
        if args.command == "models":
            return _models()
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "threshold":
            return _threshold(args)
        if args.command == "sweep":
            from raylib_ad.tuning.sweep import main_sweep

            return main_sweep(args)
    except RaylibADError as err:
        print(f"raylib-ad: error: {err}", file=sys.stderr)
        return 2
    return 1


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
    parser.add_argument("--data", choices=["mvtec", "folder", "magnetic_tile", "synthetic"],
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

    result = run_threshold(_evaluation_options(args), target_recall=args.target_recall, target_fpr=args.target_fpr)
    print(json.dumps(result))
    return 0


def _predict(args) -> int:
    from raylib_ad.artifact import PREDICTION_FIELDS, load
    from raylib_ad.postprocess.plots import anomaly_map_png

    trained = load(args.model, device=args.device)
    maps_dir = Path(args.maps) if args.maps else None
    if maps_dir:
        maps_dir.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start : start + args.batch_size]
        for path, result in zip(paths, trained.predict(paths, with_maps=maps_dir is not None)):
            # The same field names as TrainedModel.predict and the HTTP API (README.md, "Outputs").
            line = {"path": path, **{name: result[name] for name in PREDICTION_FIELDS}}
            if maps_dir is not None and result.get("normalized_map") is not None:
                png = maps_dir / f"{Path(path).stem}_map.png"
                png.write_bytes(anomaly_map_png(result["normalized_map"], vmin=0.0, vmax=1.0))
                line["anomaly_map_file"] = str(png)
            print(json.dumps(line), flush=True)
    return 0


def _models() -> int:
    from raylib_ad.models import list_models, model_class

    for name in list_models():
        cls = model_class(name)
        training = f"{cls.default_epochs} epochs" if cls.trains_by_gradient() else "one pass or none"
        print(f"{name:22s} {training:18s} backbone={cls.default_backbone} layers={list(cls.default_layers)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
