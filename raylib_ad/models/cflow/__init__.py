from .model import Cflow

__all__ = ["Cflow"]
