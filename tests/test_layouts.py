"""The public datasets' layouts (VisA, MVTec AD 2, MVTec LOCO AD, KolektorSDD) on small generated trees in
each dataset's own folder structure, and their category lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_image
from raylib_ad.data import (
    DATA_KINDS,
    build_manifest,
    dataset_categories,
    load_mask,
    split_counts,
    validate_manifest,
)
from raylib_ad.errors import ConfigError, DataError


def write_mask(path: Path, box: tuple[int, int, int, int] | None, value: int = 255, size=(32, 32)) -> Path:
    """A mask image: `value` inside box (x0, y0, x1, y1), 0 elsewhere; None = all zero."""
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        array[y0:y1, x0:x1] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def rows_by_item(table) -> dict[str, dict]:
    """Rows keyed by "<folder>/<file name>"."""
    return {"/".join(Path(r["path"]).parts[-2:]): r for r in table.to_pylist()}


# --- VisA -----------------------------------------------------------------------------------------


def make_visa(root: Path) -> Path:
    """The VisA download: split_csv/1cls.csv + <object>/Data/Images/{Normal,Anomaly}, Data/Masks/Anomaly."""
    lines = ["object,split,label,image,mask"]
    for obj in ("candle", "pcb1"):
        data = f"{obj}/Data"
        for i in range(4):
            write_image(root / data / "Images" / "Normal" / f"{i:04d}.JPG")
            lines.append(f"{obj},{'train' if i < 3 else 'test'},normal,{data}/Images/Normal/{i:04d}.JPG,")
        for i in range(2):
            write_image(root / data / "Images" / "Anomaly" / f"{i:03d}.JPG")
            write_mask(root / data / "Masks" / "Anomaly" / f"{i:03d}.png", (4, 4, 12, 12))
            lines.append(f"{obj},test,anomaly,{data}/Images/Anomaly/{i:03d}.JPG,{data}/Masks/Anomaly/{i:03d}.png")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")
    return root


def test_visa_follows_its_split_csv_for_one_object(tmp_path):
    root = make_visa(tmp_path / "VisA")
    table = build_manifest("visa", root, "candle")
    validate_manifest(table)
    assert split_counts(table) == {"train": {"normal": 3, "anomalous": 0}, "test": {"normal": 1, "anomalous": 2}}
    rows = table.to_pylist()
    assert {r["category"] for r in rows} == {"candle"} and all("/candle/" in r["path"] for r in rows)
    anomalous = [r for r in rows if r["label"] == 1]
    assert all(r["defect"] == "bad" and r["mask_path"].endswith(Path(r["path"]).stem + ".png") for r in anomalous)
    assert all(r["mask_path"] is None for r in rows if r["label"] == 0)


def test_visa_explains_a_wrong_object_and_bad_lines(tmp_path):
    root = make_visa(tmp_path / "VisA")
    with pytest.raises(DataError, match="no rows for object 'bottle'.*candle, pcb1"):
        build_manifest("visa", root, "bottle")
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.write_text(csv_path.read_text() + "candle,train,anomaly,candle/Data/Images/Anomaly/000.JPG,\n"
                        "candle,test,normal,candle/Data/Images/Normal/9999.JPG,\n")
    with pytest.raises(DataError) as error:
        build_manifest("visa", root, "candle")
    assert "anomalous image in the train split" in str(error.value) and "9999.JPG" in str(error.value)


def test_visa_split_csv_elsewhere_and_the_converted_tree(tmp_path):
    root = make_visa(tmp_path / "VisA")
    moved = tmp_path / "my_split.csv"
    (root / "split_csv" / "1cls.csv").rename(moved)
    assert build_manifest("visa", root, "pcb1", split_file=moved).num_rows == 6  # VisA's format, found by its header
    # anomalib's converted tree: visa_pytorch/<object>/ in the MVTec AD layout, defect "bad"
    base = root / "visa_pytorch" / "candle"
    write_image(base / "train" / "good" / "0000.JPG")
    write_image(base / "test" / "good" / "0003.JPG")
    write_image(base / "test" / "bad" / "000.JPG")
    write_mask(base / "ground_truth" / "bad" / "000.png", (0, 0, 8, 8))
    table = build_manifest("visa", root, "candle")
    assert split_counts(table)["test"] == {"normal": 1, "anomalous": 1}
    assert [r["mask_path"] for r in table.to_pylist() if r["label"]][0].endswith("ground_truth/bad/000.png")


# --- MVTec AD 2 -----------------------------------------------------------------------------------


def make_mvtec_ad2(root: Path, category: str = "sheet_metal") -> Path:
    base = root / category
    for i in range(3):
        write_image(base / "train" / "good" / f"{i:03d}_regular.png")
    write_image(base / "validation" / "good" / "000_regular.png")
    write_image(base / "test_public" / "good" / "000_regular.png")
    for i in range(2):
        write_image(base / "test_public" / "bad" / f"{i:03d}_regular.png")
        write_mask(base / "test_public" / "ground_truth" / "bad" / f"{i:03d}_regular_mask.png", (2, 2, 9, 9))
    write_image(base / "test_private" / "000_regular.png")  # unlabelled: never a row
    write_image(base / "test_private_mixed" / "000_mixed.png")
    return root


def test_mvtec_ad2_reads_train_and_the_public_test_set(tmp_path):
    root = make_mvtec_ad2(tmp_path / "MVTec_AD_2")
    table = build_manifest("mvtec_ad2", root, "sheet_metal")
    validate_manifest(table)
    assert split_counts(table) == {"train": {"normal": 3, "anomalous": 0}, "test": {"normal": 1, "anomalous": 2}}
    paths = " ".join(table.column("path").to_pylist())
    assert "validation" not in paths and "test_private" not in paths
    for row in table.to_pylist():
        if row["label"]:
            assert row["mask_path"].endswith(Path(row["path"]).stem + "_mask.png") and row["defect"] == "bad"


def test_mvtec_ad2_missing_mask_and_unknown_category(tmp_path):
    root = make_mvtec_ad2(tmp_path / "MVTec_AD_2")
    (root / "sheet_metal" / "test_public" / "ground_truth" / "bad" / "001_regular_mask.png").unlink()
    with pytest.raises(DataError, match="missing mask for .*001_regular.png"):
        build_manifest("mvtec_ad2", root, "sheet_metal")
    with pytest.raises(DataError, match="not a MVTec AD 2 category: can, fabric"):
        build_manifest("mvtec_ad2", root, "bottle")


# --- MVTec LOCO AD --------------------------------------------------------------------------------


def make_loco(root: Path, category: str = "juice_bottle") -> Path:
    base = root / category
    for i in range(3):
        write_image(base / "train" / "good" / f"{i:03d}.png")
    write_image(base / "validation" / "good" / "000.png")
    for i in range(2):
        write_image(base / "test" / "good" / f"{i:03d}.png")
    write_image(base / "test" / "logical_anomalies" / "000.png")
    # two defect regions, one mask file each, with LOCO's per-defect pixel values
    write_mask(base / "ground_truth" / "logical_anomalies" / "000" / "000.png", (0, 0, 4, 4), value=255)
    write_mask(base / "ground_truth" / "logical_anomalies" / "000" / "001.png", (20, 20, 30, 30), value=254)
    write_image(base / "test" / "structural_anomalies" / "000.png")
    write_mask(base / "ground_truth" / "structural_anomalies" / "000" / "000.png", (8, 8, 16, 16), value=253)
    return root


def test_mvtec_loco_both_anomaly_kinds_share_the_good_test_images(tmp_path):
    root = make_loco(tmp_path / "MVTec_LOCO")
    table = build_manifest("mvtec_loco", root, "juice_bottle")
    validate_manifest(table)
    assert split_counts(table) == {"train": {"normal": 3, "anomalous": 0}, "test": {"normal": 2, "anomalous": 2}}
    test = [r for r in table.to_pylist() if r["split"] == "test"]
    assert sorted(r["defect"] for r in test) == ["good", "good", "logical_anomalies", "structural_anomalies"]
    assert "validation" not in " ".join(r["path"] for r in table.to_pylist())
    structural = next(r for r in test if r["defect"] == "structural_anomalies")
    assert structural["mask_path"].endswith("structural_anomalies/000/000.png")  # a single mask is used as it is


def test_mvtec_loco_merges_several_masks_into_their_union(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLIB_AD_CACHE", str(tmp_path / "cache"))
    root = make_loco(tmp_path / "MVTec_LOCO")
    logical = next(r for r in build_manifest("mvtec_loco", root, "juice_bottle").to_pylist()
                   if r["defect"] == "logical_anomalies")
    merged = Path(logical["mask_path"])
    assert merged.is_relative_to(tmp_path / "cache" / "mvtec_loco_masks")
    mask = load_mask(str(merged), 32)
    assert mask[:4, :4].all() and mask[20:30, 20:30].all() and mask.sum() == 16 + 100
    stamp = merged.stat().st_mtime_ns
    build_manifest("mvtec_loco", root, "juice_bottle")
    assert merged.stat().st_mtime_ns == stamp  # reused, not rewritten


def test_mvtec_loco_missing_mask_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLIB_AD_CACHE", str(tmp_path / "cache"))
    root = make_loco(tmp_path / "MVTec_LOCO")
    for mask in (root / "juice_bottle" / "ground_truth" / "structural_anomalies" / "000").iterdir():
        mask.unlink()
    with pytest.raises(DataError, match="missing masks for .*structural_anomalies/000.png"):
        build_manifest("mvtec_loco", root, "juice_bottle")


# --- KolektorSDD ----------------------------------------------------------------------------------


def make_kolektor(root: Path) -> Path:
    """kos01..kos03 with Part0..Part3.jpg and PartN_label.bmp; Part1 of kos01 and kos02 has a crack."""
    for item in ("kos01", "kos02", "kos03"):
        for part in range(4):
            write_image(root / item / f"Part{part}.jpg", size=(32, 64), mode="L")
            defect = part == 1 and item in ("kos01", "kos02")
            write_mask(root / item / f"Part{part}_label.bmp", (5, 10, 9, 40) if defect else None, size=(32, 64))
    return root


def test_kolektor_labels_by_mask_content_and_splits_normals_by_seed(tmp_path):
    root = make_kolektor(tmp_path / "KolektorSDD")
    table = build_manifest("kolektor", root)  # a single-category dataset: no category needed
    validate_manifest(table)
    rows = rows_by_item(table)
    assert {k for k, r in rows.items() if r["label"]} == {"kos01/Part1.jpg", "kos02/Part1.jpg"}
    assert all(r["split"] == "test" and r["mask_path"].endswith("_label.bmp") for r in rows.values() if r["label"])
    assert split_counts(table)["train"]["normal"] + split_counts(table)["test"]["normal"] == 10
    assert split_counts(table)["test"]["normal"] == 2  # round(10 * 0.2)
    assert {r["category"] for r in rows.values()} == {"kolektor"}
    again = build_manifest("kolektor", root, seed=0)
    assert again.equals(table)
    other = build_manifest("kolektor", root, seed=1)
    assert set(other.column("path").to_pylist()) == set(table.column("path").to_pylist())


def test_kolektor_missing_label_file(tmp_path):
    root = make_kolektor(tmp_path / "KolektorSDD")
    (root / "kos02" / "Part3_label.bmp").unlink()
    with pytest.raises(DataError, match="missing mask for .*kos02/Part3.jpg: expected .*Part3_label.bmp"):
        build_manifest("kolektor", root)
    with pytest.raises(DataError, match="no item folders"):
        build_manifest("kolektor", tmp_path / "empty_dir_that_is_missing")


# --- categories -----------------------------------------------------------------------------------


@pytest.mark.parametrize("data, count, first", [("mvtec", 15, "bottle"), ("visa", 12, "candle"),
                                                ("mvtec_ad2", 8, "can"), ("mvtec_loco", 5, "breakfast_box"),
                                                ("kolektor", 1, "kolektor"), ("magnetic_tile", 1, "magnetic_tile")])
def test_every_listed_dataset_knows_all_its_categories(data, count, first):
    categories = dataset_categories(data)
    assert len(categories) == count and categories[0] == first and len(set(categories)) == count
    assert data in DATA_KINDS


def test_folder_data_has_no_category_list():
    with pytest.raises(ConfigError, match="no fixed category list"):
        dataset_categories("folder")


def test_multi_category_datasets_need_a_category(tmp_path):
    with pytest.raises(ConfigError, match="needs a category, e.g. one of: breakfast_box"):
        build_manifest("mvtec_loco", tmp_path)
