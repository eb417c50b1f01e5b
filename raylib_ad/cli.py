"""The `raylib-ad` command: train, predict, models, sweep. jobs/*.py call the same functions."""

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
