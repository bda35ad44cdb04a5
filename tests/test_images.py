"""images.py: every awkward file becomes an upright 8-bit RGB image; every broken one a short, specific reason
(hand-made cases first, then hypothesis-generated ones: random bytes, mutated headers, lying sizes).

The writers here are shared with the indexer and CLI tests, which check the same files go through a whole batch.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from simimg.dataset.images import MAX_PIXELS, decode_image, load_image, read_bytes, to_rgb
from simimg.dataset.uploads import validate_upload
from simimg.errors import BadImageError, ImageTooLargeError

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


# --- generated inputs (hypothesis): whatever the bytes, an RGB image or a BadImageError with a reason --------------
FORMATS = {
    "JPEG": ("RGB", {"quality": 80}),
    "PNG": ("RGBA", {}),
    "GIF": ("P", {}),
    "WEBP": ("RGB", {}),
    "TIFF": ("RGB", {}),
    "BMP": ("RGB", {}),
}
DEADLINE_MS = 5_000  # a hang guard, not a speed target: a decode of these small files takes milliseconds
CAP = 1_000_000  # validate_upload's pixel cap in these tests


def seed_file(fmt: str, size: tuple[int, int] = (24, 16)) -> bytes:
    mode, params = FORMATS[fmt]
    rng = np.random.default_rng(len(fmt))
    pixels = rng.integers(0, 255, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert("RGB" if mode == "P" else mode)
    return encode(image.convert("P") if mode == "P" else image, fmt, **params)


SEEDS = {fmt: seed_file(fmt) for fmt in FORMATS}


def decoded_or_refused(data: bytes) -> Image.Image | None:
    """The property every input must have: an RGB image within the pixel cap, or a BadImageError with a reason."""
    try:
        image = decode_image(data)
    except BadImageError as err:
        assert err.reason.strip(), repr(err)
        return None
    # Pillow refuses at twice MAX_PIXELS (its DecompressionBombError); between once and twice it only warns, and
    # gallery files keep that limit (docs/NOTES.md, "Hardening"): hypothesis found a 24 x 3,735,568 PNG there
    assert image.mode == "RGB" and image.width * image.height <= 2 * MAX_PIXELS
    return image


@settings(max_examples=200, deadline=DEADLINE_MS)
@given(st.binary(max_size=4096))
def test_random_bytes_decode_or_are_refused(data: bytes):
    decoded_or_refused(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on the damage it reads past
@settings(max_examples=300, deadline=DEADLINE_MS, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(FORMATS)),
    st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), min_size=1, max_size=6),
    st.one_of(st.none(), st.integers(8, 400)),
)
def test_real_files_with_mutated_headers_decode_or_are_refused(fmt: str, flips: list, cut: int | None):
    data = bytearray(SEEDS[fmt])
    for position, value in flips:
        data[position % len(data)] = value
    decoded_or_refused(bytes(data[:cut]))


def png_claiming(width: int, height: int, fix_crc: bool) -> bytes:
    """A real small PNG whose header claims width x height (its pixel data unchanged)."""
    data = bytearray(SEEDS["PNG"])
    data[16:24] = struct.pack(">II", width, height)
    if fix_crc:
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@settings(max_examples=100, deadline=DEADLINE_MS)
@given(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1), st.booleans())
def test_a_header_claiming_any_size_never_decodes_past_the_cap(width: int, height: int, fix_crc: bool):
    data = png_claiming(width, height, fix_crc)
    try:
        image = validate_upload("claims.png", data, max_pixels=CAP)
    except ImageTooLargeError:
        assert width * height > CAP  # refused from the header, before any pixel is decoded
        return
    except BadImageError as err:
        assert err.reason.startswith("claims.png: ")
        return
    assert image.width * image.height <= CAP


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_comes_out_upright(orientation: int):
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = Image.new("RGB", (40, 20), RED)
    image.paste(BLUE, (0, 0, 10, 10))  # a marker in the stored top-left corner
    got = decoded_or_refused(encode(image, "JPEG", quality=95, exif=exif.tobytes()))
    assert got is not None and got.size == ((20, 40) if orientation >= 5 else (40, 20))


@given(st.sampled_from(["I;16", "I", "F"]), st.integers(0, 65535), st.integers(0, 65535))
@settings(max_examples=30, deadline=DEADLINE_MS)
def test_sixteen_bit_and_float_images_become_eight_bit_rgb(mode: str, low: int, high: int):
    values = np.linspace(low, high, 64, dtype=np.float64).reshape(8, 8)
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    image = Image.fromarray(values.astype(dtype))
    assert image.mode == mode
    got = decoded_or_refused(encode(image, "TIFF"))
    assert got is not None and got.size == (8, 8)


@given(st.integers(0, 255), st.sampled_from(["PNG", "GIF"]))
@settings(max_examples=30, deadline=DEADLINE_MS)
def test_a_palette_with_a_transparent_entry_is_flattened_onto_white(index: int, fmt: str):
    image = Image.new("P", (4, 4), index)
    image.putpalette([(i * 7) % 256 for i in range(768)])
    got = decoded_or_refused(encode(image, fmt, transparency=index))
    assert got is not None and got.getpixel((0, 0)) == WHITE


def test_wide_pixels_are_scaled_strip_by_strip_within_a_bounded_footprint(monkeypatch):
    """Found by scripts/fuzz_decode.py: a 390-byte float TIFF declaring 8 x 16,777,226 pixels took 3.7 GB to
    decode, through whole-image float64 copies. The scaling now allocates the 8-bit result and a strip or two."""
    from simimg.dataset import images

    values = np.random.default_rng(0).random((2000, 2000), dtype=np.float32)  # 16 MB as float32
    image = Image.fromarray(values)
    monkeypatch.setattr(images, "STRIP_PIXELS", 250_000)  # 16 strips of 1 MB as float32
    tracemalloc.start()
    try:
        got = images._to_uint8(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < values.nbytes / 2  # the 4 MB result and a strip or two; whole-image float64 copies took 32+ MB
    np.testing.assert_array_equal(got, np.rint(values * 255).astype(np.uint8))
    monkeypatch.setattr(images, "STRIP_PIXELS", 1 << 30)  # one strip: the same pixels
    np.testing.assert_array_equal(images._to_uint8(image), got)
