"""raylib_ad: visual anomaly detection (the anomalib model zoo) trained and served on Ray.

    import raylib_ad
    model = raylib_ad.load("runs/demo/model")      # no Ray needed; or "models:/<name>@champion"
    model.predict(["part.png"])
"""

__version__ = "0.1.0"


def load(path, device="cpu", *, tracking_uri=None):
    """Load a trained model directory, or a registered one (`models:/<name>@champion`,
    `models:/<name>/<version>`); see raylib_ad.artifact.load and TrainedModel."""
    from raylib_ad.artifact import load as _load

    return _load(path, device=device, tracking_uri=tracking_uri)


def create_model(name, **kwargs):
    from raylib_ad.models import create_model as _create

    return _create(name, **kwargs)
