"""raylib_ad: visual anomaly detection (the anomalib model zoo) trained and served on Ray.

    import raylib_ad
    model = raylib_ad.load("runs/demo/model")      # no Ray needed; or "models:/<name>@champion"
    model.predict(["part.png"])
"""

__version__ = "0.1.0"


def load(path, device="cpu", *, tracking_uri=None):
    """Load a trained model directory, or a registered one (`models:/<name>@champion`,
    `models:/<name>/<version>`); see raylib_ad.artifact.load and TrainedModel."""
    import os

    if not str(path).startswith("models:/") and os.path.isfile(os.path.join(path, "export.json")):
        # An exported model (raylib-ad export) runs on onnxruntime / openvino: no torch import on this path.
        from raylib_ad.export.runtime import ExportedModel

        return ExportedModel(path, device=str(device))
    from raylib_ad.artifact import load as _load

    return _load(path, device=device, tracking_uri=tracking_uri)


def create_model(name, **kwargs):
    from raylib_ad.models import create_model as _create

    return _create(name, **kwargs)
