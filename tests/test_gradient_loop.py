"""The stage runner on Ray Train with gradient-trained models: every image once per epoch for any image
count, validation over every validation image, resuming after a killed worker, early stopping,
reproducible runs, and a model's own error ending the run at once instead of being retried."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest
import torch

from raylib_ad.artifact import read_model
from raylib_ad.data import build_manifest
from raylib_ad.errors import ModelError
from raylib_ad.postprocess.validation_split import carve_validation
from raylib_ad.train.ray_train import fit_on_ray
from raylib_ad.train.runner import RunnerConfig

pytestmark = pytest.mark.ray
SIZE = 64
N_TRAIN = 39  # odd: two workers get 20 and 19 images


def rows(synthetic_root):
    table = build_manifest("synthetic", synthetic_root, "widget")
    train = table.filter(pc.equal(table.column("split"), "train")).slice(0, N_TRAIN)
    test = table.filter(pc.equal(table.column("split"), "test"))
    val_idx, _ = carve_validation(test.column("label").to_numpy(), 0.3, 0)
    return train, test.take(val_idx)


def fit(synthetic_root, tmp_path, name, settings, *, workers=2, run_name="run", **runner):
    train, val = rows(synthetic_root)
    config = RunnerConfig(image_size=SIZE, mean=(0.5,) * 3, std=(0.5,) * 3, **{"batch_size": 8, **runner})
    return fit_on_ray(name, {"backbone": "tf_efficientnet_lite0", "image_size": SIZE, **settings}, train, val,
                      config, workers=workers, cpus_per_worker=0.5, gpus_per_worker=0, storage_path=str(tmp_path),
                      run_name=run_name), val.num_rows


def test_a_worker_that_dies_resumes_and_every_image_is_used_once_per_epoch(ray_cluster, synthetic_root, tmp_path,
                                                                            lite0_available):
    marker = tmp_path / "failed-once"
    result, n_val = fit(synthetic_root, tmp_path, "stfpm", {}, max_epochs=3,
                        test_hooks={"fail_once_at_epoch": 1, "fail_marker": str(marker)})
    history = result.history
    assert marker.exists() and result.restarts == 1  # rank 1 really died at the start of epoch 1
    # (test hooks count epochs from 0, as the runner does inside; every record counts from 1, as the bar)
    assert [h["epoch"] for h in history] == [1, 2, 3]  # epoch 1 restored from its checkpoint, not re-run
    # Restarted workers have no feature cache: they refill it before epoch 2 (a pass that trains nothing),
    # so that epoch 2 trains on the same shuffled batches as an undisturbed run (had epoch 1 been re-run
    # instead of restored, it would have streamed and no refill would be recorded).
    assert [h["from_feature_cache"] for h in history] == [False, True, True]
    assert [h.get("cache_refilled_after_restore", False) for h in history] == [False, True, False]
    for record in history:
        assert record["train_images"] == N_TRAIN  # 20 + 19: none dropped, none repeated
        assert record["val_images"] == n_val
        assert record["train_loss"] > 0 and 0 <= record["val_image_auroc"] <= 1 and "val_pixel_auroc" in record
    best = read_model(result.model_dir)
    assert best.name == "stfpm" and result.metrics["best_epoch"] in (1, 2, 3)
    with torch.no_grad():
        assert best(torch.zeros(1, 3, SIZE, SIZE)).anomaly_map.shape == (1, SIZE, SIZE)


def test_a_worker_killed_in_a_later_stage_resumes_in_that_stage(ray_cluster, synthetic_root, tmp_path):
    """DSR (tiny, its VQ-VAE trained here for one epoch) killed in epoch 1 of its main stage, its 2nd of 3
    stages: the run restores the main stage's epoch-0 checkpoint and goes on from there. A finished stage
    run again would add its epochs to the restored history a second time."""
    marker = tmp_path / "failed-once"
    tiny = {"backbone": None, "vq_epochs": 1, "embedding_dim": 8, "num_embeddings": 32, "num_hiddens": 8,
            "num_residual_hiddens": 4, "base_width": 4, "category_trained_vq_model": True}
    # --max-epochs 3: DSR gives int(0.7 * 3) = 2 epochs to its main stage and 1 to the upsampling stage
    result, n_val = fit(synthetic_root, tmp_path, "dsr", tiny, max_epochs=3,
                        test_hooks={"fail_once_at_epoch": 1, "fail_in_stage": "main", "fail_marker": str(marker)})
    assert marker.exists() and result.restarts == 1
    assert [(h["stage"], h["epoch"]) for h in result.history] == [("latent", 1), ("main", 1), ("main", 2),
                                                                    ("upsample", 1)]
    assert result.metrics["stages"] == ["optimize:latent", "optimize:main", "optimize:upsample"]
    for record in result.history:
        assert record["train_images"] == N_TRAIN and record["train_loss"] > 0
        assert ("val_image_auroc" in record) == (record["stage"] == "main")  # only the main stage validates
    best = read_model(result.model_dir)
    with torch.no_grad():
        assert best(torch.zeros(1, 3, SIZE, SIZE)).anomaly_map.shape == (1, SIZE, SIZE)


def test_cfa_killed_while_training_resumes_with_its_collected_memory(ray_cluster, synthetic_root, tmp_path):
    """CFA's recipe is a Collect stage (the memory of patch centres) then its Optimize stage. Killed in
    epoch 1 of training, the run restores the epoch-0 checkpoint: the memory comes back with the weights
    (an empty memory would leave a model that cannot score) and training goes on from epoch 1."""
    marker = tmp_path / "failed-once"
    tiny = {"backbone": "resnet18", "pretrained": False, "layers": ["layer1", "layer2", "layer3"]}
    result, _ = fit(synthetic_root, tmp_path, "cfa", tiny, max_epochs=2,
                    test_hooks={"fail_once_at_epoch": 1, "fail_in_stage": "train", "fail_marker": str(marker)})
    assert marker.exists() and result.restarts == 1
    assert result.metrics["stages"] == ["collect:memory", "optimize:train"]
    assert [(h["stage"], h["epoch"]) for h in result.history] == [("train", 1), ("train", 2)]
    model = read_model(result.model_dir)
    grid = model.grid[0] * model.grid[1]
    assert model.memory_bank.shape[0] == grid and torch.isfinite(model.memory_bank).all()
    with torch.no_grad():
        output = model(torch.zeros(2, 3, SIZE, SIZE))
    assert output.anomaly_map.shape == (2, SIZE, SIZE) and torch.isfinite(output.score).all()


def test_early_stopping_ends_the_run(ray_cluster, synthetic_root, tmp_path, lite0_available):
    result, _ = fit(synthetic_root, tmp_path, "fastflow", {"flow_steps": 2}, workers=1, max_epochs=20, patience=1)
    # Patience 1: the run stops at the first epoch that does not beat the best so far.
    assert len(result.history) < 20 and result.history[-1]["stopped"]
    assert result.history[-1]["val_image_auroc"] <= result.metrics["best_val_image_auroc"]


def test_the_same_run_twice_gives_the_same_model(ray_cluster, synthetic_root, tmp_path, lite0_available):
    settings = {"flow_steps": 2}
    first, _ = fit(synthetic_root, tmp_path, "fastflow", settings, max_epochs=2, run_name="a")
    second, _ = fit(synthetic_root, tmp_path, "fastflow", settings, max_epochs=2, run_name="b")
    a, b = read_model(first.model_dir).state_dict(), read_model(second.model_dir).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [h["train_loss"] for h in first.history] == [h["train_loss"] for h in second.history]


def test_an_error_in_the_model_code_is_not_retried(ray_cluster, synthetic_root, tmp_path, capsys):
    train, _ = rows(synthetic_root)
    with pytest.raises(ModelError, match="unknown model 'no_such_model'"):
        fit_on_ray("no_such_model", {}, train, None, RunnerConfig(image_size=SIZE), workers=2,
                   cpus_per_worker=0.5, gpus_per_worker=0, storage_path=str(tmp_path), run_name="bad",
                   max_failures=2)
    assert "restarting from the latest checkpoint" not in capsys.readouterr().out  # one attempt, not three
