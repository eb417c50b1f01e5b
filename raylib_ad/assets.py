"""The files anomalib downloads for its models, downloaded the same way, into one cache.

    ASSETS         name -> Asset: anomalib's address and sha256 for each file (read from anomalib 2.x's code)
    fetch_asset    the local path of an asset: from the cache, else downloaded, checked and unpacked
    fetch_assets   several at once, with ONE error naming every one that cannot be had

The cache is ``$RAYLIB_AD_CACHE/assets`` (default ``~/.cache/raylib_ad/assets``), one folder per asset:
``<cache>/<name>/<the archive's file name>`` is where a download lands (and where a copy fetched on another
machine can be put by hand: it is checked and unpacked on the next run), and the archive's contents are
unpacked next to it. A download:
- goes to ``<file>.part`` and is resumed with an HTTP Range request after an interruption (in the same
  run, up to a few times, or in a later run);
- is checked against anomalib's sha256 before it is used; a file that does not match is removed and refused;
- is unpacked (zip, tar) member by member, refusing absolute paths, ``..``, links and device files, into a
  temporary folder that is moved into place only when complete; a marker file then records the hash, so
  a second call does nothing (and concurrent calls on one machine wait for the first, through a file lock).

Offline ($RAYLIB_AD_OFFLINE=1) or when the host cannot be reached, an absent asset raises
`AssetUnavailableError`, naming the file, its address, where to put it and the named fallback setting for
users who accept a method that is not the published one. Training runs fetch their assets on the driver,
before any worker starts (`prepare_model_assets`, called by raylib_ad/train/prepare.py).

$RAYLIB_AD_ASSET_BASE_URL replaces the host and folder of every address (the file name is kept): a mirror,
or the local server the tests start.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import stat
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import Request, urlopen

from .errors import WeightsUnavailableError

BASE_URL_ENV = "RAYLIB_AD_ASSET_BASE_URL"
MARKER = ".raylib_ad_asset.json"
CHUNK = 1 << 20
ATTEMPTS = 4  # one download and up to three resumptions in the same call


class AssetError(WeightsUnavailableError):
    """An asset was downloaded but is not what anomalib publishes (hash), or its archive is unsafe."""


class AssetUnavailableError(WeightsUnavailableError):
    """An asset is not in the cache and cannot be downloaded (offline, or the host does not answer)."""


@dataclass(frozen=True)
class Asset:
    name: str  # the key and the cache folder
    what: str  # what it is, in messages
    url: str  # anomalib's address
    sha256: str  # anomalib's hashsum of the downloaded file
    target: str  # the path fetch_asset returns, relative to the asset's folder once unpacked
    used_by: str  # the model that needs it
    fallback: str  # the named setting for a method that is not the published one, and what it does
    local: str = ""  # a setting that names a copy the user already has
    size: int | None = None  # bytes, when known (checked before the hash)

    @property
    def file(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


# Addresses and hashes: anomalib (open-edge-platform/anomalib, src/anomalib/...), the DownloadInfo of
# models/image/efficient_ad/lightning_model.py (WEIGHTS_DOWNLOAD_INFO, IMAGENETTE_DOWNLOAD_INFO),
# models/image/draem/lightning_model.py (DTD_DOWNLOAD_INFO) and models/image/dsr/lightning_model.py
# (WEIGHTS_DOWNLOAD_INFO); data/utils/download.py checks them as sha256 of the downloaded file.
ASSETS: dict[str, Asset] = {
    asset.name: asset
    for asset in (
        Asset("efficientad_teacher",
              "anomalib's pretrained EfficientAD teachers (PDNs distilled from WideResNet-101 on ImageNet)",
              "https://github.com/open-edge-platform/anomalib/releases/download/efficientad_pretrained_weights/"
              "efficientad_pretrained_weights.zip",
              "c09aeaa2b33f244b3261a5efdaeae8f8284a949470a4c5a526c61275fe62684a",
              "efficientad_pretrained_weights", "efficient_ad",
              "--set self_distilled_teacher=true (the teacher is distilled from distill_backbone on the training "
              "images first)",
              "--set teacher=PATH (a pretrained_teacher_{small,medium}.pth you have), or put the unpacked folder "
              "at $RAYLIB_AD_WEIGHTS_DIR/efficientad_pretrained_weights/"),
        Asset("imagenette", "Imagenette (10 ImageNet classes), the penalty images of EfficientAD's student",
              "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz",
              "6cbfac238434d89fe99e651496f0812ebc7a10fa62bd42d6874042bf01de4efd",
              "imagenette2", "efficient_ad",
              "--set no_penalty=true (no penalty term: the student learns the teacher on the training images only)",
              "--set penalty_dir=FOLDER (any folder of natural images, e.g. an unpacked imagenette2)"),
        Asset("dtd", "the Describable Textures Dataset (DTD), DRAEM's anomaly textures",
              "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
              "e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205",
              "dtd/images", "draem",
              "--set image_as_texture=true (the pasted texture is a shuffled, recoloured copy of a training image)",
              "--set dtd_dir=FOLDER (an unpacked DTD, or any folder of texture images)"),
        Asset("dsr_vq_model", "anomalib's DSR VQ-VAE (discrete latent model) pretrained on ImageNet",
              "https://github.com/open-edge-platform/anomalib/releases/download/dsr_pretrained_weights/"
              "dsr_vq_model_pretrained.zip",
              "52fe7504ec8e9df70b4382f287ab26269dcfe000cd7a7e146a52c6f146f34afb",
              "vq_model_pretrained_128_4096.pckl", "dsr",
              "--set category_trained_vq_model=true (the VQ-VAE is trained on the training images first, "
              "vq_epochs epochs)",
              "--weights PATH (a vq_model_pretrained_128_4096.pckl you have)"),
    )
}


# --- where ------------------------------------------------------------------------------------------------

def cache_root() -> Path:
    root = os.environ.get("RAYLIB_AD_CACHE") or Path.home() / ".cache" / "raylib_ad"
    return Path(root).expanduser() / "assets"


def asset_dir(asset: Asset | str) -> Path:
    return cache_root() / _asset(asset).name


def asset_url(asset: Asset | str) -> str:
    asset = _asset(asset)
    base = os.environ.get(BASE_URL_ENV, "").strip()
    return f"{base.rstrip('/')}/{asset.file}" if base else asset.url


def offline() -> bool:
    return os.environ.get("RAYLIB_AD_OFFLINE", "") not in ("", "0")


def _asset(asset: Asset | str) -> Asset:
    if isinstance(asset, Asset):
        return asset
    try:
        return ASSETS[asset]
    except KeyError:
        raise KeyError(f"unknown asset {asset!r}; known: {', '.join(ASSETS)}") from None


def cached_path(asset: Asset | str) -> Path | None:
    """The asset's path when it is in the cache, complete and from the expected file; else None."""
    asset = _asset(asset)
    folder = asset_dir(asset)
    try:
        record = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    path = folder / asset.target
    return path if record.get("sha256") == asset.sha256 and path.exists() else None


# --- fetch ------------------------------------------------------------------------------------------------

def fetch_asset(asset: Asset | str) -> Path:
    """The local path of `asset` (ASSETS key or Asset): from the cache, else downloaded from its address,
    checked (sha256, and size when known) and unpacked. Idempotent. Raises AssetUnavailableError when it is
    absent and cannot be downloaded, AssetError when what was downloaded is not the published file."""
    asset = _asset(asset)
    path = cached_path(asset)
    if path is not None:
        return path
    folder = asset_dir(asset)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / ".lock"):
        path = cached_path(asset)  # another process may have finished it while this one waited
        if path is not None:
            return path
        archive = folder / asset.file
        if archive.is_file():  # an earlier download, or a copy put there by hand
            _check(asset, archive, downloaded=False)
        else:
            part = folder / (asset.file + ".part")
            _download(asset, asset_url(asset), part)
            try:
                _check(asset, part, downloaded=True)
            except AssetError:
                part.unlink(missing_ok=True)  # a wrong file is not resumed from
                raise
            part.replace(archive)
        _unpack(asset, archive, folder)
        path = folder / asset.target
        if not path.exists():
            raise AssetError(f"{asset.file} (from {asset_url(asset)}) was unpacked into {folder}, but it holds no "
                             f"{asset.target}: not the archive anomalib publishes")
        (folder / MARKER).write_text(json.dumps({"sha256": asset.sha256, "url": asset_url(asset),
                                                 "file": asset.file}) + "\n")
        archive.unlink(missing_ok=True)  # unpacked: the archive would only double the disk use (as anomalib)
        return path


def fetch_assets(names: Iterable[Asset | str]) -> dict[str, Path]:
    """fetch_asset for each; every asset that cannot be had is named in ONE AssetUnavailableError."""
    found, missing = {}, []
    for name in dict.fromkeys(names):
        try:
            found[_asset(name).name] = fetch_asset(name)
        except AssetUnavailableError as err:
            missing.append(str(err))
    if missing:
        raise AssetUnavailableError("\n\n".join(missing))
    return found


def prepare_model_assets(cls, settings: dict[str, Any], *, pretrained: bool = True,
                         weights: str | None = None) -> dict[str, Path]:
    """The driver's check before any worker starts: fetch what a model class with these settings needs
    (its `required_assets`), or raise one error naming all that is missing.

    Nothing with pretrained=False: that is how a trained model directory is evaluated (its weights hold
    everything, and no training data is drawn). A training run with pretrained=false fetches its data
    assets (textures, penalty images) on the worker, with the same error."""
    required = getattr(cls, "required_assets", None)
    if required is None or not pretrained:
        return {}
    return fetch_assets(required({**getattr(cls, "defaults", {}), **settings}, pretrained=pretrained,
                                 weights=weights))


def unavailable_message(asset: Asset | str, reason: str) -> str:
    asset = _asset(asset)
    folder = asset_dir(asset)
    lines = [f"{asset.used_by} needs {asset.what}, which is not in the asset cache and cannot be downloaded "
             f"({reason}).",
             f"  file:       {asset.file} (sha256 {asset.sha256})",
             f"  address:    {asset_url(asset)}",
             f"  put it at:  {folder / asset.file} (downloaded elsewhere; it is checked and unpacked on the next "
             f"run; the cache is $RAYLIB_AD_CACHE/assets, default ~/.cache/raylib_ad/assets)"]
    if asset.local:
        lines.append(f"  or:         {asset.local}")
    lines.append(f"  or accept a method that is not the published one: {asset.fallback}")
    return "\n".join(lines)


# --- download ---------------------------------------------------------------------------------------------

def _download(asset: Asset, url: str, part: Path) -> None:
    """Into `part`, resuming what is there with a Range request; retried after an interruption."""
    if offline():
        raise AssetUnavailableError(unavailable_message(asset, "offline: $RAYLIB_AD_OFFLINE is set"))
    if urlparse(url).scheme not in ("http", "https"):
        raise AssetError(f"{asset.name}: address {url!r} is not http(s)")
    reason = _unreachable(url)
    if reason:
        raise AssetUnavailableError(unavailable_message(asset, reason))
    print(f"[raylib_ad] downloading {asset.file} from {url} into {part.parent}"
          + (f" (resuming at {part.stat().st_size} bytes)" if part.exists() else ""), file=sys.stderr)
    last = None
    for _ in range(ATTEMPTS):
        try:
            if _transfer(url, part):
                return
            last = "the transfer ended early"
        except HTTPError as err:
            if err.code == 416 and part.exists():  # nothing left to send: the .part is complete
                return
            reason = f"HTTP {err.code} {err.reason} from {url}"
            raise AssetUnavailableError(unavailable_message(asset, reason)) from None
        except (URLError, http.client.HTTPException, OSError) as err:  # incl. timeouts and IncompleteRead
            last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
    kept = part.stat().st_size if part.exists() else 0
    raise AssetUnavailableError(unavailable_message(
        asset, f"the download was interrupted {ATTEMPTS} times ({last}); {kept} bytes are kept in {part} and "
               f"the next run resumes from there"))


def _unreachable(url: str, timeout: float = 5.0) -> str | None:
    """None when the host accepts a connection, else why not (fails in seconds, not a long retry). Behind
    a proxy the request itself tells."""
    from urllib.request import getproxies, proxy_bypass

    parsed = urlparse(url)
    if parsed.scheme in getproxies() and not proxy_bypass(parsed.hostname or ""):
        return None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return None
    except OSError as err:
        return f"cannot connect to {parsed.hostname}:{port}: {err}"


def _transfer(url: str, part: Path, timeout: float = 60.0) -> bool:
    """One request: appends to `part` from its current size. True when the body arrived whole."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "raylib_ad", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with urlopen(Request(url, headers=headers), timeout=timeout) as response:  # noqa: S310 (http(s) checked)
        start = 0
        if response.status == 206:
            match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            start = int(match.group(1)) if match else 0
            if start != have:  # not the range asked for: start over
                response.close()
                part.unlink(missing_ok=True)
                return False
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        received = 0
        with open(part, "ab" if start else "wb") as handle:
            while True:
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                handle.write(chunk)
                handle.flush()  # what arrived survives an interruption
                received += len(chunk)
        return expected is None or received == expected


def _check(asset: Asset, path: Path, *, downloaded: bool) -> None:
    size = path.stat().st_size
    origin = f"downloaded from {asset_url(asset)}" if downloaded else "found in the asset cache"
    if asset.size is not None and size != asset.size:
        raise AssetError(f"{path.name} ({origin}) has {size} bytes, anomalib's file has {asset.size}"
                         + ("; it was removed" if downloaded else f"; remove {path} or replace it"))
    digest = _sha256(path)
    if digest != asset.sha256:
        raise AssetError(
            f"{asset.file} ({origin}) does not match anomalib's hash: sha256 {digest}, expected {asset.sha256}"
            + ("; the download was removed (try again, or fetch it from the address yourself)" if downloaded
               else f"; remove {path} or replace it with the file from {asset_url(asset)}"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- unpack -----------------------------------------------------------------------------------------------

def archive_kind(file: str) -> str | None:
    name = file.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar", ".tgz", ".tar.gz", ".tar.xz", ".tar.bz2", ".txz", ".tbz2")):
        return "tar"
    return None  # a plain file (kept as it is)


def _safe_member(name: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if not name or path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", name):
        raise AssetError(f"unsafe path in archive: {name!r}")
    return path


def _unpack(asset: Asset, archive: Path, folder: Path) -> None:
    kind = archive_kind(asset.file)
    if kind is None:
        return
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=folder))
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as handle:
                for info in handle.infolist():
                    _safe_member(info.filename)
                    if stat.S_ISLNK(info.external_attr >> 16):
                        raise AssetError(f"{asset.file}: link in archive: {info.filename!r}")
                for info in handle.infolist():
                    handle.extract(info, staging)
        else:
            with tarfile.open(archive, "r:*") as handle:
                members = handle.getmembers()
                for member in members:
                    _safe_member(member.name)
                    if member.issym() or member.islnk():
                        raise AssetError(f"{asset.file}: link in archive: {member.name!r}")
                    if not (member.isfile() or member.isdir()):
                        raise AssetError(f"{asset.file}: special file in archive: {member.name!r}")
                if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: the stdlib's own guard too
                    handle.extractall(staging, members=members, filter="data")
                else:
                    handle.extractall(staging, members=members)  # noqa: S202 (every member checked above)
        for entry in staging.iterdir():
            destination = folder / entry.name
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            elif destination.exists() or destination.is_symlink():
                destination.unlink()
            entry.replace(destination)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as err:
        raise AssetError(f"{asset.file} cannot be unpacked ({type(err).__name__}: {err}); remove {archive}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
