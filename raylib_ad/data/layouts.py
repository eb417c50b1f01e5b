"""Dataset layouts on disk -> manifest tables.

Each layout function collects every structural problem (missing folder, missing mask,
bad split-file line) before raising a single DataError, so one run shows them all. When
there are structural problems, the message also lists the file problems of the rows found
(corrupt image, mask of the wrong size); otherwise file contents are checked by
manifest.validate_manifest.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import ConfigError, DataError
from .categories import KOLEKTOR_CATEGORY, MAGNETIC_TILE_CATEGORY
from .manifest import ANOMALOUS, GOOD, NORMAL, SPLITS, file_problems, format_problems, make_manifest
from .mvtec import MVTEC_CATEGORIES, ensure_mvtec
from .synthetic import ensure_synthetic
from .video import VIDEO_DATA_KINDS

# The layouts of public_layouts.py (imported there lazily: it builds on the helpers below).
PUBLIC_DATA_KINDS = ("visa", "mvtec_ad2", "mvtec_loco", "kolektor")
IMAGE_DATA_KINDS = ("mvtec", "folder", "magnetic_tile", "synthetic", *PUBLIC_DATA_KINDS)
# Video datasets (data/video.py): one row per scored frame, with the clip of frames ending at it.
DATA_KINDS = (*IMAGE_DATA_KINDS, *VIDEO_DATA_KINDS)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLIT_FILE_COLUMNS = ("split", "label", "defect", "image", "mask")
SPLIT_FILE_LABELS = {"normal": NORMAL, "anomalous": ANOMALOUS}
MAGNETIC_TILE_DEFECTS = ("Blowhole", "Break", "Crack", "Fray", "Uneven")
DEFAULT_SYNTHETIC_CATEGORY = "synthetic"


def build_manifest(
    data: str,
    root: str | os.PathLike,
    category: str | None = None,
    *,
    split_file: str | os.PathLike | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    normal_dir: str | os.PathLike | None = None,
    abnormal_dir: str | os.PathLike | None = None,
    mask_dir: str | os.PathLike | None = None,
    clip_length: int | None = None,
) -> pa.Table:
    """Manifest for dataset kind ``data`` (one of DATA_KINDS) found under ``root``.

    A split file, when given, defines the rows for every image kind (paths relative to root); for VisA it
    may also be in VisA's own format (object,split,label,image,mask). ``clip_length``: the frames per
    sample of a video model (AnomalyModel.clip_length); required for the video kinds, None for images.
    """
    if data not in DATA_KINDS:
        raise ConfigError(f"unknown dataset kind data={data!r}; choices: {', '.join(DATA_KINDS)}")
    if data in VIDEO_DATA_KINDS:
        if split_file is not None:
            raise ConfigError(f"--split-file is not supported for the video dataset --data {data}")
        from .video import video_manifest

        return video_manifest(data, root, category, clip_length)
    if clip_length is not None:
        raise ConfigError(f"--data {data} is an image dataset, but a video model needs clips of {clip_length} "
                          f"frames; video datasets: {', '.join(VIDEO_DATA_KINDS)}")
    if data == "magnetic_tile":
        return magnetic_tile_manifest(root, split_file=split_file, seed=seed, test_fraction=test_fraction)
    if data in PUBLIC_DATA_KINDS:
        return _public_manifest(data, root, category, split_file, seed, test_fraction)
    if data == "folder":
        if normal_dir is None:
            raise ConfigError("data='folder' needs normal_dir (the folder of normal images)")
        if split_file is not None:
            return split_file_manifest(root, split_file, category or Path(root).name)
        return folder_manifest(
            root, normal_dir, abnormal_dir, mask_dir, category=category, seed=seed, test_fraction=test_fraction
        )
    if data == "synthetic":
        category = category or DEFAULT_SYNTHETIC_CATEGORY
        ensure_synthetic(root, category)
    elif category is None:
        raise ConfigError(f"data='mvtec' needs a category, e.g. one of: {', '.join(MVTEC_CATEGORIES)}")
    if split_file is not None:
        return split_file_manifest(root, split_file, category)
    return mvtec_manifest(root, category)


def _public_manifest(data: str, root, category: str | None, split_file, seed: int, test_fraction: float) -> pa.Table:
    from . import public_layouts

    if data == "kolektor":
        category = category or KOLEKTOR_CATEGORY
    elif category is None:
        from .categories import dataset_categories

        raise ConfigError(f"data={data!r} needs a category, e.g. one of: {', '.join(dataset_categories(data))}")
    if split_file is not None:
        if data == "visa" and public_layouts.is_visa_split_csv(split_file):
            return public_layouts.visa_manifest(root, category, split_csv=split_file)
        return split_file_manifest(root, split_file, category)
    if data == "visa":
        return public_layouts.visa_manifest(root, category)
    if data == "mvtec_ad2":
        return public_layouts.mvtec_ad2_manifest(root, category)
    if data == "mvtec_loco":
        return public_layouts.mvtec_loco_manifest(root, category)
    return public_layouts.kolektor_manifest(root, seed=seed, test_fraction=test_fraction)


def mvtec_manifest(root: str | os.PathLike, category: str) -> pa.Table:
    """MVTec AD layout: train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png."""
    base = Path(root).absolute() / category
    if not base.is_dir():
        if category in MVTEC_CATEGORIES:
            ensure_mvtec(root, category)
        else:
            raise DataError(
                f"category folder {base} does not exist; expected the MVTec layout "
                f"{base}/train/good/*.png, {base}/test/<defect>/*.png, "
                f"{base}/ground_truth/<defect>/<name>_mask.png"
            )
    problems: list[str] = []
    rows = [
        _row(path, None, NORMAL, GOOD, category, "train")
        for path in _images_in(base / "train" / GOOD, problems, required=True)
    ]
    train_dir = base / "train"
    if train_dir.is_dir():
        problems += [
            f"unexpected folder {d}: the train split holds only normal images, in {train_dir / GOOD}"
            for d in sorted(train_dir.iterdir())
            if d.is_dir() and d.name != GOOD
        ]
    test_dir = base / "test"
    defects = sorted(d.name for d in test_dir.iterdir() if d.is_dir()) if test_dir.is_dir() else []
    if not defects:
        problems.append(f"no test images: {test_dir} has no <defect>/ folders (e.g. test/good)")
    for defect in defects:
        masks = _mask_index(base / "ground_truth" / defect) if defect != GOOD else {}
        for path in _images_in(test_dir / defect, problems):
            if defect == GOOD:
                rows.append(_row(path, None, NORMAL, GOOD, category, "test"))
                continue
            mask = _find_mask(masks, path.stem)
            if mask is None:
                problems.append(
                    f"missing mask for {path}: expected {base / 'ground_truth' / defect / (path.stem + '_mask.png')}"
                )
            rows.append(_row(path, mask, ANOMALOUS, defect, category, "test"))
    _raise_if(problems, rows)
    return make_manifest(rows)


def folder_manifest(
    root: str | os.PathLike,
    normal_dir: str | os.PathLike,
    abnormal_dir: str | os.PathLike | None,
    mask_dir: str | os.PathLike | None = None,
    category: str | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> pa.Table:
    """Plain folders: normal images are split train/test by a seeded shuffle, abnormal ones go to test.

    Directories may be relative to ``root``. Masks are matched by stem: ``<stem>.png``
    or ``<stem>_mask.png`` (any supported extension).
    """
    root = Path(root).absolute()
    category = category or root.name
    problems: list[str] = []
    normals = _images_in(root / normal_dir, problems, required=True)
    train, test = seeded_split(normals, seed, test_fraction)
    rows = [_row(p, None, NORMAL, GOOD, category, "train") for p in train]
    rows += [_row(p, None, NORMAL, GOOD, category, "test") for p in test]
    if abnormal_dir is not None:
        abnormal_root = root / abnormal_dir
        masks = _mask_index(root / mask_dir, problems, required=True) if mask_dir is not None else None
        for path in _images_in(abnormal_root, problems, required=True):
            mask = None
            if masks is not None:
                mask = _find_mask(masks, path.stem)
                if mask is None:
                    problems.append(
                        f"missing mask for {path}: expected {root / mask_dir / (path.stem + '.png')} "
                        f"or {root / mask_dir / (path.stem + '_mask.png')}"
                    )
            rows.append(_row(path, mask, ANOMALOUS, abnormal_root.name, category, "test"))
    _raise_if(problems, rows)
    return make_manifest(rows)


def magnetic_tile_manifest(
    root: str | os.PathLike,
    split_file: str | os.PathLike | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> pa.Table:
    """Magnetic Tile Defects: MT_Free/Imgs/*.jpg normal, MT_<Defect>/Imgs/*.jpg with same-stem .png masks."""
    if split_file is not None:
        return split_file_manifest(root, split_file, MAGNETIC_TILE_CATEGORY)
    root = Path(root).absolute()
    problems: list[str] = []
    free = [p for p in _images_in(root / "MT_Free" / "Imgs", problems, required=True) if _is_jpeg(p)]
    train, test = seeded_split(free, seed, test_fraction)
    rows = [_row(p, None, NORMAL, GOOD, MAGNETIC_TILE_CATEGORY, "train") for p in train]
    rows += [_row(p, None, NORMAL, GOOD, MAGNETIC_TILE_CATEGORY, "test") for p in test]
    for defect in MAGNETIC_TILE_DEFECTS:
        for path in _images_in(root / f"MT_{defect}" / "Imgs", problems, required=True):
            if not _is_jpeg(path):
                continue
            mask = path.with_suffix(".png")
            if not mask.is_file():
                problems.append(f"missing mask for {path}: expected {mask}")
            rows.append(_row(path, mask, ANOMALOUS, defect.lower(), MAGNETIC_TILE_CATEGORY, "test"))
    _raise_if(problems, rows)
    return make_manifest(rows)


def split_file_manifest(root: str | os.PathLike, split_file: str | os.PathLike, category: str) -> pa.Table:
    """Rows from a CSV with header ``split,label,defect,image,mask`` (paths relative to root).

    label is "normal" or "anomalous"; mask may be empty. Extra columns are ignored.
    """
    root = Path(root).absolute()
    split_file = Path(split_file)
    try:
        # utf-8-sig: spreadsheet tools often prepend a byte-order mark.
        with open(split_file, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            columns = _split_file_columns(split_file, header)
            problems: list[str] = []
            rows = []
            for record in reader:
                if not any(field.strip() for field in record):
                    continue
                row = _split_file_row(split_file, reader.line_num, record, columns, root, category, problems)
                if row is not None:
                    rows.append(row)
    except OSError as exc:
        raise DataError(f"cannot read split file {split_file}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"split file {split_file} is not UTF-8 text: {exc}") from exc
    _raise_if(problems, rows, f"split file {split_file}")
    return make_manifest(rows)


def _split_file_columns(split_file: Path, header: list[str]) -> dict[str, int]:
    missing = [name for name in SPLIT_FILE_COLUMNS if name not in header]
    if missing:
        raise DataError(
            f"split file {split_file}, line 1: header {','.join(header) or '(empty file)'} lacks "
            f"column(s) {', '.join(missing)}; expected {','.join(SPLIT_FILE_COLUMNS)}"
        )
    return {name: header.index(name) for name in SPLIT_FILE_COLUMNS}


def _split_file_row(
    split_file: Path,
    line: int,
    record: list[str],
    columns: dict[str, int],
    root: Path,
    category: str,
    problems: list[str],
) -> dict | None:
    where = f"{split_file}, line {line}"
    if len(record) <= max(columns.values()):
        problems.append(f"{where}: expected {len(SPLIT_FILE_COLUMNS)} fields, got {len(record)}: {record}")
        return None
    value = {name: record[index].strip() for name, index in columns.items()}
    found = len(problems)
    if value["split"] not in SPLITS:
        problems.append(f"{where}: split {value['split']!r} is not one of {', '.join(SPLITS)}")
    if value["label"] not in SPLIT_FILE_LABELS:
        problems.append(f"{where}: label {value['label']!r} is not one of {', '.join(SPLIT_FILE_LABELS)}")
    if not value["image"]:
        problems.append(f"{where}: image is empty")
    if len(problems) > found:
        return None
    label = SPLIT_FILE_LABELS[value["label"]]
    if value["split"] == "train" and label == ANOMALOUS:
        problems.append(f"{where}: an anomalous image in the train split ({value['image']})")
        return None
    defect = value["defect"] or (GOOD if label == NORMAL else "anomalous")
    if label == ANOMALOUS and defect == GOOD:
        problems.append(f"{where}: label 'anomalous' contradicts defect 'good' ({value['image']})")
        return None
    # Normal images carry no mask in the manifest, whatever the file says.
    mask = root / value["mask"] if value["mask"] and label == ANOMALOUS else None
    return _row(root / value["image"], mask, label, defect, category, value["split"])


def seeded_split(paths: list[Path], seed: int, test_fraction: float) -> tuple[list[Path], list[Path]]:
    """Split normal images into (train, test); depends only on the file names and the seed."""
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test_fraction={test_fraction!r} must be in [0, 1)")
    ordered = sorted(paths, key=str)
    order = np.random.default_rng(seed).permutation(len(ordered))
    n_test = int(round(len(ordered) * test_fraction))
    test_idx = set(order[:n_test].tolist())
    train = [p for i, p in enumerate(ordered) if i not in test_idx]
    test = [p for i, p in enumerate(ordered) if i in test_idx]
    return train, test


def _images_in(folder: Path, problems: list[str], *, required: bool = False) -> list[Path]:
    if not folder.is_dir():
        problems.append(f"folder does not exist: {folder}")
        return []
    images = sorted(
        p
        for p in folder.iterdir()
        # Dot files include macOS "._name.png" resource forks, which are not images.
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )
    if required and not images:
        problems.append(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return images


def _mask_index(folder: Path, problems: list[str] | None = None, *, required: bool = False) -> dict[str, Path]:
    if not folder.is_dir():
        if required and problems is not None:
            problems.append(f"mask folder does not exist: {folder}")
        return {}
    masks = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
    # Later entries win, so where a stem has several files the .png one is used.
    return {p.stem: p for p in sorted(masks, key=lambda p: (p.suffix.lower() == ".png", p.name))}


def _find_mask(index: dict[str, Path], stem: str) -> Path | None:
    return index.get(f"{stem}_mask") or index.get(stem)


def _is_jpeg(path: Path) -> bool:
    return path.suffix.lower() in (".jpg", ".jpeg")


def _row(path: Path, mask: Path | None, label: int, defect: str, category: str, split: str) -> dict:
    return {
        "path": str(path),
        "mask_path": str(mask) if mask is not None else None,
        "label": label,
        "defect": defect,
        "category": category,
        "split": split,
    }


def _raise_if(problems: list[str], rows: list[dict], source: str | None = None) -> None:
    if problems:
        # Already failing: decode the rows found too, so the one message is complete.
        message = format_problems(problems + file_problems(rows))
        raise DataError(f"{source}: {message}" if source else message)
