"""In-process test-split scoring speed of the memory-bank models (issue #14): the path `raylib-ad train` and
jobs/benchmark.py time (evaluation.score_split: decoding prefetched in a thread, then model(images)), on a
model fitted in process on the first --fit-images training images. No Ray. PatchCore's coreset ratio is
set so that its bank has --bank-rows rows (780 = ratio 0.001 of Magnetic Tile's 762 training images).

    python jobs/scoring_speed.py --data magnetic_tile --root ../shared/datasets/magnetic_tile \\
        --split-file ../shared/datasets/magnetic_tile_split.csv --threads 2

Prints one JSON line per model: test images/s (whole test split, after one warm-up batch); the CPU time the
scoring took per image (process time: decoding thread and torch threads together; with --threads 1 a figure
that other jobs on the machine barely move); the split into decoding (CPU ms/image) and the forward pass
(wall ms/image, on one batch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="patchcore,padim,dfm,dfkde")
    parser.add_argument("--data", default="magnetic_tile")
    parser.add_argument("--root", required=True)
    parser.add_argument("--category")
    parser.add_argument("--split-file")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--fit-images", type=int, default=50)
    parser.add_argument("--bank-rows", type=int, default=780)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, help="score only the first N test images")
    args = parser.parse_args(argv)

    import pyarrow.compute as pc
    import torch

    from raylib_ad.data import build_manifest
    from raylib_ad.data.transforms import decode_all
    from raylib_ad.evaluation import score_split
    from raylib_ad.models import create_model, model_class
    from raylib_ad.train.in_process import fit_in_process

    torch.set_num_threads(args.threads)
    table = build_manifest(args.data, args.root, args.category, split_file=args.split_file)
    train = table.filter(pc.equal(table.column("split"), "train")).slice(0, args.fit_images)
    test = table.filter(pc.equal(table.column("split"), "test"))
    if args.limit:
        test = test.slice(0, args.limit)
    results = []
    for name in args.models.split(","):
        preset = model_class(name).benchmark_preset
        settings = dict(preset.get("settings", {}))
        model = create_model(name, backbone=args.backbone, layers=preset.get("layers"), image_size=args.image_size,
                             **settings)
        mean, std = model.normalization
        if name == "patchcore":
            grid = model.embed(torch.zeros(1, 3, args.image_size, args.image_size))[0].shape[1]
            model.settings["coreset_sampling_ratio"] = min(1.0, args.bank_rows / (grid * args.fit_images))
        images = torch.cat([torch.from_numpy(b["image"]) for b in decode_all(
            train, args.image_size, mean, std, batch_size=args.batch_size, with_masks=False)])
        fit_in_process(model, images, None, batch_size=args.batch_size, progress=False)
        model.eval()
        score_split(model, test.slice(0, args.batch_size), batch_size=args.batch_size, progress=False)  # warm-up
        cpu_start = time.process_time()
        scored = score_split(model, test, batch_size=args.batch_size, progress=False)
        cpu_ms = 1000 * (time.process_time() - cpu_start) / test.num_rows
        start = time.process_time()
        batch = next(decode_all(test.slice(0, args.batch_size), args.image_size, mean, std,
                                batch_size=args.batch_size))
        decode_ms = 1000 * (time.process_time() - start) / len(batch["image"])
        x = torch.from_numpy(batch["image"])
        with torch.no_grad():
            start = time.perf_counter()
            model(x)
            forward_ms = 1000 * (time.perf_counter() - start) / len(x)
        result = {"model": name, "test_images": test.num_rows, "test_images_per_second": round(scored.images_per_second, 2),
                  "scoring_cpu_ms_per_image": round(cpu_ms, 2),
                  "decode_ms_per_image": round(decode_ms, 2), "forward_ms_per_image": round(forward_ms, 2),
                  "threads": args.threads, "batch_size": args.batch_size, "fit_images": args.fit_images}
        if name == "patchcore":
            result["bank_rows"] = int(model.memory_bank.shape[0])
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
