"""Search spaces and the sweep's trial plan. Plain Python: no Ray here.

A search space maps a key to a distribution, written the same way in a model's `search_space` class
attribute and in a `--search-space` YAML file:

    patchcore:                                       # model name (one mapping per model)
      coreset_sampling_ratio: {loguniform: [0.001, 0.1]}
      num_neighbors: {choice: [1, 3, 9]}
      layers: {choice: [[layer2, layer3], [layer1, layer2, layer3]]}
    stfpm:
      lr: {loguniform: [0.01, 0.4]}
      epochs: {randint: [3, 10]}                     # integers, both ends included
      momentum: 0.9                                  # a plain value: fixed in every trial

Keys are the model's anomalib-named settings (`raylib-ad models`), `layers` and, for gradient models,
`epochs`. Distributions: `choice` (a list), `uniform` / `loguniform` ([low, high]), `randint`
([low, high], inclusive). Layers may use ResNet names (layer1..layer4), translated by stride to the
backbone's own modules as the model defaults are (tf_efficientnet_lite0: layer2 -> blocks.2), or the
backbone's names. A model named in the file takes the file's space instead of its default one.

The plan is drawn up front, deterministically: for each category and model, sample 0 is the model's
default configuration (so the champion is never worse than the defaults on validation) and samples
1..K-1 come from a generator seeded by (seed, category, model). The list is handed to Tune as one
grid, so a resumed sweep and a re-run with the same arguments see exactly the same trials.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from raylib_ad.errors import ConfigError
from raylib_ad.models import model_class
from raylib_ad.models.base import default_layers_for

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")


@dataclass(frozen=True)
class Trial:
    """One planned training run. `key` is stable across runs and resumes: category-model-index."""

    key: str
    category: str
    model: str
    index: int
    params: dict[str, Any] = field(default_factory=dict)  # layers, epochs, settings as sampled

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "category": self.category, "model": self.model, "index": self.index,
                "params": dict(self.params)}


def default_space(model: str) -> dict[str, Any]:
    cls = model_class(model)
    space = getattr(cls, "search_space", None)
    if not space:
        raise ConfigError(f"model '{cls.name}' declares no search space; give one with --search-space FILE")
    return dict(space)


def load_space_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a YAML search-space file; every problem names the file and the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"search space file {path}: cannot read it ({err})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"search space file {path}: not valid YAML ({err})") from err
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"search space file {path}: expected a mapping of model name -> {{key: distribution}}")
    spaces = {}
    for model, space in data.items():
        try:
            name = model_class(str(model)).name
        except ConfigError as err:
            raise ConfigError(f"search space file {path}: {err}") from None
        if not isinstance(space, dict):
            raise ConfigError(f"search space file {path}: '{model}' must map keys to distributions")
        spaces[name] = space
    return spaces


def check_space(model: str, space: dict[str, Any], where: str) -> None:
    """Unknown keys and malformed distributions -> ConfigError naming `where` (a file or 'default')."""
    cls = model_class(model)
    allowed = set(cls.defaults) | {"layers"} | ({"epochs"} if cls.trains_by_gradient() else set())
    for key, spec in space.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key '{model}.{key}'; valid keys: {sorted(allowed)}")
        if isinstance(spec, dict):
            _check_distribution(f"{where}: {model}.{key}", spec)
        if key == "layers":
            for option in (spec["choice"] if isinstance(spec, dict) else [spec]):
                if not isinstance(option, list) or not option or not all(isinstance(x, str) for x in option):
                    raise ConfigError(f"{where}: {model}.layers: each choice must be a list of layer names, "
                                      f"got {option!r}")


def _check_distribution(label: str, spec: dict[str, Any]) -> None:
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{label}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{label}: choice needs a non-empty list, got {args!r}")
        return
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)):
        raise ConfigError(f"{label}: {kind} needs [low, high], got {args!r}")
    low, high = args
    if not low <= high:
        raise ConfigError(f"{label}: {kind} needs low <= high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{label}: loguniform needs low > 0, got {args!r}")
    if kind == "randint" and not all(float(a).is_integer() for a in args):
        raise ConfigError(f"{label}: randint needs integers, got {args!r}")


def sample_value(spec: Any, rng: np.random.Generator) -> Any:
    if not isinstance(spec, dict):
        return spec
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        value = args[int(rng.integers(len(args)))]
        return list(value) if isinstance(value, list) else value
    if kind == "uniform":
        return round(float(rng.uniform(args[0], args[1])), 6)
    if kind == "loguniform":
        return round(float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1])))), 6)
    return int(rng.integers(int(args[0]), int(args[1]) + 1))


def resolve_layers(layers: list[str], backbone: str, label: str) -> list[str]:
    """ResNet names translated by stride (as the model defaults are); the result must exist on `backbone`."""
    from raylib_ad.models.components.feature_extractor import feature_layers

    names, _ = feature_layers(backbone)
    if all(layer in names for layer in layers):
        return list(layers)
    try:
        return default_layers_for(backbone, layers)
    except KeyError:
        raise ConfigError(f"{label}: layers {layers} are neither ResNet names (layer1..layer4) nor feature "
                          f"modules of {backbone} ({names})") from None


def plan_trials(models: list[str], categories: list[str], num_samples: int, *, seed: int,
                spaces: dict[str, dict[str, Any]], backbone: str | None, fixed_epochs: int | None,
                where: dict[str, str]) -> list[Trial]:
    """The sweep's trials: categories x models x samples, sample 0 = the model's defaults."""
    if num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {num_samples}")
    trials = []
    for category in categories:
        for model in models:
            cls = model_class(model)
            space = dict(spaces[cls.name])
            if fixed_epochs is not None:
                space.pop("epochs", None)  # --max-epochs fixes the epochs of every trial
            net = backbone or cls.default_backbone
            rng = np.random.default_rng([seed, zlib.crc32(category.encode()), zlib.crc32(cls.name.encode())])
            for index in range(num_samples):
                params = {} if index == 0 else {key: sample_value(space[key], rng) for key in sorted(space)}
                if "layers" in params:
                    params["layers"] = resolve_layers(params["layers"], net, f"{where[cls.name]}: {cls.name}.layers")
                trials.append(Trial(f"{category}-{cls.name}-{index}", category, cls.name, index, params))
    return trials
