"""What the HTTP service accepts from clients, and how it refuses the rest.

Every refusal is an ``ApiError``: an HTTP status and one clear sentence, sent as JSON. Images are decoded
from memory only (never a path, never a temporary file), their pixel count checked from the header before
any pixel is decoded, and an image PIL would only warn about as a decompression bomb is refused too,
as in ``load_rgb``.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps

from race_classifier.data.image_io import _to_rgb, refuse_decompression_bomb

MB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """``max_bytes``: one image's upload (a batch body may hold ``max_batch`` of them). ``max_pixels``:
    width x height of one image. ``workers``: inferences run at once; ``queue``: requests that may wait for
    a worker, beyond which the service answers 503 at once rather than let latency grow without bound."""
    max_bytes: int = 10 * MB
    max_pixels: int = 40_000_000
    max_batch: int = 16
    workers: int = 2
    queue: int = 16

    def __post_init__(self):
        if min(self.max_bytes, self.max_pixels, self.max_batch, self.workers) < 1 or self.queue < 0:
            raise ValueError(f"limits must be positive (queue may be 0): {self}")


class ApiError(Exception):
    """A refusal the client can act on: sent as ``{"error": code, "detail": message}`` with ``status``."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def too_large(n: int, limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"upload of {n} bytes is over the limit of {limit} bytes")


def check_image_type(content_type: str | None, what: str = "body") -> None:
    """Only images (or untyped bytes, as some clients send files) are accepted: 415 for anything else."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media and not media.startswith("image/") and media != "application/octet-stream":
        raise ApiError(415, "unsupported_media_type",
                       f"{what} has content type {media!r}: send an image (image/jpeg, image/png, ...)")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """An upright 8-bit RGB image from uploaded bytes, or an ApiError (413 too many pixels, 422 not an
    image, truncated or otherwise unreadable)."""
    if not data:
        raise ApiError(422, "empty_image", "the image is empty (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only; over 2x PIL's limit it raises
        width, height = im.size
        if width * height > max_pixels:  # refused before a single pixel is decoded
            raise ApiError(413, "too_many_pixels", f"image of {width}x{height} = {width * height} pixels "
                           f"is over the limit of {max_pixels} pixels")
        refuse_decompression_bomb(im)
        im = ImageOps.exif_transpose(im)
        im.load()  # decodes here, so truncated data fails here
        return _to_rgb(im)
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ApiError(413, "too_many_pixels", f"refused as a possible decompression bomb ({e})") from None
    except Image.UnidentifiedImageError:
        raise ApiError(422, "not_an_image", "the bytes are not an image format this service reads "
                       "(JPEG, PNG, WebP, BMP, TIFF, GIF, ...)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ApiError(422, "unreadable_image", f"the image could not be decoded (truncated or corrupt: {e})") \
            from None


class Admission:
    """A bound on requests in the service: ``workers`` running plus ``queue`` waiting. Used from the
    event loop's one thread only, so a plain counter is enough."""

    def __init__(self, limits: Limits):
        self.capacity = limits.workers + limits.queue
        self.active = 0

    def enter(self) -> None:
        if self.active >= self.capacity:
            raise ApiError(503, "busy", f"the service is at capacity ({self.capacity} requests in progress "
                           "or queued): retry shortly")
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
