"""The model zoo: `create_model(name, **kwargs)` finds any model by its name.

Every sub-package except `components` is a model family; importing it registers its models
(`@register_model`), so a new model touches only its own folder.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from .base import AnomalyModel, AnomalyOutput, create_model, list_models, model_class

for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.ispkg and _info.name != "components":
        _importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["AnomalyModel", "AnomalyOutput", "create_model", "list_models", "model_class"]
