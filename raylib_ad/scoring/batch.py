"""`raylib-ad predict --out FILE.parquet`: score any number of images on Ray Data with a pool of model
replicas, streaming the results into a resumable Parquet file (parquet_sink.py)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from raylib_ad.scoring.parquet_sink import ParquetParts
from raylib_ad.scoring.payload import directory_payload, payload_digest

PART_ROWS = 1024  # rows per part file: what an interruption can lose at most...
PART_SECONDS = 60.0  # ...or a minute of work, whichever comes first


def map_file_names(paths: list[str]) -> dict[str, str]:
    """`<stem>_map.png` as the in-process predict names them; images sharing a stem (good/000.png and
    crack/000.png) are told apart by their path below the folder they have in common."""
    stems = Counter(Path(p).stem for p in paths)
    clashing = [p for p in paths if stems[Path(p).stem] > 1]
    common = os.path.commonpath([os.path.abspath(p) for p in clashing]) if clashing else ""
    names = {}
    for p in paths:
        if stems[Path(p).stem] == 1:
            names[p] = f"{Path(p).stem}_map.png"
        else:
            relative = os.path.relpath(os.path.abspath(p), common)
            names[p] = relative.replace(os.sep, "__").replace(".", "_") + "_map.png"
    return names


def score_to_parquet(trained, paths: list[str], out: str | os.PathLike, *, maps_dir: str | os.PathLike | None = None,
                     pool=None, batch_size: int = 16, progress: bool = True, part_rows: int = PART_ROWS,
                     part_seconds: float = PART_SECONDS) -> dict[str, Any]:
    """Score `paths` with the loaded model `trained` (its directory is what the replicas load) into
    `out`. Paths already in `out` or its parts are skipped. Returns the run's summary."""
    import ray

    from raylib_ad.progress import progress_enabled
    from raylib_ad.scoring.pipeline import ReplicaPool, data_context, predict_dataset
    from raylib_ad.train.ray_setup import ensure_ray

    if trained.directory is None:
        raise ValueError("score_to_parquet needs a model loaded from a directory (raylib_ad.load)")
    pool = pool or ReplicaPool()
    paths = list(dict.fromkeys(paths))
    payload = directory_payload(trained.directory)
    sink = ParquetParts(out, {"model": payload_digest(payload), "maps": maps_dir is not None})
    done = sink.written_paths()
    todo = [p for p in paths if p not in done]
    map_dir = Path(maps_dir) if maps_dir is not None else None
    if map_dir is not None:
        map_dir.mkdir(parents=True, exist_ok=True)
    writer = _PartWriter(sink, map_dir, map_file_names(todo) if map_dir is not None else {}, part_rows,
                         part_seconds)
    start = time.perf_counter()
    if todo:
        ensure_ray()
        bar = None  # drawn from the first scored block: while the actors start, no bar and no runaway ETA (and
        # what Ray prints as they start, e.g. core_worker.cc's constructor-argument line, lands before the bar)
        try:
            with data_context(progress):
                ds = predict_dataset(todo, ray.put(payload), image_size=trained.image_size, batch_size=batch_size,
                                     pool=pool, with_maps=map_dir is not None)
                # closing(): an interrupted run stops its actors and tasks now, not when its traceback is freed
                with contextlib.closing(iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))) as stream:
                    for block in stream:
                        writer.add(block)
                        if bar is None and progress and progress_enabled():
                            bar = _bar(len(todo))
                        if bar is not None:
                            bar.update(block.num_rows)
        except KeyboardInterrupt:  # the CLI prints this as its one line, without a traceback
            raise KeyboardInterrupt(f"scoring stopped after {writer.scored} of {len(todo)} images; the rows written "
                                    f"are kept in {sink.parts_dir}: rerun the same command to score the rest") from None
        except BaseException:
            print(f"[raylib_ad] scoring stopped after {writer.scored} of {len(todo)} images; the rows written are "
                  f"kept in {sink.parts_dir}: rerun the same command to score the rest", file=sys.stderr)
            raise
        finally:
            writer.flush()  # rows already scored are kept, whatever stopped the run
            if bar is not None:
                bar.close()
    seconds = time.perf_counter() - start
    table = sink.finish(paths)
    scored = writer.scored
    return {"out": str(out), "rows": table.num_rows, "scored": scored, "errors": writer.errors,
            "skipped_already_written": len(paths) - len(todo),
            "errors_in_file": table.num_rows - table.column("error").null_count,
            "seconds": round(seconds, 3), "images_per_second": round(scored / seconds, 3) if scored else None}


class _PartWriter:
    """Collects scored blocks on the driver, writes the map PNGs the replicas encoded, and flushes a part
    every `part_rows` rows or `part_seconds` seconds."""

    def __init__(self, sink: ParquetParts, map_dir: Path | None, names: dict[str, str], part_rows: int,
                 part_seconds: float):
        self.sink, self.map_dir, self.names = sink, map_dir, names
        self.part_rows, self.part_seconds = part_rows, part_seconds
        self.buffer: list[pa.Table] = []
        self.scored = self.errors = 0
        self.flushed = time.monotonic()

    def add(self, block: pa.Table) -> None:
        block = self._with_map_files(block)
        self.buffer.append(block)
        self.scored += block.num_rows
        self.errors += block.num_rows - block.column("error").null_count
        if sum(t.num_rows for t in self.buffer) >= self.part_rows or \
                time.monotonic() - self.flushed >= self.part_seconds:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            rows, self.buffer = pa.concat_tables(self.buffer), []  # emptied first: a failed write is not retried
            self.sink.write(rows)
        self.flushed = time.monotonic()

    def _with_map_files(self, block: pa.Table) -> pa.Table:
        """The row keeps the PNG's path instead of its bytes."""
        files: list[str | None] = [None] * block.num_rows
        if self.map_dir is not None:
            pngs = block.column("map_png").to_pylist()
            for i, (path, png) in enumerate(zip(block.column("path").to_pylist(), pngs)):
                if png is not None:
                    target = self.map_dir / self.names[path]
                    target.write_bytes(png)
                    files[i] = str(target)
            block = block.drop_columns(["map_png"])
        return block.append_column("anomaly_map_file", pa.array(files, pa.string()))


def _bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="scoring", unit="img", file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 10.0)
