from .model import DFKDE

__all__ = ["DFKDE"]
