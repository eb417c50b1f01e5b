"""R-KDE: boxes and scores in the output, the map built from the boxes, KDE scores, both region stages,
weights files and the offline error, the model directory round trip, and the exact 2-worker fit.

A tiny randomly initialised torchvision Faster R-CNN (2 conv layers, 64 px) is injected in place of
the COCO ResNet-50 FPN; features come from its box head unless a test says otherwise.
"""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from raylib_ad.artifact import load_state_resizing, write_model_dir
from raylib_ad.errors import ConfigError, WeightsUnavailableError
from raylib_ad.models import create_model
from raylib_ad.models.rkde import model as rkde_model
from raylib_ad.models.rkde.model import DetectionOutput, boxes_to_map
from raylib_ad.models.rkde.regions import AlexNetRegionFeatures

SIZE = 64


def tiny_detector(seed: int = 0) -> FasterRCNN:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
    backbone.out_channels = 16
    return FasterRCNN(backbone, rpn_anchor_generator=AnchorGenerator(((16, 32),), ((0.5, 1.0, 2.0),)),
                      box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), box_head=TwoMLPHead(16 * 49, 32),
                      box_predictor=FastRCNNPredictor(32, 2), min_size=SIZE, max_size=SIZE)


def build(**settings):
    kwargs = dict(image_size=SIZE, pretrained=False, detector=tiny_detector(), region_features="detector",
                  min_box_size=4, max_detections_per_image=20, n_pca_components=4)
    kwargs.update(settings)
    return create_model("rkde", **kwargs)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fitted():
    torch.set_num_threads(1)
    model = build()
    model.fit([images(2), images(2, seed=1)])
    return model


def test_boxes_to_map_gives_each_pixel_its_highest_covering_box():
    boxes = [torch.tensor([[1.7, 1.2, 4.9, 3.0], [3.0, 2.0, 6.0, 6.0]]), torch.zeros(0, 4)]
    scores = [torch.tensor([2.0, 5.0]), torch.zeros(0)]
    maps = boxes_to_map(boxes, scores, (8, 8), background=-1.0)
    expected = torch.full((8, 8), -1.0)
    expected[1:4, 1:5] = 2.0  # corners truncated to whole pixels, both ends included (anomalib)
    expected[2:7, 3:7] = 5.0
    assert torch.equal(maps[0], expected) and torch.equal(maps[1], torch.full((8, 8), -1.0))


def test_output_has_boxes_scores_and_a_map_built_from_them(fitted):
    with torch.no_grad():
        out = fitted(images(3, seed=5))
    assert isinstance(out, DetectionOutput) and out.score.shape == (3,) and out.anomaly_map.shape == (3, SIZE, SIZE)
    floor = fitted.background_score()
    for boxes, scores, score, amap in zip(out.boxes, out.box_scores, out.score, out.anomaly_map):
        assert boxes.shape[1] == 4 and scores.shape == (len(boxes),) and 0 < len(boxes) <= 20
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        assert bool((widths >= 4).all() and (heights >= 4).all())
        assert bool((boxes >= 0).all() and (boxes <= SIZE).all())
        assert score == scores.max() and amap.max() == score
        assert bool((scores >= floor).all())  # no box beats the KDE's peak density
    assert torch.equal(out.score, out.anomaly_map.amax(dim=(1, 2)))


def test_box_scores_are_minus_log_density_of_the_projected_scaled_features(fitted):
    x = images(2, seed=5)
    with torch.no_grad():
        boxes, features = fitted.regions(x)
        out = fitted(x)
        projected = fitted.pca.transform(features)
        expected = -fitted.kde.log_density(projected / fitted.max_length)
    assert torch.allclose(torch.cat(out.box_scores), expected)
    # a region of the training set is more usual than one of a very different image
    with torch.no_grad():
        train_score = fitted(images(1)).score
        odd_score = fitted(torch.zeros(1, 3, SIZE, SIZE)).score
    assert odd_score > train_score


def test_rpn_stage_keeps_at_most_max_detections_proposals():
    model = build(roi_stage="rpn", max_detections_per_image=7)
    model.fit([images(2)])
    with torch.no_grad():
        out = model(images(2, seed=3))
    assert all(0 < len(b) <= 7 for b in out.boxes)


@pytest.mark.parametrize("key, value", [("roi_stage", "rois"), ("iou_threshold", 2.0), ("n_pca_components", 0),
                                        ("feature_scaling_method", "max"), ("detector_arch", "yolo"),
                                        ("region_features", "vgg")])
def test_bad_settings_raise_config_error_naming_the_setting(key, value):
    with pytest.raises(ConfigError, match=key):
        build(**{key: value})


def test_too_few_regions_is_a_clear_error():
    model = build(n_pca_components=10_000)
    with pytest.raises(RuntimeError, match="n_pca_components"):
        model.fit([images(1)])


def test_round_trip_through_the_model_directory(fitted, tmp_path):
    directory = write_model_dir(fitted, tmp_path / "model")
    # A fresh model with the same (injected) detector architecture, as read_model would build it.
    fresh = build(detector=tiny_detector(seed=7))
    load_state_resizing(fresh, load_file(str(directory / "weights.safetensors")))
    x = images(2, seed=9)
    with torch.no_grad():
        a, b = fitted(x), fresh.eval()(x)
    assert torch.equal(a.score, b.score) and torch.equal(a.anomaly_map, b.anomaly_map)


def test_anomalibs_alexnet_region_features_from_a_weights_file(tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(3)
    path = tmp_path / "rkde_feature_extractor.pth"
    torch.save(AlexNetRegionFeatures().state_dict(), path)
    model = build(region_features="alexnet", pretrained=True, feature_weights=str(path))
    assert torch.equal(model.region_features.classifier[2].weight, torch.load(path)["classifier.2.weight"])
    boxes, features = model.regions(images(1))
    assert features.shape == (len(boxes[0]), 4096)


def test_offline_without_weights_names_the_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLIB_AD_OFFLINE", "1")
    monkeypatch.setenv("RAYLIB_AD_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsUnavailableError) as err:
        create_model("rkde", image_size=SIZE, region_features="detector")
    message = str(err.value)
    assert "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth" in message and "--weights" in message
    assert "RAYLIB_AD_WEIGHTS_DIR" in message and "detector_arch" in message
    with pytest.raises(WeightsUnavailableError, match="region_features=detector"):
        create_model("rkde", image_size=SIZE)  # anomalib's feature network: rkde_feature_extractor.pth


def test_detector_weights_from_the_weights_dir(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    arch = "fasterrcnn_mobilenet_v3_large_320_fpn"
    source = create_model("rkde", image_size=SIZE, pretrained=False, detector_arch=arch, region_features="detector",
                          seed=4)
    torch.save(source.detector.state_dict(), tmp_path / "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth")
    monkeypatch.setenv("RAYLIB_AD_WEIGHTS_DIR", str(tmp_path))
    loaded = create_model("rkde", image_size=SIZE, detector_arch=arch, region_features="detector")
    assert torch.equal(loaded.detector.roi_heads.box_head.fc7.weight, source.detector.roi_heads.box_head.fc7.weight)
    assert loaded.detector.roi_heads.nms_thresh == 1.0 and loaded.detector.roi_heads.score_thresh == 0.001


# --- 2 workers: the collectives simulated by threads ---------------------------------------------------


class ThreadCollectives:
    """raylib_ad.distributed's functions for `world` threads in this process (rank per thread)."""

    def __init__(self, world: int):
        self.world, self.local = world, threading.local()
        self.barrier, self.slots = threading.Barrier(world), [None] * world

    def _exchange(self, tensor):
        self.slots[self.local.rank] = tensor.detach().clone()
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()
        return values

    def rank(self):
        return self.local.rank

    def all_reduce_sum(self, tensor):
        return torch.stack(self._exchange(tensor)).sum(0)

    def all_reduce_max(self, tensor):
        return torch.stack(self._exchange(tensor)).amax(0)

    def all_gather_rows(self, tensor):
        return torch.cat(self._exchange(tensor))


@pytest.mark.parametrize("cap", [40_000, 50, 12])  # all regions, subsampled (moments); gathered rows
def test_two_workers_fit_the_single_process_model(monkeypatch, cap):
    torch.set_num_threads(1)
    shards = [[images(2), images(1, seed=1)], [images(1, seed=2)]]  # unequal shards
    single = build(max_training_points=cap)
    single.fit([b for shard in shards for b in shard])
    fake = ThreadCollectives(2)
    for name in ("rank", "all_reduce_sum", "all_reduce_max", "all_gather_rows"):
        monkeypatch.setattr(rkde_model.distributed, name, getattr(fake, name))
    models, errors = [build(max_training_points=cap) for _ in range(2)], []

    def run(rank):
        fake.local.rank = rank
        try:
            models[rank].fit(shards[rank])
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            fake.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    expected = single.state_dict()
    for model in models:
        for key in ("pca.mean", "pca.components", "kde.dataset", "kde.whiten", "kde.log_norm", "max_length"):
            assert torch.allclose(model.state_dict()[key], expected[key], rtol=1e-4, atol=1e-5), key


def test_predictions_carry_the_boxes_in_the_images_own_pixels(fitted):
    """TrainedModel.predict (and so `raylib-ad predict` and the HTTP API) gives R-KDE's boxes with their
    scores, scaled from the model's input back to each image's size, highest score first."""
    import numpy as np

    from raylib_ad.artifact import TrainedModel
    from raylib_ad.serving.models import ModelInfo
    from raylib_ad.serving.responses import prediction_response

    trained = TrainedModel(fitted, None)
    wide = (np.random.default_rng(0).random((SIZE, 2 * SIZE, 3)) * 255).astype(np.uint8)  # W = 2 x input
    (result,) = trained.predict([wide])
    with torch.no_grad():
        out = fitted(trained.preprocess([wide]))
    assert len(result["boxes"]) == len(out.boxes[0]) > 0
    expected = sorted(zip(out.box_scores[0].tolist(), out.boxes[0].tolist()), key=lambda pair: -pair[0])
    for item, (score, (x1, y1, x2, y2)) in zip(result["boxes"], expected):
        assert item["score"] == pytest.approx(score)
        assert item["box"] == pytest.approx([2 * x1, y1, 2 * x2, y2], abs=0.1)
    info = ModelInfo(category="c", source="model_dir", name="rkde", version="abc", location="/m")
    assert prediction_response(result, info)["boxes"] == result["boxes"]
