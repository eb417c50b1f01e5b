"""A trained model directory -> an export directory that runs without torch:

    model.onnx  (--format onnx)   or   model.xml + model.bin  (--format openvino)
    export.json                   model name, image size, pre-processing (resize S x S bilinear, RGB,
                                  x / 255, (x - mean) / std, NCHW), input/output names, produces_maps,
                                  format, half, the parity measured at export, stats.json's content
    raylib_ad_runtime.py          a copy of runtime.py: numpy + Pillow + onnxruntime/openvino only

The graph takes the normalized float32 (B, 3, S, S) batch with a dynamic batch dimension and returns
score (B,) and, for models with maps, anomaly_map (B, S, S): the raw outputs of the torch model.

Exporter: torch.onnx's TorchScript exporter (dynamo=False) first, deliberately. On this zoo it exports
every model below in 0.2-12 s and keeps the batch dimension dynamic; the torch.export-based exporter
(dynamo=True, torch's default) takes 8-80 s per model and specializes the batch to the traced size in
PatchCore, C-Flow and DFKDE (Python loops over row chunks). dynamo=True is the fallback when the
TorchScript exporter fails (it is deprecated upstream and may go away). Every export is checked before
it is written: the exported network, run by the runtime that will serve it, must reproduce the torch
model on a batch of a size other than the traced one (see TOLERANCE).

Small export blockers are handled here, not in the model files: PatchCore and C-Flow bound inference
memory by Python loops over row chunks, which a trace would freeze at the traced batch; they are
traced unchunked, and export.json's max_batch makes the runtime feed them a few images at a time.
nn.MultiheadAttention's fused fast path (WinCLIP's CLIP) has no ONNX export: it is switched off while
tracing (same arithmetic).
"""

from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import tempfile
from contextlib import ExitStack, contextmanager, redirect_stdout
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from raylib_ad.errors import ConfigError, RaylibADError
from raylib_ad.export import FORMATS
from raylib_ad.export.runtime import (EXPORT_FILE, EXPORT_FORMAT_VERSION, ExportedModel, is_export_dir,
                                      missing_package)

OPSET = 17
NETWORK = {"onnx": "model.onnx", "openvino": "model.xml"}
RUNTIME_COPY = "raylib_ad_runtime.py"
# Models no exporter can turn into one static graph, with the reason `raylib-ad export` reports.
NOT_EXPORTABLE = {
    "rkde": "its region detector (torchvision Faster R-CNN) returns a data-dependent number of boxes per "
            "image and the scoring loops over them in Python; torch.onnx traces that into a graph valid "
            "only for the traced box counts (onnxruntime then fails on other images)",
    "ai_vad": "a video model built on detections (Mask R-CNN boxes and frame-difference blobs, data-dependent "
              "counts with per-region Python loops), RAFT flow and Keypoint R-CNN: not one static graph",
}
# Models whose --half export would not keep the parity bound, and why.
HALF_UNSUPPORTED = {
    "dsr": "its codebook lookups (argmin over VQ distances) pick other codes for many latent cells once the "
           "weights are rounded to FP16, which moves whole regions of the map; export it without --half",
}
# Parity of the exported network with the torch model, per output: max |exported - torch| <= tol *
# max(1, max |torch|) (absolute for outputs in [0, 1], relative to the peak for larger ones). FP16
# exports store the weights in half precision (computed in FP32), hence the looser bound.
TOLERANCE = {False: 1e-4, True: 2e-2}
# DSR's map (FP32): its upsampling module (anomalib's architecture) instance-normalizes nearly constant
# channels, which amplifies the rounding differences between torch's and the runtimes' kernels.
MODEL_TOLERANCE = {"dsr": 2e-3}
# Share of map pixels allowed beyond the tolerance. DSR picks codebook entries by argmin: on a near tie
# the exported graph (another GEMM summation order) may pick the neighbouring code for a latent cell,
# which moves the few map pixels that cell covers.
MAP_OUTLIERS = {"dsr": 0.01}
# Images per runtime call for models traced without their memory-bounding row chunks (see above).
MAX_BATCH = {"patchcore": 8, "cflow": 8}
# PatchCore's graph holds a (patches x bank rows) distance matrix per call: fewer images per call when
# the bank is large, so that one call's matrix stays near this many entries (the torch model's chunks
# hold ~2**21 to 2**26). At least one image per call.
KNN_ENTRIES_PER_CALL = 2**24
_UNBOUNDED = 1 << 62


class ExportError(RaylibADError, RuntimeError):
    """The model could not be exported, or the exported network does not reproduce it."""


def exportable(name: str) -> tuple[bool, str]:
    from raylib_ad.models import model_class

    if name in NOT_EXPORTABLE:
        return False, NOT_EXPORTABLE[name]
    if model_class(name).clip_length is not None:
        return False, "a video model: its input is a clip of frames, not the image batch the export takes"
    return True, ""


def require_packages(fmt: str) -> None:
    """ConfigError naming what to pip install when the format's packages are missing."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is not known; expected one of {list(FORMATS)}")
    for package in ({"onnx": ("onnx", "onnxruntime"), "openvino": ("openvino",)}[fmt]):
        try:
            importlib.import_module(package)
        except ImportError as err:
            raise missing_package(fmt, package, err) from None


class ExportGraph(nn.Module):
    """The traced function: normalized (B, 3, S, S) -> score (B,)[, anomaly_map (B, S, S)], float32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        out = self.model(image)
        if out.anomaly_map is None:
            return out.score.float()
        return out.score.float(), out.anomaly_map.float()


@contextmanager
def _set(obj: Any, key: str, value: Any, item: bool = False) -> Iterator[None]:
    old = obj[key] if item else getattr(obj, key)
    if item:
        obj[key] = value
    else:
        setattr(obj, key, value)
    try:
        yield
    finally:
        if item:
            obj[key] = old
        else:
            setattr(obj, key, old)


def _export_patches(model) -> ExitStack:
    stack = ExitStack()
    if hasattr(torch.backends, "mha") and hasattr(torch.backends.mha, "set_fastpath_enabled"):
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        stack.callback(torch.backends.mha.set_fastpath_enabled, fast)
    if model.name == "patchcore":
        stack.enter_context(_set(model.settings, "query_chunk", _UNBOUNDED, item=True))
        # One bank chunk: the trace would fold each bank[start:end] slice into an initializer of its own,
        # a second copy of the bank beside memory_bank (a 45 MB bank of 74000 rows exported as 93 MB).
        from raylib_ad.models.components import nearest_neighbors as knn

        stack.enter_context(_set(knn.nearest_neighbors.__kwdefaults__, "bank_chunk", _UNBOUNDED, item=True))
    if model.name == "cflow":
        stack.enter_context(_set(importlib.import_module(type(model).__module__), "_EVAL_ROWS", _UNBOUNDED))
    return stack


def max_batch(model) -> int | None:
    """Images per runtime call (export.json's max_batch), None for no limit."""
    limit = MAX_BATCH.get(model.name)
    if model.name == "patchcore" and model.memory_bank.numel():
        with torch.no_grad():
            patches = model.embed(check_images(model, 1))[0].shape[1]
        per_image = patches * model.memory_bank.shape[0]
        limit = max(1, min(limit or _UNBOUNDED, KNN_ENTRIES_PER_CALL // per_image))
    return limit


def _trace_to_onnx(model, example: torch.Tensor, path: Path) -> str:
    """Write the ONNX graph; returns which exporter made it. ExportError with both exporters' reasons."""
    import warnings

    graph = ExportGraph(model).eval()
    outputs = ["score", "anomaly_map"][: 2 if model.produces_maps else 1]
    errors = []
    with _export_patches(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and the legacy exporter's deprecation notice
        try:
            torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=OPSET,
                              input_names=["image"], output_names=outputs,
                              dynamic_axes={name: {0: "batch"} for name in ["image", *outputs]})
            return f"torch.onnx TorchScript exporter (dynamo=False), opset {OPSET}"
        except Exception as err:  # the exporter raises many types; the message is what matters
            errors.append(f"dynamo=False: {type(err).__name__}: {_first_line(err)}")
        try:
            batch = torch.export.Dim("batch", min=1, max=4096)
            with redirect_stdout(io.StringIO()):  # its progress lines would mix into the CLI's JSON output
                program = torch.onnx.export(graph, (example,), dynamo=True, input_names=["image"],
                                            output_names=outputs, dynamic_shapes=({0: batch},), verbose=False)
            program.save(str(path), external_data=False)
            return f"torch.onnx torch.export-based exporter (dynamo=True), opset {program.model.opset_imports['']}"
        except Exception as err:
            errors.append(f"dynamo=True: {type(err).__name__}: {_first_line(err)}")
    raise ExportError(f"{model.name} cannot be exported to ONNX: " + "; ".join(errors))


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


def fp16_weights(path: Path) -> int:
    """Store the ONNX graph's float32 initializers as float16, each followed by a Cast back to float32
    (weights-only FP16, as OpenVINO's compress_to_fp16: half the file, FP32 arithmetic). Tensors with
    values beyond float16's range stay float32. Returns how many tensors were converted."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    casts, converted = [], 0
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(init)
        if values.size < 16 or not np.isfinite(values).all() or np.abs(values).max() > 65504:
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(values.astype(np.float16), f"{name}__fp16"))
        casts.append(helper.make_node("Cast", [f"{name}__fp16"], [name], to=TensorProto.FLOAT,
                                      name=f"{name}__cast"))
        converted += 1
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))
    return converted


def parity(model, exported: ExportedModel, images: torch.Tensor) -> dict[str, float]:
    """Max |exported - torch| / max(1, max |torch|) per output (a quantile for MAP_OUTLIERS' maps)."""
    with torch.no_grad():
        out = model(images)
    scores, maps = exported.forward_batch(images.numpy())
    result = {"score": _error(out.score.float().numpy(), scores)}
    if out.anomaly_map is not None:
        result["anomaly_map"] = _error(out.anomaly_map.float().numpy(), maps, 1 - MAP_OUTLIERS.get(model.name, 0.0))
    return result


def _error(expected: np.ndarray, got: np.ndarray | None, quantile: float = 1.0) -> float:
    if got is None or got.shape != expected.shape:
        return float("inf")
    diff = np.abs(expected.astype(np.float64) - got)
    worst = float(np.quantile(diff, quantile)) if quantile < 1 else float(diff.max())
    return worst / max(1.0, float(np.abs(expected).max()))


def check_images(model, batch: int, seed: int = 0) -> torch.Tensor:
    """Uniform random pixels, normalized as the model's inputs are (the batch the parity is taken on)."""
    size = model.image_size
    pixels = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in model.normalization)
    return (pixels - mean) / std


def export_model(model_dir: str | os.PathLike, fmt: str = "onnx", out_dir: str | os.PathLike | None = None,
                 half: bool = False) -> Path:
    """Export the trained model directory (or models:/ registry version) `model_dir` into `out_dir`
    (default: a sibling named <model_dir>_<fmt>). Raises ConfigError for a missing package or a model in
    NOT_EXPORTABLE, ExportError when tracing fails or the exported network does not match."""
    require_packages(fmt)
    from raylib_ad.artifact import CONFIG_FILE, load, make_readable

    source = str(model_dir)
    if source.startswith("models:/"):
        if out_dir is None:
            raise ConfigError(f"exporting {source} needs an output directory (--out)")
    else:  # refuse early, before the weights are read
        if is_export_dir(source):
            raise ConfigError(f"{source} is already an exported model; export the trained model directory")
        config_path = Path(source) / CONFIG_FILE
        if not config_path.is_file():
            raise ConfigError(f"{source} is not a raylib_ad model directory: {CONFIG_FILE} is missing")
        name = json.loads(config_path.read_text())["model"]
        ok, why = exportable(name)
        if not ok:
            raise ConfigError(f"{name} cannot be exported: {why}")
    trained = load(source)
    model = trained.model.cpu().eval()
    ok, why = exportable(model.name)
    if not ok:
        raise ConfigError(f"{model.name} cannot be exported: {why}")
    if half and model.name in HALF_UNSUPPORTED:
        raise ConfigError(f"{model.name} cannot be exported with --half: {HALF_UNSUPPORTED[model.name]}")
    out = Path(out_dir) if out_dir is not None else Path(source.rstrip("/") + f"_{fmt}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        onnx_path = tmp / NETWORK["onnx"]
        exporter = _trace_to_onnx(model, check_images(model, 2, seed=1), onnx_path)
        if fmt == "onnx" and half:
            fp16_weights(onnx_path)
        if fmt == "openvino":
            import openvino as ov

            ov.save_model(ov.convert_model(str(onnx_path)), str(tmp / NETWORK["openvino"]), compress_to_fp16=half)
            onnx_path.unlink()
        meta = {
            "export_format_version": EXPORT_FORMAT_VERSION, "format": fmt, "network": NETWORK[fmt], "half": half,
            "exporter": exporter, "model": model.name, "image_size": model.image_size,
            "mean": list(model.normalization[0]), "std": list(model.normalization[1]),
            "preprocessing": {"resize": "bilinear to image_size x image_size (PIL)", "color": "RGB",
                              "scale": "x / 255", "normalize": "(x - mean) / std", "layout": "NCHW float32"},
            "input": {"name": "image", "shape": ["batch", 3, model.image_size, model.image_size]},
            "outputs": ["score", "anomaly_map"][: 2 if model.produces_maps else 1],
            "produces_maps": bool(model.produces_maps), "batch": "dynamic",
            "max_batch": max_batch(model), "config": model.config(), "stats": trained.stats or None,
            # onnxruntime's CPU arena keeps (and rounds up) the unchunked graphs' large intermediates
            "cpu_memory_arena": model.name not in MAX_BATCH,
        }
        (tmp / EXPORT_FILE).write_text(json.dumps(meta, indent=2))
        shutil.copyfile(Path(__file__).with_name("runtime.py"), tmp / RUNTIME_COPY)
        # checked with the runtime that will serve it, on as many threads as torch uses here
        try:
            errors = parity(model, ExportedModel(tmp, threads=torch.get_num_threads()), check_images(model, 3, seed=2))
        except RaylibADError:
            raise
        except Exception as err:  # e.g. a graph whose batch dimension the exporter fixed to the traced size
            raise ExportError(f"the exported {model.name} does not run on a batch of 3 ({exporter}): "
                              f"{type(err).__name__}: {_first_line(err)}") from None
        tolerance = max(TOLERANCE[bool(half)], MODEL_TOLERANCE.get(model.name, 0.0))
        if not all(e <= tolerance for e in errors.values()):
            raise ExportError(f"the exported {model.name} does not reproduce the torch model: relative errors "
                              f"{errors} exceed {tolerance} ({exporter})")
        meta["parity"] = {"relative_error": errors, "tolerance": tolerance, "images": 3,
                          "map_outlier_share": MAP_OUTLIERS.get(model.name, 0.0)}
        (tmp / EXPORT_FILE).write_text(json.dumps(meta, indent=2))
        make_readable(tmp)  # mkdtemp's 0700 would make the export unreadable to a serving account
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
