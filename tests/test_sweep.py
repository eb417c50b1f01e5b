"""The CI sweep: 3 synthetic categories x 2 models x 2 samples, interrupted and resumed (see
sweep_helpers.py); one champion per category registered, every trial in the summary."""

from __future__ import annotations

import csv
import json

import pytest
from sweep_helpers import CATEGORIES, MODELS, ci_sweep, sweep_args

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def sweep(ray_cluster, tmp_path_factory, lite0_available):
    return ci_sweep(tmp_path_factory)


def test_sweep_registers_one_champion_per_category_and_lists_every_trial(sweep):
    from mlflow import MlflowClient

    from raylib_ad.tracking.registry import get_champion

    out, uri = sweep["out"], sweep["uri"]
    keys = {f"{c}-{m}-{i}" for c in CATEGORIES for m in MODELS for i in range(2)}
    with open(out / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["trial"] for r in rows} == keys and len(rows) == 12
    assert all(r["status"] == "finished" and 0 <= float(r["val_image_auroc"]) <= 1 for r in rows)
    assert len((out / "summary.md").read_text().strip().splitlines()) == 2 + 12
    assert (out / "test_auroc_by_category.png").stat().st_size > 1000

    for category in CATEGORIES:
        champion = get_champion("synthetic", category, uri=uri)
        entry = sweep["champions"][category]
        assert champion is not None and champion.name == f"raylib_ad-synthetic-{category}"
        assert champion.version == entry["version"] and champion.run_id == entry["mlflow_run_id"]
        # the winner has the best validation image AUROC of its category (ties broken by pixel AUPRO)
        mine = [r for r in rows if r["category"] == category]
        best = max(float(r["val_image_auroc"]) for r in mine)
        assert entry["validation"]["val_image_auroc"] == pytest.approx(best, abs=1e-4)
        winner = next(r for r in mine if r["trial"] == entry["trial"])
        assert "champion" in winner["role"] and winner["image_auroc"]
        # test metrics exist only for the trials scored on the held-out images: best and default per model
        scored = [r for r in mine if r["image_auroc"]]
        assert all("best of model" in r["role"] or "default" in r["role"] for r in scored)
        assert (out / "champions" / category / "model" / "stats.json").is_file()
        stats = json.loads((out / "champions" / category / "model" / "stats.json").read_text())
        assert stats["metrics"]["image_auroc"] == pytest.approx(entry["test"]["image_auroc"])
        # the registered champion loads (its run carries the model) and is the champion directory's model
        import raylib_ad

        loaded = raylib_ad.load(f"models:/raylib_ad-synthetic-{category}@champion", tracking_uri=uri)
        assert loaded.name == entry["model"] and loaded.stats["image_stats"] == stats["image_stats"]
        # one copy on disk: the champion directory hard-links its trial's files
        assert (out / "champions" / category / "model" / "weights.safetensors").stat().st_nlink >= 2

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("raylib_ad")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("raylib_ad.kind") == "sweep"]
    assert len(parents) == 1
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert {r.info.run_name for r in nested} == keys
    assert all("val_image_auroc" in r.data.metrics for r in nested)
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"summary.csv", "summary.md", "champions.json"} <= artifacts


def test_resumed_sweep_reran_no_finished_trial(sweep):
    out = sweep["out"]
    after = {p.parent.name: p.read_bytes() for p in (out / "trials").glob("*/result.json")}
    assert len(after) == 12
    for key, content in sweep["before_kill"].items():
        assert after[key] == content, f"{key} changed on resume"
        starts = (out / "trials" / key / "starts.log").read_text().split()
        assert len(starts) == 1, f"{key} was started {len(starts)} times"
    # the others ran after the resume (one may have been cut off by the kill and restarted)
    rest = set(after) - set(sweep["before_kill"])
    assert rest and all((out / "trials" / k / "starts.log").is_file() for k in rest)


def test_same_out_with_a_different_plan_is_refused(sweep, tmp_path):
    from raylib_ad.cli import main

    args = sweep_args(sweep["root"], sweep["out"])
    args[args.index("--num-samples") + 1] = "3"
    assert main(args) == 2  # ConfigError: plan.json describes a different sweep; nothing is run


def test_sweep_rerun_of_a_finished_sweep_changes_nothing(sweep, monkeypatch):
    """Running the finished sweep's command again restores the experiment, runs no trial, scores nothing
    again and registers no new version."""
    from raylib_ad.cli import main
    from raylib_ad.tracking.registry import get_champion

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sweep["uri"])
    out = sweep["out"]
    before = {p.parent.name: p.read_text() for p in (out / "trials").glob("*/starts.log")}
    tested = (out / "test_metrics.json").read_text()
    assert main(sweep_args(sweep["root"], out)) == 0
    assert before == {p.parent.name: p.read_text() for p in (out / "trials").glob("*/starts.log")}
    assert (out / "test_metrics.json").read_text() == tested
    for category, entry in sweep["champions"].items():
        assert get_champion("synthetic", category, uri=sweep["uri"]).version == entry["version"]
