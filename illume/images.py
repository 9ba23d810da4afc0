"""Safe image decoding for untrusted client bytes.

Rules (docs/ARCHITECTURE.md, "Images"): the byte size is checked before anything is decoded; only JPEG, PNG
and WebP are opened; the pixel count is checked from the header and raises (never just warns);
animated images are refused unless explicitly allowed, in which case frame 0 is used; EXIF
orientation is applied; the result is an RGB image fully loaded into memory, so a truncated file
fails here and not later inside a batch. Every failure raises ``InvalidRequest`` with one line.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, Field

from illume.errors import InvalidRequest

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")


class ImageLimits(BaseModel):
    """Limits applied to every client image."""

    max_bytes: int = Field(8 * 1024 * 1024, gt=0, description="Largest accepted encoded image, in bytes.")
    max_pixels: int = Field(4096 * 4096, gt=0, description="Largest accepted width x height.")
    allow_animated: bool = Field(
        False, description="Accept animated images (frame 0 is used) instead of refusing."
    )


def image_sha256(data: bytes) -> str:
    """Content hash of the encoded image bytes (hex), used to store images and assign held-out items."""
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, limits: ImageLimits | None = None) -> Image.Image:
    """Decode client bytes into an RGB image under ``limits`` or raise ``InvalidRequest``."""
    limits = limits or ImageLimits()
    if not data:
        raise InvalidRequest("image is empty")
    if len(data) > limits.max_bytes:
        raise InvalidRequest(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            _check_header(image, limits)
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except InvalidRequest:
        raise
    except UnidentifiedImageError:
        raise InvalidRequest("image format is not supported (JPEG, PNG or WebP expected)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequest(f"image has more than {limits.max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidRequest(f"image could not be decoded: {str(exc).splitlines()[0][:120]}") from None


def _check_header(image: Image.Image, limits: ImageLimits) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidRequest("image has no pixels")
    if width * height > limits.max_pixels:
        raise InvalidRequest(f"image is {width}x{height} pixels; the limit is {limits.max_pixels} pixels")
    if getattr(image, "n_frames", 1) > 1 and not limits.allow_animated:
        raise InvalidRequest("animated images are not accepted")


# Local data files (training pools, evaluation sets) are trusted for size but not for format.
LOCAL_FILE_LIMITS = ImageLimits(max_bytes=1 << 30)


def load_image_file(path: str | Path) -> Image.Image:
    """Decode a local image file (a data set's or a snapshot's) the way client images are decoded."""
    return decode_image(Path(path).read_bytes(), LOCAL_FILE_LIMITS)
