"""DRAEM and DSR: outputs, training steps (every trainable parameter gets a gradient, as DDP needs),
recipes, pretrained-latent handling, determinism, round trips through the model directory, settings."""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from conftest import free_port

from raylib_ad.artifact import read_model, write_model_dir
from raylib_ad.errors import ConfigError, WeightsUnavailableError
from raylib_ad.models import create_model
from raylib_ad.models.dsr.latent import DiscreteLatentModel
from raylib_ad.models.dsr.latent_anomaly import latent_anomalies, replace_codes
from raylib_ad.models.recipe import Optimize
from raylib_ad.tuning.space import check_space

SIZE = 64  # DSR's smallest size: its coarse codes (stride 8) are pooled twice more in training
DRAEM_SIZE = 32
DRAEM_TINY = {"reconstructive_base_width": 4, "discriminative_base_width": 4}
DSR_TINY = {"embedding_dim": 8, "num_embeddings": 32, "num_hiddens": 8, "num_residual_hiddens": 4, "base_width": 4}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


class FakeContext:
    """The StepContext a recipe's step sees, without the runner: records which parameters got gradients."""

    def __init__(self, stage: Optimize, batch: dict, seed: int = 0, step: int = 0):
        self.batch, self.modules, self.extra, self.epoch, self.step = batch, stage.modules, {}, 0, step
        self.generator = torch.Generator().manual_seed(seed)
        self._specs = {spec.name: spec for spec in stage.optimizers}
        self.logged, self.missing_grads = {}, []

    def optimize(self, name, loss, *, retain_graph=False):
        spec = self._specs[name]
        spec.optimizer.zero_grad(set_to_none=True)
        loss.backward(retain_graph=retain_graph)
        self.missing_grads += [f"{m}.{n}" for m, module in self.modules.items()
                               for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
        spec.optimizer.step()
        self.logged["loss"] = float(loss.detach())
        return self.logged["loss"]

    def log(self, **values):
        self.logged.update({k: float(v) for k, v in values.items()})


def run_steps(stage: Optimize, images: torch.Tensor, steps: int, seed: int = 0, fixed_augment: bool = False):
    """Run `steps` steps of `stage`; returns the losses and the contexts."""
    for module in stage.modules.values():
        module.train()
    contexts, batch = [], None
    for i in range(steps):
        if batch is None or not fixed_augment:
            batch = {"image": images}
            if stage.augment is not None:
                batch = stage.augment(batch, torch.Generator().manual_seed(seed + (0 if fixed_augment else i)))
        ctx = FakeContext(stage, batch, seed=seed + i, step=i)
        stage.step(ctx)
        contexts.append(ctx)
    return [c.logged["loss"] for c in contexts], contexts


def images(n: int = 2, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- DRAEM -------------------------------------------------------------------------------------------------

def draem(**settings):
    settings.setdefault("image_as_texture", "dtd_dir" not in settings)  # offline: not anomalib's DTD (test_assets.py)
    return create_model("draem", image_size=DRAEM_SIZE, **{**DRAEM_TINY, **settings})


def test_draem_needs_no_weights_and_reads_raw_pixels(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = draem()
    assert model.feature_extractor is None and model.config()["backbone"] is None
    assert model.config()["mean"] == [0.0, 0.0, 0.0] and model.config()["std"] == [1.0, 1.0, 1.0]


def test_draem_eval_output():
    model = draem().eval()
    out = model(images(2, size=DRAEM_SIZE))
    assert out.score.shape == (2,) and out.anomaly_map.shape == (2, DRAEM_SIZE, DRAEM_SIZE)
    assert torch.equal(out.score, out.anomaly_map.amax(dim=(1, 2)))
    assert 0 <= float(out.anomaly_map.min()) and float(out.anomaly_map.max()) <= 1


@pytest.mark.parametrize("sspcab", [False, True])
def test_draem_step_trains_every_parameter_and_lowers_the_loss(sspcab):
    model = draem(enable_sspcab=sspcab, lr=2e-3)
    (stage,) = model.recipe()
    assert stage.main and stage.epochs == 700 and stage.augment is not None
    losses, contexts = run_steps(stage, images(2, size=DRAEM_SIZE), steps=4, fixed_augment=True)
    assert all(not c.missing_grads for c in contexts), contexts[0].missing_grads
    assert {"l2", "ssim", "focal"} <= set(contexts[0].logged) and (("sspcab" in contexts[0].logged) == sspcab)
    assert losses[-1] < losses[0]


def test_draem_schedule_and_augmentation_follow_anomalib():
    model = draem()
    (stage,) = model.recipe()
    spec = stage.optimizers[0]
    assert isinstance(spec.optimizer, torch.optim.Adam) and spec.optimizer.defaults["lr"] == 1e-4
    assert dict(spec.scheduler.milestones) == {400: 1, 600: 1} and spec.scheduler.gamma == 0.1
    batch = stage.augment({"image": images(8, size=DRAEM_SIZE)}, torch.Generator().manual_seed(0))
    masks = batch["mask"]
    assert masks.shape == (8, 1, DRAEM_SIZE, DRAEM_SIZE) and batch["augmented"].shape == batch["image"].shape
    outside = masks.expand(-1, 3, -1, -1) == 0
    assert torch.equal(batch["augmented"][outside], batch["image"][outside])
    assert 0 < int(masks.flatten(1).amax(1).sum()) < 8  # anomalib's probability 0.5 per image


def test_draem_same_seed_same_network():
    a, b = draem(seed=3), draem(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_draem_round_trip_without_its_texture_folder(tmp_path):
    from PIL import Image

    textures = tmp_path / "dtd"
    textures.mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(textures / "a.png")
    model = draem(dtd_dir=str(textures))
    (stage,) = model.recipe()
    run_steps(stage, images(2, size=DRAEM_SIZE), steps=1)
    model.eval()
    write_model_dir(model, tmp_path / "model")
    (textures / "a.png").unlink()
    textures.rmdir()  # serving must not need the training textures
    loaded = read_model(tmp_path / "model")
    x = images(2, seed=1, size=DRAEM_SIZE)
    assert torch.allclose(model(x).anomaly_map, loaded(x).anomaly_map, atol=1e-6)


@pytest.mark.parametrize("settings, key", [
    ({"beta": [0.9, 0.1]}, "beta"), ({"enable_sspcab": "yes"}, "enable_sspcab"), ({"lr": 0}, "lr"),
    ({"image_size": 50}, "image_size"), ({"backbone": "resnet18"}, "backbone"),
    ({"reconstructive_base_width": 0}, "reconstructive_base_width"),
])
def test_draem_bad_settings(settings, key):
    with pytest.raises(ConfigError, match=key):
        create_model("draem", **{"image_size": DRAEM_SIZE, **DRAEM_TINY, **settings})


def test_draem_missing_texture_folder_fails_when_training_starts(tmp_path):
    model = draem(dtd_dir=str(tmp_path / "nowhere"))  # constructing (and serving) does not need it
    with pytest.raises(ConfigError, match="dtd_dir"):
        model.recipe()


def test_draem_fits_in_process():
    from raylib_ad.train.in_process import fit_in_process

    val = {"image": images(2, seed=5, size=DRAEM_SIZE), "label": torch.tensor([0, 1]),
           "mask": torch.zeros(2, DRAEM_SIZE, DRAEM_SIZE)}
    val["mask"][1, 8:24, 8:24] = 1
    fit = fit_in_process(draem(), images(2, size=DRAEM_SIZE), val, max_epochs=1, batch_size=2)
    assert fit.metrics["stages"] == ["optimize:train"] and len(fit.history) == 1
    assert torch.isfinite(torch.tensor(fit.history[0]["train_loss"]))
    assert read_model(fit.model_dir).name == "draem"


# --- DSR ---------------------------------------------------------------------------------------------------

def dsr(**kwargs):
    kwargs.setdefault("category_trained_vq_model", "weights" not in kwargs)  # offline: not anomalib's VQ model
    return create_model("dsr", image_size=SIZE, **{**DSR_TINY, **kwargs})


@pytest.fixture(autouse=True)
def no_weights_dir(monkeypatch):
    monkeypatch.delenv("RAYLIB_AD_WEIGHTS_DIR", raising=False)


def test_dsr_latent_model_has_anomalibs_state_dict_names():
    keys = set(DiscreteLatentModel(8, 2, 4, 16, 8).state_dict())
    expected = {"_encoder_b._conv_1.weight", "_encoder_b._residual_stack._layers.1._block.3.weight",
                "_encoder_t._conv_2.bias", "_pre_vq_conv_top.weight", "_pre_vq_conv_bot.weight",
                "_vq_vae_top._embedding.weight", "_vq_vae_top._ema_cluster_size", "_vq_vae_top._ema_w",
                "_vq_vae_bot._embedding.weight", "_decoder_b._conv_trans_2.weight", "upsample_t.weight"}
    assert expected <= keys
    assert not any(k.endswith("._block.0.weight") or k.endswith("._block.2.weight") for k in keys)


def test_dsr_eval_output_and_score_from_the_smoothed_detection_map():
    model = dsr().eval()
    x = images(2)
    out = model(x)
    assert out.score.shape == (2,) and out.anomaly_map.shape == (2, SIZE, SIZE)
    with torch.no_grad():
        detection = model._detect(x)[2][:, 1:]
    expected = torch.nn.functional.avg_pool2d(detection, 21, stride=1, padding=10).amax(dim=(1, 2, 3))
    assert torch.allclose(out.score, expected, atol=1e-6)


def test_dsr_recipe_phases_and_budget_split():
    stages = dsr().recipe()
    assert [s.name for s in stages] == ["latent", "main", "upsample"]
    assert [s.epochs for s in stages] == [100, 489, 211]  # anomalib: int(700 * 0.7) epochs, then the rest
    assert [s.main for s in stages] == [False, True, False] and not stages[2].validate
    assert [s.epochs for s in dsr(vq_epochs=0).recipe(max_epochs=10)] == [7, 3]
    main = stages[1]
    assert main.optimizers[0].scheduler.step_size == int(0.8 * 489)
    assert set(main.modules) == {"subspace_restriction_module_hi", "subspace_restriction_module_lo",
                                 "image_reconstruction_network", "anomaly_detection_module"}


def test_dsr_every_stage_trains_all_its_parameters():
    model = dsr()
    x = images(2)
    for stage in model.recipe():
        losses, contexts = run_steps(stage, x, steps=1, seed=1)
        assert all(not c.missing_grads for c in contexts), (stage.name, contexts[0].missing_grads)
        assert all(torch.isfinite(torch.tensor(losses))), stage.name
    assert not any(p.grad is not None for p in model.discrete_latent_model.parameters() if not p.requires_grad)


def test_dsr_latent_stage_learns_codebooks_from_the_data():
    model = dsr(vq_lr=3e-3)
    latent = model.discrete_latent_model
    stage = model.recipe()[0]
    losses, _ = run_steps(stage, images(2), steps=5, fixed_augment=True)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        out = latent(images(2))
    used = torch.unique(out["index_bot"]).numel()
    assert used > 1  # the data-initialized codebook spreads over several codes
    assert torch.isfinite(latent.vq_bot.codebook).all()


def test_dsr_latent_anomalies_swap_codes_inside_the_mask_only():
    model = dsr()
    latent = model.discrete_latent_model
    x = images(2)
    with torch.no_grad():
        out = latent(x)
    mask = torch.zeros(2, 1, SIZE, SIZE)
    mask[0, :, :32, :32] = 1
    swapped = replace_codes(out["z_bot"], out["quantized_b"], latent.vq_bot.codebook, mask,
                            torch.tensor([1.0, 1.0]), torch.Generator().manual_seed(0))
    small = torch.nn.functional.max_pool2d(mask, 4)[:, 0] > 0  # bottom level: stride 4
    assert torch.equal(swapped[1], out["quantized_b"][1])  # no mask: untouched
    assert torch.equal(swapped[0][:, ~small[0]], out["quantized_b"][0][:, ~small[0]])
    inside = swapped[0][:, small[0]].t()  # (n, D) codes under the mask: codebook rows, never the nearest one
    codebook = latent.vq_bot.codebook
    assert torch.isclose(inside[:, None], codebook[None]).all(-1).any(-1).all()
    assert not torch.isclose(inside, out["quantized_b"][0][:, small[0]].t()).all(-1).any()
    first = latent_anomalies(latent, x, mask, 0.2, torch.Generator().manual_seed(4))
    again = latent_anomalies(latent, x, mask, 0.2, torch.Generator().manual_seed(4))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert first["anomaly_mask"].shape == (2, 1, SIZE, SIZE) and first["anomaly_mask"][1].sum() == 0


def test_dsr_loads_a_given_latent_model_and_skips_its_training(tmp_path, monkeypatch):
    source = dsr(seed=9)
    path = tmp_path / "vq.pth"
    torch.save(source.discrete_latent_model.state_dict(), path)
    model = dsr(weights=str(path))
    assert model.latent_from_file == str(path)
    assert torch.equal(model.discrete_latent_model._vq_vae_top._embedding.weight,
                       source.discrete_latent_model._vq_vae_top._embedding.weight)
    assert [s.name for s in model.recipe()] == ["main", "upsample"]
    monkeypatch.setenv("RAYLIB_AD_WEIGHTS_DIR", str(tmp_path))
    (tmp_path / "dsr_vq_model.pth").write_bytes(path.read_bytes())
    assert dsr(category_trained_vq_model=False).latent_from_file == str(tmp_path / "dsr_vq_model.pth")
    assert dsr(pretrained=False).latent_from_file is None  # e.g. read_model: the directory has everything


def test_dsr_weights_errors_only_when_asked_for(tmp_path):
    assert dsr().latent_from_file is None  # category_trained_vq_model: no error, the latent stage trains it
    with pytest.raises(WeightsUnavailableError, match="Ways out"):
        dsr(weights=str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save(DiscreteLatentModel(16, 2, 4, 32, 8).state_dict(), wrong)
    with pytest.raises(WeightsUnavailableError, match="num_hiddens"):
        dsr(weights=str(wrong))


def test_dsr_round_trip_and_fit_in_process():
    from raylib_ad.train.in_process import fit_in_process

    model = dsr(vq_epochs=1)
    val = {"image": images(2, seed=5), "label": torch.tensor([0, 1]), "mask": torch.zeros(2, SIZE, SIZE)}
    # The runner hands --max-epochs to DSR's recipe, which splits it: 1 main + 1 upsampling epoch.
    fit = fit_in_process(model, images(2), val, max_epochs=2, batch_size=2)
    assert fit.metrics["stages"] == ["optimize:latent", "optimize:main", "optimize:upsample"]
    assert [h["stage"] for h in fit.history] == ["latent", "main", "upsample"]
    loaded = read_model(fit.model_dir)
    x = images(2, seed=6)
    assert torch.allclose(model.eval()(x).anomaly_map, loaded(x).anomaly_map, atol=1e-5)
    assert torch.allclose(model(x).score, loaded(x).score, atol=1e-5)


@pytest.mark.parametrize("settings, key", [
    ({"latent_anomaly_strength": 1.5}, "latent_anomaly_strength"), ({"num_embeddings": 1}, "num_embeddings"),
    ({"vq_decay": 1.0}, "vq_decay"), ({"image_size": 48}, "image_size"), ({"num_hiddens": 7}, "num_hiddens"),
])
def test_dsr_bad_settings(settings, key):
    with pytest.raises(ConfigError, match=key):
        create_model("dsr", **{"image_size": SIZE, **DSR_TINY, **settings})


# --- two DDP workers --------------------------------------------------------------------------------------

def _ddp_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {}
        for name, model, size in (("draem", draem(), DRAEM_SIZE), ("dsr", dsr(), SIZE)):
            for stage in model.recipe():
                # as the runner does; find_unused_parameters=False: an unused parameter fails the 2nd step
                stage.modules = {k: DistributedDataParallel(m) for k, m in stage.modules.items()}
                run_steps(stage, images(2, seed=rank, size=size), steps=2, seed=100 * rank)
            state = dict(model.named_parameters())
            state.update({k: v for k, v in model.named_buffers() if "_ema_" in k})
            results[name] = {k: v.detach().clone() for k, v in state.items()}
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ddp_workers_train_every_stage_and_stay_identical(tmp_path):
    """Each worker sees other images and other synthetic anomalies; DDP averages the gradients and DSR's
    codebook statistics are all-reduced, so both workers must hold the same weights and codebooks."""
    # fork: the workers inherit the imported modules (a spawned worker re-imports torch, timm and the
    # model zoo, ~8 CPU-seconds each); they run on one thread, as DataLoader workers do after a fork.
    mp.start_processes(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in ("draem", "dsr"):
        differing = [k for k in rank0[name] if not torch.equal(rank0[name][k], rank1[name][k])]
        assert not differing, (name, differing[:5])
    start = dsr().discrete_latent_model._vq_vae_bot._embedding.weight
    assert not torch.equal(rank0["dsr"]["discrete_latent_model._vq_vae_bot._embedding.weight"], start)


@pytest.mark.parametrize("name", ["draem", "dsr"])
def test_search_spaces_are_valid(name):
    from raylib_ad.models import model_class

    check_space(name, model_class(name).search_space, "default")
