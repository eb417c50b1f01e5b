from .model import WinClip

__all__ = ["WinClip"]
