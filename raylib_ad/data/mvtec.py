"""MVTec AD: the 15 category names and a fail-fast download of one category.

The download is best effort: offline it fails within seconds with a DataError that
says where the files must go and where to get them, instead of hanging a training job.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import socket
import tarfile
import tempfile
import threading
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from ..errors import DataError

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
MVTEC_HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"

_SHARE = "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download"
# The whole dataset in one archive (about 5 GB), as anomalib downloads it.
MVTEC_FULL_ARCHIVE = (
    f"{_SHARE}/420938113-1629952094/mvtec_anomaly_detection.tar.xz",
    "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
)
# Per-category archives from MVTec's download page: (url, sha256). No official per-category
# checksums are published that we could confirm, so these are None and verification is
# skipped with a warning; fill one in to have it enforced.
MVTEC_CATEGORY_ARCHIVES: dict[str, tuple[str, str | None]] = {
    "bottle": (f"{_SHARE}/420937370-1629951468/bottle.tar.xz", None),
    "cable": (f"{_SHARE}/420937413-1629951498/cable.tar.xz", None),
    "capsule": (f"{_SHARE}/420937454-1629951595/capsule.tar.xz", None),
    "carpet": (f"{_SHARE}/420937484-1629951672/carpet.tar.xz", None),
    "grid": (f"{_SHARE}/420937487-1629951814/grid.tar.xz", None),
    "hazelnut": (f"{_SHARE}/420937545-1629951845/hazelnut.tar.xz", None),
    "leather": (f"{_SHARE}/420937607-1629951964/leather.tar.xz", None),
    "metal_nut": (f"{_SHARE}/420937637-1629952063/metal_nut.tar.xz", None),
    "pill": (
        "https://www.mydrive.ch/shares/43421/11a215a5749fcfb75e331ddd5f8e43ee/download/"
        "420938129-1629953099/pill.tar.xz",
        None,
    ),
    "screw": (f"{_SHARE}/420938130-1629953152/screw.tar.xz", None),
    "tile": (f"{_SHARE}/420938133-1629953189/tile.tar.xz", None),
    "toothbrush": (f"{_SHARE}/420938134-1629953256/toothbrush.tar.xz", None),
    "transistor": (f"{_SHARE}/420938166-1629953277/transistor.tar.xz", None),
    "wood": (f"{_SHARE}/420938383-1629953354/wood.tar.xz", None),
    "zipper": (f"{_SHARE}/420938385-1629953449/zipper.tar.xz", None),
}

CONNECT_TIMEOUT_S = 5.0
# Set to 1 to never touch the network (CI, air-gapped clusters).
OFFLINE_ENV = "RAYLIB_AD_OFFLINE"


def ensure_mvtec(root: str | os.PathLike, category: str, *, timeout: float = CONNECT_TIMEOUT_S) -> Path:
    """Return ``root/category``, downloading and unpacking the category if it is absent."""
    if category not in MVTEC_CATEGORY_ARCHIVES:
        raise DataError(f"{category!r} is not an MVTec AD category; choices: {', '.join(MVTEC_CATEGORIES)}")
    root = Path(root).absolute()
    target = root / category
    if target.is_dir():
        return target
    url, sha256 = MVTEC_CATEGORY_ARCHIVES[category]
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise DataError(_missing_message(root, category, f"downloads are disabled by {OFFLINE_ENV}"))
    try:
        response = _open_fast(url, timeout)
    except OSError as exc:  # URLError, socket.timeout and DNS failures are all OSErrors
        raise DataError(_missing_message(root, category, f"download from {url} failed ({exc})")) from exc

    root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{category}.download-", dir=root))
    try:
        archive = workdir / f"{category}.tar.xz"
        with response:
            digest = _stream_to_file(response, archive)
        _verify(archive, digest, sha256, url)
        with tarfile.open(archive, "r:xz") as tar:
            tar.extractall(workdir / "unpacked", filter="data")
        unpacked = workdir / "unpacked" / category
        if not unpacked.is_dir():
            raise DataError(f"archive {url} does not contain a top-level {category}/ directory")
        _publish(unpacked, target)
    except (OSError, EOFError, tarfile.TarError, lzma.LZMAError) as exc:
        raise DataError(_missing_message(root, category, f"download of {url} failed: {exc}")) from exc
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return target


def _open_fast(url: str, timeout: float):
    """urlopen, bounded by ``timeout`` even where DNS resolution ignores socket timeouts."""
    host = urllib.parse.urlsplit(url).hostname or ""
    resolved: list = []

    def resolve() -> None:
        try:
            resolved.append(socket.getaddrinfo(host, 443))
        except OSError as exc:
            resolved.append(exc)

    # A daemon thread, so a resolver that never answers cannot keep the process alive.
    thread = threading.Thread(target=resolve, daemon=True)
    thread.start()
    thread.join(timeout)
    if not resolved:
        raise TimeoutError(f"resolving {host} took longer than {timeout:.0f} s")
    if isinstance(resolved[0], OSError):
        raise resolved[0]
    return urllib.request.urlopen(url, timeout=timeout)


def _stream_to_file(response, path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "wb") as out:
        while chunk := response.read(1 << 20):
            sha.update(chunk)
            out.write(chunk)
    return sha.hexdigest()


def _verify(archive: Path, digest: str, expected: str | None, url: str) -> None:
    if expected is None:
        warnings.warn(f"no published sha256 for {url}; downloaded archive not verified (sha256 {digest})")
    elif digest != expected:
        raise DataError(
            f"checksum mismatch for {url}: expected sha256 {expected}, got {digest} "
            f"(file {archive}); the download is corrupt or the file changed upstream"
        )


def _publish(unpacked: Path, target: Path) -> None:
    try:
        os.rename(unpacked, target)
    except OSError:
        # Another process finished the same download first; keep its copy.
        if not target.is_dir():
            raise


def _missing_message(root: Path, category: str, reason: str) -> str:
    return (
        f"MVTec AD category {category!r} not found at {root / category} and {reason}.\n"
        f"Download {category}.tar.xz (or the full mvtec_anomaly_detection.tar.xz) from "
        f"{MVTEC_HOMEPAGE} and unpack it so that the tree is:\n"
        f"  {root}/{category}/train/good/*.png\n"
        f"  {root}/{category}/test/good/*.png\n"
        f"  {root}/{category}/test/<defect>/*.png\n"
        f"  {root}/{category}/ground_truth/<defect>/<name>_mask.png"
    )
