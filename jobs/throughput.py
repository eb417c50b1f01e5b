"""Throughput and peak memory of one model's forward pass (and fit, where it has one), with randomly
initialised weights: for the models whose weights cannot be had on the development machines (WinCLIP's
CLIP, AI-VAD's detectors, RAFT and CLIP). Same architecture, same arithmetic as with real weights, so the
speed and memory are the real ones; the scores are meaningless. No Ray.

    # WinCLIP zero-shot and 4-shot at CLIP's 240 px, 2 CPU threads
    python jobs/throughput.py --model winclip --image-size 240 --batch-size 4
    python jobs/throughput.py --model winclip --image-size 240 --batch-size 4 --set k_shot=4
    # AI-VAD with anomalib's networks (Mask R-CNN, Keypoint R-CNN, RAFT large, CLIP ViT-B/16) on 2-frame clips
    python jobs/throughput.py --model ai_vad --image-size 256 --batch-size 2 --fit-samples 8
    # on a GPU
    python jobs/throughput.py --model winclip --device cuda --batch-size 32 --batches 20

Prints one JSON line: fit samples/s, forward images (or frames) /s, peak memory (process RSS; CUDA peak).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=5, help="timed forward batches (after one warm-up batch)")
    parser.add_argument("--fit-samples", type=int, default=8, help="samples for the model's Collect stages")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--set", dest="settings", action="append", metavar="KEY=VALUE", default=[])
    args = parser.parse_args(argv)

    import torch

    from raylib_ad.models import create_model, model_class
    from raylib_ad.options import parse_settings
    from raylib_ad.train.in_process import fit_in_process

    torch.set_num_threads(args.threads)
    cls = model_class(args.model)
    kwargs = {"pretrained": False, "image_size": args.image_size, **parse_settings(args.settings)}
    model = create_model(args.model, **kwargs).to(args.device)
    generator = torch.Generator().manual_seed(0)

    def samples(n: int) -> torch.Tensor:
        shape = (n, 3, args.image_size, args.image_size)
        if cls.clip_length:
            shape = (n, cls.clip_length, *shape[1:])
        return torch.rand(shape, generator=generator)

    fit_s = None
    if model.recipe():  # zero-shot models have no stages
        start = time.perf_counter()
        fit_in_process(model, samples(args.fit_samples), None, batch_size=args.batch_size, max_epochs=1,
                       device=args.device)
        fit_s = time.perf_counter() - start
    model.eval()
    batch = samples(args.batch_size).to(args.device)
    with torch.no_grad():
        model(batch)  # warm-up: lazy buffers, allocator, kernels
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.batches):
            model(batch)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    result = {
        "model": args.model, "settings": kwargs, "device": args.device, "threads": args.threads,
        "batch_size": args.batch_size, "image_size": args.image_size, "clip_length": cls.clip_length,
        "fit_samples": args.fit_samples if fit_s is not None else 0,
        "fit_samples_per_second": None if fit_s is None else round(args.fit_samples / fit_s, 3),
        "forward_per_second": round(args.batches * args.batch_size / seconds, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if args.device.startswith("cuda") else None,
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
