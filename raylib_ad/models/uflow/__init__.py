from . import nfa
from .model import Uflow

__all__ = ["Uflow", "nfa"]
