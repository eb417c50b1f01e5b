"""AI-VAD with small random networks (networks="tiny") on hand-made clips of a moving square: the whole
pipeline (regions, flow, attributes, density models, scores, maps), the density models against direct
formulas, the velocity branch with a known flow, the distributed fit, round trip, settings and weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import free_port
from raylib_ad.artifact import read_model, write_model_dir
from raylib_ad.errors import ConfigError, ModelError, WeightsUnavailableError
from raylib_ad.models import create_model
from raylib_ad.models.ai_vad.density import GaussianMixture, GroupedKNN
from raylib_ad.models.ai_vad.model import AiVad, box_map

S = 64
SQUARE = 14
TINY = {"networks": "tiny", "image_size": S, "pretrained": False, "min_bbox_area": 10}


def clips(n: int, speed: int | list[int], seed: int = 0) -> torch.Tensor:
    """(n, 2, 3, S, S) in [0, 1]: an orange square on grey moving `speed` px to the right."""
    gen = torch.Generator().manual_seed(seed)
    speeds = speed if isinstance(speed, list) else [speed] * n
    out = torch.full((n, 2, 3, S, S), 0.2)
    colour = torch.tensor([0.9, 0.5, 0.1]).view(3, 1, 1)
    for i in range(n):
        x, y = (int(v) for v in torch.randint(2, S - SQUARE - 14, (2,), generator=gen))
        for t in range(2):
            out[i, t, :, y : y + SQUARE, x + t * speeds[i] : x + t * speeds[i] + SQUARE] = colour
    return out


def tiny(**settings) -> AiVad:
    return create_model("ai_vad", **{**TINY, **settings})


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fitted() -> AiVad:
    model = tiny()
    model.fit([clips(3, [1, 2, 3], seed=0), clips(3, [2, 1, 2], seed=1)])
    return model


def density_state(model: AiVad) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.density.state_dict().items()}


# --- pipeline ---------------------------------------------------------------------------------------

def test_scores_and_maps_have_the_contract_shapes_and_maps_hold_region_scores(fitted):
    batch = clips(3, 2, seed=5)
    out = fitted(batch)
    assert out.score.shape == (3,) and out.anomaly_map.shape == (3, S, S)
    assert torch.isfinite(out.score).all() and torch.isfinite(out.anomaly_map).all()
    boxes, features = fitted.extract(batch)
    for i in range(3):
        regions, frame = fitted.density.score({n: f[i] for n, f in features.items()})
        assert len(boxes[i]) > 0  # the moving square's frame difference gives regions
        torch.testing.assert_close(out.score[i], frame)
        # the frame score sums, over attributes, the best region's score of each
        parts = [est(features[n][i]).max() for n, est in fitted.density.estimators().items()]
        torch.testing.assert_close(frame, torch.stack(parts).sum())
        x1, y1, x2, y2 = boxes[i][0].int().tolist()
        assert out.anomaly_map[i, y1 : y2 + 1, x1 : x2 + 1].min() >= regions[0] - 1e-6
        covered = torch.zeros(S, S, dtype=torch.bool)
        for bx1, by1, bx2, by2 in boxes[i].int().tolist():
            covered[by1 : by2 + 1, bx1 : bx2 + 1] = True
        assert (out.anomaly_map[i][~covered] == 0).all()


def test_box_map_takes_the_highest_covering_box_and_zero_elsewhere():
    boxes = torch.tensor([[0.0, 0.0, 3.0, 3.0], [2.0, 2.0, 5.0, 5.0]])
    amap = box_map(boxes, torch.tensor([0.5, -0.25]), (8, 8))
    assert amap[0, 0] == 0.5 and amap[2, 2] == 0.5 and amap[5, 5] == -0.25 and amap[7, 7] == 0


def test_a_frame_without_regions_scores_zero(fitted):
    still = clips(2, 0, seed=3)  # nothing moves, and the random detector finds nothing
    out = fitted(still)
    assert torch.equal(out.score, torch.zeros(2)) and torch.equal(out.anomaly_map, torch.zeros(2, S, S))


def test_detector_regions_are_merged_with_the_foreground_regions():
    model = tiny(box_score_thresh=0.0)  # random detector: every box passes
    batch = clips(2, 3, seed=2)
    raw = model.region_extractor.detector(list(batch[:, 1]))
    boxes, features = model.extract(batch)
    assert all(len(r["boxes"]) > 0 for r in raw)
    for frame_boxes, frame_pose in zip(boxes, features["pose"]):
        assert frame_pose.shape == (frame_boxes.shape[0], 34)
        areas = (frame_boxes[:, 2] - frame_boxes[:, 0]) * (frame_boxes[:, 3] - frame_boxes[:, 1])
        assert (areas > 10).all()


def test_wrong_input_shape_is_refused(fitted):
    with pytest.raises(ValueError, match=r"\(B, 2, 3, H, W\)"):
        fitted(torch.rand(2, 3, S, S))


def test_no_regions_in_training_is_a_clear_error():
    with pytest.raises(ModelError, match="no regions"):
        tiny().fit([clips(2, 0)])


# --- fit: determinism, sharding, round trip -------------------------------------------------------

def test_fit_is_deterministic_and_independent_of_clip_order(fitted):
    again = tiny()
    again.fit([clips(3, [2, 1, 2], seed=1), clips(3, [1, 2, 3], seed=0)])  # other order, same clips
    for key, value in density_state(fitted).items():
        assert torch.equal(density_state(again)[key], value), key
    batch = clips(2, 4, seed=9)
    assert torch.equal(again(batch).score, fitted(batch).score)
    # Other batch sizes change the networks' kernels, so the features (not the reduction) may move by
    # float rounding: the density models agree to that precision.
    one_by_one = tiny()
    one_by_one.fit(list(torch.cat([clips(3, [1, 2, 3], seed=0), clips(3, [2, 1, 2], seed=1)]).split(1)))
    for key, value in density_state(fitted).items():
        torch.testing.assert_close(density_state(one_by_one)[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_model_directory_round_trip_gives_equal_scores(fitted, tmp_path):
    directory = write_model_dir(fitted, tmp_path / "model")
    loaded = read_model(directory)
    batch = clips(3, 3, seed=7)
    expected, got = fitted(batch), loaded(batch)
    assert torch.equal(got.score, expected.score) and torch.equal(got.anomaly_map, expected.anomaly_map)


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = tiny()
        shard = [clips(3, [1, 2, 3], seed=0)] if rank == 0 else [clips(3, [2, 1, 2], seed=1), clips(1, 1, seed=4)]
        model.fit(shard)
        torch.save(density_state(model), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_workers_fit_the_same_density_models_as_one(tmp_path):
    # fork: the workers inherit the imported modules (spawn re-imports torch and the zoo in each, ~10 s);
    # like DataLoader workers they run torch on one thread, which keeps fork safe after OpenMP use.
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    single = tiny()
    single.fit([clips(1, 1, seed=4), clips(3, [2, 1, 2], seed=1), clips(3, [1, 2, 3], seed=0)])
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        assert state.keys() == density_state(single).keys()
        for key, value in density_state(single).items():
            assert torch.equal(state[key], value), f"rank {rank}: {key}"


def test_fit_through_the_stage_runner():
    from raylib_ad.train.in_process import fit_in_process

    model = tiny()
    fit = fit_in_process(model, clips(4, [1, 2, 3, 2], seed=0), batch_size=2)
    assert fit.metrics["final"] and fit.model_dir is not None
    assert model.density.fitted
    torch.testing.assert_close(read_model(fit.model_dir)(clips(2, 2, seed=8)).score, model(clips(2, 2, seed=8)).score)


# --- density models against direct computations ------------------------------------------------------

def test_knn_scores_and_leave_one_group_out_normalization_match_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    bank, groups = torch.randn(30, 5, generator=gen), torch.arange(30) // 7  # 5 groups
    knn = GroupedKNN(n_neighbors=2)
    knn.fit(bank, groups)
    low, high = math.inf, -math.inf
    for i in range(30):
        others = bank[groups != groups[i]]
        d = sorted(float((bank[i] - o).norm()) for o in others)[:2]
        low, high = min(low, *d), max(high, *d)
    assert knn.min.item() == pytest.approx(low, rel=1e-5) and knn.max.item() == pytest.approx(high, rel=1e-5)
    query = torch.randn(4, 5, generator=gen)
    direct = torch.tensor([sum(sorted(float((q - b).norm()) for b in bank)[:2]) / 2 for q in query])
    torch.testing.assert_close(knn(query), (direct - low) / (high - low), rtol=1e-4, atol=1e-5)


def test_gmm_log_likelihood_matches_the_mixture_formula_and_finds_the_clusters():
    gen = torch.Generator().manual_seed(0)
    data = torch.cat([torch.randn(40, 2, generator=gen) * 0.3, torch.randn(60, 2, generator=gen) * 0.5 + 5])
    gmm = GaussianMixture(2)
    gmm.fit(data, torch.Generator().manual_seed(0))
    means = gmm.means[gmm.means[:, 0].argsort()]
    torch.testing.assert_close(means, torch.tensor([[0.0, 0.0], [5.0, 5.0]], dtype=torch.float64), atol=0.25, rtol=0)
    torch.testing.assert_close(gmm.weights.sort().values, torch.tensor([0.4, 0.6], dtype=torch.float64), atol=1e-6,
                               rtol=0)
    query = torch.randn(5, 2, generator=gen) * 3
    direct = torch.stack([
        torch.stack([gmm.weights[k] * torch.distributions.MultivariateNormal(
            gmm.means[k], gmm.covariances[k]).log_prob(q.double()).exp() for k in range(2)]).sum().log()
        for q in query])
    torch.testing.assert_close(gmm.log_likelihood(query), direct)
    train_scores = -gmm.log_likelihood(data)
    torch.testing.assert_close(gmm(query), ((-direct - train_scores.min()) / (train_scores.max() - train_scores.min()))
                               .float())


class ConstantFlow(nn.Module):
    """A flow field known in advance: (dx, dy) per clip, the same at every pixel."""

    def __init__(self, speeds: list[float]):
        super().__init__()
        self.speeds = speeds

    def forward(self, first, last):
        flow = torch.zeros(first.shape[0], 2, *first.shape[-2:])
        flow[:, 0] = torch.tensor(self.speeds, dtype=torch.float32).view(-1, 1, 1)
        return flow


def test_a_region_moving_much_faster_than_in_training_scores_higher():
    model = tiny(use_pose_features=False, use_deep_features=False, n_velocity_bins=8)
    train_speeds = [1, 2, 3, 2, 1, 3, 2, 2]
    model.flow_extractor = ConstantFlow([float(s) for s in train_speeds])
    model.fit([clips(8, train_speeds, seed=0)])
    test_speeds = [2, 2, 10]
    model.flow_extractor = ConstantFlow([float(s) for s in test_speeds])
    out = model(clips(3, test_speeds, seed=1))
    assert out.score[2] > 5 * max(out.score[0].abs(), out.score[1].abs(), torch.tensor(0.5))
    assert out.anomaly_map[2].max() > out.anomaly_map[:2].max()


# --- settings and weights ------------------------------------------------------------------------

@pytest.mark.parametrize("settings, key", [
    ({"networks": "huge"}, "networks"),
    ({"box_score_thresh": 1.5}, "box_score_thresh"),
    ({"n_components_velocity": 0}, "n_components_velocity"),
    ({"n_neighbors_deep": 2.5}, "n_neighbors_deep"),
    ({"foreground_kernel_size": 4}, "foreground_kernel_size"),
    ({"foreground_binary_threshold": 300}, "foreground_binary_threshold"),
    ({"use_velocity_features": False, "use_pose_features": False, "use_deep_features": False}, "use_"),
    ({"nonsense": 1}, "nonsense"),
])
def test_bad_settings_raise_config_error_naming_the_setting(settings, key):
    with pytest.raises(ConfigError, match=key):
        tiny(**settings)


def test_a_backbone_or_single_weights_file_is_refused():
    with pytest.raises(ConfigError, match="detector_weights"):
        tiny(weights="x.pth")
    with pytest.raises(ConfigError, match="no timm backbone"):
        create_model("ai_vad", backbone="resnet18", **TINY)


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLIB_AD_OFFLINE", "1")
    monkeypatch.setenv("RAYLIB_AD_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    (tmp_path / "weights").mkdir()
    return tmp_path / "weights"


def test_missing_weights_fail_at_construction_naming_the_ways_out(no_weights):
    for call in (lambda: create_model("ai_vad", image_size=S),
                 lambda: AiVad.check_weights(None, None, dict(AiVad.defaults))):
        with pytest.raises(WeightsUnavailableError) as err:
            call()
        message = str(err.value)
        for needle in ("detector_weights", "keypoint_weights", "flow_weights", "clip_weights",
                       "maskrcnn_resnet50_fpn_v2.pth", "RAYLIB_AD_WEIGHTS_DIR", "networks=tiny", "pretrained=false"):
            assert needle in message
    with pytest.raises(WeightsUnavailableError, match="flow_weights"):
        create_model("ai_vad", image_size=S, flow_weights=str(no_weights / "absent.pth"))


def test_weights_are_found_in_the_weights_directory_under_their_fixed_names(no_weights):
    from raylib_ad.models.ai_vad.networks import FILE_NAMES, resolve_all

    for name in FILE_NAMES.values():
        (no_weights / name).write_bytes(b"")
    found = resolve_all(dict(AiVad.defaults), download=False)
    assert found == {key: str(no_weights / name) for key, name in FILE_NAMES.items()}
