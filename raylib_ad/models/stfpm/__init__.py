from raylib_ad.models.stfpm.model import Stfpm

__all__ = ["Stfpm"]
