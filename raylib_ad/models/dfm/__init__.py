from raylib_ad.models.dfm.model import DFM

__all__ = ["DFM"]
