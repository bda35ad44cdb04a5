"""uploads: what a user drops on the Search page is decoded, or refused with a reason."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from simimg.dataset.uploads import validate_upload
from simimg.errors import BadImageError


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "fmt, mode", [("PNG", "RGBA"), ("JPEG", "RGB"), ("WEBP", "RGB"), ("BMP", "RGB"), ("GIF", "P"), ("TIFF", "RGB")]
)
def test_every_offered_format_decodes_to_rgb(fmt: str, mode: str):
    image = validate_upload(f"x.{fmt.lower()}", encoded(Image.new(mode, (30, 20)), fmt))
    assert image.mode == "RGB" and image.size == (30, 20)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"hello, these are words\n" * 10, "not an image: the file holds text"),
        (encoded(Image.new("RGB", (64, 64), "red"), "PNG")[:60], "truncated or corrupt"),
    ],
)
def test_bad_files_get_a_reason_naming_the_file(data: bytes, reason: str):
    with pytest.raises(BadImageError, match=reason) as err:
        validate_upload("upload.png", data)
    assert err.value.reason.startswith("upload.png: ")


def test_size_cap():
    with pytest.raises(BadImageError, match=r"is 2\.0 MB; the limit is 1 MB"):
        validate_upload("big.png", bytes(2 * 1024 * 1024), max_mb=1)


def test_pixel_cap_refuses_a_bomb_before_decoding():
    bomb = encoded(Image.new("1", (8000, 8000)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(BadImageError, match="decompression bomb"):
        validate_upload("bomb.png", bomb, max_pixels=10_000_000)
    assert validate_upload("ok.png", bomb, max_pixels=100_000_000).size == (8000, 8000)
