"""The harness: our side of every case, anomalib's side in its own venv (a subprocess), then the rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from . import exchange
from .cases import CASES, Case, Inputs
from .compare import DEFAULT_TOLERANCE, align_signs, compare_grads, compare_tensors, failed_row, summary

# anomalib 2.7's image and video models, in the order of value of issue #21; R-KDE is anomalib 1.x only.
ALL_MODELS = ("padim", "patchcore", "dfm", "dfkde", "stfpm", "fastflow", "reverse_distillation", "cflow",
              "csflow", "uflow", "cfa", "efficient_ad", "draem", "dsr", "ganomaly", "winclip", "ai_vad")
# Models without a case yet: the reason, reported as a failed row (never a pass).
NOT_COVERED: dict[str, str] = {
    "cfa": "no case yet (not reached in the time box): needs the memory initialised by anomalib's pass given to "
           "both sides, then the soft-boundary loss and gradients",
    "efficient_ad": "no case yet (not reached in the time box): PDN teacher/student/autoencoder key map, the "
                    "channel statistics and quantiles given to both sides, penalty and autoencoder draws",
    "draem": "no case yet (not reached in the time box): the augmented batch (Perlin masks, textures) would be "
             "drawn once on our side and given to anomalib's DraemModel and DraemLoss",
    "dsr": "no case yet (not reached in the time box): VQ-VAE and subspace-restriction key maps; anomalib's "
           "default needs its pretrained VQ model (a download)",
    "winclip": "no case yet: anomalib's WinClip builds open_clip ViT-B-16-plus-240 with its laion400m weights "
               "(a download); a random-weight tiny CLIP on both sides is not wired",
    "ai_vad": "no case yet: anomalib's AiVad builds torchvision Mask R-CNN, RAFT, Keypoint R-CNN and CLIP with "
              "weights (downloads); the feature parts are not wired",
}
ANOMALIB_SIDE = Path(__file__).resolve().parents[2] / "jobs" / "parity_anomalib_side.py"


def build_cases(models: Iterable[str], exchange_dir: Path, inputs: Inputs, log=print
                ) -> tuple[dict[str, Case], list[dict], dict[str, float]]:
    cases, rows, seconds = {}, [], {}
    for name in models:
        if name not in CASES:
            rows.append(failed_row(name, "all", NOT_COVERED.get(name, "no parity case written for this model yet")))
            continue
        start = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                case = CASES[name](inputs)
        except Exception as error:  # our side failed: the model's one row says why
            rows.append(failed_row(name, "all", f"our side failed: {type(error).__name__}: {error}"))
            log(f"[parity] {name}: our side failed: {error}")
            continue
        seconds[name] = round(time.perf_counter() - start, 2)
        exchange.write_request(exchange_dir, name, case.request)
        cases[name] = case
        log(f"[parity] {name}: our side done ({seconds[name]} s)")
    return cases, rows, seconds


def run_anomalib_side(python: Path, exchange_dir: Path, models: list[str], threads: int, timeout: float,
                      log=print) -> dict[str, Any]:
    if not models:
        return {"seconds": 0.0}
    env = {**os.environ, "PARITY_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)  # anomalib's venv must not see this project's packages
    start = time.perf_counter()
    try:
        done = subprocess.run([str(python), str(ANOMALIB_SIDE), str(exchange_dir), *models], env=env,
                              capture_output=True, text=True, timeout=timeout)
        info = {"returncode": done.returncode, "stderr_tail": "\n".join(done.stderr.splitlines()[-20:])}
    except subprocess.TimeoutExpired:
        info = {"returncode": None, "stderr_tail": f"timed out after {timeout} s"}
    info["seconds"] = round(time.perf_counter() - start, 2)
    for line in info["stderr_tail"].splitlines():
        if line.startswith("[parity:anomalib]"):
            log(line)
    return info


def compare_case(name: str, case: Case, response: dict[str, Any] | None, side_info: dict) -> list[dict]:
    if response is None:
        return [failed_row(name, "all", f"anomalib's side wrote no response (exit {side_info.get('returncode')}): "
                                        f"{side_info.get('stderr_tail', '')[-300:]}")]
    if response.get("error"):
        return [failed_row(name, "all", f"anomalib's side failed: {response['error']}")]
    theirs = response["outputs"]
    extra = "; ".join(response.get("notes") or [])
    rows = []
    for quantity, ours in case.ours.items():
        tol = case.tolerances.get(quantity, DEFAULT_TOLERANCE)
        note = case.notes.get(quantity, "")
        if quantity not in theirs:
            rows.append(failed_row(name, quantity, f"anomalib's side gave no '{quantity}'", tol))
            continue
        ours_t = torch.as_tensor(ours)
        if quantity.endswith("components") and ours_t.shape == theirs[quantity].shape:
            ours_t = align_signs(ours_t, theirs[quantity])
        rows.append(compare_tensors(name, quantity, ours_t, theirs[quantity], tol, note))
    if case.grads is not None:
        rows.append(compare_grads(name, case.grads, response.get("grads") or {},
                                  case.tolerances.get("gradients", DEFAULT_TOLERANCE), case.notes.get("gradients", "")))
    if extra:
        rows[0]["note"] = "; ".join(p for p in (rows[0]["note"], f"anomalib side: {extra}") if p)
    return rows


def run(out: Path, models: Iterable[str] = ALL_MODELS, python: Path | None = None, venv_error: str | None = None,
        threads: int = 2, timeout: float = 1800, log=print) -> dict[str, Any]:
    out = Path(out)
    exchange_dir = out / "exchange"
    exchange_dir.mkdir(parents=True, exist_ok=True)
    models = list(models)
    start = time.perf_counter()
    torch.set_num_threads(threads)
    inputs = Inputs()
    cases, rows, our_seconds = build_cases(models, exchange_dir, inputs, log)
    ours_done = time.perf_counter()
    if python is None:
        side = {"seconds": 0.0}
        for name in cases:
            rows.append(failed_row(name, "all", f"anomalib venv unavailable: {venv_error}"))
    else:
        side = run_anomalib_side(python, exchange_dir, list(cases), threads, timeout, log)
        for name, case in cases.items():
            rows.extend(compare_case(name, case, exchange.read_response(exchange_dir, name), side))
    order = {m: i for i, m in enumerate(models)}
    rows.sort(key=lambda r: order.get(r["model"], len(order)))
    result = {"rows": rows, "summary": summary(rows),
              "inputs": {"image_size": inputs.size, "train_images": inputs.n_train, "test_images": len(inputs.test),
                         "dtype": "float32", "threads": threads},
              "timings": {"ours_seconds": round(ours_done - start, 2), "ours_per_model": our_seconds,
                          "anomalib_side_seconds": side["seconds"], "total_seconds": round(time.perf_counter() - start, 2)},
              "anomalib_side": {k: v for k, v in side.items() if k != "seconds"}}
    (out / "parity.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
