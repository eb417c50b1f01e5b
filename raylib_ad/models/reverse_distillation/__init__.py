from raylib_ad.models.reverse_distillation.model import ReverseDistillation

__all__ = ["ReverseDistillation"]
