"""Load test of the serving application over loopback, next to the bare model's own throughput.

    python jobs/loadtest.py --model-dir widget=runs/demo/model --images 'data/widget/test/*/*.png' \
        --requests 1000 --concurrency 16 [--torch-threads 2] [--json out.json]

1. Bare model: `raylib_ad.load(DIR).predict` on the same images, in batches of --batch-size, in this
   process (decoded up front, so it is the model's time plus resizing): images/second.
2. Serving: starts Ray and the application on 127.0.0.1 (or drives --url, an application already
   running), warms it up, then sends --requests raw-byte POSTs with --concurrency in flight (httpx async)
   and reports errors, p50/p90/p99 latency and requests/second. Exit status 1 if any request failed.
The bare model runs before the application starts, so the two never share the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bare_throughput(model_dir: str, images: list[bytes], batch_size: int, n: int, threads: int | None) -> dict:
    import torch

    from raylib_ad.artifact import load
    from raylib_ad.serving.decode import decode_image

    if threads:
        torch.set_num_threads(threads)
    trained = load(model_dir)
    arrays = [decode_image(b, 2**31) for b in images]
    batches = [[arrays[(start + i) % len(arrays)] for i in range(batch_size)] for start in range(0, n, batch_size)]
    trained.predict(batches[0])  # warm-up: first call allocates
    start = time.perf_counter()
    for batch in batches:
        trained.predict(batch)
    seconds = time.perf_counter() - start
    return {"images": len(batches) * batch_size, "seconds": seconds,
            "images_per_second": len(batches) * batch_size / seconds, "torch_threads": torch.get_num_threads()}


async def drive(url: str, category: str, images: list[bytes], requests: int, concurrency: int) -> dict:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(requests))
    endpoint = f"{url}/v1/categories/{category}/predict"

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:  # a shared iterator: each request index is taken by exactly one worker
            start = time.perf_counter()
            try:
                response = await client.post(endpoint, content=images[i % len(images)],
                                             headers={"content-type": "application/octet-stream"})
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
                    continue
            except httpx.HTTPError as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for image in images[:concurrency]:  # warm-up: model loaded, connections open
            (await client.post(endpoint, content=image)).raise_for_status()
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    return {"requests": requests, "concurrency": concurrency, "ok": len(latencies), "errors": len(errors),
            "error_samples": errors[:5], "seconds": seconds, "requests_per_second": len(latencies) / seconds,
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99), "max_ms": 1000 * ordered[-1] if ordered else None}


def start_app(args, category: str, model_dir: str) -> str:
    import ray
    from ray import serve

    from raylib_ad.serving.app import build_application

    port = args.port
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    serve.run(build_application({"model_dirs": {category: model_dir}, "torch_threads": args.torch_threads,
                         "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s},
                        ray_actor_options={"num_cpus": args.replica_cpus},
                        autoscaling_config={"min_replicas": args.replicas, "max_replicas": args.replicas}),
              name="raylib_ad", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, metavar="CATEGORY=DIR")
    p.add_argument("--images", required=True, help="glob of image files sent round-robin")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--url", help="an application already running (else one is started here)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--ray-cpus", type=int, default=os.cpu_count())
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--replica-cpus", type=float, default=0.5)
    p.add_argument("--torch-threads", type=int, help="torch threads in each replica and in the bare run")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=16, help="bare model batch size")
    p.add_argument("--bare-images", type=int, default=256)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    category, _, model_dir = args.model_dir.partition("=")
    paths = sorted(glob.glob(args.images))
    if not paths:
        p.error(f"--images {args.images!r} matches no file")
    images = [Path(path).read_bytes() for path in paths]

    result = {"bare": bare_throughput(model_dir, images, args.batch_size, args.bare_images, args.torch_threads)}
    print(json.dumps({"bare": result["bare"]}), flush=True)
    url = args.url or start_app(args, category, str(Path(model_dir).resolve()))
    try:
        result["serve"] = asyncio.run(drive(url, category, images, args.requests, args.concurrency))
    finally:
        if not args.url:
            from ray import serve

            serve.shutdown()
    result["settings"] = {k: v for k, v in vars(args).items() if k != "json"}
    result["n_images"] = len(images)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 1 if result["serve"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
