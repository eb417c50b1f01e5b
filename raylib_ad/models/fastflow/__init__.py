from .model import Fastflow

__all__ = ["Fastflow"]
