"""Untrusted images: refused precisely (InvalidRequest), never decoded unsafely."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from illume.errors import InvalidRequest
from illume.images import ImageLimits, decode_image


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_allowed_formats_decode_to_rgb(fmt):
    image = decode_image(_encode(Image.new("RGBA" if fmt != "JPEG" else "RGB", (20, 10), "red"), fmt))
    assert image.mode == "RGB" and image.size == (20, 10)


def test_truncated_image_is_refused():
    data = _encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with pytest.raises(InvalidRequest, match="could not be decoded"):
        decode_image(data[: len(data) // 2])


def test_too_many_bytes_is_refused_before_decoding():
    data = _encode(Image.new("RGB", (64, 64)), "PNG")
    with pytest.raises(InvalidRequest, match="bytes"):
        decode_image(data, ImageLimits(max_bytes=len(data) - 1))


def test_too_many_pixels_is_refused():
    data = _encode(Image.new("RGB", (300, 300)), "PNG")
    with pytest.raises(InvalidRequest, match="pixels"):
        decode_image(data, ImageLimits(max_pixels=300 * 300 - 1))


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_unsupported_formats_are_refused(fmt):
    with pytest.raises(InvalidRequest, match="not supported"):
        decode_image(_encode(Image.new("RGB", (8, 8)), fmt))


def test_garbage_and_empty_bytes_are_refused():
    with pytest.raises(InvalidRequest):
        decode_image(b"not an image at all")
    with pytest.raises(InvalidRequest, match="empty"):
        decode_image(b"")


def test_animated_image_is_refused_unless_allowed():
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    with pytest.raises(InvalidRequest, match="animated"):
        decode_image(buffer.getvalue())
    first = decode_image(buffer.getvalue(), ImageLimits(allow_animated=True))
    assert first.getpixel((0, 0)) == (255, 0, 0)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (20, 10), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(_encode(image, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (10, 20)
