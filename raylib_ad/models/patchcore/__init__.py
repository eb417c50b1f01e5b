from raylib_ad.models.patchcore.model import PatchCore

__all__ = ["PatchCore"]
