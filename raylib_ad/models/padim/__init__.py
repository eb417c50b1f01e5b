from raylib_ad.models.padim.model import Padim

__all__ = ["Padim"]
