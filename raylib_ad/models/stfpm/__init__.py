from .model import Stfpm

__all__ = ["Stfpm"]
