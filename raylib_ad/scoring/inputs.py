"""What `raylib-ad predict` scores: image files, folders, globs and manifests, expanded to one list of paths.
Plain Python (no Ray), so the in-process predict uses it too."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from raylib_ad.errors import DataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
MANIFEST_SUFFIXES = frozenset({".csv", ".parquet"})
PATH_COLUMN = "path"


def expand_inputs(items: list[str]) -> list[str]:
    """Each item, in order: a manifest (.csv/.parquet with a `path` column; relative paths are taken
    relative to the manifest's folder), a folder (its images, recursively, sorted), a glob (sorted;
    `**` recurses), else an image file. Duplicates are kept once, at their first place. A folder or
    glob matching nothing, or a file that does not exist, is an error naming it: a typo should not
    look like an empty result."""
    paths: list[str] = []
    for item in items:
        path = Path(item)
        if path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file():
            paths += manifest_paths(path)
        elif path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise DataError(f"folder {item} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths += found
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise DataError(f"glob {item!r} matches no files")
            paths += found
        elif path.is_file():
            paths.append(item)
        else:
            raise DataError(f"{item}: no such file, folder or manifest")
    return list(dict.fromkeys(paths))


def manifest_paths(manifest: Path) -> list[str]:
    import pyarrow.csv as pv
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(manifest) if manifest.suffix.lower() == ".parquet" else pv.read_csv(manifest)
    except Exception as exc:  # pyarrow raises several types for a malformed file
        raise DataError(f"cannot read manifest {manifest}: {type(exc).__name__}: {exc}") from exc
    if PATH_COLUMN not in table.column_names:
        raise DataError(f"manifest {manifest} has no {PATH_COLUMN!r} column (columns: {table.column_names})")
    base = manifest.parent
    values = [v for v in table.column(PATH_COLUMN).to_pylist() if v not in (None, "")]
    if not values:
        raise DataError(f"manifest {manifest} lists no paths")
    # An unreadable or missing file inside a manifest is not an error here: it gets an error row, and the
    # other images are scored (a manifest of a million paths should not fail on one).
    return [str(v) if os.path.isabs(str(v)) else str(base / str(v)) for v in values]
