from .model import PatchCore

__all__ = ["PatchCore"]
