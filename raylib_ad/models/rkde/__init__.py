from .model import DetectionOutput, Rkde

__all__ = ["DetectionOutput", "Rkde"]
