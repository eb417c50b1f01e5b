"""Entry point for `serve run serve/config.yaml` (run from the repository root). The application itself
lives in raylib_ad/serving/app.py so that `raylib-ad serve` and `serve run` deploy the same code."""

from raylib_ad.serving.app import AnomalyDetector, build_app

__all__ = ["AnomalyDetector", "build_app"]
