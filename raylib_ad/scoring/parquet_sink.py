"""FILE.parquet written in parts, so an interrupted run loses at most the rows it had not yet flushed.

    FILE.parquet.parts/RUN.json          which model (digest of its files) and options wrote the parts
    FILE.parquet.parts/part-000000.parquet, part-000001.parquet, ...   written atomically (tmp + rename)

A rerun reads the paths already in the parts (and in FILE.parquet, when an earlier run finished) and scores
only the others; at the end every part is combined into FILE.parquet (atomically) and the parts removed.
Parts of a different model or options are refused rather than mixed in.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylib_ad.artifact import PREDICTION_FIELDS
from raylib_ad.errors import DataError

# path (as given), the PREDICTION_FIELDS, then what the batch path adds: the error of an unreadable image
# (null when it was scored) and the map PNG's path (null without --maps).
RESULT_SCHEMA = pa.schema([("path", pa.string()), ("score", pa.float64()), ("normalized_score", pa.float64()),
                           ("is_anomalous", pa.bool_()), ("threshold", pa.float64()), ("error", pa.string()),
                           ("anomaly_map_file", pa.string())])
assert tuple(RESULT_SCHEMA.names[1:1 + len(PREDICTION_FIELDS)]) == PREDICTION_FIELDS
RUN_FILE = "RUN.json"
METADATA_KEY = b"raylib_ad.run"


class ParquetParts:
    def __init__(self, out: str | os.PathLike, identity: dict):
        self.out = Path(out)
        if self.out.suffix != ".parquet":
            raise DataError(f"--out {self.out}: expected a file name ending in .parquet")
        self.parts_dir = self.out.with_name(self.out.name + ".parts")
        self.identity = identity
        self._check_identity()
        self._next = 1 + max((int(p.stem.split("-")[1]) for p in self._parts()), default=-1)

    def _check_identity(self) -> None:
        run_file = self.parts_dir / RUN_FILE
        written = [json.loads(run_file.read_text())] if run_file.is_file() else []
        if self.out.is_file():
            meta = pq.read_schema(self.out).metadata or {}
            written.append(json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None)
        for earlier in written:
            if earlier != self.identity:
                raise DataError(f"{self.out} (or {self.parts_dir}) was written by another model or with other "
                                f"options ({earlier} vs {self.identity}); remove it or choose another --out")
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.parts_dir.glob(".*.tmp"):  # a part being written when the run stopped
            stale.unlink()
        if not run_file.is_file():
            run_file.write_text(json.dumps(self.identity))

    def _parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.parquet")) if self.parts_dir.is_dir() else []

    def _tables(self) -> list[pa.Table]:
        tables = [pq.read_table(self.out)] if self.out.is_file() else []
        return tables + [pq.read_table(p) for p in self._parts()]

    def written_paths(self) -> set[str]:
        paths: set[str] = set()
        sources = ([self.out] if self.out.is_file() else []) + self._parts()
        for source in sources:
            paths.update(pq.read_table(source, columns=["path"]).column("path").to_pylist())
        return paths

    def write(self, table: pa.Table) -> Path:
        """One part, whole or not at all."""
        target = self.parts_dir / f"part-{self._next:06d}.parquet"
        tmp = self.parts_dir / f".{target.name}.tmp"
        pq.write_table(table.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA), tmp)
        os.replace(tmp, target)
        self._next += 1
        return target

    def finish(self, order: list[str]) -> pa.Table:
        """Combine the earlier file and every part into FILE.parquet, in `order` (paths not in it after,
        as they were), one row per path; then remove the parts."""
        tables = [t.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA) for t in self._tables()]
        combined = pa.concat_tables(tables) if tables else RESULT_SCHEMA.empty_table()
        paths = combined.column("path").to_pylist()
        first = list({p: i for i, p in reversed(list(enumerate(paths)))}.values())
        position = {p: i for i, p in enumerate(order)}
        first.sort(key=lambda i: (position.get(paths[i], len(order)), i))
        combined = combined.take(np.asarray(first, dtype=np.int64)).replace_schema_metadata(
            {METADATA_KEY: json.dumps(self.identity).encode()})
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        pq.write_table(combined, tmp)
        os.replace(tmp, self.out)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return combined
