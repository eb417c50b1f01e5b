"""Manifest -> ray.data.Dataset: decode, resize and normalize in map_batches on CPU workers, streamed
to the Ray Train workers, each of which reads its own shard (train.get_dataset_shard)."""

from __future__ import annotations

from typing import Sequence

import pyarrow as pa
import ray

from raylib_ad.data.transforms import BatchDecoder


def manifest_to_dataset(
    table: pa.Table,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    with_masks: bool = False,
    rows_per_block: int = 16,
    decode_tasks: int = 2,
) -> ray.data.Dataset:
    # A video manifest keeps its clip column: the decoder turns each row's clip into (T, 3, S, S).
    columns = ["path", "label"] + (["mask_path"] if with_masks else [])
    columns += ["clip"] if "clip" in table.column_names else []
    table = table.select(columns)
    # Small blocks let several decode tasks run at once and let the stream start flowing early;
    # one block per table would decode the whole split in a single task.
    blocks = [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)]
    decoder = BatchDecoder(image_size, mean, std, with_masks=with_masks)
    # Decode tasks ask Ray for no CPU; at most `decode_tasks` of them run at once for this dataset.
    # Why not a (fractional) CPU each: Ray Data 2.60 runs a pipeline only within the CPUs that Ray's
    # autoscaling coordinator reserves for it, and a pipeline that has not finished a task yet asks for
    # no CPU of its own: it gets a share of the CPUs the training workers leave, in WHOLE CPUs (floor
    # division). Two workers on 2 CPUs leave 1 CPU for two pipelines: 0 each, no decode task ever
    # starts, and the run waits forever ("Cluster resources are not enough to run any task"). Which
    # pipeline starts first depends on timing, so it struck on busy machines and after restarts
    # (docs/design.md, "A run never hangs"). A task that needs no CPU can always start; the cap
    # keeps decoding from crowding the training threads.
    return ray.data.from_arrow(blocks).map_batches(decoder, batch_format="numpy", num_cpus=0,
                                                   compute=ray.data.TaskPoolStrategy(size=max(1, int(decode_tasks))))
