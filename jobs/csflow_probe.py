"""How fast CS-Flow learns, in one process on cached backbone features: validation image AUROC after N
optimizer steps for a few (loss, learning rate) variants started from the same initial flow (issue #11).

Variants: `ours` (the per-sample log|det J| of the flow, raylib_ad's loss) and `anomalib` (anomalib 2.7.0's
log|det J| summed over the batch and broadcast to every sample), each at any learning rate. Scores on the
validation images that `raylib-ad train` carves from the test split (--val-fraction 0.3, --seed 0): the
held-out test images are never touched, so a setting chosen here can be reported on them honestly.

    python jobs/csflow_probe.py --root ../shared/datasets/magnetic_tile \\
        --split-file ../shared/datasets/magnetic_tile_split.csv --hidden 256 --steps 60 \\
        --variants ours:2e-4,anomalib:2e-4,ours:1e-3

Prints one JSON line per variant: (step, training loss, validation image AUROC) at four points.
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
    parser.add_argument("--data", default="magnetic_tile")
    parser.add_argument("--root", required=True)
    parser.add_argument("--category")
    parser.add_argument("--split-file")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024, help="cross_conv_hidden_channels")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--variants", default="ours:2e-4,anomalib:2e-4,ours:1e-3")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import pyarrow.compute as pc
    import torch
    from sklearn.metrics import roc_auc_score

    from raylib_ad.data import build_manifest
    from raylib_ad.data.transforms import decode_all
    from raylib_ad.models import create_model
    from raylib_ad.postprocess.validation_split import carve_validation

    torch.set_num_threads(args.threads)
    table = build_manifest(args.data, args.root, args.category, split_file=args.split_file)
    train = table.filter(pc.equal(table.column("split"), "train"))
    test = table.filter(pc.equal(table.column("split"), "test"))
    val_idx, _ = carve_validation(test.column("label").to_numpy(), 0.3, 0)
    val = test.take(val_idx)
    val_labels = val.column("label").to_numpy()

    model = create_model("csflow", backbone=args.backbone, image_size=args.image_size,
                         cross_conv_hidden_channels=args.hidden).eval()
    mean, std = model.normalization

    def features(rows):
        parts = []
        for batch in decode_all(rows, args.image_size, mean, std, batch_size=32, with_masks=False):
            with torch.no_grad():
                parts.append(model.frozen_features(torch.from_numpy(batch["image"])))
        return [torch.cat([p[f"scale{i}"] for p in parts]) for i in range(3)]

    train_features, val_features = features(train), features(val)
    initial = {k: v.clone() for k, v in model.flow.state_dict().items()}
    results = []
    for variant in args.variants.split(","):
        loss_kind, lr = variant.split(":")
        model.flow.load_state_dict(initial)
        model.settings["lr"] = float(lr)
        optimizer, _ = model.configure_optimizers()
        generator = torch.Generator().manual_seed(0)
        batches = torch.randperm(train.num_rows, generator=generator).split(args.batch_size)
        curve, start = [], time.perf_counter()
        for step in range(1, args.steps + 1):
            if step % len(batches) == 1 and step > 1:
                batches = torch.randperm(train.num_rows, generator=generator).split(args.batch_size)
            index = batches[(step - 1) % len(batches)]
            model.flow.train()
            z, log_jac = model.flow([f[index] for f in train_features])
            if loss_kind == "anomalib":  # anomalib sums log|det J| over the batch before the per-sample mean
                log_jac = log_jac.sum().expand_as(log_jac)
            loss = model.loss(z, log_jac, "per_sample")  # the anomalib variant summed log_jac above
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.flow.parameters(), model.gradient_clip_val)
            optimizer.step()
            if step % max(1, args.steps // 4) == 0:
                model.flow.eval()
                with torch.no_grad():
                    z_val, _ = model.flow(val_features)
                scores = torch.cat([zi.flatten(1) for zi in z_val], dim=1).pow(2).mean(dim=1)
                curve.append([step, round(loss.item(), 4), round(float(roc_auc_score(val_labels, scores.numpy())), 4)])
        result = {"loss": loss_kind, "lr": float(lr), "hidden": args.hidden, "batch_size": args.batch_size,
                  "seconds": round(time.perf_counter() - start, 1), "step_loss_val_auroc": curve}
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
