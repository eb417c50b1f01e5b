"""Where the fixed cost of a Ray Train run goes: `ray.init`, then several tiny fits through the same code
`raylib-ad train` uses (train/ray_train.py fit_on_ray), on 8 images of 32 px, so that the work inside the
workers is negligible and the wall time is start-up and teardown.

    python jobs/fixed_cost.py                 # 3 runs, 1 worker
    python jobs/fixed_cost.py --workers 2 --runs 5
    RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=1 python jobs/fixed_cost.py   # what the watcher costs
    python jobs/fixed_cost.py --bare          # Ray Train's own floor: a TorchTrainer whose workers only report

Prints one JSON line per run (fit wall seconds, seconds inside the workers, the difference) and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model", default="padim")
    parser.add_argument("--bare", action="store_true", help="no raylib_ad in the workers: a TorchTrainer whose "
                        "train function only reports, i.e. what Ray Train alone costs per fit() on this machine")
    parser.add_argument("--timeline", type=int, default=0, metavar="N", help="print the last N lines of Ray's "
                        "log (timestamped) after each run")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    import pyarrow.compute as pc

    from raylib_ad.data import build_manifest, ensure_synthetic
    from raylib_ad.train.ray_setup import cluster_cpus, ensure_ray
    from raylib_ad.train.ray_train import fit_on_ray
    from raylib_ad.train.resources import cpus_per_worker
    from raylib_ad.train.runner import RunnerConfig

    imports = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        ensure_synthetic(tmp, "widget")
        table = build_manifest("synthetic", tmp, "widget")
        train = table.filter(pc.equal(table.column("split"), "train")).slice(0, 8)
        from raylib_ad.console import install_console

        log = Path(tmp) / "ray.log"
        console = install_console(log)  # Ray's lines, timestamped: where the seconds go
        start = time.perf_counter()
        ensure_ray(local=True)
        init = time.perf_counter() - start
        console.attach_ray()
        runs = []
        for i in range(args.runs):
            if args.bare:
                runs.append(_bare_fit(i, args.workers, os.path.join(tmp, "ray")))
                print(json.dumps(runs[-1]), flush=True)
                continue
            config = RunnerConfig(batch_size=8, image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
            fit = fit_on_ray(args.model, {"backbone": "resnet18", "pretrained": False, "image_size": 32,
                                          "layers": ["layer1", "layer2"]}, train, None, config,
                             workers=args.workers, cpus_per_worker=cpus_per_worker(cluster_cpus(), args.workers),
                             gpus_per_worker=0, storage_path=os.path.join(tmp, "ray"), run_name=f"fixed-{i}")
            inside = float(fit.metrics.get("fit_compute_seconds", 0.0))
            if args.timeline:
                print(f"--- run {i}: fit started {time.strftime('%H:%M:%S', time.localtime(time.time() - fit.seconds))}")
                print("\n".join(line[:140] for line in log.read_text().splitlines()[-args.timeline:]))
            run = {"run": i, "fit_seconds": round(fit.seconds, 2), "inside_workers_seconds": round(inside, 2),
                   "fixed_seconds": round(fit.seconds - inside, 2)}
            runs.append(run)
            print(json.dumps(run), flush=True)
    summary = {"imports_seconds": round(imports, 2), "ray_init_seconds": round(init, 2), "workers": args.workers,
               "median_fixed_seconds": statistics.median(r["fixed_seconds"] for r in runs),
               "median_fit_seconds": statistics.median(r["fit_seconds"] for r in runs),
               "preemption_watcher": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1"),
               "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps(summary))
    return summary


def _report_only() -> None:
    import ray.train

    ray.train.report({"done": 1})


def _bare_fit(index: int, workers: int, storage: str) -> dict:
    """One TorchTrainer.fit() with nothing of raylib_ad inside: Ray Train's controller, worker processes, torch
    process group and one report. Everything it costs is fixed cost no model code can remove."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raylib_ad.train.ray_setup import cluster_cpus
    from raylib_ad.train.resources import cpus_per_worker

    trainer = TorchTrainer(_report_only, scaling_config=ScalingConfig(
        num_workers=workers, resources_per_worker={"CPU": cpus_per_worker(cluster_cpus(), workers)}),
        run_config=RunConfig(storage_path=storage, name=f"bare-{index}"))
    start = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - start
    return {"run": index, "fit_seconds": round(wall, 2), "inside_workers_seconds": 0.0, "fixed_seconds": round(wall, 2)}


if __name__ == "__main__":
    main()
