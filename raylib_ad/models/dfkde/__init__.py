from raylib_ad.models.dfkde.model import DFKDE

__all__ = ["DFKDE"]
