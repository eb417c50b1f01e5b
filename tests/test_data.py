"""Tests for raylib_ad.data: layouts, manifest validation, synthetic data (transforms: test_transforms.py)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from raylib_ad.data import (
    decode_all,
    MANIFEST_SCHEMA,
    build_manifest,
    ensure_mvtec,
    ensure_synthetic,
    folder_manifest,
    make_manifest,
    mvtec_manifest,
    split_counts,
    validate_manifest,
)
from conftest import write_image
from raylib_ad.data import mvtec as mvtec_module
from raylib_ad.errors import ConfigError, DataError


SMALL = dict(n_train=4, n_test_good=2, n_test_defect=4, image_size=48)


def rows_of(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- synthetic ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_default(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("synthetic"), "widget")


def test_synthetic_default_layout_is_complete_and_fast(tmp_path):
    start = time.perf_counter()
    category = ensure_synthetic(tmp_path, "speed_check")
    assert time.perf_counter() - start < 2.0
    assert len(list((category / "train/good").glob("*.png"))) == 40
    assert len(list((category / "test/good").glob("*.png"))) == 10
    defects = {d.name: len(list(d.glob("*.png"))) for d in (category / "test").iterdir() if d.name != "good"}
    assert defects == {"scratch": 10, "spot": 10}
    for defect, count in defects.items():
        assert len(list((category / "ground_truth" / defect).glob("*_mask.png"))) == count
    assert [p.name for p in tmp_path.iterdir()] == ["speed_check"], "temporary directory left behind"


def test_synthetic_masks_are_binary_and_nonempty_exactly_for_defects(synthetic_default):
    table = mvtec_manifest(synthetic_default.parent, "widget")
    validate_manifest(table)
    for row in rows_of(table):
        image = np.asarray(Image.open(row["path"]))
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        if row["label"] == 0:
            assert row["mask_path"] is None
            continue
        mask = np.asarray(Image.open(row["mask_path"]))
        assert set(np.unique(mask)) == {0, 255}, row["mask_path"]
        # A defect is small: visible, but far from covering the image.
        assert 10 <= (mask == 255).sum() <= 0.1 * mask.size


def test_synthetic_defects_are_not_found_by_grey_level_alone(synthetic_default):
    rows = rows_of(mvtec_manifest(synthetic_default.parent, "widget"))

    def grey(path):
        return np.asarray(Image.open(path).convert("L"))

    normal = np.concatenate([grey(r["path"]).ravel() for r in rows if r["split"] == "train"])
    low, high = np.percentile(normal, [1, 99])
    hidden = {"scratch": [], "spot": []}
    for r in rows:
        if r["label"] == 1:
            values = grey(r["path"])[grey(r["mask_path"]) > 0]
            hidden[r["defect"]].append(((values >= low) & (values <= high)).mean())
    # Share of defect pixels whose grey level a normal image also has: spots only change
    # colour and texture; a fair part of every scratch stays within the normal range too.
    assert np.median(hidden["spot"]) > 0.9
    assert np.median(hidden["scratch"]) > 0.3


def test_synthetic_is_deterministic_per_name(tmp_path):
    a = ensure_synthetic(tmp_path / "a", "alpha", **SMALL)
    again = ensure_synthetic(tmp_path / "b", "alpha", **SMALL)
    other = ensure_synthetic(tmp_path / "c", "beta", **SMALL)
    assert file_bytes(a) == file_bytes(again)
    a_files, other_files = file_bytes(a), file_bytes(other)
    assert a_files.keys() == other_files.keys()
    assert all(a_files[name] != other_files[name] for name in a_files if not name.startswith("ground_truth"))


def test_synthetic_is_idempotent_and_refuses_incomplete(tmp_path):
    category = ensure_synthetic(tmp_path, "alpha", **SMALL)
    before = {p: p.stat().st_mtime_ns for p in category.rglob("*")}
    assert ensure_synthetic(tmp_path, "alpha", **SMALL) == category
    assert {p: p.stat().st_mtime_ns for p in category.rglob("*")} == before

    victim = category / "test" / "spot" / "000.png"
    victim.unlink()
    with pytest.raises(DataError, match=str(victim)):
        ensure_synthetic(tmp_path, "alpha", **SMALL)


def test_build_manifest_synthetic(tmp_path):
    table = build_manifest("synthetic", tmp_path, "gadget")
    assert table.schema == MANIFEST_SCHEMA
    assert split_counts(table) == {"train": {"normal": 40, "anomalous": 0}, "test": {"normal": 10, "anomalous": 20}}
    assert set(table.column("category").to_pylist()) == {"gadget"}


def test_build_manifest_unknown_kind_names_value_and_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"'mvtec3d'.*mvtec, folder, magnetic_tile, synthetic"):
        build_manifest("mvtec3d", tmp_path, "x")


# --- MVTec layout ------------------------------------------------------------------------


def make_mvtec_tree(root: Path) -> Path:
    base = root / "parts"
    write_image(base / "train/good/000.png")
    write_image(base / "train/good/001.JPG")
    write_image(base / "train/good/002.jpeg")
    write_image(base / "train/good/.003.png")  # hidden files are not images
    (base / "train/good/notes.txt").write_text("not an image")
    write_image(base / "test/good/000.PNG")
    write_image(base / "test/crack/000.bmp")
    write_image(base / "ground_truth/crack/000_mask.png", mode="L", value=255)
    write_image(base / "test/hole/000.TIFF")
    write_image(base / "ground_truth/hole/000_mask.png", mode="L", value=255)
    return base


def test_mvtec_manifest_rows_labels_and_masks(tmp_path):
    base = make_mvtec_tree(tmp_path)
    table = mvtec_manifest(tmp_path, "parts")
    assert table.schema == MANIFEST_SCHEMA
    got = [(Path(r["path"]).relative_to(base).as_posix(), r["label"], r["defect"], r["split"]) for r in rows_of(table)]
    assert got == [
        ("test/crack/000.bmp", 1, "crack", "test"),
        ("test/good/000.PNG", 0, "good", "test"),
        ("test/hole/000.TIFF", 1, "hole", "test"),
        ("train/good/000.png", 0, "good", "train"),
        ("train/good/001.JPG", 0, "good", "train"),
        ("train/good/002.jpeg", 0, "good", "train"),
    ]
    masks = {r["defect"]: r["mask_path"] for r in rows_of(table) if r["label"] == 1}
    assert masks == {
        "crack": str(base / "ground_truth/crack/000_mask.png"),
        "hole": str(base / "ground_truth/hole/000_mask.png"),
    }
    assert all(r["mask_path"] is None for r in rows_of(table) if r["label"] == 0)
    assert all(os.path.isabs(r["path"]) for r in rows_of(table))
    assert set(table.column("category").to_pylist()) == {"parts"}
    validate_manifest(table)


def test_mvtec_manifest_reports_every_missing_mask(tmp_path):
    base = make_mvtec_tree(tmp_path)
    write_image(base / "test/crack/001.png")
    (base / "ground_truth/hole/000_mask.png").unlink()
    write_image(base / "train/crack/000.png")
    with pytest.raises(DataError) as info:
        mvtec_manifest(tmp_path, "parts")
    message = str(info.value)
    assert str(base / "ground_truth/crack/001_mask.png") in message
    assert str(base / "ground_truth/hole/000_mask.png") in message
    assert f"unexpected folder {base / 'train/crack'}" in message
    assert "3 problem(s)" in message


def test_corrupt_image_missing_mask_and_wrong_size_mask_reported_in_one_message(tmp_path):
    # The three kinds of problem in one dataset: a run must list all of them, not stop at the first kind.
    base = make_mvtec_tree(tmp_path)
    corrupt = base / "test/good/001.png"
    corrupt.write_bytes(b"\x89PNG truncated")
    (base / "ground_truth/hole/000_mask.png").unlink()
    wrong = write_image(base / "ground_truth/crack/000_mask.png", size=(16, 8), mode="L", value=255)
    corrupt_mask = base / "ground_truth/crack/001_mask.png"
    write_image(base / "test/crack/001.png")
    corrupt_mask.write_bytes(b"not a png")
    with pytest.raises(DataError) as info:
        build_manifest("mvtec", tmp_path, "parts")  # what train/evaluate call first
    message = str(info.value)
    assert message.startswith("4 problem(s)"), message
    assert f"missing mask for {base / 'test/hole/000.TIFF'}" in message
    assert f"image cannot be decoded: {corrupt}" in message
    assert f"mask size 16x8 differs from image size 32x32: mask {wrong}" in message
    assert f"mask cannot be decoded: {corrupt_mask}" in message


def test_validate_manifest_lists_corrupt_image_and_its_mask_problem_together(tmp_path):
    # A split file's rows reach validate_manifest directly: one row's corrupt image must not hide
    # another row's missing mask or a third row's wrong-size mask, nor its own mask's problem.
    good = write_image(tmp_path / "good.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"nope")
    corrupt_mask = write_image(tmp_path / "corrupt_mask.png", size=(8, 8), mode="L")
    defect = write_image(tmp_path / "defect.png", size=(32, 24))
    small = write_image(tmp_path / "defect_mask.png", size=(16, 16), mode="L", value=255)
    lost = write_image(tmp_path / "lost.png")
    table = make_manifest([
        row(good),
        row(corrupt, label=1, split="test", mask=corrupt_mask),
        row(defect, label=1, split="test", mask=small),
        row(lost, label=1, split="test", mask=tmp_path / "lost_mask.png"),
    ])
    with pytest.raises(DataError) as info:
        validate_manifest(table)
    message = str(info.value)
    assert message.startswith("3 problem(s)"), message
    assert f"image cannot be decoded: {corrupt}" in message
    assert f"mask size 16x16 differs from image size 32x24: mask {small}" in message
    assert f"mask file does not exist: {tmp_path / 'lost_mask.png'}" in message


def test_mvtec_manifest_missing_custom_category(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nothing_here")):
        mvtec_manifest(tmp_path, "nothing_here")


def test_mvtec_missing_official_category_offline_explains_where_to_put_files(tmp_path, monkeypatch):
    monkeypatch.setenv(mvtec_module.OFFLINE_ENV, "1")
    with pytest.raises(DataError) as info:
        build_manifest("mvtec", tmp_path, "bottle")
    message = str(info.value)
    assert f"{tmp_path}/bottle/train/good/*.png" in message
    assert f"{tmp_path}/bottle/ground_truth/<defect>/<name>_mask.png" in message
    assert "https://www.mvtec.com/company/research/datasets/mvtec-ad" in message


def test_mvtec_download_gives_up_fast_when_dns_hangs(tmp_path, monkeypatch):
    monkeypatch.delenv(mvtec_module.OFFLINE_ENV, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: time.sleep(3))
    start = time.perf_counter()
    with pytest.raises(DataError, match="bottle.tar.xz"):
        ensure_mvtec(tmp_path, "bottle", timeout=0.2)
    assert time.perf_counter() - start < 1.5
    assert list(tmp_path.iterdir()) == []


def test_mvtec_category_table_is_complete():
    assert len(mvtec_module.MVTEC_CATEGORIES) == 15
    assert set(mvtec_module.MVTEC_CATEGORY_ARCHIVES) == set(mvtec_module.MVTEC_CATEGORIES)
    for category, (url, _) in mvtec_module.MVTEC_CATEGORY_ARCHIVES.items():
        assert url.startswith("https://") and url.endswith(f"/{category}.tar.xz")


# --- manifest validation -----------------------------------------------------------------


def row(path, *, label=0, split="train", mask=None, defect=None):
    return {
        "path": str(path),
        "mask_path": str(mask) if mask else None,
        "label": label,
        "defect": defect or ("good" if label == 0 else "crack"),
        "category": "unit",
        "split": split,
    }


def test_make_manifest_sorts_and_checks_values(tmp_path):
    table = make_manifest([row(tmp_path / "b.png"), row(tmp_path / "c.png", split="test"), row(tmp_path / "a.png")])
    assert [(r["split"], Path(r["path"]).name) for r in rows_of(table)] == [
        ("test", "c.png"),
        ("train", "a.png"),
        ("train", "b.png"),
    ]
    with pytest.raises(DataError, match=r"split 'val'.*x\.png"):
        make_manifest([row(tmp_path / "x.png", split="val")])
    with pytest.raises(DataError, match=r"label 2.*x\.png"):
        make_manifest([row(tmp_path / "x.png", label=2)])


def test_validate_manifest_unreadable_image(tmp_path):
    good = write_image(tmp_path / "good.png")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG not really a png")
    table = make_manifest([row(good), row(garbage, split="test")])
    validate_manifest(table, check_images=False)  # exists, so only decoding finds it
    with pytest.raises(DataError, match=f"image cannot be decoded: {garbage}"):
        validate_manifest(table)


def test_validate_manifest_missing_image_and_mask(tmp_path):
    good = write_image(tmp_path / "good.png")
    defect = write_image(tmp_path / "defect.png")
    gone = tmp_path / "gone.png"
    table = make_manifest([row(good), row(gone), row(defect, label=1, split="test", mask=tmp_path / "defect_mask.png")])
    for check_images in (False, True):
        with pytest.raises(DataError) as info:
            validate_manifest(table, check_images=check_images)
        assert f"image file does not exist: {gone}" in str(info.value)
        assert f"mask file does not exist: {tmp_path / 'defect_mask.png'}" in str(info.value)


def test_validate_manifest_mask_size_mismatch_names_both_files(tmp_path):
    good = write_image(tmp_path / "good.png")
    defect = write_image(tmp_path / "defect.png", size=(32, 24))
    mask = write_image(tmp_path / "defect_mask.png", size=(16, 16), mode="L", value=255)
    table = make_manifest([row(good), row(defect, label=1, split="test", mask=mask)])
    with pytest.raises(DataError) as info:
        validate_manifest(table)
    message = str(info.value)
    assert "16x16" in message and "32x24" in message
    assert str(mask) in message and str(defect) in message


def test_validate_manifest_empty_train_set(tmp_path):
    image = write_image(tmp_path / "cat" / "only_test.png")
    with pytest.raises(DataError, match=rf"empty train set.*unit.*{tmp_path / 'cat'}"):
        validate_manifest(make_manifest([row(image, split="test")]))


def test_validate_manifest_reports_all_problems_at_once(tmp_path):
    good = write_image(tmp_path / "good.png")
    anomalous_train = write_image(tmp_path / "bad_train.png")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"nope")
    missing = [tmp_path / f"missing_{i:02d}.png" for i in range(25)]
    rows = [row(good), row(anomalous_train, label=1), row(garbage, split="test")]
    rows += [row(p, split="test") for p in missing]
    with pytest.raises(DataError) as info:
        validate_manifest(make_manifest(rows))
    message = str(info.value)
    assert message.startswith("27 problem(s)")
    assert f"anomalous image (label=1, defect='crack'): {anomalous_train}" in message
    assert str(garbage) in message
    assert "... and 7 more" in message


# --- folder layout -----------------------------------------------------------------------


@pytest.fixture()
def folder_tree(tmp_path) -> Path:
    for i in range(20):
        write_image(tmp_path / "ok" / f"n{i:02d}.png")
    for i in range(4):
        write_image(tmp_path / "ng" / f"a{i}.png")
    write_image(tmp_path / "masks" / "a0.png", mode="L", value=255)
    write_image(tmp_path / "masks" / "a1_mask.png", mode="L", value=255)
    write_image(tmp_path / "masks" / "a2.png", mode="L", value=255)
    write_image(tmp_path / "masks" / "a3_mask.png", mode="L", value=255)
    return tmp_path


def test_folder_split_is_seeded_and_counts_are_right(folder_tree):
    def test_normals(seed):
        table = folder_manifest(folder_tree, "ok", "ng", "masks", seed=seed, test_fraction=0.25)
        return {r["path"] for r in rows_of(table) if r["split"] == "test" and r["label"] == 0}, table

    first, table = test_normals(0)
    assert split_counts(table) == {"train": {"normal": 15, "anomalous": 0}, "test": {"normal": 5, "anomalous": 4}}
    assert test_normals(0)[0] == first
    assert test_normals(1)[0] != first
    masks = {Path(r["path"]).stem: Path(r["mask_path"]).name for r in rows_of(table) if r["label"] == 1}
    assert masks == {"a0": "a0.png", "a1": "a1_mask.png", "a2": "a2.png", "a3": "a3_mask.png"}
    assert set(table.column("defect").to_pylist()) == {"good", "ng"}
    assert set(table.column("category").to_pylist()) == {folder_tree.name}
    validate_manifest(table)


def test_folder_missing_mask_and_bad_fraction(folder_tree):
    (folder_tree / "masks" / "a3_mask.png").unlink()
    with pytest.raises(DataError, match=str(folder_tree / "masks" / "a3_mask.png")):
        build_manifest("folder", folder_tree, normal_dir="ok", abnormal_dir="ng", mask_dir="masks")
    with pytest.raises(ConfigError, match="test_fraction=1.5"):
        folder_manifest(folder_tree, "ok", "ng", test_fraction=1.5)


def test_decode_all_keeps_row_order(tmp_path):
    table = mvtec_manifest(tmp_path, make_mvtec_tree(tmp_path).name)
    batches = list(decode_all(table, 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), batch_size=4))
    assert [len(b["index"]) for b in batches] == [4, 2]
    assert np.concatenate([b["index"] for b in batches]).tolist() == list(range(table.num_rows))
    labels = np.concatenate([b["label"] for b in batches])
    assert labels.tolist() == table.column("label").to_pylist()
    masks = np.concatenate([b["mask"] for b in batches])
    assert [bool(m.any()) for m in masks] == [lbl == 1 for lbl in labels]
