from .model import Padim

__all__ = ["Padim"]
