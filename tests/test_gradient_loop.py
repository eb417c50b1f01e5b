"""The shared gradient loop on Ray Train: epochs, validation, best/latest checkpoints, and resuming a
run whose worker died from its latest checkpoint."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest
import torch

from raylib_ad.artifact import read_model
from raylib_ad.data import build_manifest
from raylib_ad.data.ray_dataset import manifest_to_dataset
from raylib_ad.postprocess.validation_split import carve_validation
from raylib_ad.train.gradient import fit_gradient

pytestmark = pytest.mark.ray
SIZE = 64


def datasets(synthetic_root):
    table = build_manifest("synthetic", synthetic_root, "widget")
    train = table.filter(pc.equal(table.column("split"), "train"))
    test = table.filter(pc.equal(table.column("split"), "test"))
    val_idx, _ = carve_validation(test.column("label").to_numpy(), 0.3, 0)
    mean = std = (0.5, 0.5, 0.5)
    return (manifest_to_dataset(train, SIZE, mean, std),
            manifest_to_dataset(test.take(val_idx), SIZE, mean, std, with_masks=True))


def test_a_worker_that_dies_resumes_and_the_run_keeps_its_epoch_count(ray_cluster, synthetic_root, tmp_path,
                                                                    lite0_available):
    train, val = datasets(synthetic_root)
    marker = tmp_path / "failed-once"
    model_dir, last, history = fit_gradient(
        "stfpm", {"backbone": "tf_efficientnet_lite0", "image_size": SIZE}, train, val, workers=2,
        cpus_per_worker=0.5, gpus_per_worker=0, batch_size=8, max_epochs=3, storage_path=str(tmp_path),
        run_name="fault", extra_config={"fail_once_at_epoch": 1, "fail_marker": str(marker)})
    assert marker.exists()  # rank 1 really died at the start of epoch 1
    assert [h["epoch"] for h in history] == [0, 1, 2]  # epoch 0 restored from its checkpoint, not re-run
    assert last["epoch"] == 2
    # Restarted workers have no feature cache: epoch 1 streams again and epoch 2 trains from the cache
    # (had epoch 0 been re-run instead of restored, epoch 1 would come from the cache).
    assert [h["from_feature_cache"] for h in history] == [False, False, True]
    for record in history:
        assert record["train_loss"] > 0 and 0 <= record["val_image_auroc"] <= 1 and "val_pixel_auroc" in record
    best = read_model(model_dir)
    assert best.name == "stfpm" and last["best_epoch"] in (0, 1, 2)
    with torch.no_grad():
        assert best(torch.zeros(1, 3, SIZE, SIZE)).anomaly_map.shape == (1, SIZE, SIZE)


def test_early_stopping_ends_the_run(ray_cluster, synthetic_root, tmp_path, lite0_available):
    train, val = datasets(synthetic_root)
    _, last, history = fit_gradient(
        "fastflow", {"backbone": "tf_efficientnet_lite0", "image_size": SIZE, "flow_steps": 2}, train, val,
        workers=1, cpus_per_worker=1, gpus_per_worker=0, batch_size=8, max_epochs=20, patience=1,
        storage_path=str(tmp_path), run_name="early")
    # Patience 1: the run stops at the first epoch that does not beat the best so far.
    assert last["stopped"] and len(history) < 20
    assert history[-1]["val_image_auroc"] <= last["best_val_image_auroc"]
