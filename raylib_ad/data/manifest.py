"""The manifest: one pyarrow row per image, the only thing the rest of raylib_ad reads.

Layouts (layouts.py) turn a dataset on disk into a manifest; training and evaluation
consume only the manifest, so a new layout never touches model code.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
from PIL import Image

from ..errors import DataError

# Every field is nullable at the Arrow level: Ray Data infers nullable fields when it
# rebuilds blocks, and a stricter schema here would make the two compare unequal.
# Non-null values are enforced by make_manifest instead.
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string()),
        pa.field("mask_path", pa.string()),
        pa.field("label", pa.int8()),
        pa.field("defect", pa.string()),
        pa.field("category", pa.string()),
        pa.field("split", pa.string()),
    ]
)

# Video manifests (data/video.py) add `clip`: the frame files of the clip that ends at the row's frame
# (`path`), oldest first. Every row of a video manifest has one; image manifests have no such column.
CLIP_COLUMN = "clip"
VIDEO_MANIFEST_SCHEMA = MANIFEST_SCHEMA.append(pa.field(CLIP_COLUMN, pa.list_(pa.string())))

SPLITS = ("train", "test")
NORMAL, ANOMALOUS = 0, 1
GOOD = "good"
MAX_LISTED_PROBLEMS = 20


def make_manifest(rows: Iterable[Mapping]) -> pa.Table:
    """Build a manifest table from dicts with the MANIFEST_SCHEMA keys.

    Paths are made absolute; rows are sorted by (split, path) so the same files
    always give the same table, whatever order the file system listed them in.
    """
    rows = list(rows)
    video = any(CLIP_COLUMN in row for row in rows)
    clean = [_clean_row(i, row, video) for i, row in enumerate(rows)]
    clean.sort(key=lambda r: (r["split"], r["path"]))
    return pa.Table.from_pylist(clean, schema=VIDEO_MANIFEST_SCHEMA if video else MANIFEST_SCHEMA)


def _clean_row(index: int, row: Mapping, video: bool = False) -> dict:
    missing = [name for name in MANIFEST_SCHEMA.names if name not in row and name != "mask_path"]
    if missing:
        raise DataError(f"manifest row {index} lacks field(s) {missing}: {dict(row)}")
    for name in ("path", "defect", "category", "split"):
        if row[name] is None or str(row[name]) == "":
            raise DataError(f"manifest row {index}: field {name!r} is empty: {dict(row)}")
    if row["split"] not in SPLITS:
        raise DataError(f"manifest row {index}: split {row['split']!r} is not one of {SPLITS} ({row['path']})")
    if row["label"] not in (NORMAL, ANOMALOUS):
        raise DataError(f"manifest row {index}: label {row['label']!r} is not 0 or 1 ({row['path']})")
    mask = row.get("mask_path")
    clean = {
        "path": os.path.abspath(os.fspath(row["path"])),
        "mask_path": os.path.abspath(os.fspath(mask)) if mask else None,
        "label": int(row["label"]),
        "defect": str(row["defect"]),
        "category": str(row["category"]),
        "split": str(row["split"]),
    }
    if video:
        clip = row.get(CLIP_COLUMN)
        if not clip or isinstance(clip, (str, bytes)):
            raise DataError(f"manifest row {index}: a video manifest row needs {CLIP_COLUMN!r}, a non-empty list of "
                            f"frame files ending at its path, got {clip!r} ({row['path']})")
        clean[CLIP_COLUMN] = [os.path.abspath(os.fspath(p)) for p in clip]
    return clean


def validate_manifest(table: pa.Table, *, check_images: bool = True, clip_length: int | None = None) -> None:
    """Raise one DataError listing every problem found, so they can all be fixed at once.

    Files are always checked for existence; with check_images every image and mask is
    also decoded (PIL ``load()``) and mask sizes are compared with their image's size.
    A video manifest (a `clip` column) is also checked clip by clip: `clip_length` frames (when
    given) ending at the row's frame, every frame readable, all frames of a clip of one size.
    """
    missing = [name for name in MANIFEST_SCHEMA.names if name not in table.column_names]
    if missing:
        raise DataError(f"manifest lacks column(s) {missing}; expected {MANIFEST_SCHEMA.names}")
    video = CLIP_COLUMN in table.column_names
    if clip_length is not None and not video:
        raise DataError(f"the model takes clips of {clip_length} frames, but the manifest has no {CLIP_COLUMN!r} "
                        "column: it describes images, not videos")
    rows = table.select(MANIFEST_SCHEMA.names + ([CLIP_COLUMN] if video else [])).to_pylist()

    problems = []
    train = [r for r in rows if r["split"] == "train"]
    if not train:
        problems.append(f"empty train set: no rows with split='train' for {_describe_source(rows)}")
    problems += [
        f"train split holds an anomalous image (label=1, defect={r['defect']!r}): {r['path']}"
        for r in train
        if r["label"] != NORMAL
    ]
    problems += file_problems(rows, check_images=check_images)
    if video:
        problems += clip_problems(rows, clip_length, check_images=check_images)
    if problems:
        raise DataError(format_problems(problems))


def clip_problems(rows: list[dict], clip_length: int | None, *, check_images: bool = True) -> list[str]:
    """Per-clip problems of a video manifest: wrong length, not ending at the row's frame, a frame that is
    missing or cannot be decoded, frames of different sizes in one clip."""
    problems: list[str] = []
    for row in rows:
        clip = row[CLIP_COLUMN] or []
        if clip_length is not None and len(clip) != clip_length:
            problems.append(f"clip of {len(clip)} frame(s) for {row['path']}; the model needs clips of {clip_length}")
        elif clip and clip[-1] != row["path"]:
            problems.append(f"the clip of {row['path']} ends at another frame, {clip[-1]}")
    # Frames that are some row's `path` were decoded by file_problems: their header size is enough here.
    scored = {row["path"] for row in rows}
    frames = sorted({frame for row in rows for frame in (row[CLIP_COLUMN] or [])})

    def size_of(frame: str) -> tuple[tuple[int, int] | None, str | None]:
        if not os.path.isfile(frame):
            return None, None if frame in scored else f"clip frame does not exist: {frame}"
        if frame in scored or not check_images:
            try:
                with Image.open(frame) as im:
                    return im.size, None
            except Exception:  # reported by file_problems (scored frames) or below
                return None, None if frame in scored else f"clip frame cannot be decoded: {frame}"
        size, problem = _decoded_size(frame, "clip frame")
        return size, problem

    with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
        found = dict(zip(frames, pool.map(size_of, frames, chunksize=16)))
    problems += [problem for _, problem in found.values() if problem]
    for row in rows:
        sizes = {frame: found[frame][0] for frame in row[CLIP_COLUMN] or [] if found[frame][0] is not None}
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{frame} {_wh(size)}" for frame, size in sizes.items())
            problems.append(f"frames of different sizes in one clip (of {row['path']}): {listed}")
    return problems


def file_problems(rows: list[dict], *, check_images: bool = True) -> list[str]:
    """Per-row file problems (missing, undecodable, mask size != image size), in row order.

    Layouts call this too when they already have structural problems (a missing mask), so
    one message lists those and the corrupt files together instead of one kind per run.
    """
    check = _check_files_and_images if check_images else _check_files_exist
    problems: list[str] = []
    # PIL decoding releases the GIL, so threads overlap the I/O and the decoding.
    with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
        for row_problems in pool.map(check, rows, chunksize=16):
            problems += row_problems
    return problems


def _describe_source(rows: list[dict]) -> str:
    categories = sorted({r["category"] for r in rows if r["category"]})
    paths = [r["path"] for r in rows if r["path"]]
    where = os.path.commonpath(paths) if paths else "an empty manifest"
    return f"category {', '.join(categories) or '?'} (images under {where})"


def _check_files_exist(row: dict) -> list[str]:
    problems = []
    if not os.path.isfile(row["path"]):
        problems.append(f"image file does not exist: {row['path']}")
    if row["mask_path"] and not os.path.isfile(row["mask_path"]):
        problems.append(f"mask file does not exist: {row['mask_path']} (for image {row['path']})")
    return problems


def _check_files_and_images(row: dict) -> list[str]:
    # The image and its mask are checked independently, so a corrupt image does not hide a
    # corrupt mask; sizes are compared only when both decode.
    problems = []
    image_size = mask_size = None
    if not os.path.isfile(row["path"]):
        problems.append(f"image file does not exist: {row['path']}")
    else:
        image_size, problem = _decoded_size(row["path"], "image")
        problems += [problem] if problem else []
    if row["mask_path"]:
        if not os.path.isfile(row["mask_path"]):
            problems.append(f"mask file does not exist: {row['mask_path']} (for image {row['path']})")
        else:
            mask_size, problem = _decoded_size(row["mask_path"], "mask")
            problems += [problem] if problem else []
    if image_size and mask_size and mask_size != image_size:
        problems.append(
            f"mask size {_wh(mask_size)} differs from image size {_wh(image_size)}: "
            f"mask {row['mask_path']}, image {row['path']}"
        )
    return problems


def _decoded_size(path: str, kind: str) -> tuple[tuple[int, int] | None, str | None]:
    try:
        with Image.open(path) as im:
            im.load()
            return im.size, None
    except Exception as exc:  # PIL raises many types for corrupt files
        return None, f"{kind} cannot be decoded: {path} ({type(exc).__name__}: {exc})"


def _wh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def format_problems(problems: list[str]) -> str:
    listed = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED_PROBLEMS])
    more = len(problems) - MAX_LISTED_PROBLEMS
    tail = f"\n  ... and {more} more" if more > 0 else ""
    return f"{len(problems)} problem(s) in the dataset manifest:\n{listed}{tail}"


def split_counts(table: pa.Table) -> dict[str, dict[str, int]]:
    """Image counts per split and label, e.g. {"train": {"normal": 40, "anomalous": 0}, ...}."""
    counts = {split: {"normal": 0, "anomalous": 0} for split in SPLITS}
    for split, label in zip(table.column("split").to_pylist(), table.column("label").to_pylist()):
        bucket = counts.setdefault(split, {"normal": 0, "anomalous": 0})
        bucket["anomalous" if label == ANOMALOUS else "normal"] += 1
    return counts
