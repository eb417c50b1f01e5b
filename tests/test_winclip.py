"""WinCLIP on a tiny random open_clip ViT (32 px, 4x4 patch grid): the window and few-shot arithmetic
against direct computations, zero-/few-shot outputs, the seeded shard-independent reference draw,
the model directory round trip, the weights lookup and its offline error."""

from __future__ import annotations

import json

import threading

import pytest
import torch

from raylib_ad import distributed
from raylib_ad.artifact import read_model, write_model_dir
from raylib_ad.errors import ConfigError, WeightsUnavailableError
from raylib_ad.models import create_model
from raylib_ad.models.winclip import clip as clip_module
from raylib_ad.models.winclip.clip import patch_tokens, run_tower
from raylib_ad.models.winclip.model import TEMPERATURE
from raylib_ad.models.winclip.prompting import prompt_ensemble
from raylib_ad.models.winclip.scoring import harmonic_aggregation, window_indices

open_clip = pytest.importorskip("open_clip")

SIZE = 32
TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def winclip(**settings):
    settings.setdefault("pretrained", False)
    return create_model("winclip", image_size=SIZE, clip_model=TINY, **settings).eval()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_prompt_ensemble_is_anomalibs():
    normal, anomalous = prompt_ensemble("bottle")
    assert (len(normal), len(anomalous)) == (7 * 21, 4 * 21)
    assert normal[0] == "a cropped photo of the bottle." and anomalous[0] == "a cropped photo of the damaged bottle."
    assert "a photo of a bottle without defect for visual inspection." in normal
    assert "a photo of the small bottle with damage." in anomalous


def test_window_indices_and_harmonic_aggregation():
    assert window_indices((3, 3), 2).tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    # Each patch: harmonic mean of the windows covering it (the values in anomalib's docstring).
    out = harmonic_aggregation(torch.tensor([[1.0, 0.75, 0.5, 0.25]]), window_indices((3, 3), 2), (3, 3))
    expected = torch.tensor([[1.0, 6 / 7, 0.75], [2 / 3, 0.48, 0.375], [0.5, 1 / 3, 0.25]])
    torch.testing.assert_close(out[0], expected)
    # Against a loop over patches on a non-square grid with 3x3 windows; a zero window zeroes its patches.
    scores = torch.rand(2, 6, generator=torch.Generator().manual_seed(0)) + 0.1
    scores[1, 2] = 0.0
    windows = window_indices((4, 5), 3)
    got = harmonic_aggregation(scores, windows, (4, 5)).flatten(1)
    for b in range(2):
        for p in range(20):
            covering = [w for w in range(6) if p in windows[w].tolist()]
            want = len(covering) / sum(1 / float(scores[b, w]) for w in covering) if 0 not in [
                float(scores[b, w]) for w in covering] else 0.0
            assert abs(float(got[b, p]) - want) < 1e-5


def test_tower_matches_open_clip_and_each_window_is_its_own_sequence():
    model = winclip()
    x = images(2, 0)
    visual = model.clip.visual
    pooled, tokens = run_tower(visual, patch_tokens(visual, x))
    torch.testing.assert_close(pooled, model.clip.encode_image(x))
    visual.output_tokens = True
    try:
        _, reference_tokens = visual(x)
    finally:
        visual.output_tokens = False
    torch.testing.assert_close(tokens, reference_tokens)
    # A window embedding = the ViT on [class token, the window's patch tokens] alone.
    _, windows, _ = model.encode(x)
    full = patch_tokens(visual, x)
    for scale, (emb, idx) in enumerate(zip(windows, model.windows)):
        assert emb.shape == (2, idx.shape[0], 16)
        for w in (0, idx.shape[0] - 1):
            seq = torch.cat([full[:, :1], full[:, 1:][:, idx[w]]], dim=1)
            alone = visual.ln_post(visual.transformer(visual.ln_pre(seq)))[:, 0] @ visual.proj
            torch.testing.assert_close(emb[:, w], alone, rtol=1e-4, atol=1e-5)


def test_zero_shot_scores_shapes_and_text_embeddings():
    model = winclip(class_name="widget")
    assert model.recipe() == []  # zero-shot: nothing to fit
    x = images(3, 1)
    out = model(x)
    assert out.score.shape == (3,) and out.anomaly_map.shape == (3, SIZE, SIZE)
    assert ((out.score > 0) & (out.score < 1)).all()
    assert ((out.anomaly_map >= 0) & (out.anomaly_map <= 1)).all()
    # Text embeddings: the mean of each class's prompt embeddings.
    normal, anomalous = prompt_ensemble("widget")
    encoded = model.clip.encode_text(open_clip.tokenize(normal + anomalous))
    torch.testing.assert_close(model.text_embeddings[1], encoded[len(normal):].mean(0), rtol=1e-4, atol=1e-5)
    # Image score: softmax over (normal, anomalous) cosine similarities at CLIP's temperature.
    image = model.clip.encode_image(x[:1])[0]
    logits = torch.tensor([cos(image, model.text_embeddings[0]), cos(image, model.text_embeddings[1])]) / TEMPERATURE
    assert abs(float(logits.softmax(0)[1]) - float(out.score[0])) < 1e-5
    # Other input sizes are resized to CLIP's grid; the map comes back at the input size.
    assert model(torch.nn.functional.interpolate(x, size=48)).anomaly_map.shape == (3, 48, 48)
    assert winclip().settings["class_name"] == "object"  # anomalib's fallback


def test_few_shot_memory_against_brute_force():
    zero, few = winclip(), winclip(k_shot=3)
    refs, x = images(3, 2), images(2, 3)
    few.set_references(refs)
    assert few.reference_patches.shape == (3, 16, 32)
    assert [r.shape for r in few.reference_windows] == [(3, 9, 16), (3, 4, 16)]
    _, _, patches = few.encode(x)
    _, _, ref_patches = few.encode(refs)
    # Full-scale association: half the cosine distance to the nearest of all K x P reference patches.
    b, p = 1, 5
    brute = min((1 - cos(patches[b, p], ref_patches[k, q])) / 2 for k in range(3) for q in range(16))
    got = (1 - torch.nn.functional.normalize(patches, dim=-1) @ torch.nn.functional.normalize(
        few.reference_patches.flatten(0, 1), dim=-1).T).amin(-1)[b, p] / 2
    assert abs(float(got) - brute) < 1e-5
    # Final scores average the zero-shot score with the few-shot maps' maximum (same CLIP: same seed).
    out_zero, out_few = zero(x), few(x)
    assert not torch.allclose(out_zero.score, out_few.score)
    assert ((out_few.score >= 0) & (out_few.score <= 1)).all()
    # A reference image is its own nearest neighbour: its few-shot maps are 0, its score half the zero-shot one.
    torch.testing.assert_close(few(refs[:1]).score, zero(refs[:1]).score / 2, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="no reference images"):
        winclip(k_shot=1)(x)


def test_reference_draw_is_seeded_and_independent_of_batching():
    train = images(10, 4)

    def drawn(seed, batches) -> list[int]:
        """Indices into `train` of the references the Collect stage drew."""
        model = winclip(k_shot=3, seed=seed)
        (stage,) = model.recipe()
        stage.run(iter(batches), False)
        candidates = model.encode(train)[2]
        return sorted(i for ref in model.reference_patches for i in range(10)
                      if torch.allclose(ref, candidates[i], atol=1e-5))

    first = drawn(0, [train[:4], train[4:]])
    assert len(set(first)) == 3
    assert drawn(0, [train[i : i + 1] for i in reversed(range(10))]) == first  # order, batch size
    assert drawn(1, [train]) != first  # another seed, another sample


@pytest.mark.parametrize("world", [2, 3, 11])  # 11 workers over 10 images: one shard is empty
def test_any_worker_count_draws_the_references_one_process_draws(world, monkeypatch):
    """Workers as threads, exchanging rows through an in-memory all_gather_rows (the gloo/nccl one is
    tested in test_distributed_fit.py): each sees every world-th image, all end with the same draw."""
    train = images(10, 4)
    alone = winclip(k_shot=3)
    alone.collect_references([train])
    barrier, slots, local = threading.Barrier(world), {}, threading.local()

    def gather(tensor):
        slots[(local.rank, local.calls)] = tensor
        barrier.wait()
        rows = torch.cat([slots[(r, local.calls)] for r in range(world)])
        barrier.wait()
        local.calls += 1
        return rows

    monkeypatch.setattr(distributed, "all_gather_rows", gather)
    models = [winclip(k_shot=3) for _ in range(world)]  # built here: torch's global RNG is not per thread
    results = [None] * world

    def worker(rank):
        local.rank, local.calls = rank, 0
        model = models[rank]
        model.collect_references([train[rank::world][i : i + 2] for i in range(0, len(train[rank::world]), 2)])
        results[rank] = model.reference_patches

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for patches in results:
        torch.testing.assert_close(patches, alone.reference_patches)


def test_model_dir_round_trip_holds_the_clip_weights(tmp_path):
    model = winclip(k_shot=2, class_name="widget")
    model.fit([images(4, 5)])
    with torch.no_grad():  # weights that a fresh random build would not reproduce
        model.clip.visual.proj.add_(0.5)
    model.text_embeddings = torch.empty(0)
    x = images(2, 6)
    out = model(x)
    write_model_dir(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["settings"]["clip_model"] == TINY
    reloaded = read_model(tmp_path / "m")
    again = reloaded(x)
    torch.testing.assert_close(again.score, out.score)
    torch.testing.assert_close(again.anomaly_map, out.anomaly_map)
    assert reloaded.config() == model.config()


def test_weights_from_file_and_weights_dir(tmp_path, monkeypatch):
    source = winclip(seed=7)
    torch.save(source.clip.state_dict(), tmp_path / "tiny.pt")
    loaded = winclip(pretrained=True, weights=str(tmp_path / "tiny.pt"))
    torch.testing.assert_close(loaded.clip.visual.proj, source.clip.visual.proj)
    # A registered open_clip name is looked up as $RAYLIB_AD_WEIGHTS_DIR/<name>.pt.
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "raylib-winclip-tiny.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp_path / "cfg" / "raylib-winclip-tiny.json")
    (tmp_path / "w").mkdir()
    torch.save({"state_dict": source.clip.state_dict()}, tmp_path / "w" / "raylib-winclip-tiny.pt")
    monkeypatch.setenv("RAYLIB_AD_WEIGHTS_DIR", str(tmp_path / "w"))
    by_name = create_model("winclip", image_size=SIZE, clip_model="raylib-winclip-tiny")
    torch.testing.assert_close(by_name.clip.visual.proj, source.clip.visual.proj)
    with pytest.raises(WeightsUnavailableError, match="not an open_clip checkpoint"):
        torch.save({"nope": torch.zeros(1)}, tmp_path / "bad.pt")
        winclip(pretrained=True, weights=str(tmp_path / "bad.pt"))


def test_missing_clip_weights_name_the_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLIB_AD_OFFLINE", "1")
    monkeypatch.setenv("RAYLIB_AD_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(clip_module, "_in_hub_cache", lambda cfg: None)
    with pytest.raises(WeightsUnavailableError) as err:
        create_model("winclip")  # anomalib's ViT-B-16-plus-240 / laion400m_e31
    message = str(err.value)
    for way in ("--weights PATH", "$RAYLIB_AD_WEIGHTS_DIR/ViT-B-16-plus-240.pt", "vit_b_16_plus_240-laion400m_e31",
                "--set pretrained=false", "model directory"):
        assert way in message
    with pytest.raises(WeightsUnavailableError, match="not found"):
        create_model("winclip", weights=str(tmp_path / "absent.pt"))


@pytest.mark.parametrize("settings", [{"k_shot": -1}, {"k_shot": 1.5}, {"scales": [5]}, {"scales": []},
                                      {"clip_model": "no-such-clip"}, {"class_name": ""}, {"backbone": "resnet18"},
                                      {"clip_model": {"embed_dim": 8}},
                                      {"clip_model": {"embed_dim": 8, "vision_cfg": 3, "text_cfg": {}}},
                                      {"clip_model": {**TINY, "vision_cfg": {**TINY["vision_cfg"], "bogus": 1}}}])
def test_bad_settings_raise_config_error(settings):
    kwargs = {"clip_model": TINY, **settings}
    with pytest.raises(ConfigError):
        create_model("winclip", image_size=SIZE, pretrained=False, **kwargs)


def test_end_to_end_fit_in_process():
    runner = pytest.importorskip("raylib_ad.train.in_process")
    zero = runner.fit_in_process(winclip(), images(4, 7), batch_size=2)
    assert zero.metrics["stages"] == [] and zero.model_dir is not None
    few = runner.fit_in_process(winclip(k_shot=2), images(6, 8), batch_size=4)
    assert few.metrics["stages"] == ["collect:references"]
    reloaded = read_model(few.model_dir)
    assert reloaded.reference_patches.shape == (2, 16, 32) and reloaded.text_embeddings.shape == (2, 16)
    torch.testing.assert_close(reloaded(images(2, 9)).score, few.model(images(2, 9)).score)
