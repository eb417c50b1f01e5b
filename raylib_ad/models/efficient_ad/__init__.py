from .model import EfficientAd

__all__ = ["EfficientAd"]
