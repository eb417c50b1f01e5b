"""Layouts of the public anomaly-detection datasets beyond MVTec AD -> manifest tables: VisA, MVTec AD 2,
MVTec LOCO AD and KolektorSDD, as their downloads unpack (anomalib's readers,
src/anomalib/data/datasets/image/<dataset>.py, expect the same trees).

Like layouts.py, each function collects every structural problem before raising one DataError.
Only labelled images become rows: validation folders (normal images anomalib uses for validation)
and unlabelled private test sets are left out, since a manifest has train and test splits only and
the validation subset is carved from the test split.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from .categories import KOLEKTOR_CATEGORY, MVTEC_AD2_CATEGORIES, MVTEC_LOCO_CATEGORIES, VISA_CATEGORIES
from .layouts import _find_mask, _images_in, _mask_index, _raise_if, _row, mvtec_manifest, seeded_split
from .manifest import ANOMALOUS, GOOD, NORMAL, SPLITS, make_manifest

BAD = "bad"  # the defect name of datasets that do not name their defects (as anomalib's converted trees)

# --- VisA -----------------------------------------------------------------------------------------

VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"
VISA_CSV_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_LABELS = {"normal": NORMAL, "anomaly": ANOMALOUS}


def visa_manifest(root: str | os.PathLike, category: str, split_csv: str | os.PathLike | None = None):
    """VisA as downloaded: <root>/split_csv/1cls.csv (columns object,split,label,image,mask; paths relative
    to root) over <root>/<category>/Data/Images/{Normal,Anomaly}/*.JPG and Data/Masks/Anomaly/*.png.
    ``split_csv`` names another file in that format. Without the split file, anomalib's converted tree
    <root>/visa_pytorch/<category>/ (or <root>/<category>/ in the MVTec AD layout) is read instead."""
    root = Path(root).absolute()
    csv_path = Path(split_csv) if split_csv is not None else root / VISA_SPLIT_CSV
    if not csv_path.is_file():
        for base in (root / "visa_pytorch", root):
            if (base / category / "train").is_dir():
                return mvtec_manifest(base, category)
        raise DataError(
            f"VisA: no split file {csv_path} (the VisA download has it) and no converted tree "
            f"{root / 'visa_pytorch' / category}/train (anomalib's layout); categories: {', '.join(VISA_CATEGORIES)}"
        )
    problems: list[str] = []
    rows, objects = [], set()
    with _open_csv(csv_path) as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        if header[: len(VISA_CSV_COLUMNS)] != list(VISA_CSV_COLUMNS):
            raise DataError(f"VisA split file {csv_path}, line 1: header {','.join(header) or '(empty)'}; "
                            f"expected {','.join(VISA_CSV_COLUMNS)}")
        for record in reader:
            if not any(field.strip() for field in record):
                continue
            where = f"{csv_path}, line {reader.line_num}"
            if len(record) < len(VISA_CSV_COLUMNS):
                problems.append(f"{where}: expected {len(VISA_CSV_COLUMNS)} fields, got {len(record)}: {record}")
                continue
            obj, split, label, image, mask = (field.strip() for field in record[: len(VISA_CSV_COLUMNS)])
            objects.add(obj)
            if obj != category:
                continue
            row = _visa_row(root, where, split, label, image, mask, category, problems)
            if row is not None:
                rows.append(row)
    if not rows and not problems:
        raise DataError(f"VisA split file {csv_path} has no rows for object {category!r}; "
                        f"objects in it: {', '.join(sorted(objects)) or '(none)'}")
    _raise_if(problems, rows)
    return make_manifest(rows)


def _visa_row(root: Path, where: str, split: str, label: str, image: str, mask: str, category: str,
              problems: list[str]) -> dict | None:
    found = len(problems)
    if split not in SPLITS:
        problems.append(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
    if label not in VISA_LABELS:
        problems.append(f"{where}: label {label!r} is not one of {', '.join(VISA_LABELS)}")
    elif VISA_LABELS[label] == ANOMALOUS and split == "train":
        problems.append(f"{where}: an anomalous image in the train split ({image})")
    elif VISA_LABELS[label] == ANOMALOUS and not mask:
        problems.append(f"{where}: anomalous image {image} has no mask")
    if not (root / image).is_file():
        problems.append(f"{where}: image file does not exist: {root / image}")
    anomalous = VISA_LABELS.get(label) == ANOMALOUS
    if anomalous and mask and not (root / mask).is_file():
        problems.append(f"{where}: mask file does not exist: {root / mask}")
    if len(problems) > found:
        return None
    if anomalous:
        return _row(root / image, root / mask, ANOMALOUS, BAD, category, split)
    return _row(root / image, None, NORMAL, GOOD, category, split)


def is_visa_split_csv(path: str | os.PathLike) -> bool:
    """Whether a split file is in VisA's own format (its header starts object,split,label,...)."""
    try:
        with _open_csv(Path(path)) as handle:
            header = [name.strip() for name in next(csv.reader(handle), [])]
    except DataError:
        return False
    return header[: len(VISA_CSV_COLUMNS)] == list(VISA_CSV_COLUMNS)


def _open_csv(path: Path):
    try:
        # utf-8-sig: spreadsheet tools often prepend a byte-order mark.
        return open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"cannot read split file {path}: {exc}") from exc


# --- MVTec AD 2 -----------------------------------------------------------------------------------


def mvtec_ad2_manifest(root: str | os.PathLike, category: str):
    """MVTec AD 2: <category>/train/good, test_public/{good,bad}, test_public/ground_truth/bad/<stem>_mask.png.
    validation/good and the unlabelled test_private*/ folders are not read."""
    base = _category_dir(root, category, "MVTec AD 2", MVTEC_AD2_CATEGORIES,
                         "train/good/*.png, test_public/{good,bad}/*.png, test_public/ground_truth/bad/<name>_mask.png")
    problems: list[str] = []
    rows = [_row(p, None, NORMAL, GOOD, category, "train")
            for p in _images_in(base / "train" / GOOD, problems, required=True)]
    test = base / "test_public"
    rows += [_row(p, None, NORMAL, GOOD, category, "test") for p in _images_in(test / GOOD, problems, required=True)]
    masks = _mask_index(test / "ground_truth" / BAD, problems, required=True)
    for path in _images_in(test / BAD, problems, required=True):
        mask = _find_mask(masks, path.stem)
        if mask is None:
            problems.append(f"missing mask for {path}: expected {test / 'ground_truth' / BAD / (path.stem + '_mask.png')}")
        rows.append(_row(path, mask, ANOMALOUS, BAD, category, "test"))
    _raise_if(problems, rows)
    return make_manifest(rows)


# --- MVTec LOCO AD --------------------------------------------------------------------------------

LOCO_DEFECTS = ("logical_anomalies", "structural_anomalies")


def mvtec_loco_manifest(root: str | os.PathLike, category: str, merged_mask_dir: str | os.PathLike | None = None):
    """MVTec LOCO AD: <category>/train/good, test/{good,logical_anomalies,structural_anomalies}, and per
    anomalous image a folder of masks ground_truth/<defect>/<stem>/000.png, 001.png, ... (one per defect
    region). The test/good images serve as the normal test images of both anomaly kinds; the defect
    column tells the kinds apart. An image with several masks gets their union, written once to
    ``merged_mask_dir`` (default $RAYLIB_AD_CACHE/mvtec_loco_masks, i.e. ~/.cache/raylib_ad/...), since a
    manifest row has one mask file. validation/good is not read."""
    base = _category_dir(root, category, "MVTec LOCO AD", MVTEC_LOCO_CATEGORIES,
                         "train/good/*.png, test/{good,logical_anomalies,structural_anomalies}/*.png, "
                         "ground_truth/<defect>/<name>/000.png")
    problems: list[str] = []
    rows = [_row(p, None, NORMAL, GOOD, category, "train")
            for p in _images_in(base / "train" / GOOD, problems, required=True)]
    test = base / "test"
    rows += [_row(p, None, NORMAL, GOOD, category, "test") for p in _images_in(test / GOOD, problems, required=True)]
    defects = sorted(d.name for d in test.iterdir() if d.is_dir() and d.name != GOOD) if test.is_dir() else []
    if test.is_dir() and not defects:
        problems.append(f"no anomalous test images: {test} has none of the folders {', '.join(LOCO_DEFECTS)}")
    merged_root = Path(merged_mask_dir) if merged_mask_dir is not None else _cache_dir() / "mvtec_loco_masks"
    merged_root = merged_root / hashlib.sha1(str(base).encode()).hexdigest()[:12]
    for defect in defects:
        for path in _images_in(test / defect, problems):
            folder = base / "ground_truth" / defect / path.stem
            masks = _images_in(folder, [], required=False)
            if not masks:
                problems.append(f"missing masks for {path}: expected {folder}/000.png")
                rows.append(_row(path, None, ANOMALOUS, defect, category, "test"))
                continue
            mask = masks[0]
            if len(masks) > 1:
                try:
                    mask = _union_mask(masks, merged_root / defect / f"{path.stem}.png")
                except (DataError, OSError) as exc:
                    problems.append(f"cannot merge the masks in {folder}: {exc}")
            rows.append(_row(path, mask, ANOMALOUS, defect, category, "test"))
    _raise_if(problems, rows)
    return make_manifest(rows)


def _union_mask(sources: list[Path], target: Path) -> Path:
    """One 0/255 mask, nonzero wherever any source is; rewritten only when a source is newer."""
    newest = max(p.stat().st_mtime for p in sources)
    if target.is_file() and target.stat().st_mtime >= newest:
        return target
    union = None
    for source in sources:
        try:
            with Image.open(source) as im:
                region = np.asarray(im.convert("L")) > 0
        except Exception as exc:  # PIL raises many types for corrupt files
            raise DataError(f"cannot read mask {source}: {type(exc).__name__}: {exc}") from exc
        if union is not None and region.shape != union.shape:
            raise DataError(f"masks of one image differ in size: {sources[0]} {union.shape}, {source} {region.shape}")
        union = region if union is None else union | region
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    Image.fromarray(union.astype(np.uint8) * np.uint8(255)).save(partial, format="PNG")
    os.replace(partial, target)  # atomic: concurrent runs never read half a file
    return target


def _cache_dir() -> Path:
    return Path(os.environ.get("RAYLIB_AD_CACHE", Path.home() / ".cache" / "raylib_ad"))


# --- KolektorSDD ----------------------------------------------------------------------------------


def kolektor_manifest(root: str | os.PathLike, seed: int = 0, test_fraction: float = 0.2):
    """KolektorSDD: <root>/kos01 ... kos50, each with PartN.jpg and its mask PartN_label.bmp. An image is
    anomalous when its mask has any nonzero pixel (anomalib's rule); normal images are split train/test
    by a seeded shuffle (test_fraction 0.2, anomalib's 0.8 train ratio), anomalous ones go to test."""
    root = Path(root).absolute()
    items = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")) if root.is_dir() else []
    if not items:
        raise DataError(f"KolektorSDD: {root} has no item folders; expected {root}/kos01/Part0.jpg with "
                        f"{root}/kos01/Part0_label.bmp, ...")
    problems: list[str] = []
    normals, rows = [], []
    for item in items:
        masks = {p.stem: p for p in item.iterdir() if p.suffix.lower() == ".bmp"}
        images = [p for p in _images_in(item, problems) if p.suffix.lower() in (".jpg", ".jpeg")]
        for path in images:
            mask = masks.get(f"{path.stem}_label")
            if mask is None:
                problems.append(f"missing mask for {path}: expected {item / (path.stem + '_label.bmp')}")
                continue
            try:
                with Image.open(mask) as im:
                    anomalous = im.convert("L").getbbox() is not None
            except Exception as exc:  # PIL raises many types for corrupt files
                problems.append(f"cannot read mask {mask}: {type(exc).__name__}: {exc}")
                continue
            if anomalous:
                rows.append(_row(path, mask, ANOMALOUS, BAD, KOLEKTOR_CATEGORY, "test"))
            else:
                normals.append(path)
    if not normals and not problems:
        problems.append(f"no normal images under {root} (every mask has a defect)")
    _raise_if(problems, rows)
    train, test = seeded_split(normals, seed, test_fraction)
    rows += [_row(p, None, NORMAL, GOOD, KOLEKTOR_CATEGORY, "train") for p in train]
    rows += [_row(p, None, NORMAL, GOOD, KOLEKTOR_CATEGORY, "test") for p in test]
    return make_manifest(rows)


def _category_dir(root: str | os.PathLike, category: str, dataset: str, known: tuple[str, ...], layout: str) -> Path:
    base = Path(root).absolute() / category
    if not base.is_dir():
        hint = "" if category in known else f" ({category!r} is not a {dataset} category: {', '.join(known)})"
        raise DataError(f"{dataset}: category folder {base} does not exist{hint}; expected {base}/{layout}")
    return base
