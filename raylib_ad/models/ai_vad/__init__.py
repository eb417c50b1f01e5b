"""AI-VAD: attribute-based video anomaly detection (velocity, pose and appearance of regions)."""

from .model import AiVad

__all__ = ["AiVad"]
