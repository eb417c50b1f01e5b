"""Request bytes -> RGB uint8 arrays, with the limits checked before the expensive part: the body size
while it streams in, the pixel count from the image header before any pixel is decoded."""

from __future__ import annotations

import io
import re
from typing import AsyncIterator

import numpy as np

from raylib_ad.serving.errors import BadRequest, PayloadTooLarge


async def read_body(chunks: AsyncIterator[bytes], limit: int, declared_length: str | None = None) -> bytes:
    """Collect a request body, refusing it as soon as it passes `limit` bytes (a client that lies in
    Content-Length, or sends none, is still cut off)."""
    if declared_length is not None:
        try:
            declared = int(declared_length)
        except ValueError:
            raise BadRequest(f"Content-Length {declared_length!r} is not a number") from None
        if declared > limit:
            raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit} (max_body_bytes)")
    parts, total = [], 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"request body is over {limit} bytes (max_body_bytes)")
        parts.append(chunk)
    return b"".join(parts)


def decode_image(data: bytes, max_pixels: int, name: str = "request body") -> np.ndarray:
    """Image file bytes (PNG, JPEG, BMP, TIFF, ... whatever Pillow reads) -> (H, W, 3) uint8 RGB.
    The pixel count is checked against `max_pixels` (the server's max_image_pixels) from the header,
    before any pixel is decoded; Pillow's own decompression-bomb limit never answers in its place."""
    from PIL import Image

    if not data:
        raise BadRequest(f"{name} is empty: send the image file's bytes")
    if max_pixels > Image.MAX_IMAGE_PIXELS:  # Pillow refuses twice its limit at open: ours must be the one
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                raise PayloadTooLarge(f"{name} is {width}x{height} = {width * height} pixels; the limit is "
                                      f"{max_pixels} (max_image_pixels)")
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except PayloadTooLarge:
        raise
    except Image.DecompressionBombError as err:  # Pillow's guard fired first (its limit is below ours)
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        size = f"is {pixels.group(1)} pixels" if pixels else "has too many pixels"
        raise PayloadTooLarge(f"{name} {size}; the limit is {max_pixels} (max_image_pixels)") from None
    except Image.UnidentifiedImageError:
        raise BadRequest(f"{name} is not a readable image ({len(data)} bytes; not in a format the server reads: "
                         f"PNG, JPEG, BMP, TIFF, WebP, GIF, ...)") from None
    except Exception as err:  # Pillow raises many types for bytes that are not (whole) images
        raise BadRequest(f"{name} is not a readable image ({len(data)} bytes; {_plain(err)})") from None
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise BadRequest(f"{name} decodes to an empty image of shape {rgb.shape}")
    return rgb


_REPR = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>")


def _plain(err: Exception) -> str:
    """Pillow's message for the client, without the Python object reprs some messages carry
    (`<_io.BytesIO object at 0x7f...>`)."""
    text = _REPR.sub("the image", str(err)).strip()
    return text or "the image cannot be decoded"
