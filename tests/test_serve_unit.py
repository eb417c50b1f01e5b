"""The Ray-free half of serving: settings, request decoding with limits, model slots, responses.
`small_model_dir` and `png_bytes` are shared with tests/test_serve.py."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest

from raylib_ad.errors import ConfigError
from raylib_ad.serving import BadRequest, ModelUnavailable, PayloadTooLarge, ServeSettings, UnknownCategory
from raylib_ad.serving.decode import decode_image, read_body
from raylib_ad.serving.models import Catalog, ModelInfo, ModelSlot, dir_fingerprint
from raylib_ad.serving.responses import prediction_response

SIZE = 64


def small_model_dir(directory: Path, threshold_quantile: float = 0.5, seed: int = 0) -> Path:
    """A fitted PaDiM (64 px, offline tf_efficientnet_lite0) with stats.json, in about a second.
    `threshold_quantile` moves the deployment threshold, so two directories differ in their answers."""
    import torch

    from raylib_ad.artifact import write_model_dir
    from raylib_ad.models import create_model
    from raylib_ad.postprocess import fit_normalization

    gen = torch.Generator().manual_seed(seed)
    model = create_model("padim", backbone="tf_efficientnet_lite0", image_size=SIZE, n_features=16)
    model.fit([torch.randn(6, 3, SIZE, SIZE, generator=gen) for _ in range(2)])
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(6, 3, SIZE, SIZE, generator=gen))
    scores, maps = out.score.numpy(), out.anomaly_map.numpy()
    stats = {"image_stats": fit_normalization(scores, float(np.quantile(scores, threshold_quantile))).to_dict(),
             "pixel_stats": fit_normalization(maps, float(np.quantile(maps, threshold_quantile))).to_dict()}
    return write_model_dir(model, directory, stats)


def png_bytes(width: int = 80, height: int = 60, seed: int = 0, fmt: str = "PNG") -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


# ---- settings ------------------------------------------------------------------------------------------
def test_settings_resolve_dirs_and_name_bad_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = ServeSettings.from_dict({"model_dirs": ["widget=models/w"]})
    assert settings.model_dirs == {"widget": str(tmp_path / "models" / "w")}  # absolute for the replicas
    with pytest.raises(ConfigError, match=r"unknown serving setting\(s\) \['max_body'\]"):
        ServeSettings.from_dict({"model_dirs": {"a": "x"}, "max_body": 1})
    with pytest.raises(ConfigError, match="nothing to serve"):
        ServeSettings.from_dict({})
    with pytest.raises(ConfigError, match="needs dataset"):
        ServeSettings.from_dict({"registry": True})
    with pytest.raises(ConfigError, match="max_image_pixels must be a positive integer, got 0"):
        ServeSettings.from_dict({"model_dirs": {"a": "x"}, "max_image_pixels": 0})
    with pytest.raises(ConfigError, match="CATEGORY=DIR, got 'widget'"):
        ServeSettings.from_dict({"model_dirs": ["widget"]})
    with pytest.raises(ConfigError, match="category 'a/b'"):
        ServeSettings.from_dict({"model_dirs": {"a/b": "x"}})


# ---- decoding and limits -------------------------------------------------------------------------------
def test_decode_gives_rgb_and_refuses_bad_bytes_with_a_message():
    rgb = decode_image(png_bytes(80, 60), max_pixels=10_000)
    assert rgb.shape == (60, 80, 3) and rgb.dtype == np.uint8
    assert decode_image(png_bytes(fmt="JPEG"), 10_000).shape == (60, 80, 3)
    with pytest.raises(BadRequest, match="request body is empty"):
        decode_image(b"", 10_000)
    with pytest.raises(BadRequest, match=r"file 'a.png' is not a readable image \(9 bytes"):
        decode_image(b"not a png", 10_000, name="file 'a.png'")
    with pytest.raises(BadRequest, match="not a readable image"):
        decode_image(png_bytes()[:200], 10_000)  # a truncated PNG: the header reads, the pixels do not
    with pytest.raises(PayloadTooLarge, match=r"80x60 = 4800 pixels; the limit is 4000 \(max_image_pixels\)"):
        decode_image(png_bytes(80, 60), max_pixels=4000)


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header says width x height (its pixel data is a stub): what a client sends to
    test the pixel limit without a gigabyte of pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b""))


def test_answers_name_the_problem_without_internals_and_quote_the_servers_limit(monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after: decode may raise it

    with pytest.raises(BadRequest) as err:
        decode_image(b"this is a text body, no image", 10_000)
    assert "request body is not a readable image (29 bytes" in err.value.message
    assert "0x" not in err.value.message and "object at" not in err.value.message and "<" not in err.value.message
    limit = 4096 * 4096  # the default max_image_pixels
    # above twice Pillow's own limit (Pillow refuses it at open), and between the server's and Pillow's
    for width, height in ((20000, 20000), (12000, 12000)):
        with pytest.raises(PayloadTooLarge) as err:
            decode_image(png_header(width, height), limit)
        assert f"is {width * height} pixels" in err.value.message or f"{width}x{height}" in err.value.message
        assert f"the limit is {limit} (max_image_pixels)" in err.value.message, err.value.message
        assert str(Image.MAX_IMAGE_PIXELS) not in err.value.message
    # a server limit above Pillow's: an image between the two is decoded, not refused by Pillow
    big = Image.MAX_IMAGE_PIXELS * 2 + 1000
    with pytest.raises(BadRequest, match="not a readable image"):  # the stub's pixels, not the size
        decode_image(png_header(big // 1000, 1000), big)


def test_read_body_stops_at_the_limit():
    async def chunks(n, size):
        for _ in range(n):
            yield b"x" * size

    async def run():
        assert await read_body(chunks(3, 10), limit=30) == b"x" * 30
        with pytest.raises(PayloadTooLarge, match="over 25 bytes"):
            await read_body(chunks(3, 10), limit=25)  # no Content-Length: counted while streaming
        with pytest.raises(PayloadTooLarge, match="is 100 bytes; the limit is 25"):
            await read_body(chunks(0, 0), limit=25, declared_length="100")
        with pytest.raises(BadRequest, match="Content-Length 'ten'"):
            await read_body(chunks(0, 0), limit=25, declared_length="ten")

    asyncio.run(run())


# ---- catalog and slots ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, lite0_available):
    root = tmp_path_factory.mktemp("serve_models")
    return small_model_dir(root / "low", 0.2), small_model_dir(root / "high", 0.8)


def test_catalog_and_slot_serve_a_model_dir_and_pick_up_a_rewrite(model_dirs, tmp_path):
    import shutil

    from raylib_ad.artifact import load

    low, high = model_dirs
    served = tmp_path / "widget"
    shutil.copytree(low, served)
    clock = [0.0]
    catalog = Catalog(ServeSettings.from_dict({"model_dirs": {"widget": str(served)}}))
    slot = ModelSlot("widget", catalog, ttl_s=5.0, clock=lambda: clock[0])
    assert slot.refresh(force=True) is True
    first = slot.info.version
    image = decode_image(png_bytes(), 10**6)
    trained, info = slot.snapshot()
    assert trained.predict([image]) == load(low).predict([image])

    shutil.rmtree(served)
    shutil.copytree(high, served)  # a new model where the old one was
    assert dir_fingerprint(served) != first
    assert slot.refresh() is False  # within the TTL nobody looks
    clock[0] = 6.0
    assert slot.refresh() is True and slot.info.version == dir_fingerprint(served)
    assert slot.snapshot()[0].predict([image]) == load(high).predict([image])

    with pytest.raises(UnknownCategory, match="'gadget' is not served; served categories: \\['widget'\\]"):
        catalog.current("gadget")


def test_model_name_is_the_directory_name_and_unknown_is_logged_at_info(model_dirs, tmp_path, caplog):
    import logging
    import shutil

    served = {"widget": tmp_path / "widget", "gadget": tmp_path / "demo" / "model"}  # train's OUT/model
    for directory in served.values():
        shutil.copytree(model_dirs[0], directory)
    catalog = Catalog(ServeSettings.from_dict({"model_dirs": {k: str(v) for k, v in served.items()}}))
    names = {info.category: info.public()["name"] for info in catalog.list()}
    assert names == {"widget": "widget", "gadget": "demo/model"}  # never the server's absolute path
    slot = ModelSlot.open("widget", catalog)
    assert slot.info.public() == {"name": "widget", "version": dir_fingerprint(served["widget"])}
    assert str(tmp_path) not in json.dumps(prediction_response({"score": 1.0}, slot.info))

    caplog.set_level(logging.INFO, logger="raylib_ad.serving")
    with pytest.raises(UnknownCategory):
        catalog.require("nosuch")
    records = [r for r in caplog.records if "nosuch" in r.getMessage()]
    assert records and all(r.levelno == logging.INFO for r in records)

    (served["widget"] / "config.json").unlink()  # a broken directory: 503, named without its path
    with pytest.raises(ModelUnavailable) as err:
        ModelSlot.open("widget", catalog)
    assert "config.json is missing" in err.value.message and str(tmp_path) not in err.value.message


def test_a_broken_new_version_keeps_the_old_one_serving(model_dirs, tmp_path):
    import shutil

    served = tmp_path / "widget"
    shutil.copytree(model_dirs[0], served)
    clock = [0.0]
    slot = ModelSlot("widget", Catalog(ServeSettings.from_dict({"model_dirs": {"widget": str(served)}})),
                     ttl_s=1.0, clock=lambda: clock[0])
    slot.refresh(force=True)
    served_version = slot.info.version
    (served / "weights.safetensors").write_bytes(b"garbage")
    clock[0] = 2.0
    assert slot.refresh() is False and slot.info.version == served_version  # still serving
    assert "failed to load" in slot.last_error and "weights" not in served_version
    with pytest.raises(ModelUnavailable, match="category 'widget'.*failed to load"):
        slot.refresh(force=True)  # the reload endpoint reports the reason


def test_a_broken_model_dir_is_unavailable_not_unknown(tmp_path):
    (tmp_path / "broken").mkdir()
    catalog = Catalog(ServeSettings.from_dict({"model_dirs": {"widget": str(tmp_path / "broken")}}))
    with pytest.raises(ModelUnavailable, match="config.json is missing"):
        ModelSlot.open("widget", catalog)


# ---- responses -----------------------------------------------------------------------------------------
def test_response_fields_and_map_png():
    from PIL import Image

    info = ModelInfo("widget", "registry", "raylib_ad-synthetic-widget", 3, "file:///x")
    amap = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    prediction = {"score": np.float32(2.5), "normalized_score": 0.7, "is_anomalous": True, "threshold": 2.0,
                  "anomaly_map": amap * 5, "normalized_map": amap}
    out = prediction_response(prediction, info, with_map=False)
    assert out == {"score": 2.5, "normalized_score": 0.7, "is_anomalous": True, "threshold": 2.0,
                   "model": {"name": "raylib_ad-synthetic-widget", "version": 3}}
    json.dumps(out)  # plain JSON types only (no numpy scalars)
    with_map = prediction_response(prediction, info, with_map=True, filename="a.png")
    assert with_map["filename"] == "a.png"
    png = Image.open(io.BytesIO(base64.b64decode(with_map["anomaly_map_png"])))
    assert png.size == (64, 64)
    sized = prediction_response(prediction, info, with_map=True, size=(80, 60))  # the request image's size
    png = Image.open(io.BytesIO(base64.b64decode(sized["anomaly_map_png"])))
    assert png.size == (80, 60) and "threshold" in png.text["Threshold"]
    assert prediction_response({"score": 1.0}, info, with_map=True)["anomaly_map_png"] is None


def test_cli_python_and_http_answer_with_the_same_field_names(model_dirs, tmp_path, capsys):
    from raylib_ad.artifact import PREDICTION_FIELDS, load, read_model, write_model_dir
    from raylib_ad.cli import main

    image = tmp_path / "part.png"
    image.write_bytes(png_bytes())
    [python] = load(model_dirs[0]).predict([str(image)])
    http = prediction_response(python, ModelInfo("widget", "model_dir", "widget", "abc", str(model_dirs[0])))
    assert main(["predict", "--model", str(model_dirs[0]), "--maps", str(tmp_path / "maps"), str(image)]) == 0
    cli = json.loads(capsys.readouterr().out)
    for answer in (python, http, cli):
        assert set(PREDICTION_FIELDS) <= set(answer), answer
        assert "label" not in answer
    assert cli["is_anomalous"] is http["is_anomalous"] is python["is_anomalous"]
    assert cli["normalized_score"] == pytest.approx(http["normalized_score"])
    assert cli["threshold"] == http["threshold"] and cli["path"] == str(image)
    assert open(cli["anomaly_map_file"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(cli["anomaly_map_file"]) as png:  # the image's own size (80 x 60), not the model's 64
        assert png.size == (80, 60) and "Threshold" in png.text

    # Without stats.json there is no threshold: all three channels say null, none says "normal".
    bare = write_model_dir(read_model(model_dirs[0]), tmp_path / "bare")
    [python] = load(bare).predict([str(image)])
    assert main(["predict", "--model", str(bare), str(image)]) == 0
    cli = json.loads(capsys.readouterr().out)
    http = prediction_response(python, ModelInfo("widget", "model_dir", "widget", "abc", str(bare)))
    for answer in (python, http, cli):
        assert answer["is_anomalous"] is None and answer["threshold"] is None


def test_cli_serve_refuses_to_start_with_nothing_to_serve(capsys):
    from raylib_ad.cli import main

    assert main(["serve", "--port", "1"]) == 2  # settings are checked before Ray starts
    assert "nothing to serve" in capsys.readouterr().err
    assert main(["serve", "--registry"]) == 2
    assert "needs dataset (--dataset)" in capsys.readouterr().err
