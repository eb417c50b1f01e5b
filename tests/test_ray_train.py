"""The Ray path end to end: Ray Data shards -> Ray Train workers -> one model, on a local cluster."""

from __future__ import annotations

import os

import json
import subprocess
import sys

import pyarrow.compute as pc
import pytest
import torch

from raylib_ad.artifact import read_model
from raylib_ad.data import build_manifest
from raylib_ad.errors import DataError
from raylib_ad.options import TrainOptions
from raylib_ad.train.ray_train import fit_on_ray
from raylib_ad.train.runner import RunnerConfig

pytestmark = pytest.mark.ray
SIZE = 64
BACKBONE = "tf_efficientnet_lite0"


def fit(ray_cluster, synthetic_root, tmp_path, name, workers, n_train=None, **settings):
    table = build_manifest("synthetic", synthetic_root, "widget")
    train = table.filter(pc.equal(table.column("split"), "train"))
    if n_train is not None:
        train = train.slice(0, n_train)
    kwargs = {"backbone": BACKBONE, "image_size": SIZE, **settings}
    result = fit_on_ray(name, kwargs, train, None, RunnerConfig(batch_size=8, image_size=SIZE, mean=(0.5,) * 3,
                                                                std=(0.5,) * 3),
                        workers=workers, cpus_per_worker=0.5, gpus_per_worker=0, storage_path=str(tmp_path),
                        run_name=f"{name}-{workers}")
    return read_model(result.model_dir), result.metrics


def test_padim_on_two_workers_equals_one_worker_for_an_odd_image_count(ray_cluster, synthetic_root, tmp_path,
                                                                       lite0_available):
    # 39 images: Ray Train's default split would drop one to make the shards equal; every image counts.
    one, _ = fit(ray_cluster, synthetic_root, tmp_path, "padim", 1, n_train=39, n_features=20)
    two, metrics = fit(ray_cluster, synthetic_root, tmp_path, "padim", 2, n_train=39, n_features=20)
    assert metrics["world_size"] == 2 and len(set(metrics["worker_digests"])) == 1
    torch.testing.assert_close(two.mean, one.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two.inv_covariance, one.inv_covariance, rtol=1e-3, atol=1e-3)
    # ...and the 39th image is in both: the same fit in one process without it differs.
    from raylib_ad.models import create_model
    from raylib_ad.train.in_process import fit_in_process

    table = build_manifest("synthetic", synthetic_root, "widget")
    train = table.filter(pc.equal(table.column("split"), "train"))
    alone = {}
    for n in (39, 38):
        alone[n] = create_model("padim", backbone=BACKBONE, image_size=SIZE, n_features=20)
        fit_in_process(alone[n], train.slice(0, n), batch_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    torch.testing.assert_close(alone[39].mean, two.mean, rtol=1e-5, atol=1e-5)  # Ray == one process
    assert not torch.allclose(alone[38].mean, two.mean, rtol=1e-5, atol=1e-5)


def test_patchcore_on_two_workers_saves_the_whole_bank(ray_cluster, synthetic_root, tmp_path, lite0_available):
    model, metrics = fit(ray_cluster, synthetic_root, tmp_path, "patchcore", 2, coreset_sampling_ratio=0.05)
    n_train = 40  # synthetic default
    expected = int(n_train * (SIZE // 8) ** 2 * 0.05)
    assert model.memory_bank.shape[0] == expected == metrics["memory_bank_rows"]
    digests = metrics["worker_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both workers hold the same, whole bank


def test_train_cli_end_to_end(ray_cluster, synthetic_root, tmp_path, monkeypatch, lite0_available):
    from raylib_ad.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    out = tmp_path / "run"
    code = main(["train", "--model", "patchcore", "--data", "synthetic", "--root", str(synthetic_root),
                 "--category", "widget", "--backbone", BACKBONE, "--image-size", "128", "--workers", "2",
                 "--set", "coreset_sampling_ratio=0.05", "--out", str(out), "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1", "fit_seconds", "test_images_per_second",
                "peak_memory_mb"):
        assert isinstance(metrics[key], float), key
    assert metrics["image_auroc"] > 0.8 and metrics["pixel_auroc"] > 0.8  # planted defects are easy
    assert (out / "roc.png").stat().st_size > 1000 and (out / "heatmaps.png").stat().st_size > 1000

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])  # not an earlier test's global URI
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.data.metrics["image_auroc"] == pytest.approx(metrics["image_auroc"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "plots"} <= artifacts
    # the run spans the training it records; its params are the user's options, paths absolute
    assert (run.info.end_time - run.info.start_time) / 1000 >= metrics["fit_seconds"]
    assert not {"progress", "verbose", "overwrite"} & set(run.data.params)
    assert run.data.params["root"] == str(synthetic_root.resolve()) and run.data.params["out"] == str(out.resolve())
    assert (out / "scores.npz").is_file()  # the test split's scores, for `threshold` and `evaluate`

    images = sorted((synthetic_root / "widget" / "test").glob("*/*.png"))[:3]
    result = subprocess.run([sys.executable, "-m", "raylib_ad.cli", "predict", "--model", str(out / "model"),
                             "--maps", str(tmp_path / "maps"), *map(str, images)],
                            capture_output=True, text=True, check=True)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(p) for p in images]
    for line in lines:
        assert isinstance(line["is_anomalous"], bool) and 0 <= line["normalized_score"] <= 1
        assert open(line["anomaly_map_file"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_image_fails_before_any_worker_starts(synthetic_root, tmp_path):
    import shutil

    from raylib_ad.train.prepare import prepare

    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "widget", root / "widget")
    broken = sorted((root / "widget" / "train" / "good").glob("*.png"))[0]
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match=broken.name):
        prepare(TrainOptions(model="patchcore", data="synthetic", root=str(root), category="widget",
                             backbone=BACKBONE))


def test_unreachable_tracking_server_never_costs_the_model(tmp_path, capsys):
    import time

    from raylib_ad.tracking.mlflow_run import log_training_run

    (tmp_path / "model").mkdir()
    start = time.perf_counter()
    run_id = log_training_run(experiment="x", run_name="y", params={}, metrics={"a": 1.0},
                              model_dir=tmp_path / "model", artifacts=[], uri="http://127.0.0.1:9")
    assert run_id is None and time.perf_counter() - start < 5
    assert "unreachable" in capsys.readouterr().err
