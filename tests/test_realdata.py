"""Real defects: the Magnetic Tile dataset (Huang, Qiu, Yuan, "Surface defect saliency of magnetic tile",
The Visual Computer 2020), read from ../shared/datasets; skipped cleanly where it is absent.

A seeded slice keeps this fast on 2 cores: 200 good training images, 60 test images (30 defective)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from conftest import MAGNETIC_TILE, MAGNETIC_TILE_SPLIT
from raylib_ad.data import build_manifest, validate_manifest
from raylib_ad.data.transforms import decode_all
from raylib_ad.evaluation import score_split
from raylib_ad.postprocess import evaluation_report
from raylib_ad.models import create_model

pytestmark = pytest.mark.skipif(not MAGNETIC_TILE_SPLIT.is_file(), reason="Magnetic Tile dataset not present")


@pytest.fixture(scope="module")
def tile_slice():
    table = build_manifest("magnetic_tile", MAGNETIC_TILE, split_file=MAGNETIC_TILE_SPLIT)
    rng = np.random.default_rng(0)
    train = table.filter(pc.equal(table.column("split"), "train"))
    train = train.take(np.sort(rng.choice(train.num_rows, 200, replace=False)))
    test = table.filter(pc.equal(table.column("split"), "test"))
    labels = test.column("label").to_numpy()
    pick = np.concatenate([rng.choice(np.flatnonzero(labels == k), 30, replace=False) for k in (0, 1)])
    test = test.take(np.sort(pick))
    validate_manifest(pa.concat_tables([train, test]))
    return train, test


@pytest.mark.parametrize("name, layers, settings, min_image_auroc", [
    ("dfm", ["blocks.4"], {}, 0.9),
    ("patchcore", ["blocks.2", "blocks.4"], {"coreset_sampling_ratio": 0.01}, 0.8),
])
def test_memory_bank_models_find_real_defects(tile_slice, name, layers, settings, min_image_auroc, lite0_available):
    train, test = tile_slice
    model = create_model(name, backbone="tf_efficientnet_lite0", layers=layers, image_size=256, **settings)
    cfg = model.config()
    model.fit(torch.from_numpy(b["image"]) for b in decode_all(train, 256, cfg["mean"], cfg["std"],
                                                                 with_masks=False))
    scored = score_split(model, test, progress=False)
    report = evaluation_report(scored.labels, scored.scores, scored.masks, scored.maps)
    assert report["metrics"]["image_auroc"] >= min_image_auroc
    assert report["metrics"]["pixel_auroc"] > 0.6  # the maps point at the defects, not at random pixels
