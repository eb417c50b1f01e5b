from .model import Csflow

__all__ = ["Csflow"]
