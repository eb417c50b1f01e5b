"""The files anomalib downloads (raylib_ad/assets.py), fetched from a real HTTP server on 127.0.0.1 that this
module starts, serving small stand-ins under anomalib's file names ($RAYLIB_AD_ASSET_BASE_URL points the
addresses at it; the registry's hashes are replaced by the stand-ins'). Nothing in the download path is
mocked: the bytes travel over a socket, with the server's Range support and an interrupted transfer."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from raylib_ad import assets
from raylib_ad.assets import AssetError, AssetUnavailableError, fetch_asset
from raylib_ad.models import create_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

SIZE = 64


# --- a file server with Range support ------------------------------------------------------------------------

class FileServer:
    """Serves `files` (name -> bytes) at /name; records (name, Range header) per request; `cut[name] = n`
    sends only n bytes of the next response for that file, then closes the connection."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                wanted = self.headers.get("Range")
                server.requests.append((name, wanted))
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = 0
                if wanted:
                    match = re.fullmatch(r"bytes=(\d+)-", wanted)
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                cut = server.cut.pop(name, None)
                self.wfile.write(body if cut is None else body[:cut])
                self.wfile.flush()
                if cut is not None:
                    self.close_connection = True  # the transfer breaks off here

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/files"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def names(self) -> list[str]:
        return [name for name, _ in self.requests]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch, tmp_path):
    """The server, an empty asset cache, online, and every asset's address pointed at the server."""
    srv = FileServer()
    monkeypatch.setenv("RAYLIB_AD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RAYLIB_AD_OFFLINE", "0")
    monkeypatch.setenv(assets.BASE_URL_ENV, srv.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.delenv("RAYLIB_AD_WEIGHTS_DIR", raising=False)
    yield srv
    srv.close()


def serve(srv: FileServer, monkeypatch, name: str, data: bytes, *, sha256: str | None = None) -> assets.Asset:
    """Serve `data` as asset `name`'s file and register its hash (or a given one) for that asset."""
    asset = assets.ASSETS[name]
    srv.files["files/" + asset.file] = data
    asset = dataclasses.replace(asset, sha256=sha256 or hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(assets.ASSETS, name, asset)
    return asset


# --- stand-ins with anomalib's layouts -----------------------------------------------------------------------

def png(colour, size=(40, 40), centre=None) -> bytes:
    """A PNG of one colour; with `centre`, the central half of each side in that colour."""
    from PIL import Image

    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8) + np.array(colour, dtype=np.uint8)
    if centre is not None:
        h, w = size[1], size[0]
        pixels[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = centre
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def tar_gz(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as handle:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            handle.addfile(info, io.BytesIO(data))
    return out.getvalue()


def zip_of(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as handle:
        for name, data in members.items():
            handle.writestr(name, data)
    return out.getvalue()


def torch_bytes(state: dict) -> bytes:
    out = io.BytesIO()
    torch.save(state, out)
    return out.getvalue()


TEXTURES = {"banded/banded_0001.jpg": (200, 30, 30), "dotted/dotted_0002.jpg": (30, 200, 30),
            "zigzagged/zigzagged_0003.jpg": (30, 30, 200)}


def dtd_standin() -> bytes:
    """DTD's layout: dtd/images/<class>/<class>_NNNN.jpg (PNG bytes under .jpg names), labels beside them."""
    members = {f"dtd/images/{name}": png(colour) for name, colour in TEXTURES.items()}
    members["dtd/labels/labels_joint_anno.txt"] = b"banded/banded_0001.jpg banded\n"
    return tar_gz(members)


def imagenette_standin() -> bytes:
    """imagenette2/{train,val}/<wnid>/*.JPEG; each image blue with a red central half (anomalib's crop keeps it)."""
    return tar_gz({"imagenette2/train/n01440764/a.JPEG": png((0, 0, 255), (80, 60), centre=(255, 0, 0)),
                   "imagenette2/val/n02102040/b.JPEG": png((0, 0, 255), (96, 96), centre=(255, 0, 0))})


def teacher_standin(channels: int = 8) -> tuple[bytes, dict]:
    from raylib_ad.models.efficient_ad.networks import PDN

    torch.manual_seed(5)
    state = PDN(channels, "small", False).state_dict()
    return zip_of({"efficientad_pretrained_weights/pretrained_teacher_small.pth": torch_bytes(state)}), state


DSR_TINY = {"embedding_dim": 8, "num_embeddings": 32, "num_hiddens": 8, "num_residual_hiddens": 4, "base_width": 4}


def vq_standin() -> tuple[bytes, dict]:
    from raylib_ad.models.dsr.latent import DiscreteLatentModel

    torch.manual_seed(6)
    state = DiscreteLatentModel(8, 2, 4, 32, 8).state_dict()
    return zip_of({"vq_model_pretrained_128_4096.pckl": torch_bytes(state)}), state


# --- the cache -----------------------------------------------------------------------------------------------

def test_download_checks_the_hash_unpacks_and_is_idempotent(server, monkeypatch, tmp_path):
    serve(server, monkeypatch, "dtd", dtd_standin())
    path = fetch_asset("dtd")
    folder = tmp_path / "cache" / "assets" / "dtd"
    assert path == folder / "dtd" / "images"
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*.jpg")) == sorted(TEXTURES)
    assert (folder / "dtd" / "labels" / "labels_joint_anno.txt").is_file()
    assert server.requests == [("files/dtd-r1.0.1.tar.gz", None)]  # anomalib's file name, one whole request
    assert not list(folder.glob("*.tar.gz*")) and not list(folder.glob(".unpack-*"))  # archive gone once unpacked
    assert fetch_asset("dtd") == path and assets.cached_path("dtd") == path
    assert len(server.requests) == 1  # the second call found it in the cache


def test_an_interrupted_download_resumes_with_a_range_request(server, monkeypatch, tmp_path):
    data, _ = teacher_standin()
    name = "files/efficientad_pretrained_weights.zip"
    serve(server, monkeypatch, "efficientad_teacher", data)
    # 1. the transfer breaks off mid-way: the same call resumes from the bytes it has
    server.cut[name] = len(data) // 3
    path = fetch_asset("efficientad_teacher")
    assert (path / "pretrained_teacher_small.pth").is_file()
    assert server.requests == [(name, None), (name, f"bytes={len(data) // 3}-")]
    # 2. a part left by an earlier, interrupted run: the next run asks only for the rest
    monkeypatch.setenv("RAYLIB_AD_CACHE", str(tmp_path / "other"))
    part = tmp_path / "other" / "assets" / "efficientad_teacher" / "efficientad_pretrained_weights.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:1000])
    server.requests.clear()
    assert (fetch_asset("efficientad_teacher") / "pretrained_teacher_small.pth").is_file()
    assert server.requests == [(name, "bytes=1000-")]
    assert not part.exists()


def test_a_wrong_hash_is_refused_and_nothing_is_kept(server, monkeypatch, tmp_path):
    serve(server, monkeypatch, "dtd", dtd_standin(), sha256="0" * 64)
    with pytest.raises(AssetError) as caught:
        fetch_asset("dtd")
    message = str(caught.value)
    assert "0" * 64 in message and hashlib.sha256(dtd_standin()).hexdigest() in message
    assert "dtd-r1.0.1.tar.gz" in message and server.url in message and "removed" in message
    folder = tmp_path / "cache" / "assets" / "dtd"
    assert not [p for p in folder.iterdir() if p.name != ".lock"] and assets.cached_path("dtd") is None


def test_a_copy_put_in_the_cache_by_hand_is_checked_and_used_offline(server, monkeypatch, tmp_path):
    data = dtd_standin()
    serve(server, monkeypatch, "dtd", data)
    monkeypatch.setenv("RAYLIB_AD_OFFLINE", "1")
    folder = tmp_path / "cache" / "assets" / "dtd"
    folder.mkdir(parents=True)
    (folder / "dtd-r1.0.1.tar.gz").write_bytes(data)
    assert fetch_asset("dtd") == folder / "dtd" / "images" and not server.requests


def test_unsafe_archive_members_are_refused(server, monkeypatch, tmp_path):
    serve(server, monkeypatch, "dtd", tar_gz({"dtd/images/a.jpg": png((1, 2, 3)), "../escaped.txt": b"x"}))
    with pytest.raises(AssetError, match="unsafe path"):
        fetch_asset("dtd")
    assert not (tmp_path / "cache" / "assets" / "escaped.txt").exists() and assets.cached_path("dtd") is None


def test_offline_and_absent_the_error_names_file_address_place_and_fallback(server, monkeypatch, tmp_path):
    monkeypatch.setenv("RAYLIB_AD_OFFLINE", "1")
    with pytest.raises(AssetUnavailableError) as caught:
        assets.fetch_assets(["efficientad_teacher", "imagenette"])  # both named in ONE error
    message = str(caught.value)
    cache = tmp_path / "cache" / "assets"
    for name, setting in (("efficientad_teacher", "self_distilled_teacher=true"), ("imagenette", "no_penalty=true")):
        asset = assets.ASSETS[name]
        assert asset.file in message and f"{server.url}/{asset.file}" in message and setting in message
        assert str(cache / name / asset.file) in message
    assert "RAYLIB_AD_OFFLINE" in message and not server.requests
    # a host that does not answer: the same error, with the reason
    monkeypatch.setenv("RAYLIB_AD_OFFLINE", "0")
    server.close()
    with pytest.raises(AssetUnavailableError, match=r"(?s)cannot connect.*dsr_vq_model_pretrained\.zip.*"
                                                    r"category_trained_vq_model=true"):
        fetch_asset("dsr_vq_model")


def test_anomalibs_addresses_are_the_defaults(monkeypatch):
    monkeypatch.delenv(assets.BASE_URL_ENV, raising=False)
    assert {name: assets.asset_url(name) for name in assets.ASSETS} == {
        "efficientad_teacher": "https://github.com/open-edge-platform/anomalib/releases/download/"
                               "efficientad_pretrained_weights/efficientad_pretrained_weights.zip",
        "imagenette": "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz",
        "dtd": "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
        "dsr_vq_model": "https://github.com/open-edge-platform/anomalib/releases/download/dsr_pretrained_weights/"
                        "dsr_vq_model_pretrained.zip"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", a.sha256) for a in assets.ASSETS.values())


# --- the models' defaults use them ---------------------------------------------------------------------------

def test_draem_by_default_draws_its_anomalies_from_the_downloaded_dtd(server, monkeypatch, tmp_path):
    serve(server, monkeypatch, "dtd", dtd_standin())
    model = create_model("draem", image_size=32, reconstructive_base_width=4, discriminative_base_width=4)
    assert model.required_assets(model.settings) == ["dtd"] and not server.requests  # built without fetching
    model.recipe()  # the worker's augmenter: from the cache (downloaded here)
    folder = model.augmenter().folder
    images_dir = tmp_path / "cache" / "assets" / "dtd" / "dtd" / "images"
    assert folder is not None and folder.paths == sorted(images_dir / name for name in TEXTURES)
    # every texture drawn is one of the served files: with a blend of 1 and no augmentation, the pixels inside
    # the mask are exactly a served texture's colour
    model.augmenter().blend, model.augmenter().augmentations = (1.0, 1.0), 0
    batch = model.augment({"image": torch.zeros(4, 3, 32, 32)}, torch.Generator().manual_seed(0))
    colours = {tuple(round(c / 255, 4) for c in colour) for colour in TEXTURES.values()}
    inside = batch["mask"][:, 0] > 0
    assert inside.any()
    for image, mask in zip(batch["augmented"], inside):
        if mask.any():
            assert tuple(round(v, 4) for v in image[:, mask][:, 0].tolist()) in colours


def test_efficient_ad_by_default_loads_anomalibs_teacher_and_imagenette_with_its_crop(server, monkeypatch, tmp_path):
    data, state = teacher_standin()
    serve(server, monkeypatch, "efficientad_teacher", data)
    serve(server, monkeypatch, "imagenette", imagenette_standin())
    model = create_model("efficient_ad", image_size=SIZE, teacher_out_channels=8)
    cache = tmp_path / "cache" / "assets"
    assert model.teacher_source == str(cache / "efficientad_teacher" / "efficientad_pretrained_weights"
                                       / "pretrained_teacher_small.pth")
    assert all(torch.equal(model.teacher.state_dict()[k], v) for k, v in state.items())
    assert [s.name for s in model.recipe()] == ["teacher_statistics", "train", "map_quantiles"]  # no distillation
    assert sorted(Path(p).name for p in model._penalty.paths) == ["a.JPEG", "b.JPEG"]
    # anomalib's transform: Resize((2S, 2S)), CenterCrop(S): only the red central half is left
    penalty = model._penalty.take(2)
    assert penalty.shape == (2, 3, SIZE, SIZE)
    assert torch.allclose(penalty[:, :, 1:-1, 1:-1], torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1).expand(2, 3, 62, 62))
    from PIL import Image
    from torchvision.transforms import v2

    reference = v2.Compose([v2.Resize((2 * SIZE, 2 * SIZE)), v2.CenterCrop((SIZE, SIZE)), v2.PILToTensor()])
    from raylib_ad.models.efficient_ad.penalty import load_penalty_image

    for source in model._penalty.paths:
        with Image.open(source) as image:
            expected = reference(image.convert("RGB")).permute(1, 2, 0).numpy().astype(int)
        assert np.abs(load_penalty_image(source, SIZE).astype(int) - expected).max() <= 1
    # a training step (the runner's step context, no stream given) draws them: the penalty term is on
    from raylib_ad.train.step_context import RunnerStepContext

    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    model.fit_teacher_statistics([x])
    train = next(s for s in model.recipe() if s.name == "train")
    ctx = RunnerStepContext(batch={"image": x}, modules=train.modules, optimizers={o.name: o for o in train.optimizers},
                            extra={}, epoch=0, step=0, generator=torch.Generator().manual_seed(0), use_amp=False,
                            weight=1.0)
    train.step(ctx)
    assert ctx.logged["loss_penalty"] > 0


def test_dsr_by_default_loads_anomalibs_vq_model(server, monkeypatch, tmp_path):
    data, state = vq_standin()
    serve(server, monkeypatch, "dsr_vq_model", data)
    model = create_model("dsr", image_size=SIZE, **DSR_TINY)
    assert model.latent_from_file == str(tmp_path / "cache" / "assets" / "dsr_vq_model"
                                         / "vq_model_pretrained_128_4096.pckl")
    assert torch.equal(model.discrete_latent_model.state_dict()["_vq_vae_top._embedding.weight"],
                       state["_vq_vae_top._embedding.weight"])
    assert [s.name for s in model.recipe()] == ["main", "upsample"]  # no latent stage


def test_the_named_fallbacks_need_no_download(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYLIB_AD_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("RAYLIB_AD_OFFLINE", "1")
    draem = create_model("draem", image_size=32, reconstructive_base_width=4, discriminative_base_width=4,
                         image_as_texture=True)
    draem.recipe()
    assert draem.augmenter().mode == "self"
    dsr = create_model("dsr", image_size=SIZE, category_trained_vq_model=True, **DSR_TINY)
    assert dsr.latent_from_file is None and dsr.recipe()[0].name == "latent"
    ead = create_model("efficient_ad", image_size=SIZE, teacher_out_channels=8, pretrained=False,
                       self_distilled_teacher=True, no_penalty=True)
    assert ead.recipe()[0].name == "distill" and ead._penalty is None
    assert not (tmp_path / "empty").exists()


def test_a_training_run_fails_on_the_driver_before_ray_starts(server, synthetic_root, monkeypatch, capsys, tmp_path):
    """`raylib-ad train` offline without DTD: one error (exit 2) naming file, address, place and fallback;
    Ray is never started and nothing is written. Online, the driver fetches it before training."""
    import ray

    from raylib_ad.cli import main
    from raylib_ad.options import TrainOptions
    from raylib_ad.train import ray_setup
    from raylib_ad.train.prepare import prepare

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started although an asset was missing")

    monkeypatch.setattr(ray_setup, "ensure_ray", no_ray)
    monkeypatch.setenv("RAYLIB_AD_OFFLINE", "1")
    was_up = ray.is_initialized()
    code = main(["train", "--model", "draem", "--data", "synthetic", "--root", str(synthetic_root), "--category",
                 "widget", "--image-size", "32", "--out", str(tmp_path / "run"), "--no-mlflow"])
    err = capsys.readouterr().err
    assert code == 2 and ray.is_initialized() == was_up and not (tmp_path / "run").exists()
    for words in ("dtd-r1.0.1.tar.gz", f"{server.url}/dtd-r1.0.1.tar.gz",
                  str(tmp_path / "cache" / "assets" / "dtd" / "dtd-r1.0.1.tar.gz"), "image_as_texture=true"):
        assert words in err, err
    monkeypatch.setenv("RAYLIB_AD_OFFLINE", "0")
    serve(server, monkeypatch, "dtd", dtd_standin())
    prepare(TrainOptions(model="draem", data="synthetic", root=str(synthetic_root), category="widget",
                         image_size=32), validate=False, quiet=True)
    assert assets.cached_path("dtd") is not None and len(server.requests) == 1
