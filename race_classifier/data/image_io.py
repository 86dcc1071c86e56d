"""Reading one image robustly: any mode or bit depth becomes 8-bit RGB, EXIF orientation is honoured,
and every failure (missing, corrupt, truncated, decompression bomb) is an ImageLoadError naming the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


class ImageLoadError(Exception):
    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit greyscale: the fixed 16-to-8-bit scale, so brightness is kept (a per-image stretch
        # would brighten dark faces). Float images are taken as 0..1 when they fit, else stretched.
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F" and a.max() <= 1.0:
            a = a * 255.0
        elif im.mode == "F" or a.max() > 65535:
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        else:
            a = a / 257.0
        return Image.fromarray(np.clip(a.round(), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Composite transparency on mid-grey: neither black nor white biases the crop.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, P, CMYK, YCbCr, 1, ...


def refuse_decompression_bomb(im: Image.Image) -> None:
    """Raise PIL's DecompressionBombError for an image over PIL's pixel limit (about 89 Mpx) where PIL itself
    only warns (1x to 2x the limit): a face image that large is an accident or an attack either way. Checked
    by hand, not by turning the warning into an error with ``warnings.catch_warnings()``: that swaps
    process-wide state and is not thread-safe (the server decodes uploads in several threads at once)."""
    width, height = im.size
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        raise Image.DecompressionBombError(f"image of {width}x{height} = {width * height} pixels is over "
                                           f"PIL's limit of {Image.MAX_IMAGE_PIXELS} pixels")


def load_rgb(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Open ``path`` as an 8-bit RGB PIL image, upright by its EXIF orientation.

    ``draft_size`` lets the JPEG decoder skip detail that a resize to that size would discard.
    """
    try:
        with Image.open(path) as im:  # reads the header only; over 2x PIL's limit it raises
            refuse_decompression_bomb(im)
            if draft_size and im.format == "JPEG":
                im.draft("RGB", (draft_size, draft_size))
            im = ImageOps.exif_transpose(im)
            im.load()
            return _to_rgb(im)
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(path, f"refused as a possible decompression bomb ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError(path, "not an image file PIL can read") from None
    except (OSError, ValueError, SyntaxError) as e:
        # Truncated data, broken headers, unsupported codecs: PIL reports these as OSError/ValueError.
        raise ImageLoadError(path, f"unreadable image ({e})") from None
