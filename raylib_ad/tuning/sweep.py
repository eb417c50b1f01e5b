"""`raylib-ad sweep`: one Ray Tune experiment over categories x models x search space, then one champion
per category, registered in MLflow.

What happens, in order:
1. plan: every trial is drawn up front (tuning/space.py) and written to DIR/plan.json; the data of every
   category is validated once, before any worker starts;
2. tune: the planned trials run as one Tune grid (tuning/trial.py); each scores only the validation
   subset carved from its category's test split; ASHA stops weak gradient trials within their
   (category, model) group (tuning/scheduler.py). The experiment lives in DIR/tune/sweep: running the
   same command again restores it (Tuner.restore) and runs only the trials that never finished;
3. select: per category, the trial with the best validation image AUROC (ties: validation pixel AUPRO);
4. test: each model's best trial per category (the winner among them) and each model's default trial
   (sample 0, for the comparison with the defaults; never used to select) are scored ONCE on the
   held-out test images; the results are cached in DIR/test_metrics.json so a re-run never rescores;
5. record: a parent MLflow run with one nested run per trial, the winner registered as
   raylib_ad-<dataset>-<category> with alias `champion`, DIR/summary.{csv,md}, the bar chart, and
   DIR/champions.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from raylib_ad.errors import ConfigError
from raylib_ad.models import model_class
from raylib_ad.options import CONSTRUCTION_KEYS, DEFAULT_CATEGORY
from raylib_ad.outdir import link_tree
from raylib_ad.tuning.space import (
    Trial,
    check_space,
    default_space,
    load_space_file,
    plan_trials,
)
from raylib_ad.tuning.arguments import SweepOptions
from raylib_ad.tuning.trial import LAST_RESULT_FILE, RESULT_FILE, trial_dir, trial_options

SELECT_METRIC, TIE_BREAK = "val_image_auroc", "val_pixel_aupro"
EXPERIMENT_NAME = "sweep"
# Options that do not change what a trial computes; a resume may differ in them.
_VOLATILE = ("out", "experiment", "mlflow", "progress", "cpus_per_worker")


def resolve_categories(categories: list[str] | None, data: str) -> list[str]:
    """'all' = every category of the dataset kind (MVTec AD's 15, VisA's 12, ...; synthetic generates any
    name and borrows MVTec AD's)."""
    from raylib_ad.data import dataset_categories

    if not categories:
        if data in DEFAULT_CATEGORY:
            return [DEFAULT_CATEGORY[data]]
        raise ConfigError(f"--categories is required for --data {data} (a list, or 'all')")
    if categories == ["all"]:
        return list(dataset_categories(data))
    return list(dict.fromkeys(categories))


def _check_settings(settings: dict[str, Any], models: list[str]) -> None:
    known = set(CONSTRUCTION_KEYS)
    for name in models:
        known |= set(model_class(name).defaults)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"--set {unknown}: no swept model ({', '.join(models)}) has such a setting")


def make_plan(opts: SweepOptions) -> tuple[list[str], list[str], list[Trial], dict[str, Any]]:
    models = list(dict.fromkeys(model_class(m).name for m in opts.models))
    categories = resolve_categories(opts.categories, opts.base.data)
    file_spaces = load_space_file(opts.search_space) if opts.search_space else {}
    spaces, where = {}, {}
    for name in models:
        where[name] = f"search space file {opts.search_space}" if name in file_spaces else "default search space"
        spaces[name] = file_spaces[name] if name in file_spaces else default_space(name)
        check_space(name, spaces[name], where[name])
    _check_settings(opts.base.settings, models)
    if opts.scheduler not in ("asha", "fifo"):
        raise ConfigError(f"--scheduler must be 'asha' or 'fifo', got '{opts.scheduler}'")
    trials = plan_trials(models, categories, opts.num_samples, seed=opts.base.seed, spaces=spaces,
                         backbone=opts.base.backbone, fixed_epochs=opts.base.max_epochs, where=where)
    base = {k: v for k, v in opts.base.to_dict().items() if k not in _VOLATILE}
    plan = {"models": models, "categories": categories, "num_samples": opts.num_samples, "spaces": spaces,
            "scheduler": opts.scheduler, "base": base, "trials": [t.to_dict() for t in trials]}
    return models, categories, trials, json.loads(json.dumps(plan, default=str))


def run_sweep(opts: SweepOptions) -> dict[str, Any]:
    from raylib_ad.train.run import prepare

    out = Path(opts.out).resolve()
    # Trials run in other processes (other nodes, Tune's own working directories): absolute paths only.
    paths = {k: str(Path(getattr(opts.base, k)).resolve()) for k in ("root", "split_file", "weights")
             if getattr(opts.base, k)}
    opts = replace(opts, base=replace(opts.base, **paths))
    models, categories, trials, plan = make_plan(opts)
    plan_path = out / "plan.json"
    if plan_path.is_file() and json.loads(plan_path.read_text()) != plan:
        raise ConfigError(f"{plan_path} describes a different sweep; resume with the same arguments, or use a "
                          f"new --out")
    for category in categories:  # bad data fails here, once, not in every trial
        prepare(replace(opts.base, model=models[0], category=category), validate=True)
    out.mkdir(parents=True, exist_ok=True)
    plan_path.write_text(json.dumps(plan, indent=2))
    from raylib_ad.console import install_console

    console = install_console(out / "ray.log", verbose=opts.base.verbose, progress=opts.base.progress)
    print(f"[raylib_ad] Ray's and Tune's own output goes to {console.log_file} (--verbose prints it too)",
          file=sys.stderr)
    print(f"[raylib_ad] sweep: {len(trials)} trials ({len(categories)} categories x {len(models)} models x "
          f"{opts.num_samples} samples) -> {out}", file=sys.stderr)

    start = time.perf_counter()
    statuses = _tune(opts, trials, out)
    rows = _collect(trials, statuses, out)
    unfinished = [r["trial"] for r in rows if r["status"] in ("pending", "running")]
    if unfinished:
        raise RuntimeError(f"the sweep stopped with {len(unfinished)} trials unfinished ({unfinished[:5]}...); "
                           f"run the same command again to resume")
    champions = _select_and_test(opts, rows, out)
    result = _record(opts, plan, rows, champions, out, time.perf_counter() - start)
    console.close()
    return result


# --- Ray Tune -------------------------------------------------------------------------------------------


def _tune(opts: SweepOptions, trials: list[Trial], out: Path) -> dict[str, dict[str, Any]]:
    """Run (or resume) the Tune experiment; returns {trial key: {"status", "metrics", "error"}}."""
    from ray import tune

    from raylib_ad.train.ray_setup import cluster_cpus, ensure_ray
    from raylib_ad.train.resources import cpus_per_worker
    from raylib_ad.tuning.scheduler import LastResultCallback
    from raylib_ad.tuning.trial import run_trial

    ensure_ray(local=opts.base.local_ray)
    import ray

    from raylib_ad.console import current as current_console

    if current_console() is not None:
        current_console().attach_ray()

    total_cpus = cluster_cpus()
    workers = opts.base.workers
    cpw = opts.base.cpus_per_worker or cpus_per_worker(total_cpus, workers, spread=False)  # trials side by side
    base = replace(opts.base, cpus_per_worker=cpw, gpus_per_worker=opts.gpus_per_trial / max(workers, 1))
    # Trials in flight: their Train workers must leave one CPU to Ray Data's decode tasks, or every
    # trial waits for its dataset forever (docs/design.md, "Small machines").
    concurrent = opts.max_concurrent or max(1, int((total_cpus - 1) // (workers * cpw)))
    if opts.gpus_per_trial > 0:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        if gpus < opts.gpus_per_trial:
            raise ConfigError(f"--gpus-per-trial {opts.gpus_per_trial}: the cluster has {gpus} GPUs")
        concurrent = min(concurrent, int(gpus // opts.gpus_per_trial))
    # The trial's own actor only waits on its Train run, then scores the validation images: a token CPU
    # share, so it never takes a CPU the Train workers or the decode tasks need (Tune refuses 0).
    trainable = tune.with_resources(run_trial, {"CPU": 0.01})
    path = out / "tune" / EXPERIMENT_NAME
    if tune.Tuner.can_restore(str(path)):
        print(f"[raylib_ad] resuming the sweep in {path}", file=sys.stderr)
        tuner = tune.Tuner.restore(str(path), trainable=trainable)
    else:
        gradient = tuple(sorted({t.model for t in trials if model_class(t.model).trains_by_gradient()}))
        scheduler = None
        if opts.scheduler == "asha" and gradient:
            from raylib_ad.tuning.scheduler import GroupedASHA

            epochs = [t.params.get("epochs") or opts.base.max_epochs or model_class(t.model).default_epochs
                      for t in trials if t.model in gradient]
            # +1: after its last epoch a trial makes one more report, its full validation.
            scheduler = GroupedASHA(metric=SELECT_METRIC, mode="max", max_t=max(epochs) + 1,
                                    grace_period=opts.asha_grace_period, gradient_models=gradient)
        base_dict = {k: v for k, v in asdict(base).items()}
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([t.to_dict() for t in trials]), "base": base_dict,
                         "out": str(out)},
            # reuse_actors: a trial's process (torch, timm, Ray Data imported) serves the next trial too.
            tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=concurrent, reuse_actors=True,
                                        trial_dirname_creator=lambda t: t.config["trial"]["key"]),
            run_config=tune.RunConfig(name=EXPERIMENT_NAME, storage_path=str(out / "tune"),
                                      # The trials bar (LastResultCallback) replaces Tune's status tables.
                                      verbose=1 if opts.base.verbose else 0,
                                      callbacks=[LastResultCallback(str(out), len(trials), opts.base.progress)],
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    grid = tuner.fit()
    statuses = {}
    for result in grid:
        key = result.config["trial"]["key"]
        statuses[key] = {"metrics": dict(result.metrics or {}),
                         "error": None if result.error is None else f"{type(result.error).__name__}: "
                                                                     f"{str(result.error).splitlines()[0][:300]}"}
    return statuses


# --- selection, test, records -----------------------------------------------------------------------------


def _collect(trials: list[Trial], statuses: dict[str, dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    rows = []
    for trial in trials:
        row = {"trial": trial.key, "category": trial.category, "model": trial.model, "index": trial.index,
               "params": trial.params, "role": ""}
        result_file = trial_dir(out, trial.key) / RESULT_FILE
        status = statuses.get(trial.key)
        if result_file.is_file():
            record = json.loads(result_file.read_text())
            row.update({k: v for k, v in record.items() if k not in ("params",)})
            row["status"] = "finished"
        elif status and status["error"]:
            row["status"] = f"error: {status['error']}"
        elif status:
            last = trial_dir(out, trial.key) / LAST_RESULT_FILE  # written by LastResult, in the driver
            status["metrics"] = {**json.loads(last.read_text()), **status["metrics"]} if last.is_file() else {}
            epochs = status["metrics"].get("epoch")
            row["status"] = "stopped early (ASHA)" + (f" after epoch {int(epochs)}" if epochs is not None else "")
            for key in ("val_image_auroc", "val_pixel_auroc"):
                if key in status["metrics"]:
                    row[key] = status["metrics"][key]
        else:
            row["status"] = "pending"
        rows.append(row)
    return rows


def _rank(row: dict[str, Any]) -> tuple[float, float]:
    def value(key):
        v = row.get(key)
        return -math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    return value(SELECT_METRIC), value(TIE_BREAK)


# What a winner's held-out test yields (train/run.py test_on_heldout): the names `raylib-ad train` uses.
HELDOUT_KEYS = ("image_auroc", "image_f1_max", "pixel_auroc", "pixel_aupro", "image_f1", "image_precision",
                "image_recall", "n_test_heldout")


def _select_and_test(opts: SweepOptions, rows: list[dict[str, Any]], out: Path) -> dict[str, dict[str, Any]]:
    """Winners by validation metrics; test scoring (once, cached) of each model's best and default trial."""
    from raylib_ad.train.run import test_on_heldout

    finished = [r for r in rows if r["status"] == "finished"]
    cache_path = out / "test_metrics.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    for category in dict.fromkeys(r["category"] for r in rows):
        for model in dict.fromkeys(r["model"] for r in rows):
            group = [r for r in finished if r["category"] == category and r["model"] == model]
            if not group:
                continue
            best = max(group, key=_rank)
            best["role"] = "best of model"
            for row in group:
                if row["index"] == 0:
                    row["role"] = (row["role"] + ", default").strip(", ")
            for row in {id(best): best, **{id(r): r for r in group if r["index"] == 0}}.values():
                if row["trial"] not in cache:
                    planned = {"key": row["trial"], "category": category, "model": model, "params": row["params"]}
                    options = trial_options(opts.base, planned, out)
                    options = replace(options, progress=opts.base.progress)
                    cache[row["trial"]] = test_on_heldout(options, row["model_dir"])
                    cache_path.write_text(json.dumps(cache, indent=2))
                row.update(cache[row["trial"]])
    champions = {}
    for category in dict.fromkeys(r["category"] for r in rows):
        group = [r for r in finished if r["category"] == category]
        if not group:
            print(f"[raylib_ad] no trial of category {category} finished; no champion", file=sys.stderr)
            continue
        winner = max(group, key=_rank)
        winner["role"] = "champion, " + winner["role"]
        default = next((r for r in group if r["index"] == 0 and r["model"] == winner["model"]), None)
        champions[category] = {"row": winner, "default_row": default}
    return champions


def _record(opts: SweepOptions, plan: dict[str, Any], rows: list[dict[str, Any]],
            champions: dict[str, dict[str, Any]], out: Path, seconds: float) -> dict[str, Any]:
    from raylib_ad.tuning.report import plot_test_auroc, write_summary

    state_path = out / "mlflow_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"trial_runs": {}, "champions": {}}
    save = lambda: state_path.write_text(json.dumps(state, indent=2))  # noqa: E731
    if opts.base.mlflow:
        _log_mlflow(opts, plan, rows, champions, state, save)

    summary = write_summary(rows, out)
    best = {(r["category"], r["model"]): r["image_auroc"] for r in rows
            if "best of model" in r["role"] and "image_auroc" in r}
    chart = plot_test_auroc(best, out) if best else None
    table = {}
    for category, entry in champions.items():
        row, default = entry["row"], entry["default_row"]
        champion_dir = out / "champions" / category / "model"
        link_tree(row["model_dir"], champion_dir)  # hard links: the champion costs no second copy on disk
        table[category] = {
            "model": row["model"], "trial": row["trial"], "params": row["params"], "layers": row.get("layers"),
            "settings": row.get("settings"), "version": state["champions"].get(category),
            "registered_model": f"raylib_ad-{opts.base.data}-{category}",
            "mlflow_run_id": state["trial_runs"].get(row["trial"]),
            "validation": {k: row[k] for k in row if k.startswith("val_")},
            "test": {k: row[k] for k in HELDOUT_KEYS if k in row},
            "default_trial_test": None if default is None else {k: default[k] for k in HELDOUT_KEYS if k in default},
            "model_dir": str(champion_dir),
        }
    champions_path = out / "champions.json"
    champions_path.write_text(json.dumps(table, indent=2, default=str))
    if opts.base.mlflow and state.get("parent_run_id"):
        from raylib_ad.tracking.mlflow_run import log_to_run

        metrics = {f"{c}.champion_image_auroc": t["test"]["image_auroc"] for c, t in table.items()}
        log_to_run(state["parent_run_id"], metrics={**metrics, "sweep_seconds": seconds},
                   artifacts=[*summary, champions_path, *([chart] if chart else [])])
    print(f"[raylib_ad] sweep done in {seconds:.0f} s: {len(table)} champions; {out / 'summary.md'}", file=sys.stderr)
    return {"champions": table, "rows": rows, "seconds": seconds, "summary": [str(p) for p in summary],
            "chart": str(chart) if chart else None, "parent_run_id": state.get("parent_run_id")}


def _log_mlflow(opts, plan, rows, champions, state, save) -> None:
    """Parent run, one nested run per trial (each logged once, even across resumes), champions registered."""
    from raylib_ad.tracking.mlflow_run import log_training_run, start_parent_run
    from raylib_ad.tracking.registry import register_champion

    if not state.get("parent_run_id"):
        state["parent_run_id"] = start_parent_run(
            experiment=opts.base.experiment, run_name=f"sweep-{opts.base.data}-{len(rows)}-trials",
            params={"models": plan["models"], "categories": plan["categories"], "num_samples": plan["num_samples"],
                    "scheduler": plan["scheduler"], "search_space": opts.search_space or "default",
                    "data": opts.base.data, "backbone": opts.base.backbone, "image_size": opts.base.image_size},
            tags={"raylib_ad.kind": "sweep", "dataset": opts.base.data})
        save()
    parent = state["parent_run_id"]
    if not parent:
        return
    for row in rows:
        if row["trial"] in state["trial_runs"]:
            continue
        # Scored on the held-out images (each model's best and default trial): those carry the model, so
        # that a registered champion can be loaded (models:/...); the others log metrics only.
        tested = "n_test_heldout" in row
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and (k.startswith("val_") or k in HELDOUT_KEYS or k in ("fit_seconds", "trial_seconds", "epochs"))}
        run_id = log_training_run(
            experiment=opts.base.experiment, run_name=row["trial"], parent_run_id=parent,
            params={"category": row["category"], "model": row["model"], "trial": row["trial"],
                    "sampled": row["params"], "backbone": row.get("backbone"), "layers": row.get("layers"),
                    "settings": row.get("settings")},
            metrics=metrics, model_dir=row["model_dir"] if tested else None, artifacts=[],
            history=row.get("history"),
            tags={"model": row["model"], "dataset": opts.base.data, "category": row["category"],
                  "status": row["status"], "role": row["role"], "raylib_ad.kind": "sweep-trial",
                  "worker_node_id": str(row.get("worker_node_id", ""))})
        if run_id:
            state["trial_runs"][row["trial"]] = run_id
            save()
    for category, entry in champions.items():
        run_id = state["trial_runs"].get(entry["row"]["trial"])
        if run_id and category not in state["champions"]:
            state["champions"][category] = register_champion(run_id, opts.base.data, category,
                                                             tags={"trial": entry["row"]["trial"]})
            save()


# --- command line (flags in tuning/arguments.py, which imports nothing heavy) ------------------------------


def main_sweep(args: argparse.Namespace) -> int:
    from raylib_ad.tuning.arguments import options_from_args

    result = run_sweep(options_from_args(args))
    print(json.dumps({c: {"model": t["model"], "version": t["version"], **t["test"]}
                      for c, t in result["champions"].items()}))
    return 0
