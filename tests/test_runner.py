"""The stage runner in one process, on a toy model whose recipe uses every kind of stage: the stages run
in order, schedulers step per step or per epoch, every image is used once per epoch, augmentation is
seeded, and a time budget skips later optimize stages but never a calibrate stage."""

from __future__ import annotations

import torch
from torch import nn

from raylib_ad.models import AnomalyModel, AnomalyOutput
from raylib_ad.models.recipe import Calibrate, Collect, Optimize, OptimizerSpec
from raylib_ad.train.in_process import fit_in_process

SIZE = 32


class Toy(AnomalyModel):
    """Not registered: a linear scorer with a collected mean and a calibrated scale."""

    name = "toy"
    default_backbone = None
    default_epochs = 3
    produces_maps = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.head = nn.Linear(3, 1)
        self.critic = nn.Linear(3, 1)
        self.register_buffer("center", torch.zeros(3))
        self.register_buffer("scale", torch.ones(()))
        self.events: list[str] = []
        self.seen: list[int] = []
        self.augment_draws: list[float] = []

    def pooled(self, images):
        return images.mean(dim=(2, 3))

    def collect(self, batches, progress):
        rows = torch.cat([self.pooled(b) for b in batches])
        self.center = rows.mean(0)
        self.events.append("collect")

    def calibrate(self, batches, progress):
        self.scale = torch.cat([self.score_of(b) for b in batches]).abs().max().clamp_min(1e-6)
        self.events.append("calibrate")

    def score_of(self, images):
        return self.head(self.pooled(images) - self.center)[:, 0]

    def augment(self, batch, generator):
        noise = torch.rand(1, generator=generator, device=batch["image"].device)
        self.augment_draws.append(float(noise))
        return {**batch, "image": batch["image"] + 0.01 * noise}

    def step(self, ctx):
        self.seen.append(len(ctx.batch["image"]))
        ctx.optimize("head", self.score_of(ctx.batch["image"]).pow(2).mean())
        ctx.optimize("critic", self.critic(self.pooled(ctx.batch["image"])).pow(2).mean())

    def recipe(self):
        head = torch.optim.SGD(self.head.parameters(), lr=0.1)
        critic = torch.optim.SGD(self.critic.parameters(), lr=0.1)
        return [Collect("center", self.collect),
                Optimize("train", modules={"head": self.head, "critic": self.critic}, step=self.step,
                         epochs=self.default_epochs, augment=self.augment, validate=False,
                         optimizers=[OptimizerSpec("head", head, torch.optim.lr_scheduler.StepLR(head, 1, 0.5),
                                                   interval="step"),
                                     OptimizerSpec("critic", critic,
                                                   torch.optim.lr_scheduler.StepLR(critic, 1, 0.5))]),
                Calibrate("scale", self.calibrate)]

    def forward(self, images):
        return AnomalyOutput(score=self.score_of(images) / self.scale, anomaly_map=None)


def images(n, seed=0):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_every_stage_runs_in_order_with_its_schedules_and_every_image_once():
    model = Toy(image_size=SIZE)
    fit = fit_in_process(model, images(7), batch_size=3)
    assert model.events == ["collect", "calibrate"]
    assert fit.metrics["stages"] == ["collect:center", "optimize:train", "calibrate:scale"]
    assert model.seen == [3, 3, 1] * 3  # 7 images per epoch, last batch short, nothing dropped
    assert [h["train_images"] for h in fit.history] == [7, 7, 7]
    assert {"train_loss_head", "train_loss_critic"} <= set(fit.history[0])  # one loss per optimizer
    # center collected from the training images, scale calibrated after training
    torch.testing.assert_close(model.center, images(7).mean(dim=(2, 3)).mean(0))
    assert model.scale > 0


def test_per_step_and_per_epoch_schedulers():
    model = Toy(image_size=SIZE)
    stages = model.recipe()
    model.recipe = lambda: stages  # keep the optimizers to read their learning rates after the fit
    fit_in_process(model, images(7), batch_size=3)
    head, critic = stages[1].optimizers
    assert head.optimizer.param_groups[0]["lr"] == 0.1 * 0.5**9  # 3 steps x 3 epochs
    assert critic.optimizer.param_groups[0]["lr"] == 0.1 * 0.5**3  # 3 epochs


def test_augmentation_is_seeded():
    draws = []
    for _ in range(2):
        model = Toy(image_size=SIZE, seed=3)
        fit_in_process(model, images(7), batch_size=3)
        draws.append(model.augment_draws)
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


def test_a_time_budget_skips_optimize_stages_but_still_calibrates():
    model = Toy(image_size=SIZE)
    fit = fit_in_process(model, images(7), batch_size=3, max_minutes=1e-9)
    assert len(fit.history) == 1 and fit.history[0]["stopped"]
    assert model.seen == [3]  # the budget ends inside the epoch, after the one step every stage takes
    assert model.events == ["collect", "calibrate"]


class Validated(Toy):
    """Toy whose training stage validates (image AUROC of the held-back images)."""

    def recipe(self):
        stages = super().recipe()
        stages[1].validate = True
        return stages


def labelled(n):
    return {"image": images(n, seed=1), "label": torch.tensor([0, 1] * (n // 2) + [0] * (n % 2)),
            "mask": torch.zeros(n, SIZE, SIZE)}


def test_validation_points_inside_epochs_form_the_curve_and_keep_the_best():
    model = Validated(image_size=SIZE)
    fit = fit_in_process(model, images(7), labelled(6), batch_size=3, val_every_minutes=1e-9)
    curve = fit.val_curve
    # a point before the 2nd and 3rd of the 3 steps of each of 3 epochs (before the 1st, the model is the
    # one the previous epoch's end validated), and one at each epoch's end
    assert len(curve) == 3 * 2 + 3
    assert [p["epoch"] for p in curve] == [1] * 3 + [2] * 3 + [3] * 3  # epochs count from 1, as the bar
    assert [p["step"] for p in curve] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert all(0 <= p["val_image_auroc"] <= 1 for p in curve)
    minutes = [p["minutes"] for p in curve]
    assert minutes == sorted(minutes)
    assert fit.metrics["best_val_image_auroc"] == max(p["val_image_auroc"] for p in curve)


def test_without_in_epoch_points_the_curve_has_one_point_per_epoch():
    fit = fit_in_process(Validated(image_size=SIZE), images(7), labelled(6), batch_size=3)
    assert [p["epoch"] for p in fit.val_curve] == [1, 2, 3]
    assert [h["epoch"] for h in fit.history] == [1, 2, 3]
    assert [p["val_image_auroc"] for p in fit.val_curve] == [h["val_image_auroc"] for h in fit.history]


class Saturated(Validated):
    """Validation that cannot separate epochs: the image AUROC is 1.0 from the first epoch on (a tiny
    validation subset), as U-Flow's was on 9 images."""

    def forward(self, images):
        out = super().forward(images)  # the head trains, but the score separates the classes perfectly
        return AnomalyOutput(score=out.score * 0 + images.mean(dim=(1, 2, 3)), anomaly_map=None)


def separable(n):
    val = labelled(n)
    return {**val, "image": val["image"] + 100.0 * val["label"][:, None, None, None]}


def test_a_tie_on_validation_keeps_the_latest_weights_and_the_summary_says_so():
    model = Saturated(image_size=SIZE)
    fit = fit_in_process(model, images(7), separable(6), batch_size=3, max_epochs=4)
    assert [h["val_image_auroc"] for h in fit.history] == [1.0] * 4
    m = fit.metrics
    assert m["best_epoch"] == 4 and m["best_step"] == 12  # the latest of equals, not epoch 1
    assert m["stop_reason"] == "max_epochs" and "4 epochs" in m["stopped_because"]
    assert "val_image_auroc" in m["kept_by"] and "latest" in m["kept_by"]
    assert m["val_ties"] == 4 and "6 images, 3 anomalous" in m["validation_note"]
    # the last epoch's weights are the model's
    assert fit.history[-1]["epoch"] == 4


def test_ties_do_not_reset_patience_and_the_stop_reason_says_patience():
    model = Saturated(image_size=SIZE)
    fit = fit_in_process(model, images(7), separable(6), batch_size=3, max_epochs=10, patience=2)
    assert len(fit.history) == 3  # epoch 1 improves; 2 and 3 tie: no progress for 2 epochs
    assert fit.metrics["stop_reason"] == "patience" and fit.metrics["best_epoch"] == 3


def test_kept_choice_breaks_image_ties_by_pixel_auroc_then_takes_the_latest():
    from raylib_ad.train.checkpoints import consider, fresh_progress

    progress = fresh_progress()
    seen = []
    for epoch, (image, pixel) in enumerate([(0.9, 0.5), (1.0, 0.7), (1.0, 0.8), (1.0, 0.6), (1.0, 0.8)], start=1):
        progress["steps"] = 10 * epoch
        keep, improved = consider(progress, {"val_image_auroc": image, "val_pixel_auroc": pixel}, epoch)
        seen.append((keep, improved))
    assert seen == [(True, True), (True, True), (True, True), (False, False), (True, False)]
    assert progress["best_epoch"] == 5 and progress["best_step"] == 50 and progress["best_ties"] == 4


def test_the_kept_point_is_marked_on_the_training_curves(tmp_path):
    from raylib_ad.train.outputs import plot_history

    history = [{"epoch": e, "train_loss": 1.0 / e} for e in (1, 2, 3)]
    curve = [{"minutes": 0.1 * e, "epoch": e, "step": 3 * e, "val_image_auroc": 1.0} for e in (1, 2, 3)]
    plot_history(history, tmp_path, curve, kept={"best_epoch": 3, "best_step": 9})
    assert (tmp_path / "training_curves.png").stat().st_size > 0
    import json

    assert [p["epoch"] for p in json.loads((tmp_path / "val_curve.json").read_text())] == [1, 2, 3]


def test_summary_says_what_was_kept_why_training_stopped_and_warns_on_a_loose_threshold():
    from raylib_ad.train.outputs import summary_table, threshold_warnings

    metrics = {"image_auroc": 0.9, "image_good_fpr": 0.77, "image_good_false_positives": 24,
               "best_epoch": 117, "best_step": 351, "epochs_run": 117, "kept_by": "highest val_image_auroc",
               "best_val_image_auroc": 1.0, "stop_reason": "time",
               "stopped_because": "the time budget ran out (--max-minutes 3)", "random_weights": True}
    metrics["warnings"] = threshold_warnings(metrics)
    assert len(metrics["warnings"]) == 1 and "77%" in metrics["warnings"][0]
    assert threshold_warnings({"image_good_fpr": 0.1}) == []
    text = summary_table("uflow", "widget", metrics)
    assert "kept: epoch 117 (step 351) of 117" in text and "--max-minutes 3" in text
    assert "random weights: figures are not the method's" in text and "WARNING: the deployed threshold" in text
