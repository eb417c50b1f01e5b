"""Exceptions users can catch. Each message names the file, field or value at fault."""


class RaylibADError(Exception):
    """Base class for every error raylib_ad raises on purpose."""


class DataError(RaylibADError, ValueError):
    """A dataset, manifest or image file is missing, unreadable or inconsistent."""


class ConfigError(RaylibADError, ValueError):
    """A setting (CLI flag, --set key=value, model option) is unknown or out of range."""


class WeightsUnavailableError(RaylibADError, RuntimeError):
    """Pretrained weights were asked for but cannot be had (offline, no local file)."""


class ModelError(RaylibADError, RuntimeError):
    """A model's own code failed during training (not a lost worker): retrying would fail again."""
