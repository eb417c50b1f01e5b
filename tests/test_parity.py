"""The parity harness (raylib_ad/parity, jobs/parity.py; issue #21).

Unit tests of the comparison, the key maps and the anomalib-default loss settings run always. The end-to-end
run against anomalib 2.7.0 runs when its venv exists (RAYLIB_AD_ANOMALIB_VENV, default /work/anomalib_venv)
or when RAYLIB_AD_PARITY=1 asks for it (then a missing venv fails the test instead of skipping it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raylib_ad.parity.cases import Case
from raylib_ad.parity.compare import (align_signs, compare_grads, compare_tensors, failed_row, markdown_table,
                                      summary)
from raylib_ad.parity.harness import compare_case

ROOT = Path(__file__).resolve().parents[1]


# --- comparison -----------------------------------------------------------------------------------------

def test_equal_tensors_hold_with_zero_difference():
    row = compare_tensors("m", "score", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
    assert row["holds"] and row["max_abs_diff"] == 0 and row["max_rel_diff"] == 0
    assert set(row) == {"model", "quantity", "max_abs_diff", "max_rel_diff", "tolerance", "holds", "note"}


def test_relative_difference_is_against_anomalibs_scale():
    theirs = torch.tensor([0.0, 10.0, -1e-9])
    ours = theirs + torch.tensor([5e-4, 0.0, 0.0])  # 5e-4 next to a 0 entry: 5e-5 of the tensor's scale
    row = compare_tensors("m", "map", ours, theirs)
    assert row["max_abs_diff"] == pytest.approx(5e-4, rel=1e-6)
    assert row["max_rel_diff"] == pytest.approx(5e-5, rel=1e-6) and row["holds"]
    bad = compare_tensors("m", "map", theirs + torch.tensor([0.0, 0.01, 0.0]), theirs)
    assert bad["max_rel_diff"] == pytest.approx(1e-3, rel=1e-4) and not bad["holds"]
    assert compare_tensors("m", "map", theirs + torch.tensor([0.0, 0.01, 0.0]), theirs, tolerance=1e-2)["holds"]


def test_shape_mismatch_and_non_finite_values_fail_with_a_reason():
    row = compare_tensors("m", "score", torch.zeros(2), torch.zeros(2, 1))
    assert not row["holds"] and "shape mismatch" in row["note"] and row["max_abs_diff"] is None
    row = compare_tensors("m", "score", torch.tensor([float("nan"), 1.0]), torch.tensor([0.0, 1.0]))
    assert not row["holds"] and "non-finite" in row["note"]
    row = compare_tensors("m", "score", torch.zeros(0), torch.zeros(0))
    assert not row["holds"]


def test_gradients_compare_as_one_vector_and_need_every_parameter():
    theirs = {"a": torch.tensor([1.0, -2.0]), "tiny": torch.tensor([1e-9])}
    ours = {"a": torch.tensor([1.0, -2.0]), "tiny": torch.tensor([3e-9])}  # 3x off, but 1e-9 of the scale
    row = compare_grads("m", ours, theirs)
    assert row["holds"] and row["max_rel_diff"] == pytest.approx(1e-9, rel=1e-3) and "tiny" in row["note"]
    ours["a"] = torch.tensor([1.0, -2.01])
    row = compare_grads("m", ours, theirs)
    assert not row["holds"] and row["max_rel_diff"] == pytest.approx(5e-3, rel=1e-3) and "in a" in row["note"]
    row = compare_grads("m", {"a": theirs["a"]}, theirs)
    assert not row["holds"] and "one side only" in row["note"]


def test_align_signs_flips_rows_to_anomalibs_sign():
    theirs = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    ours = torch.tensor([[-1.0, -2.0], [3.0, -1.0]])
    assert torch.equal(align_signs(ours, theirs), theirs)


def test_markdown_table_and_summary():
    rows = [compare_tensors("padim", "score", torch.ones(2), torch.ones(2)),
            failed_row("winclip", "all", "no | case")]
    text = markdown_table(rows)
    assert text.splitlines()[0].startswith("| model | quantity | max_abs_diff")
    assert "no \\| case" in text and "**no**" in text
    s = summary(rows)
    assert s["models_holding"] == ["padim"] and s["models_failing"] == ["winclip"] and s["rows_holding"] == 1


def test_compare_case_reports_anomalib_side_failures_as_failed_rows():
    case = Case(request={}, ours={"score": torch.ones(2), "map": torch.ones(2, 4, 4)})
    rows = compare_case("m", case, None, {"returncode": 1, "stderr_tail": "boom"})
    assert len(rows) == 1 and not rows[0]["holds"] and "boom" in rows[0]["note"]
    rows = compare_case("m", case, {"outputs": {}, "error": "KeyError: x"}, {})
    assert not rows[0]["holds"] and "KeyError" in rows[0]["note"]
    rows = compare_case("m", case, {"outputs": {"score": torch.ones(2)}, "error": None, "notes": []}, {})
    assert [r["holds"] for r in rows] == [True, False] and "no 'map'" in rows[1]["note"]


# --- key maps ----------------------------------------------------------------------------------------------

def test_key_maps_rename_backbones_and_reshape_statistics():
    from raylib_ad.models.padim.anomalib_keys import to_anomalib as padim_keys
    from raylib_ad.models.stfpm.anomalib_keys import to_anomalib as stfpm_keys
    from raylib_ad.models.uflow.anomalib_keys import to_anomalib as uflow_keys

    state = {"feature_extractor.model.conv_stem.weight": torch.ones(1), "feature_index": torch.arange(3),
             "mean": torch.zeros(5, 3), "inv_covariance": torch.zeros(5, 3, 3), "blur.kernel": torch.ones(1)}
    out = padim_keys(state)
    assert set(out) == {"feature_extractor.feature_extractor.conv_stem.weight", "idx", "gaussian.mean",
                        "gaussian.inv_covariance"}
    assert out["gaussian.mean"].shape == (3, 5)  # anomalib: (C, positions)
    out = stfpm_keys({"feature_extractor.model.blocks.0.w": torch.ones(1), "student.model.blocks.0.w": torch.ones(1)})
    assert set(out) == {"teacher_model.feature_extractor.blocks.0.w", "student_model.feature_extractor.blocks.0.w"}
    out = uflow_keys({"feature_extractor.model.layer1.w": torch.ones(1), "head.norms.0.weight": torch.ones(1),
                      "head.flow.module_list.3.w_perm": torch.ones(1)})
    assert set(out) == {"feature_extractor.feature_extractor.layer1.w",
                        "feature_extractor.feature_normalizations.0.weight", "flow.module_list.3.w_perm"}


def test_reverse_distillation_key_map():
    from raylib_ad.models.base import create_model
    from raylib_ad.models.reverse_distillation.anomalib_keys import to_anomalib

    state = create_model("reverse_distillation", backbone="resnet18", pretrained=False, image_size=64,
                         decoder="anomalib").state_dict()
    out = to_anomalib(state)
    assert len(out) == len(state)
    for key in ("encoder.feature_extractor.layer1.0.conv1.weight", "bottleneck.conv1.weight", "bottleneck.bn3.bias",
                "bottleneck.bn_layer.0.downsample.0.weight", "decoder.layer1.0.upsample.0.weight",
                "decoder.layer3.1.bn2.running_var"):
        assert key in out, key


def test_ganomaly_key_map_names_modules_by_shape():
    from raylib_ad.models.base import create_model
    from raylib_ad.models.ganomaly.anomalib_keys import to_anomalib

    state = create_model("ganomaly", image_size=64).state_dict()
    out = to_anomalib(state)
    assert len(out) == len(state) == 85
    for key in ("generator.encoder1.input_layers.initial-conv-3-64.weight",
                "generator.encoder2.pyramid_features.pyramid-256-512-conv.weight",
                "generator.encoder1.pyramid_features.pyramid-128-batchnorm.num_batches_tracked",
                "generator.encoder1.final_conv_layer.weight",
                "generator.decoder.latent_input.initial-100-512-convt.weight",
                "generator.decoder.latent_input.initial-512-batchnorm.running_var",
                "generator.decoder.inverse_pyramid.pyramid-256-128-convt.weight",
                "generator.decoder.final_layers.final-64-3-convt.weight", "discriminator.classifier.0.weight"):
        assert key in out, key


# --- anomalib's losses as the defaults ------------------------------------------------------------------------

def test_uflow_loss_default_is_anomalibs_batch_sum():
    from raylib_ad.models.uflow.model import Uflow

    g = torch.Generator().manual_seed(0)
    z = [torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 5, 4, 4, generator=g)]
    log_jac = torch.randn(4, generator=g)
    # anomalib 2.7 UFlowLoss: torch.sum over the stacked per-level, per-sample terms (levels AND batch)
    anomalib = torch.mean(torch.sum(torch.stack([0.5 * torch.sum(zi**2, dim=(1, 2, 3)) for zi in z], dim=0))
                          - log_jac)
    assert Uflow.loss(z, log_jac) == pytest.approx(float(anomalib), rel=1e-6)
    per_sample = (sum(0.5 * zi.pow(2).sum(dim=(1, 2, 3)) for zi in z) - log_jac).mean()
    assert Uflow.loss(z, log_jac, "per_sample") == pytest.approx(float(per_sample), rel=1e-6)
    assert Uflow.defaults["loss_z_reduction"] == "batch_sum"
    assert Uflow.settings_added_later["loss_z_reduction"] == "per_sample"  # models saved before keep theirs


def test_csflow_loss_default_is_anomalibs_batch_sum_log_det():
    from raylib_ad.models.csflow.model import Csflow

    g = torch.Generator().manual_seed(0)
    z = [torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 1, 1, generator=g)]
    log_jac = torch.randn(3, generator=g)
    flat = torch.cat([zi.reshape(3, -1) for zi in z], dim=1)
    # anomalib 2.7: the coupling layers return log|det J| summed over the batch (a scalar)
    anomalib = torch.mean(0.5 * torch.sum(flat**2, dim=(1,)) - log_jac.sum()) / flat.shape[1]
    assert Csflow.loss(z, log_jac) == pytest.approx(float(anomalib), rel=1e-6)
    per_sample = (0.5 * flat.pow(2).sum(1) - log_jac).mean() / flat.shape[1]
    assert Csflow.loss(z, log_jac, "per_sample") == pytest.approx(float(per_sample), rel=1e-6)
    assert Csflow.defaults["log_jac_reduction"] == "batch_sum"


def test_anomalib_patience_defaults():
    from raylib_ad.models.base import model_class

    expected = {"draem": 20, "cflow": 2, "csflow": 3, "uflow": 20, "cfa": 5, "stfpm": 5, "fastflow": 3}
    assert {name: model_class(name).default_patience for name in expected} == expected


# --- end to end against anomalib 2.7.0 -------------------------------------------------------------------------

def _anomalib_venv() -> Path | None:
    venv = Path(os.environ.get("RAYLIB_AD_ANOMALIB_VENV", "/work/anomalib_venv"))
    if (venv / "bin" / "python").is_file():
        return venv
    if os.environ.get("RAYLIB_AD_PARITY") == "1":
        pytest.fail(f"RAYLIB_AD_PARITY=1 but no anomalib venv at {venv} (run .ci/parity to create it)")
    pytest.skip(f"no anomalib venv at {venv} (set RAYLIB_AD_ANOMALIB_VENV, or run .ci/parity)")


def test_harness_end_to_end_against_anomalib(tmp_path):
    venv = _anomalib_venv()
    out = tmp_path / "parity"
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "parity.py"), "--out", str(out), "--models",
                           "dfkde", "fastflow", "--anomalib-venv", str(venv), "--no-create-venv"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    result = json.loads((out / "parity.json").read_text())
    rows = result["rows"]
    assert {r["model"] for r in rows} == {"dfkde", "fastflow"}, done.stderr[-2000:]
    assert {"score", "loss", "gradients"} <= {r["quantity"] for r in rows if r["model"] == "fastflow"}
    failing = [r for r in rows if not r["holds"]]
    assert not failing, failing
    assert done.returncode == 0, done.stderr[-2000:]


def test_harness_says_clearly_when_the_venv_is_missing(tmp_path):
    out = tmp_path / "parity"
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "parity.py"), "--out", str(out), "--models",
                           "winclip", "--anomalib-venv", str(tmp_path / "no_venv"), "--no-create-venv"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2
    assert "CANNOT RUN anomalib's side" in done.stderr and "no anomalib 2.7.0 venv" in done.stderr
    rows = json.loads((out / "parity.json").read_text())["rows"]
    assert rows and not any(r["holds"] for r in rows)


# --- any timm module as a layer (issue #21 item 4) ----------------------------------------------------------

def test_any_timm_module_is_a_layer():
    from raylib_ad.errors import ConfigError
    from raylib_ad.models.components.feature_extractor import FeatureExtractor, module_layer

    # tf_efficientnet_b5's last 304-channel block at stride 32: anomalib's CS-Flow layer (torchvision features.6.8)
    assert module_layer("tf_efficientnet_b5", "blocks.5.8") == (304, 32, 4)
    torch.manual_seed(0)
    fe = FeatureExtractor("resnet18", ["layer2", "layer3.0"], pretrained=False)
    assert fe.channels == {"layer2": 128, "layer3.0": 256} and fe.strides == {"layer2": 8, "layer3.0": 16}
    x = torch.randn(2, 3, 64, 64)
    out = fe(x)  # frozen: runs the batch-norm-folded copy, hooks on it
    seen = {}
    handle = fe.model.get_submodule("layer3.0").register_forward_hook(lambda m, i, o: seen.setdefault("o", o))
    with torch.no_grad():
        plain = fe.model(x.contiguous(memory_format=torch.channels_last))
    handle.remove()
    assert list(out) == ["layer2", "layer3.0"] and out["layer3.0"].shape == (2, 256, 4, 4)
    torch.testing.assert_close(out["layer3.0"], seen["o"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["layer2"], plain[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="nor a module of it; choose from"):
        FeatureExtractor("resnet18", ["layer9.1"], pretrained=False)


def test_a_model_takes_a_module_layer():
    from raylib_ad.models.base import create_model

    model = create_model("csflow", backbone="resnet18", layers=["layer4.1"], pretrained=False, image_size=128,
                         cross_conv_hidden_channels=8, n_coupling_blocks=1)
    assert model.channels == 512
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 128))
    assert out.anomaly_map.shape == (1, 128, 128) and torch.isfinite(out.score).all()
