from .model import Cfa

__all__ = ["Cfa"]
