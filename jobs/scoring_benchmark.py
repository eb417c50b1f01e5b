"""Scoring throughput: in process (`raylib-ad predict` without --out: decode and forward on this process)
against the Ray Data path (`raylib-ad predict --out`: decode tasks + a pool of model replicas) with 1, 2, ...
actors, on the same images with the same model directory.

    # the test images of a dataset the model was trained on
    python jobs/scoring_benchmark.py --model runs/demo/model --data mvtec --root R --category bottle
    # any images: files, folders, globs, manifests (as `raylib-ad predict`)
    python jobs/scoring_benchmark.py --model runs/demo/model --images 'parts/**/*.png' --limit 500

For each Ray run: `wall` (dataset start, actor start-up and scoring: what a user waits for) and `steady`
(images/s after the first results arrive: the pool's throughput once its replicas are up; the figure
the 1 -> 2 actor scaling is judged on). Ray is started once, before any timing. Prints a markdown table;
--json FILE also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def image_paths(args) -> list[str]:
    if args.images:
        from raylib_ad.scoring.inputs import expand_inputs

        paths = expand_inputs(args.images)
    else:
        import pyarrow.compute as pc

        from raylib_ad.data import build_manifest

        table = build_manifest(args.data, args.root, args.category, split_file=args.split_file)
        paths = table.filter(pc.equal(table.column("split"), args.split)).column("path").to_pylist()
    return paths[: args.limit] if args.limit else paths


def in_process(trained, paths: list[str], batch_size: int) -> dict:
    start = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        trained.predict(paths[i : i + batch_size])
    seconds = time.perf_counter() - start
    return {"path": "in process", "actors": None, "seconds": seconds, "images_per_second": len(paths) / seconds,
            "steady_images_per_second": None}


def on_ray(trained, paths: list[str], batch_size: int, actors: int, cpus_per_actor: float | None,
           gpus_per_actor: float) -> dict:
    import ray

    from raylib_ad.scoring.payload import directory_payload
    from raylib_ad.scoring.pipeline import ReplicaPool, data_context, predict_dataset

    pool = ReplicaPool(actors=actors, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor)
    start = time.perf_counter()
    first_at, first_rows, rows = None, 0, 0
    with data_context(progress=False):
        ds = predict_dataset(paths, ray.put(directory_payload(trained.directory)), image_size=trained.image_size,
                             batch_size=batch_size, pool=pool, with_maps=False)
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows += block.num_rows
            if first_at is None:
                first_at, first_rows = time.perf_counter(), rows
    end = time.perf_counter()
    assert rows == len(paths), (rows, len(paths))
    steady = (rows - first_rows) / (end - first_at) if first_at is not None and end > first_at else None
    return {"path": "ray", "actors": actors, "cpus_per_actor": pool.resolved_cpus(), "seconds": end - start,
            "images_per_second": rows / (end - start), "steady_images_per_second": steady}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--images", nargs="+", help="files, folders, globs or manifests (instead of --data)")
    parser.add_argument("--data", default="synthetic", choices=["mvtec", "folder", "magnetic_tile", "synthetic"])
    parser.add_argument("--root", help="dataset root")
    parser.add_argument("--category")
    parser.add_argument("--split-file")
    parser.add_argument("--split", default="test", choices=["train", "test"])
    parser.add_argument("--limit", type=int, help="score only the first N images")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--actors", default="1,2", help="comma-separated actor counts")
    parser.add_argument("--cpus-per-actor", type=float)
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--device", default="cpu", help="in-process run's device")
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not args.images and not args.root:
        parser.error("give --images, or --data with --root (and --category)")

    import torch

    from raylib_ad.artifact import load
    from raylib_ad.train.ray_setup import ensure_ray

    paths = image_paths(args)
    trained = load(args.model, device=args.device)
    results = []
    if not args.skip_in_process:
        in_process(trained, paths[: args.batch_size], args.batch_size)  # warm-up: first-call allocations
        results.append(in_process(trained, paths, args.batch_size))
    ensure_ray()
    for actors in (int(a) for a in args.actors.split(",")):
        results.append(on_ray(trained, paths, args.batch_size, actors, args.cpus_per_actor, args.gpus_per_actor))

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    hardware = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {gpu}"
    print(f"\n{trained.name}, {len(paths)} images of {trained.image_size} px, batch {args.batch_size}; {hardware}\n")
    print("| path | actors | CPUs/actor | seconds | images/s (wall) | images/s (steady) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        steady = "" if r["steady_images_per_second"] is None else f"{r['steady_images_per_second']:.1f}"
        print(f"| {r['path']} | {r['actors'] or ''} | {r.get('cpus_per_actor', '')} | {r['seconds']:.2f} | "
              f"{r['images_per_second']:.1f} | {steady} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": trained.name, "images": len(paths), "hardware": hardware,
                       "command": " ".join(sys.argv), "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
