from .model import ReverseDistillation

__all__ = ["ReverseDistillation"]
