from .model import DFM

__all__ = ["DFM"]
