from .model import Dsr

__all__ = ["Dsr"]
