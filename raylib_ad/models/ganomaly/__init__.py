from .model import Ganomaly

__all__ = ["Ganomaly"]
