"""jobs/gpu_check.py runs on CPU on tiny inputs (issue #26 item 4), so the GPU script cannot rot between the
rare sessions that have a GPU: models train in both precisions and score, PatchCore fits and scores, and
the JSON and the markdown table are written. No Ray in the script's imports."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "jobs" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_on_cpu_tiny(tmp_path):
    gpu_check = load_script()
    before = set(sys.modules)
    # three models for the three kinds of row (memory bank, gradient, flow) keep the test near a minute on
    # 2 cores; `python jobs/gpu_check.py --device cpu --tiny` runs the whole registry the same way
    result = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--threads", "1",
                             "--models", "padim,stfpm,fastflow"])
    assert not any(m == "ray" or m.startswith("ray.") for m in set(sys.modules) - before), "gpu_check imported ray"
    names = {r["model"] for r in result["score"]}
    assert names == {"padim", "stfpm", "fastflow"}
    errors = [r for r in result["train"] + result["score"] if r.get("error")]
    assert not errors, errors
    by_model = {(r["model"], r["precision"]): r for r in result["train"]}
    assert by_model[("stfpm", "bf16")]["steps_per_second"] > 0
    assert by_model[("stfpm", "fp32")]["steps_per_second"] > 0
    assert all(r["images_per_second_b1"] > 0 and r["images_per_second_b4"] > 0 for r in result["score"])
    pc = result["patchcore"]
    assert "error" not in pc, pc
    assert pc["bank_rows"] > 0 and pc["test_images_per_second"] > 0 and 0 <= pc["image_auroc"] <= 1
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["device"] == "cpu" and saved["tiny"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| stfpm |" in table and "PatchCore" in table
