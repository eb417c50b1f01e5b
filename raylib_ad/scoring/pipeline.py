"""Ray Data pipelines for scoring: decode on CPU tasks, score on a fixed pool of ModelReplica actors,
stream the results to the driver (nothing is materialized as a whole).

    paths or manifest rows ─ from_arrow (many small blocks) ─ map_batches(decode, tasks, 0.5 CPU)
        ─ map_batches(ModelReplica, ActorPoolStrategy(size=actors), num_cpus/num_gpus per actor)
        ─ iter_batches on the driver

The model reaches the actors as its directory's bytes, put once in the object store (ray.put): no actor
reads a path on the driver's disk, so the same code runs on a laptop and across nodes.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import ray
import ray.data

from raylib_ad.data.transforms import BatchDecoder
from raylib_ad.scoring.replica import ModelReplica, decode_paths

# Decode tasks ask for half a CPU: beside actors that hold most cores on a small machine, a task asking for
# a whole one could wait forever (docs/design.md, "Small machines").
DECODE_CPUS = 0.5
MAX_INPUT_BLOCKS = 2000  # a million paths in ~2000 blocks: enough parallelism, little per-block overhead


@dataclass(frozen=True)
class ReplicaPool:
    """How many model replicas and what each holds. cpus_per_actor None: share the cluster's CPUs
    (actor_cpus); a GPU actor takes one CPU unless told otherwise."""

    actors: int = 1
    cpus_per_actor: float | None = None
    gpus_per_actor: float = 0.0

    def resolved_cpus(self) -> float:
        if self.cpus_per_actor:
            return float(self.cpus_per_actor)
        if self.gpus_per_actor > 0:
            return 1.0
        return actor_cpus(float(ray.cluster_resources().get("CPU", 1)), self.actors)

    def remote_args(self) -> dict:
        args = {"compute": ray.data.ActorPoolStrategy(size=max(1, int(self.actors))), "num_cpus": self.resolved_cpus()}
        if self.gpus_per_actor > 0:
            args["num_gpus"] = float(self.gpus_per_actor)
        return args

    def replica_kwargs(self) -> dict:
        cpus = self.resolved_cpus()
        # Threads: the share rounded UP. The decode reserve is busy only while images are decoded (ahead of
        # the model), and 1.5 CPUs floored to 1 thread left half of a 2-core machine idle while scoring.
        return {"device": "cuda" if self.gpus_per_actor > 0 else "cpu", "threads": max(1, math.ceil(cpus))}


def actor_cpus(total_cpus: float, actors: int) -> float:
    """An even share of the cluster's CPUs per actor, after a quarter (at least half a CPU) is kept for the
    decode tasks: actors holding every CPU would starve the tasks that feed them."""
    reserve = max(DECODE_CPUS, 0.25 * total_cpus)
    share = (total_cpus - reserve) / max(actors, 1)
    return float(math.floor(share)) if share >= 1 else max(0.25, math.floor(share * 4) / 4)


def _blocks(n: int, batch_size: int) -> int:
    rows_per_block = max(batch_size, math.ceil(n / MAX_INPUT_BLOCKS))
    return max(1, math.ceil(n / rows_per_block))


def predict_dataset(paths: list[str], payload_ref, *, image_size: int, batch_size: int, pool: ReplicaPool,
                    with_maps: bool) -> ray.data.Dataset:
    table = pa.table({"path": pa.array(paths, pa.string())})
    ds = ray.data.from_arrow(table, override_num_blocks=_blocks(len(paths), batch_size))
    ds = ds.map_batches(decode_paths, fn_kwargs={"image_size": int(image_size)}, batch_size=batch_size,
                        batch_format="numpy", num_cpus=DECODE_CPUS, udf_modifying_row_count=False)
    return ds.map_batches(ModelReplica, batch_size=batch_size, batch_format="numpy",
                          fn_constructor_args=(payload_ref,),
                          fn_constructor_kwargs={"mode": "predict", "with_maps": with_maps, **pool.replica_kwargs()},
                          udf_modifying_row_count=False, **pool.remote_args())


def decode_indexed(batch, image_size: int, mean, std):
    """BatchDecoder (normalized images, masks) plus the row index, so results go back in the table's order."""
    out = BatchDecoder(image_size, mean, std, with_masks=True)(batch)
    out["index"] = batch["index"]
    return out


def split_dataset(table: pa.Table, payload_ref, *, image_size: int, mean, std, batch_size: int,
                  pool: ReplicaPool, map_dtype: str) -> ray.data.Dataset:
    # Video rows carry their clip (frame files, oldest first): BatchDecoder then decodes clips.
    columns = ["path", "label", "mask_path"] + (["clip"] if "clip" in table.column_names else [])
    rows = table.select(columns).append_column(
        "index", pa.array(range(table.num_rows), pa.int64()))
    ds = ray.data.from_arrow(rows, override_num_blocks=_blocks(table.num_rows, batch_size))
    ds = ds.map_batches(decode_indexed, fn_kwargs={"image_size": int(image_size), "mean": tuple(mean),
                                                   "std": tuple(std)},
                        batch_size=batch_size, batch_format="numpy", num_cpus=DECODE_CPUS, udf_modifying_row_count=False)
    return ds.map_batches(ModelReplica, batch_size=batch_size, batch_format="numpy",
                          fn_constructor_args=(payload_ref,),
                          fn_constructor_kwargs={"mode": "split", "map_dtype": map_dtype, **pool.replica_kwargs()},
                          udf_modifying_row_count=False, **pool.remote_args())


@contextlib.contextmanager
def data_context(progress: bool) -> Iterator[None]:
    """Ray Data's own progress bars only when the caller shows progress (restored afterwards)."""
    context = ray.data.DataContext.get_current()
    before = context.enable_progress_bars
    context.enable_progress_bars = bool(progress) and before
    try:
        yield
    finally:
        context.enable_progress_bars = before
