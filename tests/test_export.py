"""`raylib-ad export`: every exportable model's ONNX network reproduces the torch model (OpenVINO and FP16
on a subset), the export directory loads and predicts like the trained one through raylib_ad.load, the
CLI and Serve, the runtime runs without torch, and missing packages / unexportable models fail clearly."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raylib_ad.artifact import PREDICTION_FIELDS, load, write_model_dir
from raylib_ad.cli import main
from raylib_ad.errors import ConfigError
from raylib_ad.export import export_model
from raylib_ad.export.exporter import (HALF_UNSUPPORTED, MAP_OUTLIERS, MODEL_TOLERANCE, NOT_EXPORTABLE, TOLERANCE,
                                       check_images, exportable, require_packages)
from raylib_ad.export.runtime import ExportedModel
from raylib_ad.models import create_model, list_models, model_class
from raylib_ad.models.recipe import Collect

SIZE = 64
EXPORTABLE = [name for name in list_models() if exportable(name)[0]]
# OpenVINO: a memory bank and a flow here, a gradient model (STFPM) in the FP16 test.
OPENVINO = ["patchcore", "fastflow"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # 2 shared cores: a second torch / onnxruntime thread waits on a busy core far more than it helps
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(name: str):
    """A tiny offline instance with jittered weights (an untrained STFPM student equals its teacher: an
    all-zero map would make parity vacuous), its Collect / Calibrate stages run on four images (memory
    banks, calibrations); gradient stages are skipped: parity holds for any weights."""
    cls = model_class(name)
    kwargs = {"pretrained": False, "image_size": SIZE, **({"backbone": "resnet18"} if cls.default_backbone else {})}
    torch.manual_seed(0)
    model = create_model(name, **{**kwargs, **cls.test_preset})
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    model.eval()
    images = check_images(model, 4, seed=1)
    with torch.no_grad():
        for stage in model.recipe():
            if isinstance(stage, Collect):
                stage.run(iter(images.split(2)), False)
    return model.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """name -> (the tiny fitted model, its model directory), built once per module."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            model = tiny_model(name)
            cache[name] = model, write_model_dir(model, tmp_path_factory.mktemp(name) / "model")
        return cache[name]

    return get


def assert_parity(name: str, directory: Path, torch_model, half: bool = False) -> None:
    exported = ExportedModel(directory, threads=1)
    images = check_images(torch_model, 5, seed=7)  # 5: neither the traced batch (2) nor the checked one (3)
    with torch.no_grad():
        out = torch_model(images)
    scores, maps = exported.forward_batch(images.numpy())
    tol = max(TOLERANCE[half], MODEL_TOLERANCE.get(name, 0.0))
    expected = out.score.numpy()
    assert np.abs(scores - expected).max() <= tol * max(1.0, np.abs(expected).max()), (scores, expected)
    if out.anomaly_map is None:
        assert maps is None and not exported.produces_maps
        return
    expected = out.anomaly_map.numpy()
    assert expected.std() > 0, f"{name}: a constant map makes the comparison vacuous"
    within = np.abs(maps - expected) <= tol * max(1.0, np.abs(expected).max())
    assert within.mean() >= 1 - MAP_OUTLIERS.get(name, 0.0), f"{name}: {within.mean():.4f} of pixels within {tol}"


@pytest.mark.parametrize("name", EXPORTABLE)
def test_onnx_reproduces_the_torch_model(name, model_dir, tmp_path):
    model, source = model_dir(name)
    directory = export_model(source, "onnx", tmp_path / "export")
    assert {"model.onnx", "export.json", "raylib_ad_runtime.py"} <= {p.name for p in directory.iterdir()}
    assert_parity(name, directory, model)


@pytest.mark.parametrize("name", OPENVINO)
def test_openvino_reproduces_the_torch_model(name, model_dir, tmp_path):
    model, source = model_dir(name)
    directory = export_model(source, "openvino", tmp_path / "export")
    assert (directory / "model.xml").is_file() and (directory / "model.bin").is_file()
    assert_parity(name, directory, model)


@pytest.mark.parametrize("fmt,name", [("onnx", "padim"), ("openvino", "stfpm")])
def test_half_halves_the_weights_within_its_tolerance(fmt, name, model_dir, tmp_path):
    model, source = model_dir(name)
    directory = export_model(source, fmt, tmp_path / "export", half=True)
    network = directory / ("model.onnx" if fmt == "onnx" else "model.bin")
    assert network.stat().st_size < 0.6 * (source / "weights.safetensors").stat().st_size
    assert json.loads((directory / "export.json").read_text())["half"] is True
    assert_parity(name, directory, model, half=True)


def write_images(folder: Path) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i, shape in enumerate([(80, 72, 3), (SIZE, SIZE), (50, 90, 3)]):  # resized, grayscale, non-square
        path = folder / f"img{i}.png"
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


STATS = {"image_stats": {"threshold": 5.0, "min": 1.0, "max": 9.0},
         "pixel_stats": {"threshold": 4.0, "min": 0.5, "max": 8.0}}


def test_cli_export_then_load_predict_and_serve_like_the_trained_model(tmp_path, capsys):
    source = write_model_dir(tiny_model("patchcore"), tmp_path / "model", STATS)
    out = tmp_path / "export"
    assert main(["export", "--model", str(source), "--format", "onnx", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["export_dir"] == str(out)
    paths = write_images(tmp_path)
    trained, exported = load(source), load(out)
    assert isinstance(exported, ExportedModel)
    assert (exported.name, exported.image_size, exported.mean, exported.std) == (
        trained.name, trained.image_size, trained.mean, trained.std)
    assert exported.image_stats == trained.image_stats and exported.pixel_stats == trained.pixel_stats
    np.testing.assert_array_equal(exported.preprocess(paths), trained.preprocess(paths).numpy())
    expected, got = trained.predict(paths, with_maps=True), exported.predict(paths, with_maps=True)
    for e, g in zip(expected, got):
        assert set(g) == set(e) and g["threshold"] == e["threshold"] == 5.0
        np.testing.assert_allclose([g["score"], g["normalized_score"]], [e["score"], e["normalized_score"]],
                                   rtol=1e-4, atol=1e-4)
        assert g["is_anomalous"] == e["is_anomalous"] or abs(e["score"] - 5.0) < 1e-3
        np.testing.assert_allclose(g["anomaly_map"], e["anomaly_map"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(g["normalized_map"], e["normalized_map"], rtol=1e-4, atol=1e-4)
    # `raylib-ad predict` goes through raylib_ad.load
    assert main(["predict", "--model", str(out), *paths]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["path"] for line in lines] == paths and all(set(PREDICTION_FIELDS) <= set(line) for line in lines)
    np.testing.assert_allclose([line["score"] for line in lines], [e["score"] for e in expected], rtol=1e-4)
    # Serve: its loader, and a request group scored into the API's answer
    from raylib_ad.serving.models import ModelInfo, load_trained
    from raylib_ad.serving.responses import score_group
    from raylib_ad.video_predict import clip_length_of

    info = ModelInfo("widget", "model_dir", str(out), "v", str(out))
    served = load_trained(info, out, "cpu")
    assert isinstance(served, ExportedModel) and clip_length_of(served) is None

    class Slot:
        def snapshot(self):
            return served, info

    pixels = np.asarray(Image.open(paths[0]).convert("RGB"))
    answer = score_group([(Slot(), pixels, True, "img0.png")])[0]
    assert answer["score"] == pytest.approx(expected[0]["score"], rel=1e-4) and answer["anomaly_map_png"]
    assert answer["is_anomalous"] == expected[0]["is_anomalous"] and answer["model"] == {"name": str(out), "version": "v"}


BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked in this test")
sys.meta_path.insert(0, Block())
"""


def test_runtime_runs_without_torch(model_dir, tmp_path):
    directory = export_model(model_dir("padim")[1], "onnx", tmp_path / "export")
    paths = write_images(tmp_path)
    expected = [r["score"] for r in load(directory).predict(paths)]
    # inside raylib_ad, torch and timm unimportable: ExportedModel and Serve's loader
    code = BLOCK.format(blocked={"torch", "timm"}) + f"""
from raylib_ad.export.runtime import ExportedModel
from raylib_ad.serving.models import ModelInfo, load_trained
import json
import raylib_ad
model = load_trained(ModelInfo("c", "model_dir", "d", "v", "d"), {str(directory)!r}, "cpu")
assert isinstance(model, ExportedModel) and isinstance(raylib_ad.load({str(directory)!r}), ExportedModel)
print(json.dumps([r["score"] for r in model.predict({paths!r})]))
assert "torch" not in sys.modules and "timm" not in sys.modules
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    np.testing.assert_allclose(json.loads(run.stdout), expected, rtol=1e-6)
    # the runtime file copied into the export directory, alone: raylib_ad itself unimportable too
    code = BLOCK.format(blocked={"torch", "timm", "raylib_ad"}) + f"""
import runpy
sys.argv = ["raylib_ad_runtime.py", {str(directory)!r}, *{paths!r}]
runpy.run_path({str(directory / "raylib_ad_runtime.py")!r}, run_name="__main__")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    np.testing.assert_allclose([json.loads(line)["score"] for line in run.stdout.splitlines()], expected, rtol=1e-6)


def test_missing_package_names_what_to_install(model_dir, tmp_path, monkeypatch, capsys):
    directory = export_model(model_dir("dfm")[1], "onnx", tmp_path / "export")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ConfigError, match=r"pip install onnxruntime .*raylib_ad\[export\]"):
        require_packages("onnx")
    with pytest.raises(ConfigError, match="pip install onnxruntime"):
        load(directory)  # running an export needs its runtime too
    assert main(["export", "--model", str(model_dir("dfm")[1]), "--format", "openvino", "--out",
                 str(tmp_path / "ov")]) == 2
    assert "pip install openvino" in capsys.readouterr().err and not (tmp_path / "ov").exists()


@pytest.mark.parametrize("name", sorted(NOT_EXPORTABLE))
def test_unexportable_model_says_why(name, tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model": name}))
    with pytest.raises(ConfigError, match=f"{name} cannot be exported: " + re.escape(NOT_EXPORTABLE[name])):
        export_model(tmp_path / "model", "onnx", tmp_path / "export")
    assert main(["export", "--model", str(tmp_path / "model"), "--format", "onnx", "--out",
                 str(tmp_path / "export")]) == 2
    assert NOT_EXPORTABLE[name][:40] in capsys.readouterr().err


def test_half_refused_where_it_breaks_parity(model_dir, tmp_path):
    for name, reason in HALF_UNSUPPORTED.items():
        with pytest.raises(ConfigError, match="--half: " + re.escape(reason)):
            export_model(model_dir(name)[1], "onnx", tmp_path / name, half=True)


def test_patchcore_export_stores_the_bank_once_and_bounds_each_call(model_dir, tmp_path, monkeypatch):
    """A bank longer than one distance chunk (here: chunks of 16 rows, as a real bank passes 65536 rows)
    used to be traced as one folded initializer per chunk beside memory_bank: the export twice the model.
    The export holds the bank once, still reproduces the model, feeds few enough images per call that a
    call's distance matrix stays bounded, and runs without onnxruntime's arena (which kept that matrix)."""
    import onnx

    from raylib_ad.export import exporter
    from raylib_ad.models.components import nearest_neighbors as knn

    model, _ = model_dir("patchcore")
    rows, dim = model.memory_bank.shape
    assert rows > 16
    monkeypatch.setitem(knn.nearest_neighbors.__kwdefaults__, "bank_chunk", 16)
    source = write_model_dir(model, tmp_path / "model", STATS)
    directory = export_model(source, "onnx", tmp_path / "export")
    graph = onnx.load(str(directory / "model.onnx")).graph
    bank_like = [list(init.dims) for init in graph.initializer if list(init.dims)[-1:] == [dim]]
    assert bank_like == [[rows, dim]], bank_like
    assert (directory / "model.onnx").stat().st_size <= 1.05 * (source / "weights.safetensors").stat().st_size
    assert_parity("patchcore", directory, model)
    meta = json.loads((directory / "export.json").read_text())
    assert meta["max_batch"] == 8 and meta["cpu_memory_arena"] is False

    patches = model.embed(check_images(model, 1))[0].shape[1]
    monkeypatch.setattr(exporter, "KNN_ENTRIES_PER_CALL", 3 * patches * rows)
    assert exporter.max_batch(model) == 3
    monkeypatch.setattr(exporter, "KNN_ENTRIES_PER_CALL", 1)
    assert exporter.max_batch(model) == 1  # at least one image per call
    assert exporter.max_batch(tiny_model("padim")) is None


def test_export_and_model_folders_are_readable(model_dir, tmp_path):
    """Both are staged in a mkdtemp folder (mode 0700) and renamed into place: they get mkdir's modes."""
    import os
    import stat

    umask = os.umask(0o022)
    os.umask(umask)
    _, source = model_dir("padim")
    directory = export_model(source, "onnx", tmp_path / "export")
    for folder in (source, directory):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, folder
        for file in folder.iterdir():
            assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file
