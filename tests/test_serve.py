"""The Serve application on 127.0.0.1, called over real HTTP: one category from a temporary MLflow registry
(the champion alias), one from a model directory, one broken directory."""

from __future__ import annotations

import asyncio
import base64
import io
import time

import pytest

from test_serve_unit import png_bytes, small_model_dir

pytestmark = pytest.mark.ray

MAX_BODY, MAX_PIXELS, MAX_FILES = 200_000, 300 * 300, 4


def _register(uri: str, model_dir, category: str = "widget") -> int:
    import mlflow

    from raylib_ad.tracking.registry import register_champion

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("serve-test")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(model_dir), artifact_path="model")
    return register_champion(run.info.run_id, "synthetic", category, uri=uri)


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory, lite0_available):
    import httpx
    from ray import serve

    from conftest import free_port
    from raylib_ad.serving.app import build_app

    tmp = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # the sqlite store puts artifacts under ./mlruns
        models = {name: small_model_dir(tmp / name, q, seed)
                  for name, q, seed in (("v1", 0.2, 0), ("v2", 0.8, 1), ("v3", 0.5, 2), ("gadget", 0.5, 3))}
        (tmp / "broken").mkdir()
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        assert _register(uri, models["v1"]) == 1
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
        serve.run(build_app({
            "model_dirs": {"gadget": str(models["gadget"]), "broken": str(tmp / "broken")},
            "registry": True, "dataset": "synthetic", "tracking_uri": uri, "cache_dir": str(tmp / "cache"),
            "champion_ttl_s": 1.0, "max_body_bytes": MAX_BODY, "max_image_pixels": MAX_PIXELS,
            "max_files": MAX_FILES, "max_batch_size": 8, "batch_wait_timeout_s": 0.05,
        }), name="raylib_ad", route_prefix="/")
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                yield client, models, uri
        finally:
            serve.shutdown()


def _flat_png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 90, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def _expected(model_dir, image: bytes) -> dict:
    from raylib_ad.artifact import load
    from raylib_ad.serving.decode import decode_image

    return load(model_dir).predict([decode_image(image, MAX_PIXELS)])[0]


def _assert_matches(answer: dict, expected: dict, name, version) -> None:
    assert answer["score"] == pytest.approx(expected["score"], rel=1e-5)
    assert answer["normalized_score"] == pytest.approx(expected["normalized_score"], rel=1e-5)
    assert answer["is_anomalous"] == expected["is_anomalous"]
    assert answer["threshold"] == pytest.approx(expected["threshold"])
    assert answer["model"] == {"name": name, "version": version}


def test_predict_raw_bytes_equals_the_model_and_map_is_a_png(served):
    from PIL import Image

    client, models, _ = served
    image = png_bytes(seed=1)
    answer = client.post("/v1/categories/widget/predict", content=image, headers={"content-type": "image/png"})
    assert answer.status_code == 200, answer.text
    assert "anomaly_map_png" not in answer.json()
    _assert_matches(answer.json(), _expected(models["v1"], image), "raylib_ad-synthetic-widget", 1)

    answer = client.post("/v1/categories/gadget/predict?map=true", content=image)
    assert answer.status_code == 200, answer.text
    _assert_matches(answer.json(), _expected(models["gadget"], image), "gadget",  # the directory's name
                    answer.json()["model"]["version"])
    png = Image.open(io.BytesIO(base64.b64decode(answer.json()["anomaly_map_png"])))
    assert png.format == "PNG" and png.size == Image.open(io.BytesIO(image)).size == (80, 60)  # not the model's 64


def test_multipart_and_concurrent_requests_across_categories(served):
    import httpx

    client, models, _ = served
    images = [png_bytes(seed=s) for s in range(3)]
    answer = client.post("/v1/categories/widget/predict",
                         files=[("files", (f"p{i}.png", b, "image/png")) for i, b in enumerate(images)])
    assert answer.status_code == 200, answer.text
    assert [a["filename"] for a in answer.json()] == ["p0.png", "p1.png", "p2.png"]
    for a, image in zip(answer.json(), images):
        _assert_matches(a, _expected(models["v1"], image), "raylib_ad-synthetic-widget", 1)

    async def burst():  # both categories in flight at once: batches mix them and group by category
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=60) as aclient:
            return await asyncio.gather(*(aclient.post(f"/v1/categories/{c}/predict", content=images[i % 3])
                                          for i, c in enumerate(["widget", "gadget"] * 6)))

    for i, response in enumerate(asyncio.run(burst())):
        assert response.status_code == 200, response.text
        model_dir = models["v1"] if i % 2 == 0 else models["gadget"]
        assert response.json()["score"] == pytest.approx(_expected(model_dir, images[i % 3])["score"], rel=1e-5)


@pytest.mark.parametrize("path, kwargs, status, message", [
    ("widget", {"content": b""}, 400, "request body is empty"),
    ("widget", {"content": b"GIF89a but not really"}, 400, "request body is not a readable image"),
    ("widget", {"content": b"\0" * (MAX_BODY + 1)}, 413, f"the limit is {MAX_BODY} (max_body_bytes)"),
    ("widget", {"content": _flat_png(400, 300)}, 413, "400x300 = 120000 pixels"),  # few bytes, many pixels
    ("nosuch", {"content": png_bytes()}, 404, "raylib_ad-synthetic-nosuch has no 'champion' version"),
    ("widget", {"files": [("files", (f"{i}.png", png_bytes(), "image/png")) for i in range(MAX_FILES + 1)]},
     413, f"more than {MAX_FILES} files"),
    ("widget", {"files": [("files", ("bad.png", b"nope", "image/png"))]}, 400, "file 'bad.png' is not a readable image"),
    ("broken", {"content": png_bytes()}, 503, "config.json is missing"),
])
def test_bad_requests_get_4xx_and_a_message(served, path, kwargs, status, message):
    client, _, _ = served
    answer = client.post(f"/v1/categories/{path}/predict", **kwargs)
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    assert message in detail, detail


@pytest.mark.parametrize("content_type, body, message", [
    ("multipart/form-data; boundary=b", b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nx\r\n--b--\r\n',
     "no file parts"),
    ("multipart/form-data", b"--b\r\n", "Missing boundary"),
    ("multipart/form-data; boundary=b", b"--b\r\nno headers, no end" + b"\x00" * 50, "multipart body"),
])
def test_malformed_multipart_is_a_400(served, content_type, body, message):
    client, _, _ = served
    answer = client.post("/v1/categories/widget/predict", headers={"content-type": content_type}, content=body)
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["detail"]


def test_listing_health_and_openapi(served):
    client, models, _ = served
    assert client.get("/healthz").json()["status"] == "ok"
    listing = {c["category"]: c for c in client.get("/v1/categories").json()["categories"]}
    assert set(listing) == {"widget", "gadget", "broken"}
    assert (listing["widget"]["source"], listing["widget"]["version"]) == ("registry", 1)
    assert listing["gadget"]["source"] == "model_dir"
    spec = client.get("/openapi.json").json()
    assert "/v1/categories/{category}/predict" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_a_new_champion_is_served_without_a_restart(served):
    client, models, uri = served
    image = png_bytes(seed=5)
    assert _register(uri, models["v2"]) == 2
    answer = client.post("/v1/categories/widget/reload")  # at once, on the replica that answers
    assert answer.status_code == 200, answer.text
    assert answer.json()["changed"] is True and answer.json()["model"]["version"] == 2
    _assert_matches(client.post("/v1/categories/widget/predict", content=image).json(),
                    _expected(models["v2"], image), "raylib_ad-synthetic-widget", 2)

    assert _register(uri, models["v3"]) == 3  # no reload call: the champion_ttl_s check finds it
    time.sleep(1.5)  # the first request after the TTL checks the registry and loads v3 before it is scored
    _assert_matches(client.post("/v1/categories/widget/predict", content=image).json(),
                    _expected(models["v3"], image), "raylib_ad-synthetic-widget", 3)
    listing = {c["category"]: c for c in client.get("/v1/categories").json()["categories"]}
    assert (listing["widget"]["version"], listing["widget"]["loaded_version"]) == (3, 3)  # one replica here


def test_cli_serve_answers_plainly_and_stops_cleanly_on_sigterm(tmp_path, lite0_available):
    """`raylib-ad serve` as a user runs it (its own Ray, in a subprocess): a text body, a 20000 x 20000
    PNG header, an unknown category and a good image get plain answers; SIGTERM then stops it with one
    line and exit 0: no native stack dump, no abort, no traceback, and the 404 was not logged as an ERROR."""
    import os
    import signal
    import subprocess
    import sys

    import httpx
    from PIL import Image

    from conftest import free_port
    from test_serve_unit import png_header

    model_dir = small_model_dir(tmp_path / "widget")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own cluster, not the session's
    out, err = open(tmp_path / "stdout", "w+"), open(tmp_path / "stderr", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "raylib_ad.cli", "serve", "--model-dir", f"widget={model_dir}",
                             "--port", str(port), "--min-replicas", "1", "--max-replicas", "1"],
                            cwd=tmp_path, env=env, stdout=out, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "SIGTERM stops" not in (tmp_path / "stdout").read_text():
            assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not start in 300 s"
            time.sleep(1)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            text = client.post("/v1/categories/widget/predict", content=b"hello, not an image")
            assert text.status_code == 400 and "not a readable image" in text.json()["detail"]
            assert "0x" not in text.text and "object at" not in text.text
            huge = client.post("/v1/categories/widget/predict", content=png_header(20000, 20000))
            assert huge.status_code == 413 and "the limit is 16777216 (max_image_pixels)" in huge.json()["detail"]
            image = png_bytes(seed=3)
            good = client.post("/v1/categories/widget/predict?map=true", content=image)
            assert good.status_code == 200, good.text
            assert good.json()["model"]["name"] == "widget" and str(tmp_path) not in good.text
            assert Image.open(io.BytesIO(base64.b64decode(good.json()["anomaly_map_png"]))).size == (80, 60)
            unknown = client.post("/v1/categories/nosuch/predict", content=image)
            assert unknown.status_code == 404 and "'nosuch' is not served" in unknown.json()["detail"]
        time.sleep(2)  # the replica's log lines reach the driver's stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) in (0, 143)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.close()
        err.close()
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 0, stderr[-3000:]
    assert "raylib-ad serve: stopped (SIGTERM)" in stderr
    for sign in ("SIGTERM received", "Traceback", "SIGABRT", "Aborted", "core dumped", "Fatal Python error"):
        assert sign not in stderr, stderr[-3000:]
    assert not [line for line in stderr.splitlines() if "ERROR" in line and "nosuch" in line], stderr[-3000:]
