"""Errors that become HTTP answers. Each carries its status code and a message that names the field or
value at fault; the app turns them into `{"detail": message}` with that status."""

from __future__ import annotations


class ServingError(Exception):
    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(ServingError):
    """The request itself is wrong: empty body, bytes that are not an image, a bad form."""

    status = 400


class UnknownCategory(ServingError):
    """No model directory and no registry champion for this category."""

    status = 404


class PayloadTooLarge(ServingError):
    """Body, file count or pixel count over the configured limits."""

    status = 413


class ModelUnavailable(ServingError):
    """The category exists but its model cannot be loaded (or the registry cannot be reached)."""

    status = 503
