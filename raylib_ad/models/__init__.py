"""The model zoo: `create_model(name, **kwargs)` finds any model by its name.

Every sub-package except `components` is a model family; importing it registers its models
(`@register_model`), so a new model touches only its own folder. Families are imported when first asked
for (`create_model("padim")` imports only `models.padim`; `list_models()` imports them all).
"""

from .base import AnomalyModel, AnomalyOutput, create_model, list_models, model_class

__all__ = ["AnomalyModel", "AnomalyOutput", "create_model", "list_models", "model_class"]
