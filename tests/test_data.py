"""Tests for raylib_ad.data: layouts, manifest validation, synthetic data, transforms."""

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
    MANIFEST_SCHEMA,
    BatchDecoder,
    build_manifest,
    decode_all,
    ensure_mvtec,
    ensure_synthetic,
    folder_manifest,
    load_image,
    load_mask,
    magnetic_tile_manifest,
    make_manifest,
    mvtec_manifest,
    normalize,
    split_counts,
    split_file_manifest,
    validate_manifest,
)
from raylib_ad.data import mvtec as mvtec_module
from raylib_ad.errors import ConfigError, DataError

SHARED_DATASETS = Path(
    os.environ.get("RAYLIB_AD_SHARED_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets")
)
MAGNETIC_TILE = SHARED_DATASETS / "magnetic_tile"
MAGNETIC_TILE_SPLIT = SHARED_DATASETS / "magnetic_tile_split.csv"
needs_magnetic_tile = pytest.mark.skipif(
    not MAGNETIC_TILE.is_dir(), reason=f"Magnetic Tile dataset not found at {MAGNETIC_TILE}"
)

SMALL = dict(n_train=4, n_test_good=2, n_test_defect=4, image_size=48)


def write_image(path: Path, size=(32, 32), mode="RGB", value=128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value, value // 2, 30)).save(path)
    return path


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
    with pytest.raises(ConfigError, match=r"'visa'.*mvtec, folder, magnetic_tile, synthetic"):
        build_manifest("visa", tmp_path, "x")


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


# --- split files and Magnetic Tile -------------------------------------------------------


@needs_magnetic_tile
def test_magnetic_tile_split_file():
    table = magnetic_tile_manifest(MAGNETIC_TILE, split_file=MAGNETIC_TILE_SPLIT)
    assert split_counts(table) == {"train": {"normal": 762, "anomalous": 0}, "test": {"normal": 190, "anomalous": 392}}
    rows = rows_of(table)
    assert all(r["mask_path"] for r in rows if r["label"] == 1)
    assert all(r["mask_path"] is None for r in rows if r["label"] == 0)
    assert {r["defect"] for r in rows if r["label"] == 1} == {"blowhole", "break", "crack", "fray", "uneven"}
    assert set(table.column("category").to_pylist()) == {"magnetic_tile"}
    validate_manifest(table)


@needs_magnetic_tile
def test_magnetic_tile_seeded_split_without_split_file():
    table = magnetic_tile_manifest(MAGNETIC_TILE, seed=0)
    assert split_counts(table) == {"train": {"normal": 762, "anomalous": 0}, "test": {"normal": 190, "anomalous": 392}}
    again = magnetic_tile_manifest(MAGNETIC_TILE, seed=0)
    other = build_manifest("magnetic_tile", MAGNETIC_TILE, seed=1)
    assert table.equals(again)
    assert not table.equals(other)
    rows = rows_of(table)
    assert all(r["mask_path"] is None for r in rows if r["label"] == 0)
    assert all(r["mask_path"] == r["path"][: -len(".jpg")] + ".png" for r in rows if r["label"] == 1)


def write_split_file(path: Path, lines: list[str]) -> Path:
    path.write_text("\r\n".join(lines) + "\r\n")
    return path


def test_split_file_parses_relative_paths(tmp_path):
    write_image(tmp_path / "imgs" / "n.png")
    write_image(tmp_path / "imgs" / "a.png")
    split = write_split_file(
        tmp_path / "split.csv",
        ["split,label,defect,image,mask", "train,normal,good,imgs/n.png,", "test,anomalous,dent,imgs/a.png,"],
    )
    table = split_file_manifest(tmp_path, split, "unit")
    assert [(Path(r["path"]), r["label"], r["defect"], r["mask_path"]) for r in rows_of(table)] == [
        (tmp_path / "imgs" / "a.png", 1, "dent", None),
        (tmp_path / "imgs" / "n.png", 0, "good", None),
    ]


def test_split_file_bad_header(tmp_path):
    split = write_split_file(tmp_path / "split.csv", ["split,label,image", "train,normal,a.png"])
    with pytest.raises(DataError, match=rf"{split}, line 1.*defect, mask"):
        split_file_manifest(tmp_path, split, "unit")


def test_split_file_bad_values_name_line_numbers(tmp_path):
    split = write_split_file(
        tmp_path / "split.csv",
        [
            "split,label,defect,image,mask",
            "train,normal,good,a.png,",
            "validation,normal,good,b.png,",
            "test,broken,crack,c.png,c_mask.png",
            "train,anomalous,crack,d.png,d_mask.png",
        ],
    )
    with pytest.raises(DataError) as info:
        split_file_manifest(tmp_path, split, "unit")
    message = str(info.value)
    assert "3 problem(s)" in message
    assert f"{split}, line 3: split 'validation'" in message
    assert f"{split}, line 4: label 'broken'" in message
    assert f"{split}, line 5: an anomalous image in the train split" in message


# --- transforms --------------------------------------------------------------------------


def test_load_image_grayscale_becomes_rgb(tmp_path):
    grey = write_image(tmp_path / "grey.png", size=(40, 20), mode="L", value=77)
    image = load_image(str(grey), 16)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert (image == 77).all()
    with pytest.raises(DataError, match=str(tmp_path / "none.png")):
        load_image(str(tmp_path / "none.png"), 16)


def test_load_mask_thresholds_soft_edges(tmp_path):
    soft = np.zeros((8, 8), dtype=np.uint8)
    soft[:, 4:] = 255
    soft[:, 3] = 127  # soft edge just below half: background
    soft[:, 2] = 100
    Image.fromarray(soft).save(tmp_path / "soft.png")
    mask = load_mask(str(tmp_path / "soft.png"), 8)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert (mask[:, 4:] == 1).all() and (mask[:, :4] == 0).all()

    Image.fromarray((soft == 255).astype(np.uint8)).save(tmp_path / "zero_one.png")
    assert (load_mask(str(tmp_path / "zero_one.png"), 8) == mask).all()
    assert load_mask(str(tmp_path / "soft.png"), 16).shape == (16, 16)
    assert (load_mask(None, 5) == 0).all() and load_mask(None, 5).shape == (5, 5)


def test_normalize_layout_and_values():
    images = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    images[1] = 255
    out = normalize(images, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    assert out.shape == (2, 3, 4, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0, 0], [-1.0, -1.0, 0.0])
    np.testing.assert_allclose(out[1, :, 0, 0], [1.0, 3.0, 1.0], rtol=1e-6)


def test_batch_decoder_outputs_numeric_arrays_only(tmp_path):
    image = write_image(tmp_path / "a.png", size=(20, 10), value=255)
    defect = write_image(tmp_path / "b.jpg", size=(20, 10), mode="L", value=0)
    mask = write_image(tmp_path / "b_mask.png", size=(20, 10), mode="L", value=255)
    batch = {
        "path": np.array([str(image), str(defect)], dtype=object),
        "mask_path": np.array([None, str(mask)], dtype=object),
        "label": np.array([0, 1], dtype=np.int8),
        "defect": np.array(["good", "crack"], dtype=object),
    }
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    out = BatchDecoder(8, mean, std)(batch)
    assert set(out) == {"image", "mask", "label"}
    assert all(v.dtype.kind in "fiu" for v in out.values())
    assert out["image"].shape == (2, 3, 8, 8) and out["image"].dtype == np.float32
    assert out["mask"].shape == (2, 8, 8) and out["mask"].dtype == np.uint8
    assert out["label"].tolist() == [1 - 1, 1] and out["label"].dtype == np.int64
    np.testing.assert_allclose(out["image"][0, 0], 2.0)  # red channel 255 -> (1 - .5) / .25
    np.testing.assert_allclose(out["image"][1], -2.0)  # black -> (0 - .5) / .25
    assert out["mask"][0].sum() == 0 and (out["mask"][1] == 1).all()
    assert set(BatchDecoder(8, mean, std, with_masks=False)(batch)) == {"image", "label"}


def test_decode_all_keeps_row_order(tmp_path):
    table = mvtec_manifest(tmp_path, make_mvtec_tree(tmp_path).name)
    batches = list(decode_all(table, 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), batch_size=4))
    assert [len(b["index"]) for b in batches] == [4, 2]
    assert np.concatenate([b["index"] for b in batches]).tolist() == list(range(table.num_rows))
    labels = np.concatenate([b["label"] for b in batches])
    assert labels.tolist() == table.column("label").to_pylist()
    masks = np.concatenate([b["mask"] for b in batches])
    assert [bool(m.any()) for m in masks] == [lbl == 1 for lbl in labels]
