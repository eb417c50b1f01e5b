"""Serving champion models over HTTP. The modules here hold the Ray-free logic (settings, request
decoding with limits, the per-category model slots, response building) so it can be unit-tested
without a cluster; `raylib_ad.serving.app` is the Ray Serve glue (serve/app.py re-exports it)."""

from raylib_ad.serving.errors import (BadRequest, ModelUnavailable, PayloadTooLarge, ServingError,
                                      UnknownCategory)
from raylib_ad.serving.settings import ServeSettings

__all__ = ["BadRequest", "ModelUnavailable", "PayloadTooLarge", "ServeSettings", "ServingError",
           "UnknownCategory"]
