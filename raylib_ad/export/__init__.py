"""Export a trained model for machines without torch: ONNX (onnxruntime) or OpenVINO IR.

    from raylib_ad.export import export_model
    export_model("runs/demo/model", fmt="onnx", out_dir="runs/demo/export")
    raylib_ad.load("runs/demo/export").predict(["part.png"])     # an ExportedModel: no torch needed

exporter.py builds the export directory (imports torch); runtime.py runs one with numpy, Pillow and
onnxruntime or openvino only, and is copied into every export directory so a factory PC needs nothing
else. Nothing here imports torch at import time: `from raylib_ad.export.runtime import ExportedModel`
must work where torch is not installed.
"""

from __future__ import annotations

FORMATS = ("onnx", "openvino")


def export_model(model_dir, fmt: str = "onnx", out_dir=None, half: bool = False):
    """See raylib_ad.export.exporter.export_model."""
    from raylib_ad.export.exporter import export_model as _export

    return _export(model_dir, fmt=fmt, out_dir=out_dir, half=half)


def __getattr__(name: str):
    if name == "NOT_EXPORTABLE":
        from raylib_ad.export.exporter import NOT_EXPORTABLE

        return NOT_EXPORTABLE
    if name == "ExportedModel":
        from raylib_ad.export.runtime import ExportedModel

        return ExportedModel
    raise AttributeError(name)
