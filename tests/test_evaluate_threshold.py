"""`raylib-ad evaluate` and `raylib-ad threshold` on a small PaDiM fitted in process (no Ray), from a model
directory and from the MLflow registry (a sqlite store in tmp_path)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from raylib_ad.cli import main
from raylib_ad.errors import ConfigError, DataError
from raylib_ad.postprocess.threshold import fpr_threshold, recall_threshold

REGISTERED = "raylib_ad-synthetic-widget"


def _options(root, **extra):
    from raylib_ad.options import TrainOptions

    return TrainOptions(model="padim", root=str(root), backbone="resnet18", image_size=64,
                        settings={"pretrained": False}, progress=False, **extra)


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    """A model directory as `raylib-ad train` leaves it: weights, and stats.json fitted on the validation
    subset of synthetic/widget (seed 0, val fraction 0.3)."""
    import torch

    from raylib_ad.artifact import write_model_dir
    from raylib_ad.evaluation import score_split
    from raylib_ad.models import create_model
    from raylib_ad.postprocess.report import evaluation_report
    from raylib_ad.train.evaluate import deployment_stats
    from raylib_ad.train.prepare import prepare
    from raylib_ad.train.in_process import fit_in_process

    torch.manual_seed(0)
    options = _options(synthetic_root)
    run = prepare(options, quiet=True)
    model = fit_in_process(create_model("padim", **run.model_kwargs), run.train_rows, batch_size=8).model
    scored = score_split(model, run.test_rows, batch_size=32, progress=False)
    report = evaluation_report(scored.labels, scored.scores, scored.masks, scored.maps, val_idx=run.val_idx,
                               heldout_idx=run.heldout_idx)
    stats = deployment_stats(report, report["metrics"], options, run.category)
    return write_model_dir(model, tmp_path_factory.mktemp("trained") / "model", stats)


@pytest.fixture
def model_dir(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "model")


@pytest.fixture(scope="module")
def registry(trained, tmp_path_factory):
    """One sqlite store for the module (creating one costs seconds): the trained directory registered as
    version 1 of raylib_ad-synthetic-widget with the aliases `champion` (read by the tests) and
    `candidate` (moved by the threshold test)."""
    import mlflow
    from mlflow import MlflowClient

    from raylib_ad.tracking.registry import register_champion

    home = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(home)  # the sqlite store keeps artifacts under ./mlruns
        patch.setenv("RAYLIB_AD_CACHE", str(home / "cache"))
        uri = f"sqlite:///{home / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("train")
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(trained), artifact_path="model")
        assert register_champion(run.info.run_id, "synthetic", "widget", uri=uri) == 1
        MlflowClient(tracking_uri=uri).set_registered_model_alias(REGISTERED, "candidate", "1")
        yield uri


def _run(capsys, *argv) -> dict:
    assert main([*argv, "--no-progress", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_evaluate_writes_the_held_out_metrics_of_evaluate_on_test(trained, synthetic_root, tmp_path, capsys):
    from raylib_ad.artifact import read_model
    from raylib_ad.train.outputs import evaluate_on_test
    from raylib_ad.train.prepare import prepare

    # --data/--root/--category/--seed omitted: those the model was trained on (its stats.json, config.json)
    _run(capsys, "evaluate", "--model", str(trained), "--out", str(tmp_path / "ev"), "--no-mlflow")
    written = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    run = prepare(_options(synthetic_root), quiet=True)
    (tmp_path / "ref").mkdir()
    expected = evaluate_on_test(read_model(trained), run, tmp_path / "ref", batch_size=32, progress=False)
    for key, value in expected["metrics"].items():
        if key != "test_images_per_second":
            assert written[key] == pytest.approx(value, abs=1e-6), key
    assert written["at_threshold"]["confusion"]["matrix"] == expected["at_threshold"]["confusion"]["matrix"]
    # the same images play the same roles as in training, and the plots are there
    with open(tmp_path / "ev" / "split.csv") as handle:
        roles = {row["path"]: row["role"] for row in csv.DictReader(handle)}
    assert sorted(p for p, r in roles.items() if r == "validation") == sorted(run.val_rows.column("path").to_pylist())
    assert {"roc.png", "threshold.png", "heatmaps.png"} <= {p.name for p in (tmp_path / "ev").iterdir()}
    # the deployed threshold (stats.json) was fitted on the same validation subset: the same operating point
    deployed = json.loads((trained / "stats.json").read_text())["image_stats"]["threshold"]
    assert written["deployed_image_threshold"] == pytest.approx(deployed)
    assert written["deployed_image_tpr"] == pytest.approx(written["image_tpr"])
    assert written["model"]["source"] == str(trained)
    # an earlier evaluation is not overwritten by surprise
    assert main(["evaluate", "--model", str(trained), "--out", str(tmp_path / "ev"), "--no-mlflow"]) == 2


def test_evaluate_and_load_a_registered_model(registry, trained, tmp_path, capsys, monkeypatch, synthetic_root):
    import raylib_ad
    from mlflow import MlflowClient

    printed = _run(capsys, "evaluate", "--model", f"models:/{REGISTERED}@champion", "--tracking-uri", registry,
                   "--out", str(tmp_path / "ev"), "--experiment", "qc")
    written = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert written["model"]["registered"] == {"name": REGISTERED, "version": 1, "alias": "champion"}
    client = MlflowClient(tracking_uri=registry)
    logged = client.get_run(printed["mlflow_run_id"])
    assert logged.data.tags["kind"] == "evaluation" and logged.data.tags["registered_version"] == "1"
    assert logged.data.metrics["image_auroc"] == pytest.approx(written["image_auroc"])
    names = {a.path for a in client.list_artifacts(logged.info.run_id)} | {
        a.path for a in client.list_artifacts(logged.info.run_id, "plots")}
    assert {"metrics.json", "split.csv", "plots/roc.png"} <= names
    # raylib_ad.load takes the same URI (store from MLFLOW_TRACKING_URI) and predicts as the directory does
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    image = sorted((synthetic_root / "widget" / "test").rglob("*.png"))[0]
    assert raylib_ad.load(f"models:/{REGISTERED}@champion").predict([image]) == \
        raylib_ad.load(trained).predict([image])
    with pytest.raises(ConfigError, match="not in the registry"):
        raylib_ad.load(f"models:/{REGISTERED}@nosuchalias")


def test_threshold_for_a_recall_goal_is_met_on_validation_and_used_by_predict(model_dir, synthetic_root, capsys):
    import raylib_ad
    from raylib_ad.postprocess.normalization import NormalizationStats, normalize
    from raylib_ad.train.prepare import prepare

    result = _run(capsys, "threshold", "--model", str(model_dir), "--data", "synthetic", "--root",
                  str(synthetic_root), "--val-fraction", "0.6", "--target-recall", "0.75")
    assert result["validation"]["n_anomalous"] == 12 and result["warnings"] == []
    assert result["validation"]["recall"] >= 0.75 and result["heldout"]["recall"] is not None
    stats = json.loads((model_dir / "stats.json").read_text())
    assert stats["image_stats"]["threshold"] == result["threshold"] and stats["threshold_method"] == "target_recall"
    assert normalize(result["threshold"], NormalizationStats.from_dict(stats["image_stats"])) == pytest.approx(0.5)
    # the loaded model flags exactly the validation images the reported recall / FPR count
    val = prepare(_options(synthetic_root, val_fraction=0.6), quiet=True).val_rows
    flagged = np.array([p["is_anomalous"] for p in raylib_ad.load(model_dir).predict(val.column("path").to_pylist())])
    labels = np.array(val.column("label").to_pylist(), dtype=bool)
    assert flagged[labels].mean() == pytest.approx(result["validation"]["recall"])
    assert flagged[~labels].mean() == pytest.approx(result["validation"]["fpr"])


def test_threshold_warns_when_validation_holds_few_images(model_dir, capsys):
    assert main(["threshold", "--model", str(model_dir), "--target-fpr", "0.1", "--no-progress"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    # synthetic/widget: 20 anomalous and 10 normal test images, 30% of each in the validation subset
    assert (result["validation"]["n_anomalous"], result["validation"]["n_normal"]) == (6, 3)
    assert any("only 6 anomalous" in w for w in result["warnings"])
    assert any("only 3 normal" in w for w in result["warnings"])
    assert "WARNING: the validation subset holds only 6 anomalous images" in captured.err
    assert result["validation"]["fpr"] <= 0.1


def test_threshold_on_a_registered_model_registers_a_new_version(registry, trained, capsys):
    import raylib_ad

    result = _run(capsys, "threshold", "--model", f"models:/{REGISTERED}@candidate", "--tracking-uri", registry,
                  "--target-recall", "1.0")
    registered = result["registered"]
    assert registered["from_version"] == 1 and registered["version"] > 1 and registered["alias"] == "candidate"
    assert result["validation"]["recall"] == 1.0
    new = raylib_ad.load(f"models:/{REGISTERED}@candidate", tracking_uri=registry)
    assert new.image_stats.threshold == result["threshold"]
    assert new.stats["threshold_goal"]["target_recall"] == 1.0
    assert raylib_ad.load(registered["uri"], tracking_uri=registry).image_stats.threshold == result["threshold"]
    old = raylib_ad.load(f"models:/{REGISTERED}/1", tracking_uri=registry)  # version 1 keeps its threshold
    assert old.image_stats.threshold == json.loads((trained / "stats.json").read_text())["image_stats"]["threshold"]
    assert old.image_stats.threshold == result["previous_threshold"] != result["threshold"]


def test_goal_thresholds_are_the_extreme_ones_meeting_the_goal():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.3, 0.5, 0.7, 0.2, 0.4, 0.6, 0.8])

    def rate(threshold, cls):
        return float(np.mean(scores[labels == cls] >= threshold))

    t = recall_threshold(labels, scores, 0.75)  # 3 of 4 anomalous: 0.4 decides, halfway down to 0.3
    assert t == pytest.approx(0.35) and rate(t, 1) == 0.75 and rate(0.4 + 1e-9, 1) < 0.75
    t = fpr_threshold(labels, scores, 0.25)  # at most 1 of 4 normal: above 0.5, halfway up to 0.6
    assert t == pytest.approx(0.55) and rate(t, 0) == 0.25 and rate(0.5, 0) > 0.25
    assert rate(fpr_threshold(labels, scores, 0.0), 0) == 0.0
    with pytest.raises(ConfigError, match="target recall 0"):
        recall_threshold(labels, scores, 0)
    with pytest.raises(DataError, match="no anomalous validation images"):
        recall_threshold(labels[:4], scores[:4], 0.9)


def test_label_free_threshold_for_uflow_nfa_needs_no_labels(synthetic_root, tmp_path, capsys):
    """U-Flow's a-contrario threshold (-log10 NFA > -log10 epsilon) offered beside the goal thresholds: written
    for image and pixel decisions without looking at any label; a model without one is refused by name."""
    import math

    import torch

    from raylib_ad.artifact import write_model_dir
    from raylib_ad.models import create_model
    from raylib_ad.postprocess.normalization import NormalizationStats, normalize
    from raylib_ad.train.in_process import fit_in_process
    from raylib_ad.train.prepare import prepare

    torch.manual_seed(0)
    options = _options(synthetic_root)
    run = prepare(options, quiet=True)
    kwargs = {**run.model_kwargs, "flow_steps": 2, "affine_subnet_channels_ratio": 0.5, "anomaly_map_mode": "nfa"}
    model = fit_in_process(create_model("uflow", **kwargs), run.train_rows, batch_size=8, max_epochs=1).model
    directory = write_model_dir(model, tmp_path / "uflow")
    result = _run(capsys, "threshold", "--model", str(directory), "--data", "synthetic", "--root",
                  str(synthetic_root), "--category", "widget", "--label-free", "0.01")
    assert result["threshold"] == pytest.approx(-math.log10(0.01)) and result["goal"] == {"label_free_epsilon": 0.01}
    stats = json.loads((directory / "stats.json").read_text())
    assert stats["threshold_method"] == "nfa" and stats["pixel_threshold_method"] == "nfa"
    for key in ("image_stats", "pixel_stats"):
        assert normalize(2.0, NormalizationStats.from_dict(stats[key])) == pytest.approx(0.5)

    padim = write_model_dir(create_model("padim", **run.model_kwargs), tmp_path / "padim")
    assert main(["threshold", "--model", str(padim), "--data", "synthetic", "--root", str(synthetic_root),
                 "--category", "widget", "--label-free", "--no-progress"]) == 2
    assert "padim has no label-free threshold" in capsys.readouterr().err


# --- a run directory as `train` leaves it: scores stored once, reused by threshold and evaluate -------------


@pytest.fixture
def stored_run(trained, synthetic_root, tmp_path):
    """run/model, run/metrics.json, the plots and run/scores.npz, written by the functions train/run.py uses."""
    from raylib_ad.artifact import read_model
    from raylib_ad.train.evaluate import write_metrics
    from raylib_ad.train.outputs import evaluate_on_test
    from raylib_ad.train.prepare import prepare
    from raylib_ad.train.stored import write_scores

    run_dir = tmp_path / "run"
    model_dir = shutil.copytree(trained, run_dir / "model")
    run = prepare(_options(synthetic_root), quiet=True)
    evaluation = evaluate_on_test(read_model(model_dir), run, run_dir, batch_size=32, progress=False)
    write_metrics(run_dir, evaluation["metrics"], evaluation["at_threshold"])
    write_scores(run_dir, model_dir, run.test_rows, evaluation["scored"], run.val_idx, evaluation["report"])
    return run_dir


def _no_scoring(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("scored again although the run stored its scores")

    monkeypatch.setattr("raylib_ad.evaluation.score_split", refuse)
    monkeypatch.setattr("raylib_ad.train.outputs.score_split", refuse)


def test_threshold_on_a_stored_run_scores_nothing_and_updates_metrics_plots_and_mlflow(stored_run, capsys,
                                                                                        monkeypatch):
    import time

    import mlflow
    from mlflow import MlflowClient

    # the run as tracked: its model directory logged in an MLflow run whose id metrics.json names
    uri = f"sqlite:///{stored_run / 'mlflow.db'}"
    monkeypatch.chdir(stored_run)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("train")
    with mlflow.start_run() as tracked:
        mlflow.log_artifacts(str(stored_run / "model"), artifact_path="model")
    document = json.loads((stored_run / "metrics.json").read_text())
    document.update(mlflow_run_id=tracked.info.run_id, mlflow_tracking_uri=uri)
    (stored_run / "metrics.json").write_text(json.dumps(document))
    before = (stored_run / "threshold.png").stat().st_mtime_ns

    _no_scoring(monkeypatch)
    start = time.perf_counter()
    result = _run(capsys, "threshold", "--model", str(stored_run / "model"), "--target-recall", "0.95")
    seconds = time.perf_counter() - start
    assert seconds < 30  # (scoring the split again took 22 minutes on a real PatchCore run)
    written = json.loads((stored_run / "metrics.json").read_text())
    assert written["image_threshold"] == pytest.approx(result["threshold"])
    assert written["at_threshold"]["threshold"] == pytest.approx(result["threshold"])
    assert written["image_auroc"] == document["image_auroc"]  # threshold-free figures stay
    assert written["threshold_goal"]["target_recall"] == 0.95
    assert (stored_run / "threshold.png").stat().st_mtime_ns > before
    copy = MlflowClient(tracking_uri=uri).download_artifacts(tracked.info.run_id, "model/stats.json",
                                                             str(stored_run / "dl"))
    assert json.loads(open(copy).read())["image_stats"]["threshold"] == pytest.approx(result["threshold"])


def test_evaluate_on_a_stored_run_reuses_its_scores(stored_run, tmp_path, capsys, monkeypatch):
    _no_scoring(monkeypatch)
    printed = _run(capsys, "evaluate", "--model", str(stored_run / "model"), "--out", str(tmp_path / "ev"),
                   "--no-mlflow")
    written = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    trained = json.loads((stored_run / "metrics.json").read_text())
    for key in ("image_auroc", "image_threshold", "image_f1", "pixel_auroc", "pixel_aupro"):
        assert written[key] == pytest.approx(trained[key], abs=1e-6), key
    assert printed["reused_scores"] == trained["n_validation"] + trained["n_test_heldout"]
    assert (tmp_path / "ev" / "heatmaps.png").is_file()


def test_stored_scores_belong_to_the_weights_that_made_them(stored_run):
    from raylib_ad.train.stored import read_scores

    assert read_scores(stored_run / "model") is not None
    weights = stored_run / "model" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")  # another model in the same place
    assert read_scores(stored_run / "model") is None
