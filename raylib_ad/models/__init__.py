"""The model zoo: `create_model(name, **kwargs)` finds any model by its name."""

from .base import AnomalyModel, AnomalyOutput, create_model, list_models, model_class
from . import (  # noqa: F401  (importing registers the models)
    dfkde, dfm, fastflow, padim, patchcore, reverse_distillation, stfpm,
)

__all__ = ["AnomalyModel", "AnomalyOutput", "create_model", "list_models", "model_class"]
