"""Batch scoring (raylib_ad/scoring): `raylib-ad predict --out FILE.parquet` on Ray Data and score_split on
Ray Data, against the in-process paths, with a tiny PaDiM fitted in process (pretrained=False, 32 px).

The replica, the decoder, the inputs and the Parquet parts are tested without Ray; the tests marked `ray`
run the pipelines on the session's local cluster (2 CPUs) on a handful of images."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from raylib_ad.errors import DataError

SIZE = 32


@pytest.fixture(scope="module")
def padim(synthetic_root):
    """A fitted PaDiM (resnet18, random weights) and the synthetic test split."""
    import torch

    from raylib_ad.data import build_manifest
    from raylib_ad.models import create_model
    from raylib_ad.train.in_process import fit_in_process

    torch.manual_seed(0)
    table = build_manifest("synthetic", synthetic_root, "widget")
    train = table.filter(pc.equal(table.column("split"), "train")).slice(0, 16)
    test = table.filter(pc.equal(table.column("split"), "test"))
    model = create_model("padim", backbone="resnet18", image_size=SIZE, pretrained=False, n_features=20)
    fit_in_process(model, train, batch_size=8)
    return model.eval(), test


@pytest.fixture(scope="module")
def model_dir(padim, tmp_path_factory):
    """The model as `raylib-ad train` leaves it, with a threshold and normalization in stats.json."""
    from raylib_ad.artifact import write_model_dir
    from raylib_ad.evaluation import score_split

    model, test = padim
    scored = score_split(model, test, batch_size=16, progress=False)
    image = {"threshold": float(np.median(scored.scores)), "min": float(scored.scores.min()),
             "max": float(scored.scores.max())}
    pixel = {"threshold": float(np.quantile(scored.maps, 0.9)), "min": float(scored.maps.min()),
             "max": float(scored.maps.max())}
    return write_model_dir(model, tmp_path_factory.mktemp("scoring") / "model",
                           {"image_stats": image, "pixel_stats": pixel})


@pytest.fixture(scope="module")
def images(padim, tmp_path_factory):
    """Six test images of the synthetic set and, fourth in line, a file that is not an image."""
    _, test = padim
    paths = test.column("path").to_pylist()[::5][:6]
    broken = tmp_path_factory.mktemp("broken") / "broken.png"
    broken.write_bytes(b"not a png")
    return paths[:3] + [str(broken)] + paths[3:]


def _assert_rows_equal_predict(table: pa.Table, trained, paths: list[str]):
    rows = {r["path"]: r for r in table.to_pylist()}
    expected = trained.predict(paths)
    for path, want in zip(paths, expected):
        got = rows[path]
        assert got["error"] is None
        assert got["score"] == pytest.approx(want["score"], rel=1e-5, abs=1e-5)
        assert got["normalized_score"] == pytest.approx(want["normalized_score"], rel=1e-5, abs=1e-5)
        assert got["is_anomalous"] == want["is_anomalous"] and got["threshold"] == want["threshold"]


# --- without Ray ---------------------------------------------------------------------------------------


def test_forward_batch_equals_predict(model_dir, images):
    from raylib_ad.artifact import load
    from raylib_ad.data.transforms import load_image, normalize

    trained = load(model_dir)
    paths = [images[0], images[1]]
    pixels = np.stack([load_image(p, SIZE) for p in paths])
    scores, maps = trained.forward_batch(normalize(pixels, trained.mean, trained.std))
    assert scores.shape == (2,) and maps.shape == (2, SIZE, SIZE) and scores.dtype == np.float32
    want = trained.predict(paths, with_maps=True)
    np.testing.assert_allclose(scores, [w["score"] for w in want], rtol=1e-6)
    np.testing.assert_allclose(maps[1], want[1]["anomaly_map"], rtol=1e-6)


def test_replica_scores_like_predict_and_marks_the_unreadable_image(model_dir, images):
    """The two pipeline stages called in process: the unreadable file gets an error and no score, the
    others score as TrainedModel.predict does; map PNGs only for the readable ones."""
    from raylib_ad.artifact import load
    from raylib_ad.scoring.payload import directory_payload
    from raylib_ad.scoring.replica import ModelReplica, decode_paths

    decoded = decode_paths({"path": np.asarray(images, dtype=object)}, SIZE)
    assert [bool(e) for e in decoded["error"]] == [False, False, False, True, False, False, False][: len(images)]
    assert "broken.png" in decoded["error"][3]
    out = ModelReplica(directory_payload(model_dir), with_maps=True)(decoded)
    good = [p for i, p in enumerate(images) if i != 3]
    _assert_rows_equal_predict(out, load(model_dir), good)
    row = out.to_pylist()[3]
    assert row["score"] is None and row["is_anomalous"] is None and "cannot read image" in row["error"]
    pngs = out.column("map_png").to_pylist()
    assert pngs[3] is None and all(p.startswith(b"\x89PNG") for i, p in enumerate(pngs) if i != 3)
    import io

    from PIL import Image

    for path, png in zip(images, pngs):  # each map at its image's own size, not the model's SIZE x SIZE
        if png is not None:
            with Image.open(path) as image, Image.open(io.BytesIO(png)) as drawn:
                assert drawn.size == image.size != (SIZE, SIZE) and "Threshold" in drawn.text


def test_float16_map_transit_keeps_values_to_1e3():
    from raylib_ad.scoring.replica import decode_maps, encode_maps

    rng = np.random.default_rng(0)
    maps = rng.gamma(2.0, 3e4, size=(3, 8, 8)).astype(np.float32)  # above float16's 65504
    maps[2] = 0.0
    coded, scale = encode_maps(maps, "float16")
    assert coded.dtype == np.float16 and np.isfinite(coded).all()
    np.testing.assert_allclose(decode_maps(coded, scale), maps, rtol=1e-3, atol=0)


def test_inputs_folders_globs_manifests_and_clear_errors(tmp_path):
    from conftest import write_image

    from raylib_ad.scoring.inputs import expand_inputs

    a = write_image(tmp_path / "imgs" / "a.png")
    b = write_image(tmp_path / "imgs" / "sub" / "b.jpg")
    (tmp_path / "imgs" / "notes.txt").write_text("x")
    assert expand_inputs([str(tmp_path / "imgs")]) == [str(a), str(b)]
    assert expand_inputs([str(tmp_path / "imgs" / "**" / "*.jpg"), str(a), str(b)]) == [str(b), str(a)]
    pq.write_table(pa.table({"path": ["imgs/a.png", str(b)], "label": [0, 1]}), tmp_path / "list.parquet")
    (tmp_path / "list.csv").write_text("path,label\nimgs/sub/b.jpg,1\n")
    assert expand_inputs([str(tmp_path / "list.parquet")]) == [str(a), str(b)]
    assert expand_inputs([str(tmp_path / "list.csv")]) == [str(b)]
    with pytest.raises(DataError, match=r"glob '.*\*\.bmp' matches no files"):
        expand_inputs([str(tmp_path / "*.bmp")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty holds no images"):
        expand_inputs([str(tmp_path / "empty")])
    with pytest.raises(DataError, match="no such file"):
        expand_inputs([str(tmp_path / "missing.png")])
    (tmp_path / "nopath.csv").write_text("file\nx.png\n")
    with pytest.raises(DataError, match="no 'path' column"):
        expand_inputs([str(tmp_path / "nopath.csv")])


def test_map_files_keep_the_stem_and_tell_clashing_stems_apart():
    from raylib_ad.scoring.batch import map_file_names

    names = map_file_names(["/d/good/000.png", "/d/crack/000.png", "/d/crack/001.png", "/d/crack/000.jpg"])
    assert names["/d/crack/001.png"] == "001_map.png"
    assert names["/d/good/000.png"] == "good__000_png_map.png" and len(set(names.values())) == 4


def test_parts_resume_combine_in_order_and_refuse_another_model(tmp_path):
    from raylib_ad.scoring.parquet_sink import RESULT_SCHEMA, ParquetParts

    def full(paths):
        return pa.table({"path": paths, **{f.name: pa.nulls(len(paths), f.type) for f in list(RESULT_SCHEMA)[1:]}})

    out = tmp_path / "scores.parquet"
    sink = ParquetParts(out, {"model": "m1", "maps": False})
    sink.write(full(["c", "a"]))
    again = ParquetParts(out, {"model": "m1", "maps": False})  # a rerun after an interruption
    assert again.written_paths() == {"a", "c"}
    again.write(full(["b"]))
    with pytest.raises(DataError, match="another model"):
        ParquetParts(out, {"model": "m2", "maps": False})
    table = again.finish(["a", "b", "c"])
    assert table.column("path").to_pylist() == ["a", "b", "c"] and not again.parts_dir.exists()
    assert pq.read_table(out).column("path").to_pylist() == ["a", "b", "c"]
    with pytest.raises(DataError, match="another model"):  # the finished file remembers its model too
        ParquetParts(out, {"model": "m2", "maps": False})


def test_predict_cli_in_process_takes_a_folder_and_names_an_empty_glob(model_dir, images, tmp_path, capsys):
    from raylib_ad.cli import main

    folder = tmp_path / "few"
    folder.mkdir()
    for p in images[:2]:
        (folder / p.split("/")[-1]).write_bytes(open(p, "rb").read())
    assert main(["predict", "--model", str(model_dir), str(folder)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and all(set(line) >= {"path", "score", "normalized_score"} for line in lines)
    assert main(["predict", "--model", str(model_dir), str(tmp_path / "*.tif")]) == 2
    assert "matches no files" in capsys.readouterr().err


# --- on Ray ---------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_predict_parquet_equals_predict_resumes_and_keeps_going_past_a_bad_image(
        ray_cluster, model_dir, images, tmp_path, monkeypatch, capsys):
    """Run 1 stops after its first part (2 rows); run 2 (the CLI, 2 actors, maps) scores only the rest,
    and the file equals TrainedModel.predict, the unreadable image a row with its error."""
    from raylib_ad.artifact import load
    from raylib_ad.cli import main
    from raylib_ad.scoring import batch, pipeline
    from raylib_ad.scoring.parquet_sink import ParquetParts
    from raylib_ad.scoring.pipeline import ReplicaPool

    trained = load(model_dir)
    out = tmp_path / "scores.parquet"
    real_write = ParquetParts.write

    def write_then_stop(self, table):
        real_write(self, table)
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C right after the first part

    maps = tmp_path / "maps"
    monkeypatch.setattr(ParquetParts, "write", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        batch.score_to_parquet(trained, images, out, maps_dir=maps, pool=ReplicaPool(actors=1, cpus_per_actor=0.5), batch_size=2,
                               part_rows=2, progress=False)
    monkeypatch.setattr(ParquetParts, "write", real_write)
    parts_dir = out.with_name(out.name + ".parts")
    first = pq.read_table(sorted(parts_dir.glob("part-*.parquet"))[0])
    assert not out.exists() and first.num_rows == 2

    asked = []  # the paths run 2 sends to the replicas
    real_dataset = pipeline.predict_dataset
    monkeypatch.setattr(pipeline, "predict_dataset", lambda paths, *a, **k: asked.extend(paths) or real_dataset(
        paths, *a, **k))
    code = main(["predict", "--model", str(model_dir), "--out", str(out), "--actors", "2", "--cpus-per-actor",
                 "0.5", "--batch-size", "2", "--maps", str(maps), "--no-progress", *images])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = set(first.column("path").to_pylist())
    assert set(asked) == set(images) - written and not written & set(asked)
    assert summary["skipped_already_written"] == 2 and summary["scored"] == len(images) - 2
    assert summary["rows"] == len(images) and summary["errors_in_file"] == 1
    table = pq.read_table(out)
    assert table.column("path").to_pylist() == images and not parts_dir.exists()
    assert table.filter(pc.equal(table.column("path"), first.column("path")[0])).to_pylist()[0] == \
        first.slice(0, 1).to_pylist()[0]  # run 1's row kept as written
    good = [p for p in images if "broken" not in p]
    _assert_rows_equal_predict(table, trained, good)
    bad = table.filter(pc.invert(pc.is_null(table.column("error")))).to_pylist()
    assert len(bad) == 1 and "broken.png" in bad[0]["path"] and bad[0]["score"] is None
    assert bad[0]["anomaly_map_file"] is None
    files = table.filter(pc.is_null(table.column("error"))).column("anomaly_map_file").to_pylist()
    assert len(files) == len(good) and all(f.startswith(str(maps)) and open(f, "rb").read(4) == b"\x89PNG"
                                           for f in files)


@pytest.mark.ray
def test_score_split_on_ray_equals_in_process(ray_cluster, padim):
    """As train/run.py scores with Ray up: the same ScoredSplit, in the table's row order, from 2 replicas."""
    from raylib_ad.evaluation import score_split
    from raylib_ad.options import TrainOptions
    from raylib_ad.postprocess.report import threshold_free_metrics
    from raylib_ad.train import run

    model, test = padim
    test = test.take(list(range(0, test.num_rows, 3)))  # 10 images, normal and anomalous
    local = score_split(model, test, batch_size=4, progress=False)
    options = TrainOptions(model="padim", workers=2, cpus_per_worker=0.5)
    assert isinstance(run._scoring_on_cluster(options, test.num_rows), contextlib.nullcontext)  # too small
    with run._scoring_on_cluster(options, run.CLUSTER_SCORING_MIN_IMAGES):
        remote = score_split(model, test, batch_size=4, progress=False)
    np.testing.assert_array_equal(remote.labels, local.labels)
    np.testing.assert_allclose(remote.scores, local.scores, rtol=1e-5)
    np.testing.assert_array_equal(remote.masks, local.masks)
    np.testing.assert_allclose(remote.maps, local.maps, rtol=1e-3)  # float16 in transit
    want = threshold_free_metrics(local.labels.astype(bool), local.scores, local.masks, local.maps)
    got = threshold_free_metrics(remote.labels.astype(bool), remote.scores, remote.masks, remote.maps)
    assert set(got) == set(want) and "pixel_auroc" in got
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-3), key
