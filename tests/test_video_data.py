"""The video data path: clip manifests for UCSD Ped2, CUHK Avenue, ShanghaiTech and the synthetic video set
(each on a tiny tree in its own layout), the frame cache, clip decoding to (B, T, 3, S, S), the errors a
user gets before any worker starts, and per-frame scoring of a posted clip. Ray only in the last test."""

from __future__ import annotations

import os

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raylib_ad import distributed
from raylib_ad.data import build_manifest, decode_all, load_image, normalize, validate_manifest
from raylib_ad.data.synthetic_video import NORMAL_COLOURS, ODD_COLOUR, _write_avi, ensure_synthetic_video
from raylib_ad.data.video import cached_frames
from raylib_ad.errors import ConfigError, DataError
from raylib_ad.models import AnomalyModel
from raylib_ad.models.base import register_model
from raylib_ad.models.base import AnomalyOutput
from raylib_ad.models.recipe import Collect

SMALL = {"n_train": 2, "n_test": 4, "n_frames": 12, "size": 48}


@pytest.fixture(autouse=True)
def frame_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("RAYLIB_AD_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic_video")
    ensure_synthetic_video(root, "shapes", **SMALL)
    return root


@register_model
class TinyClipModel(AnomalyModel):
    """A test-only video model: how much the last frame differs from the one before, above the
    training clips' average difference. Scores depend on frame order, so clip assembly is checked."""

    name = "tiny_clip_test"
    default_backbone = None
    clip_length = 2
    input_mean, input_std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("baseline", torch.zeros(()))

    def recipe(self):
        return [Collect("fit", self.fit)]

    def fit(self, batches, progress=False):
        sums = torch.zeros(2, dtype=torch.float64)
        for clips in batches:
            diff = self._difference(clips)
            sums += torch.tensor([diff.sum().item(), diff.numel()], dtype=torch.float64)
        sums = distributed.all_reduce_sum(sums)
        self.baseline.fill_(float(sums[0] / sums[1]))

    def _difference(self, clips: torch.Tensor) -> torch.Tensor:
        assert clips.dim() == 5 and clips.shape[1] == self.clip_length, clips.shape
        return (clips[:, -1] - clips[:, -2]).abs().mean(1)

    def forward(self, images):
        amap = self._difference(images) - self.baseline
        return AnomalyOutput(score=amap.flatten(1).amax(1), anomaly_map=amap)


def _frame(value: int, size=(24, 16), mode="L") -> Image.Image:
    return Image.new(mode, size, value)


def _mask(on: bool, size=(24, 16)) -> Image.Image:
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    if on:
        array[4:9, 6:12] = 255
    return Image.fromarray(array)


def _save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _video_frames(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Frames whose brightness rises with t (so their order can be read back after lossy coding)."""
    noise = np.random.default_rng(seed).integers(0, 20, (size, size, 3))
    return np.stack([np.clip(noise + 20 * t + 40, 0, 255).astype(np.uint8) for t in range(n)])


# --- synthetic video -------------------------------------------------------------------------------


def test_synthetic_video_is_deterministic_under_a_seed(tmp_path):
    a = ensure_synthetic_video(tmp_path / "a", "shapes", **SMALL)
    b = ensure_synthetic_video(tmp_path / "b", "shapes", **SMALL)
    c = ensure_synthetic_video(tmp_path / "c", "shapes", seed=1, **SMALL)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 2 * 12 * 4 + 12  # test frames and masks, one training frame folder
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    avi = "train/video_1.avi"
    assert [np.asarray(Image.open(p)).tobytes() for p in cached_frames(a / avi)] == \
           [np.asarray(Image.open(p)).tobytes() for p in cached_frames(b / avi)]
    with pytest.raises(DataError, match="made with other settings"):
        ensure_synthetic_video(tmp_path / "a", "shapes", seed=2, **SMALL)


def test_synthetic_anomalies_are_where_the_labels_say(synthetic):
    base = synthetic / "shapes" / "test"
    scale = SMALL["size"] / 64
    for kind in ("good", "wrong_way", "too_fast", "odd_shape"):
        masks = np.stack([np.asarray(Image.open(p)) for p in sorted((base / f"{kind}_0_gt").glob("*.png"))])
        frames = np.stack([np.asarray(Image.open(p)) for p in sorted((base / f"{kind}_0").glob("*.png"))])
        anomalous = np.flatnonzero(masks.reshape(len(masks), -1).any(1))
        if kind == "good":
            assert anomalous.size == 0
            assert not np.all(frames == np.array(ODD_COLOUR), axis=-1).any()  # the odd colour never appears
            continue
        assert anomalous.size >= 4 and np.all(np.diff(anomalous) == 1), anomalous  # one window of frames
        centres = []
        for t in anomalous:
            inside = frames[t][masks[t] > 0]
            assert (inside == inside[0]).all()  # the planted object, exactly under its mask
            colour = tuple(int(v) for v in inside[0])
            assert (colour == ODD_COLOUR) == (kind == "odd_shape") and (kind == "odd_shape" or colour in NORMAL_COLOURS)
            centres.append(np.nonzero(masks[t])[1].mean())
        step = float(np.mean(np.diff(centres)))  # pixels per frame, + = rightwards
        expected = {"wrong_way": (-1.7 * scale, -0.7 * scale), "too_fast": (3.5 * scale, 8.5 * scale),
                    "odd_shape": (0.7 * scale, 1.7 * scale)}[kind]
        assert expected[0] <= step <= expected[1], (kind, step)


def test_synthetic_manifest_clips_and_decoding(synthetic, frame_cache):
    table = build_manifest("synthetic_video", synthetic, "shapes", clip_length=3)
    rows = table.to_pylist()
    assert len(rows) == 6 * (12 - 2)  # every frame that ends a full clip, of 2 train + 4 test videos
    validate_manifest(table, clip_length=3)
    for row in rows:
        clip = [Path(p) for p in row["clip"]]
        assert len(clip) == 3 and str(clip[-1]) == row["path"] and len({p.parent for p in clip}) == 1
        indices = [int(p.stem) for p in clip]
        assert indices == list(range(indices[0], indices[0] + 3))  # consecutive, oldest first
        if row["split"] == "test":
            gt = Path(row["path"]).parent.with_name(Path(row["path"]).parent.name + "_gt") / Path(row["path"]).name
            assert row["label"] == int(np.asarray(Image.open(gt)).any())  # the label of the LAST frame
            assert (row["mask_path"] == str(gt)) == bool(row["label"])
            assert row["defect"] == (Path(row["path"]).parent.name.rsplit("_", 1)[0] if row["label"] else "good")
    decoded = [r for r in rows if r["split"] == "train" and r["path"].startswith(str(frame_cache))]
    assert len(decoded) == 10  # the .avi training video went through the frame cache
    batch = next(decode_all(table.slice(0, 4), 32, (0.0,) * 3, (1.0,) * 3, batch_size=4))
    assert batch["image"].shape == (4, 3, 3, 32, 32) and batch["mask"].shape == (4, 32, 32)
    expected = normalize(np.stack([load_image(p, 32) for p in rows[1]["clip"]]), (0.0,) * 3, (1.0,) * 3)
    np.testing.assert_array_equal(batch["image"][1], expected)
    # every clip says which video it comes from (AI-VAD's leave-one-video-out kNN normalization)
    videos = next(decode_all(table, 32, (0.0,) * 3, (1.0,) * 3, batch_size=table.num_rows))["video"]
    folders = [str(Path(r["path"]).parent) for r in rows]
    assert len(set(videos.tolist())) == len(set(folders)) == 6
    assert all((videos[i] == videos[j]) == (folders[i] == folders[j]) for i in range(0, len(rows), 7)
               for j in range(0, len(rows), 5))


def test_video_file_decodes_once_into_the_cache(tmp_path, frame_cache, monkeypatch):
    frames = _video_frames(5)
    video = tmp_path / "clip.avi"
    _write_avi(video, frames)
    paths = cached_frames(video)
    assert len(paths) == 5 and all(p.is_relative_to(frame_cache / "video_frames") for p in paths)
    back = np.stack([np.asarray(Image.open(p), dtype=np.float32) for p in paths])
    # Lossy MPEG-4 + JPEG: not the same pixels, but the same frames (brightness 40 + 20 t) in the same order.
    np.testing.assert_allclose(back.mean(axis=(1, 2, 3)), frames.mean(axis=(1, 2, 3)), atol=2)
    import raylib_ad.data.video_frames as video_frames

    monkeypatch.setattr(video_frames, "iter_video_frames", lambda *a, **k: pytest.fail("decoded twice"))
    assert cached_frames(video) == paths


# --- public layouts -------------------------------------------------------------------------------------


def make_ucsd(root: Path, frames: int = 4, odd_size_at: int | None = None) -> Path:
    base = root / "UCSDped2"
    for v in (1, 2):
        for t in range(frames):
            _save(_frame(10 * t), base / "Train" / f"Train{v:03d}" / f"{t + 1:03d}.tif")
    for t in range(frames):
        size = (30, 16) if t == odd_size_at else (24, 16)
        _save(_frame(10 * t, size), base / "Test" / "Test001" / f"{t + 1:03d}.tif")
        _save(_mask(t >= 2, size), base / "Test" / "Test001_gt" / f"{t + 1:03d}.bmp")
    (base / "Test" / "Test001" / ".DS_Store").write_bytes(b"\0")
    return root


def test_ucsd_ped2_layout(tmp_path):
    table = build_manifest("ucsd_ped2", make_ucsd(tmp_path), clip_length=2)
    validate_manifest(table, clip_length=2)
    test = [r for r in table.to_pylist() if r["split"] == "test"]
    assert table.num_rows == 3 * 3 and set(table.column("category").to_pylist()) == {"UCSDped2"}
    assert [(Path(r["path"]).name, r["label"], r["defect"]) for r in test] == [
        ("002.tif", 0, "good"), ("003.tif", 1, "anomalous"), ("004.tif", 1, "anomalous")]
    assert test[1]["mask_path"].endswith("Test001_gt/003.bmp") and test[0]["mask_path"] is None
    assert [Path(p).name for p in test[1]["clip"]] == ["002.tif", "003.tif"]


def test_avenue_layout_with_mat_labels_or_mask_folders(tmp_path):
    from scipy.io import savemat

    _write_avi(tmp_path / "training_videos" / "01.avi", _video_frames(4))
    _write_avi(tmp_path / "testing_videos" / "01.avi", _video_frames(4, seed=1))
    _write_avi(tmp_path / "testing_videos" / "02.avi", _video_frames(4, seed=2))
    gt = tmp_path / "ground_truth_demo" / "testing_label_mask"
    volume = np.zeros((1, 4), dtype=object)
    for t in range(4):
        volume[0, t] = np.zeros((32, 32), np.uint8)
    volume[0, 3][6:10, 6:10] = 1  # Avenue's volLabel: 0/1 masks, one per frame
    gt.mkdir(parents=True)
    savemat(gt / "1_label.mat", {"volLabel": volume})
    for t in range(4):
        _save(_mask(t == 1, (32, 32)), gt / "2_label" / f"{t}.png")
    table = build_manifest("avenue", tmp_path, clip_length=2)
    validate_manifest(table, clip_length=2)
    labels = {(Path(r["clip"][0]).parent.name.split("-")[0], r["split"], Path(r["path"]).stem): r["label"]
              for r in table.to_pylist()}
    assert len(labels) == 9 and sum(labels.values()) == 2
    assert labels[("01", "test", "000003")] == 1 and labels[("02", "test", "000001")] == 1
    mask_rows = [r for r in table.to_pylist() if r["label"]]
    assert all(np.asarray(Image.open(r["mask_path"])).any() for r in mask_rows)


def test_shanghaitech_layout_one_scene(tmp_path):
    _write_avi(tmp_path / "training" / "videos" / "01_001.avi", _video_frames(4))
    _write_avi(tmp_path / "training" / "videos" / "02_001.avi", _video_frames(4))  # another scene
    for t in range(5):
        _save(_frame(30 * t, (32, 32), "RGB"), tmp_path / "testing" / "frames" / "01_0014" / f"{t:03d}.jpg")
    (tmp_path / "testing" / "test_frame_mask").mkdir(parents=True)
    (tmp_path / "testing" / "test_pixel_mask").mkdir(parents=True)
    np.save(tmp_path / "testing" / "test_frame_mask" / "01_0014.npy", np.array([0, 0, 1, 1, 0]))
    pixels = np.zeros((5, 32, 32), np.uint8)
    pixels[2:4, 5:9, 5:9] = 1
    np.save(tmp_path / "testing" / "test_pixel_mask" / "01_0014.npy", pixels)
    table = build_manifest("shanghaitech", tmp_path, "1", clip_length=2)
    validate_manifest(table, clip_length=2)
    rows = table.to_pylist()
    assert {r["category"] for r in rows} == {"01"} and len(rows) == 3 + 4
    test = [r for r in rows if r["split"] == "test"]
    assert [r["label"] for r in test] == [0, 1, 1, 0]
    assert np.asarray(Image.open(test[1]["mask_path"]))[5:9, 5:9].all()


# --- errors before any worker starts --------------------------------------------------------------------


def test_undecodable_video_is_named(tmp_path):
    _write_avi(tmp_path / "training_videos" / "01.avi", _video_frames(4))
    (tmp_path / "testing_videos").mkdir()
    (tmp_path / "testing_videos" / "07.avi").write_bytes(b"not a video" * 50)
    with pytest.raises(DataError, match=r"video cannot be decoded: .*testing_videos/07\.avi"):
        build_manifest("avenue", tmp_path, clip_length=2)


def test_too_short_video_and_mismatched_frames_and_unknown_layout(tmp_path):
    root = make_ucsd(tmp_path / "short")
    with pytest.raises(DataError, match=r"Train001 has 4 frame\(s\); the model needs clips of 5 frames"):
        build_manifest("ucsd_ped2", root, clip_length=5)
    table = build_manifest("ucsd_ped2", make_ucsd(tmp_path / "odd", odd_size_at=2), clip_length=2)
    with pytest.raises(DataError, match=r"frames of different sizes in one clip .*002\.tif 24x16, .*003\.tif 30x16"):
        validate_manifest(table, clip_length=2)
    with pytest.raises(DataError, match=r"clip of 2 frame\(s\) for .*; the model needs clips of 3"):
        validate_manifest(build_manifest("ucsd_ped2", root, clip_length=2), clip_length=3)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"not in the CUHK Avenue layout \(it holds notes\.txt\); expected "
                                        r".*training_videos"):
        build_manifest("avenue", tmp_path / "elsewhere", clip_length=2)
    with pytest.raises(DataError, match=r"not in the UCSD Ped layout"):
        build_manifest("ucsd_ped2", tmp_path / "elsewhere", clip_length=2)


def test_video_data_and_image_models_do_not_mix(synthetic):
    from raylib_ad.options import TrainOptions
    from raylib_ad.train.prepare import prepare

    with pytest.raises(ConfigError, match=r"--model tiny_clip_test is a video model .* --data synthetic is an image"):
        prepare(TrainOptions(model="tiny_clip_test", data="synthetic", root=str(synthetic)), quiet=True)
    with pytest.raises(ConfigError, match=r"--model padim is an image model but --data synthetic_video is a video "
                                          r"dataset .*video models: .*tiny_clip_test"):
        prepare(TrainOptions(model="padim", data="synthetic_video", root=str(synthetic),
                             settings={"pretrained": False}), quiet=True)
    with pytest.raises(ConfigError, match="video dataset"):
        build_manifest("synthetic_video", synthetic, "shapes")  # no clip_length: not for image models


def test_prepare_builds_the_clip_manifest_for_a_video_model(tmp_path):
    from raylib_ad.options import TrainOptions
    from raylib_ad.train.prepare import prepare

    ensure_synthetic_video(tmp_path, "shapes")  # the embedded default's sizes
    run = prepare(TrainOptions(model="tiny_clip_test", data="synthetic_video", root=str(tmp_path), image_size=32),
                  quiet=True)
    assert run.category == "shapes" and run.test_rows.column("label").to_numpy().sum() > 10
    assert all(len(c) == 2 for c in run.table.column("clip").to_pylist())


# --- scoring a posted clip ------------------------------------------------------------------------------


def _trained(image_size: int = 32):
    from raylib_ad.artifact import TrainedModel

    model = TinyClipModel(image_size=image_size).eval()
    model.baseline.fill_(0.01)
    return TrainedModel(model, None)


def test_predict_clip_scores_every_frame_after_the_first(tmp_path):
    from raylib_ad.video_predict import predict_clip

    trained = _trained()
    frames = list(_video_frames(5))
    results = predict_clip(trained, frames, with_maps=True, batch_size=2)
    assert [r["frame"] for r in results] == list(range(5))
    assert results[0]["score"] is None and results[0]["anomaly_map"] is None  # no history for frame 0
    pixels = trained.preprocess(frames)
    for t in range(1, 5):
        expected = trained.model(pixels[t - 1 : t + 1][None]).score.item()
        assert results[t]["score"] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(DataError, match=r"the clip has 1 frame\(s\); .* at least 2"):
        predict_clip(trained, frames[:1])
    odd = frames[:2] + [np.zeros((32, 40, 3), np.uint8)]
    with pytest.raises(DataError, match=r"frames of different sizes in one clip: frame 0 is 32x32, frame 2 is 40x32"):
        predict_clip(trained, odd)


def test_clip_payloads_answer_per_frame_or_4xx(tmp_path):
    from raylib_ad.serving import BadRequest
    from raylib_ad.serving.models import ModelInfo
    from raylib_ad.video_predict import clip_response

    class Slot:
        def snapshot(self):
            return _trained(), ModelInfo("shapes", "model_dir", "dir", "v1", "dir")

    video = tmp_path / "clip.avi"
    _write_avi(video, _video_frames(4))
    answer = clip_response(Slot(), [(None, video.read_bytes())], 4096 * 4096, with_map=False)
    assert answer["clip_length"] == 2 and answer["model"] == {"name": "dir", "version": "v1"}
    assert [f["score"] is None for f in answer["frames"]] == [True, False, False, False]
    json.dumps(answer)

    def png(value: int, size=(32, 32)) -> bytes:
        buffer = io.BytesIO()
        _frame(value, size, "RGB").save(buffer, format="PNG")
        return buffer.getvalue()

    parts = [(f"{i}.png", png(40 * i)) for i in range(3)]
    answer = clip_response(Slot(), parts, 4096 * 4096, with_map=True)
    assert [f["filename"] for f in answer["frames"]] == ["0.png", "1.png", "2.png"]
    assert answer["frames"][0]["anomaly_map_png"] is None and answer["frames"][2]["score"] is not None
    with pytest.raises(BadRequest, match=r"video cannot be decoded: request body"):
        clip_response(Slot(), [(None, b"garbage" * 100)], 4096 * 4096, with_map=False)
    with pytest.raises(BadRequest, match=r"frames of different sizes in one clip: 0\.png is 32x32, 1\.png is 40x32"):
        clip_response(Slot(), [("0.png", png(1)), ("1.png", png(2, (40, 32)))], 4096 * 4096, with_map=False)
    with pytest.raises(BadRequest, match=r"the clip has 1 frame"):
        clip_response(Slot(), [("0.png", png(1)), ], 4096 * 4096, with_map=False)


# --- end to end through Ray Train, evaluation, the model directory and MLflow ---------------------------------


@pytest.mark.ray
def test_train_ai_vad_on_synthetic_video_end_to_end(ray_cluster, synthetic, tmp_path, monkeypatch):
    from raylib_ad.cli import main
    from raylib_ad.models import list_models

    if "ai_vad" not in list_models():
        pytest.skip("the ai_vad model is not in this tree")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    out = tmp_path / "run"
    code = main(["train", "--model", "ai_vad", "--data", "synthetic_video", "--root", str(synthetic),
                 "--image-size", "64", "--batch-size", "8", "--set", "networks=tiny", "--set", "min_bbox_area=10",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert isinstance(metrics["image_auroc"], float) and metrics["n_test"] == 4 * (12 - 1)  # frame-level
    assert len((out / "split.csv").read_text().splitlines()) == 1 + 6 * (12 - 1)

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])  # not an earlier test's global URI
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.data.metrics["image_auroc"] == pytest.approx(metrics["image_auroc"])

    from raylib_ad.artifact import load
    from raylib_ad.video_predict import predict_clip, read_clip

    frames = sorted((synthetic / "shapes" / "test" / "wrong_way_0").glob("*.png"))
    results = predict_clip(load(out / "model"), read_clip(frames))
    assert len(results) == 12 and results[0]["score"] is None
    assert all(isinstance(r["score"], float) and isinstance(r["is_anomalous"], bool) for r in results[1:])


@pytest.mark.ray
def test_ai_vad_density_models_are_the_same_on_one_and_two_ray_workers(ray_cluster, synthetic, tmp_path):
    """The Collect stage gathers every worker's regions and fits the density models on their union in a
    canonical order. Each worker runs the networks on batches of the same size (4) in both runs, so the
    fitted buffers agree to float rounding of batched convolutions (see ai_vad/model.py fit)."""
    import pyarrow.compute as pc

    from raylib_ad.artifact import read_model
    from raylib_ad.models import list_models
    from raylib_ad.train.ray_train import fit_on_ray
    from raylib_ad.train.runner import RunnerConfig

    if "ai_vad" not in list_models():
        pytest.skip("the ai_vad model is not in this tree")
    table = build_manifest("synthetic_video", synthetic, "shapes", clip_length=2)
    train = table.filter(pc.equal(table.column("split"), "train"))
    kwargs = {"image_size": 64, "networks": "tiny", "min_bbox_area": 10}
    fitted = {}
    for workers, batch in ((1, 4), (2, 8)):
        config = RunnerConfig(batch_size=batch, image_size=64, mean=(0.0,) * 3, std=(1.0,) * 3)
        fit = fit_on_ray("ai_vad", kwargs, train, None, config, workers=workers, cpus_per_worker=0.5,
                         gpus_per_worker=0, storage_path=str(tmp_path), run_name=f"ai_vad-{workers}")
        fitted[workers] = read_model(fit.model_dir).state_dict()
    density = {k: v for k, v in fitted[1].items() if k.startswith("density.")}
    assert density and any(v.numel() > 0 for v in density.values())
    for key, value in density.items():
        torch.testing.assert_close(fitted[2][key], value, rtol=1e-5, atol=1e-6, msg=key)
