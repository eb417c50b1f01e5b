"""Micro-benchmark of PatchCore's k-center greedy coreset selection: picks per second of each method on
the same features, and whether the methods pick the same points.

    # the issue's reference problem: 200k x 128 features, 2000 picks, 2 threads
    python jobs/coreset_benchmark.py
    # real PatchCore features saved with torch.save (an (N, D) float tensor), e.g. Magnetic Tile patches
    python jobs/coreset_benchmark.py --features mt_features.pt --picks 2000
    # on a GPU
    python jobs/coreset_benchmark.py --device cuda --n 780000 --dim 152 --picks 20000

Where two candidates' distances agree to float32 rounding the methods may pick them in either order;
the line then says whether the picked points are still the same set. Synthetic features are either isotropic Gaussian ("gaussian") or a mixture of Gaussian clusters of
different sizes and spreads ("clusters", closer to patch features: many patches of a few textures).
Prints one line per method and, with --json FILE, writes the figures. The CPU time of the process is
printed beside the wall time: on a machine shared with other work it is the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from raylib_ad.models.components.coreset import k_center_greedy


def synthetic(kind: str, n: int, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n, dim, generator=gen)
    n_clusters = 64
    centres = torch.randn(n_clusters, dim, generator=gen) * 4
    spreads = torch.rand(n_clusters, generator=gen) * 1.5 + 0.25
    weights = torch.rand(n_clusters, generator=gen) + 0.1
    labels = torch.multinomial(weights, n, replacement=True, generator=gen)
    return centres[labels] + torch.randn(n, dim, generator=gen) * spreads[labels, None]


def run(features: torch.Tensor, picks: int, method: str, projection_dim: int | str,
        seed: int) -> tuple[float, float, list]:
    """(wall seconds, CPU seconds of this process, picked indices)."""
    if features.device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    selected = k_center_greedy(features, picks, projection_dim=projection_dim, seed=seed, method=method)
    if features.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start, selected.tolist()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000, help="rows of synthetic features")
    parser.add_argument("--dim", type=int, default=128, help="columns of synthetic features")
    parser.add_argument("--data", choices=("clusters", "gaussian"), default="clusters")
    parser.add_argument("--features", help="a torch.save'd (N, D) tensor to use instead of synthetic features")
    parser.add_argument("--picks", type=int, default=2000)
    parser.add_argument("--methods", default="plain,lazy", help="comma-separated: plain, lazy")
    parser.add_argument("--projection-dim", default="0", help="0 (none, the default here), 'auto' or a number")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.features:
        features = torch.load(args.features, map_location="cpu").float().contiguous()
        source = args.features
    else:
        features = synthetic(args.data, args.n, args.dim, args.seed)
        source = f"synthetic {args.data}"
    features = features.to(args.device)
    projection = args.projection_dim if args.projection_dim == "auto" else int(args.projection_dim)
    results = {"source": source, "n": features.shape[0], "dim": features.shape[1], "picks": args.picks,
               "threads": args.threads, "device": args.device, "projection_dim": args.projection_dim,
               "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "methods": {}}
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    reference = None
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        seconds, cpu_seconds, selected = run(features, args.picks, method, projection, args.seed)
        same = None if reference is None else selected == reference
        same_set = None if reference is None else set(selected) == set(reference)
        first_difference = None
        if same is False:
            first_difference = next(i for i, (a, b) in enumerate(zip(selected, reference)) if a != b)
        reference = reference or selected
        results["methods"][method] = {"seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
                                      "picks_per_second": round(args.picks / seconds, 1),
                                      "same_picks_as_first": same, "same_set_as_first": same_set,
                                      "first_difference": first_difference}
        print(f"{method:6s} {features.shape[0]} x {features.shape[1]} ({source}), {args.picks} picks, "
              f"{args.threads} threads, {args.device}: {seconds:.2f} s = {args.picks / seconds:.0f} picks/s "
              f"(CPU time {cpu_seconds:.2f} s)"
              + ("" if same is None else f", same picks as the first method: {same}"
                 + ("" if same else f" (first difference at pick {first_difference}; same set of points: "
                                    f"{same_set})")), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
