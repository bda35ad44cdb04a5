"""images.py: every awkward file becomes an upright 8-bit RGB image; every broken one a short, specific reason.

The writers here are shared with the indexer and CLI tests, which check the same files go through a whole batch.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simimg.dataset.images import MAX_PIXELS, decode_image, load_image, read_bytes, to_rgb
from simimg.errors import BadImageError

RED, BLUE, WHITE = (220, 30, 30), (30, 40, 220), (255, 255, 255)
BOMB_SIDE = 40_000


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def two_halves(size: tuple[int, int] = (60, 40), mode: str = "RGB") -> Image.Image:
    """Left half red, right half blue: orientation mistakes show up as wrong colours at known places."""
    image = Image.new("RGB", size, RED)
    image.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return image.convert(mode)


def cmyk_jpeg() -> bytes:
    return encode(two_halves(mode="CMYK"), "JPEG", quality=95)


def gray16_png() -> bytes:
    """A 16-bit grayscale ramp: 0 on the left, 65535 on the right."""
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (32, 1))
    return encode(Image.fromarray(ramp), "PNG")


def rgba_png() -> bytes:
    """Opaque red on the left, fully transparent on the right."""
    image = Image.new("RGBA", (60, 40), (*RED, 255))
    image.paste((0, 0, 0, 0), (30, 0, 60, 40))
    return encode(image, "PNG")


def la_png() -> bytes:
    image = Image.new("LA", (60, 40), (90, 255))
    image.paste((0, 0), (30, 0, 60, 40))
    return encode(image, "PNG")


def palette_png(transparent: bool) -> bytes:
    """Palette entry 0 is black (transparent when asked), 1 red, 2 blue."""
    image = Image.new("P", (60, 40), 1)
    image.putpalette([0, 0, 0, *RED, *BLUE])
    image.paste(2, (30, 0, 60, 20))
    image.paste(0, (30, 20, 60, 40))
    return encode(image, "PNG", **({"transparency": 0} if transparent else {}))


def gray_png() -> bytes:
    return encode(Image.new("L", (60, 40), 77), "PNG")


def exif_rotated_jpeg() -> bytes:
    """Stored 60 wide x 40 high with EXIF orientation 6: displayed upright it is 40 x 60, red on top."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(two_halves(), "JPEG", quality=95, exif=exif.tobytes())


def png_named_jpg() -> bytes:
    return encode(two_halves(), "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 40), colour) for colour in (RED, (30, 200, 30), BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _noise(seed: int = 0, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def bomb_png() -> bytes:
    """A 99-byte PNG whose header claims 40000 x 40000 pixels (1.6 G), with a few rows of zeros as data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (1 + BOMB_SIDE // 8) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


# file name -> (bytes, a phrase the reason must contain)
BROKEN: dict[str, tuple[Callable[[], bytes], str]] = {
    "truncated.jpg": (lambda: truncated(encode(_noise(1), "JPEG")), "truncated"),
    "truncated.png": (lambda: truncated(encode(_noise(2), "PNG")), "truncated"),
    "empty.png": (lambda: b"", "empty file"),
    "random.jpg": (lambda: np.random.default_rng(3).bytes(4096), "unrecognised data"),
    "notes.jpg": (lambda: b"shopping list: eggs, milk, bread\n" * 20, "holds text"),
    "bomb.png": (bomb_png, "decompression bomb"),
}

AWKWARD_FILES: dict[str, Callable[[], bytes]] = {
    "cmyk.jpg": cmyk_jpeg,
    "gray16.png": gray16_png,
    "rgba.png": rgba_png,
    "la.png": la_png,
    "palette.png": lambda: palette_png(False),
    "palette_transparent.png": lambda: palette_png(True),
    "gray.png": gray_png,
    "exif6.jpg": exif_rotated_jpeg,
    "png_named.jpg": png_named_jpg,
    "animated.gif": animated_gif,
}


def write_files(folder: Path, files: dict[str, Callable[[], bytes]]) -> list[str]:
    """Write each generated file into `folder`; returns the names."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, make in files.items():
        folder.joinpath(name).write_bytes(make())
    return sorted(files)


def write_awkward(folder: Path) -> list[str]:
    return write_files(folder, AWKWARD_FILES)


def write_broken(folder: Path) -> dict[str, str]:
    """Write every broken kind; returns name -> the phrase its skip reason must contain."""
    write_files(folder, {name: make for name, (make, _) in BROKEN.items()})
    return {name: phrase for name, (_, phrase) in BROKEN.items()}


def near(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 25) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


def decoded(name: str) -> Image.Image:
    image = decode_image(AWKWARD_FILES[name]())
    assert image.mode == "RGB"
    return image


# --- awkward kinds --------------------------------------------------------------------------------------
def test_cmyk_jpeg_keeps_its_colours():
    image = decoded("cmyk.jpg")
    assert image.size == (60, 40)
    assert near(image.getpixel((5, 20)), RED, 40) and near(image.getpixel((55, 20)), BLUE, 40)


def test_16_bit_grayscale_is_scaled_to_8_bits():
    assert Image.open(io.BytesIO(gray16_png())).mode in ("I;16", "I")  # "I" in older Pillow
    image = decoded("gray16.png")
    assert image.getpixel((0, 0)) == (0, 0, 0)
    assert image.getpixel((63, 0)) == (255, 255, 255)
    middle = image.getpixel((32, 0))
    assert 120 <= middle[0] <= 135 and middle[0] == middle[1] == middle[2]


@pytest.mark.parametrize(
    "name, opaque", [("rgba.png", RED), ("la.png", (90, 90, 90)), ("palette_transparent.png", RED)]
)
def test_transparency_is_flattened_onto_white(name, opaque):
    image = decoded(name)
    assert image.getpixel((5, 35)) == opaque
    assert image.getpixel((55, 35)) == WHITE


def test_palette_without_transparency_keeps_its_colours():
    image = decoded("palette.png")
    assert image.getpixel((5, 5)) == RED
    assert image.getpixel((55, 5)) == BLUE
    assert image.getpixel((55, 35)) == (0, 0, 0)


def test_grayscale_becomes_three_equal_channels():
    assert decoded("gray.png").getpixel((10, 10)) == (77, 77, 77)


def test_exif_orientation_6_is_turned_upright():
    image = decoded("exif6.jpg")
    assert image.size == (40, 60)
    assert near(image.getpixel((20, 5)), RED) and near(image.getpixel((20, 55)), BLUE)


def test_exif_orientation_survives_a_draft_decode():
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decode_image(encode(two_halves((600, 400)), "JPEG", exif=exif.tobytes()), draft_size=73)
    assert image.size[0] < image.size[1] and min(image.size) >= 73
    assert near(image.getpixel((image.width // 2, 5)), RED)


def test_cmyk_jpeg_keeps_its_colours_in_a_draft_decode():
    image = decode_image(encode(two_halves((800, 600), "CMYK"), "JPEG", quality=95), draft_size=73)
    assert image.mode == "RGB" and min(image.size) >= 73 and image.width < 800
    assert near(image.getpixel((5, 5)), RED, 40) and near(image.getpixel((image.width - 5, 5)), BLUE, 40)


def test_draft_decode_is_never_smaller_than_asked():
    image = decode_image(encode(_noise(size=512), "JPEG"), draft_size=100)
    assert 100 <= image.width < 512


def test_png_with_a_jpg_name_is_read_by_its_content(tmp_path):
    path = tmp_path / "really_a.png.jpg"
    path.write_bytes(png_named_jpg())
    image = load_image(path)
    assert image.mode == "RGB" and image.getpixel((5, 5)) == RED


def test_animated_gif_gives_its_first_frame():
    image = decoded("animated.gif")
    assert image.size == (40, 40) and near(image.getpixel((20, 20)), RED, 10)


@pytest.mark.parametrize(
    "mode",
    ["1", "L", "P", "I", "I;16", "I;16B", "F", "RGBA", "RGBa", "RGBX", "LA", "PA", "CMYK", "YCbCr", "HSV", "LAB"],
)
def test_every_mode_a_file_can_have_becomes_rgb(mode):
    image = to_rgb(Image.new(mode, (8, 6)))
    assert image.mode == "RGB" and image.size == (8, 6)


# --- broken kinds ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_files_raise_a_specific_reason(name):
    make, phrase = BROKEN[name]
    with pytest.raises(BadImageError) as err:
        decode_image(make())
    assert phrase in err.value.reason


def test_pillow_bomb_guard_stays_on():
    assert MAX_PIXELS is not None and Image.MAX_IMAGE_PIXELS is not None
    assert BOMB_SIDE * BOMB_SIDE > 2 * Image.MAX_IMAGE_PIXELS


def test_bomb_is_refused_without_allocating_its_pixels(tmp_path):
    """In a fresh process, so the peak memory measured is the bomb's alone (1.6 GB if it were decoded)."""
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png())
    script = (
        "import json, re, sys\nfrom simimg.dataset.images import load_image\nfrom simimg.errors import BadImageError\n"
        "try:\n    load_image(sys.argv[1]); reason = None\nexcept BadImageError as e:\n    reason = e.reason\n"
        "peak = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
        "print(json.dumps([reason, int(peak)]))"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
    reason, peak_kib = json.loads(out.stdout)
    assert "decompression bomb" in reason
    assert peak_kib < 400 * 1024


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p, "file not found"),
        (lambda p: p.mkdir() or p, "a folder"),
    ],
)
def test_unreadable_paths_give_a_reason(tmp_path, make, reason):
    with pytest.raises(BadImageError, match=reason):
        read_bytes(make(tmp_path / "x.jpg"))
