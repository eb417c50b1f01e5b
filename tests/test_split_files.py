"""Split files (VisA-style CSV) and the Magnetic Tile layout (Huang et al., The Visual Computer 2020),
read from ../shared/datasets where present."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import MAGNETIC_TILE, MAGNETIC_TILE_SPLIT, write_image
from raylib_ad.data import build_manifest, magnetic_tile_manifest, split_counts, split_file_manifest, validate_manifest
from raylib_ad.errors import DataError

needs_magnetic_tile = pytest.mark.skipif(
    not MAGNETIC_TILE.is_dir(), reason=f"Magnetic Tile dataset not found at {MAGNETIC_TILE}"
)


def _rows(table):
    return table.to_pylist()


# --- split files and Magnetic Tile -------------------------------------------------------


@needs_magnetic_tile
def test_magnetic_tile_split_file():
    table = magnetic_tile_manifest(MAGNETIC_TILE, split_file=MAGNETIC_TILE_SPLIT)
    assert split_counts(table) == {"train": {"normal": 762, "anomalous": 0}, "test": {"normal": 190, "anomalous": 392}}
    rows = _rows(table)
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
    rows = _rows(table)
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
    assert [(Path(r["path"]), r["label"], r["defect"], r["mask_path"]) for r in _rows(table)] == [
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
    # Every problem at once: the three bad rows, and the one good row's image file, which is missing.
    assert "4 problem(s)" in message and "image file does not exist" in message
    assert f"{split}, line 3: split 'validation'" in message
    assert f"{split}, line 4: label 'broken'" in message
    assert f"{split}, line 5: an anomalous image in the train split" in message
