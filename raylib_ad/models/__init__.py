"""The model zoo: `create_model(name, **kwargs)` finds any model by its name."""

from raylib_ad.models.base import AnomalyModel, AnomalyOutput, create_model, list_models, model_class
from raylib_ad.models import dfkde, dfm, padim, patchcore  # noqa: F401  (registers the models)

__all__ = ["AnomalyModel", "AnomalyOutput", "create_model", "list_models", "model_class"]
