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
    decode_cpus: float = 0.5,
) -> ray.data.Dataset:
    # A video manifest keeps its clip column: the decoder turns each row's clip into (T, 3, S, S).
    columns = ["path", "label"] + (["mask_path"] if with_masks else [])
    columns += ["clip"] if "clip" in table.column_names else []
    table = table.select(columns)
    # Small blocks let several decode tasks run at once and let the stream start flowing early;
    # one block per table would decode the whole split in a single task.
    blocks = [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)]
    decoder = BatchDecoder(image_size, mean, std, with_masks=with_masks)
    # A fractional CPU per decode task: on a laptop the train workers hold most cores, and a task that
    # asks for a whole one would wait forever (see docs/ray_on_small_machines.md).
    return ray.data.from_arrow(blocks).map_batches(decoder, batch_format="numpy", num_cpus=decode_cpus)
