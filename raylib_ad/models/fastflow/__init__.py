from raylib_ad.models.fastflow.model import Fastflow

__all__ = ["Fastflow"]
