"""One sweep trial as a Ray Tune function trainable: a full training run through raylib_ad.train.run.

This and sweep.py's Tuner setup are the sweep's only Ray glue. Each trial is a Tune trial whose function
drives its own Ray Train run (Train V2's way of combining the two): gradient trials forward every
epoch's report to Tune through ray.tune.integration.ray_train.TuneReportCallback, so ASHA can stop them
early; every trial ends with one report of its validation metrics and the path of its model directory.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from raylib_ad.models import model_class
from raylib_ad.options import CONSTRUCTION_KEYS, TrainOptions

RESULT_FILE = "result.json"
LAST_RESULT_FILE = "last_result.json"  # the latest report Tune saw (tuning/scheduler.py LastResultCallback)
STARTS_FILE = "starts.log"


def trial_dir(out: str | Path, key: str) -> Path:
    return Path(out) / "trials" / key


def trial_options(base: TrainOptions, trial: dict[str, Any], out: str | Path) -> TrainOptions:
    """The sweep's shared options with this trial's model, category and sampled parameters. Sweep-wide
    `--set` values reach only the models that know them (sweep.py refuses keys no model knows)."""
    cls = model_class(trial["model"])
    params = dict(trial["params"])
    settings = {k: v for k, v in base.settings.items() if k in cls.defaults or k in CONSTRUCTION_KEYS}
    layers = params.pop("layers", None) or base.layers
    epochs = params.pop("epochs", None) or base.max_epochs
    settings.update(params)
    return replace(base, model=cls.name, category=trial["category"], layers=layers, max_epochs=epochs,
                   settings=settings, out=str(trial_dir(out, trial["key"])), mlflow=False, progress=False)


RECORD_ONLY = ("params", "backbone", "layers", "settings", "history", "epochs")  # result.json, not reported


def _finished_record(directory: Path, key: str) -> dict[str, Any] | None:
    """The trial's result.json when it finished earlier (its model directory still there), else None."""
    try:
        record = json.loads((directory / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    model_dir = Path(str(record.get("model_dir", "")))
    if record.get("trial_key") != key or not (model_dir / "config.json").is_file():
        return None
    return record


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable. config: {"trial": Trial.to_dict(), "base": TrainOptions dict, "out": DIR}."""
    import ray
    import ray.data
    from ray import tune

    from raylib_ad.train.run import fit_and_validate

    # Reproducible trials: with the images always in the same order, a trial's float sums (moments,
    # gradients) are the same wherever and whenever it runs — on one node or several, first run or resume.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    trial = config["trial"]
    options = trial_options(TrainOptions(**config["base"]), trial, config["out"])
    directory = Path(options.out)
    directory.mkdir(parents=True, exist_ok=True)
    done = _finished_record(directory, trial["key"])
    if done is not None:
        # Finished before an interruption that came before Tune saved its state: report, do not refit.
        tune.report({k: v for k, v in done.items() if k not in RECORD_ONLY})
        return
    with open(directory / STARTS_FILE, "a") as log:  # one line per start: proves a resume re-ran nothing
        log.write(f"{time.time():.3f}\n")
    callbacks = None
    if model_class(trial["model"]).trains_by_gradient():
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks = [TuneReportCallback()]
    start = time.perf_counter()
    fit = fit_and_validate(options, callbacks=callbacks, validate_data=False)
    worker = fit["worker_metrics"]
    result = {
        "trial_key": trial["key"], "category": trial["category"], "model": trial["model"],
        **fit["val"], "model_dir": fit["model_dir"], "fit_seconds": fit["fit_seconds"],
        "trial_seconds": time.perf_counter() - start, "n_validation": fit["n_validation"],
        "trial_node_id": ray.get_runtime_context().get_node_id(),
        # Rank 0's node, where the model was fitted (memory-bank runs report it; else the trial's node).
        "worker_node_id": worker.get("node_id", ray.get_runtime_context().get_node_id()),
    }
    record = {**result, "params": trial["params"], "backbone": fit["backbone"], "layers": fit["layers"],
              "settings": fit["settings"], "history": fit["history"], "epochs": len(fit["history"]) or None}
    tmp = directory / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=_jsonable))
    tmp.replace(directory / RESULT_FILE)  # atomic: a result file is always whole
    tune.report(result)


def _jsonable(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
