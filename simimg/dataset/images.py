"""Turn any file a user has into an upright 8-bit RGB image, or say exactly why it cannot be."""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from simimg.errors import BadImageError, ImageTooLargeError, NotAnImageError

log = logging.getLogger(__name__)
T = TypeVar("T")

ImageInput = str | Path | Image.Image  # what every image-taking call accepts: a file path or a PIL image

# Pillow's own guard stays on: it raises for more than twice this many pixels.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
STRIP_PIXELS = 1 << 22  # 16/32-bit and float images are scaled to 8 bits this many pixels at a time


def read_bytes(path: str | Path) -> bytes:
    """Read a whole file, turning OS errors into a reason a user understands."""
    try:
        return Path(path).read_bytes()
    except PermissionError:
        raise BadImageError("permission denied: the file cannot be read") from None
    except FileNotFoundError:
        raise BadImageError("file not found (deleted, or a broken link)") from None
    except IsADirectoryError:
        raise BadImageError("a folder, not a file") from None
    except OSError as err:
        raise BadImageError(f"cannot read the file: {err.strerror or err}") from None


def decode_image(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode bytes to an upright RGB image; `draft_size` lets JPEGs decode at a reduced scale.

    Every mode becomes RGB: transparency is flattened onto white, 16-bit and float data are scaled to 8 bits.
    """
    if not data:
        raise BadImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
            if draft_size and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"decompression bomb refused: {err}") from None
    except UnidentifiedImageError:
        raise NotAnImageError(_unrecognised_reason(data)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise BadImageError(f"truncated or corrupt image data: {err}") from None
    return to_rgb(image)


def read_and_decode(path: Path, transform: Callable[[Image.Image], T], draft_size: int) -> tuple[T | None, str]:
    """Read a file once; its bytes give both the content hash and the image: (transform(image), sha256 hex), or
    (None, the reason it is skipped). One odd file never stops a batch: anything unexpected is a reason too."""
    try:
        data = read_bytes(path)
        image = decode_image(data, draft_size=draft_size)
        return transform(image), hashlib.sha256(data).hexdigest()
    except BadImageError as err:
        return None, err.reason
    except Exception as err:
        log.exception("unexpected failure reading %s", path)
        return None, f"unexpected error: {type(err).__name__}: {err}"


def load_image(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Read and decode one file; raises BadImageError with a short reason."""
    return decode_image(read_bytes(path), draft_size)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, so the model always sees three 0-255 channels."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = Image.fromarray(_to_uint8(image), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(image: Image.Image) -> np.ndarray:
    """Scale 16/32-bit integer or float pixels to 0-255, strip by strip: a float copy of a whole 130-megapixel
    image is gigabytes (scripts/fuzz_decode.py found a 390-byte TIFF that took 3.7 GB that way)."""
    width, height = image.size
    rows = max(1, STRIP_PIXELS // max(width, 1))
    strips = [(top, min(top + rows, height)) for top in range(0, height, rows)]
    peak = max((float(np.asarray(image.crop((0, a, width, b))).max(initial=0)) for a, b in strips), default=0.0)
    if image.mode == "F":
        high = 1.0 if peak <= 1.0 else 255.0
    else:
        high = 65535.0 if image.mode.startswith("I;16") or peak > 255 else 255.0
    out = np.empty((height, width), np.uint8)
    for a, b in strips:
        strip = np.array(image.crop((0, a, width, b)), dtype=np.float32)
        np.nan_to_num(strip, copy=False, nan=0.0)
        np.multiply(strip, 255.0 / high, out=strip)
        np.clip(strip, 0, 255, out=strip)
        out[a:b] = np.rint(strip, out=strip)
    return out


def _unrecognised_reason(data: bytes) -> str:
    head = data[:512]
    printable = sum(32 <= b < 127 or b in b"\t\r\n" for b in head)
    if printable >= 0.95 * len(head):
        return "not an image: the file holds text"
    return "not an image: unrecognised data (wrong extension or random bytes)"


@dataclass(frozen=True)
class Input:
    """One image a caller passed, decoded: `image` is None and `reason` says why when it could not be read."""

    name: str  # the path as given, or "<image i>" for a PIL image
    image: Image.Image | None
    reason: str | None = None


def read_inputs(
    images: ImageInput | Sequence[ImageInput],
    draft_size: int | None = None,
    locate: Callable[[str | Path], Path] | None = None,
) -> tuple[list[Input], bool]:
    """The one way "a path, a PIL image, or a list of them" becomes RGB images: each decoded (a path through
    `locate` first, e.g. a gallery path made absolute), an unreadable one kept with its reason, in input order;
    and whether a single image (not a list) was given."""
    items: list[ImageInput]
    if isinstance(images, (str, Path, Image.Image)):
        items, single = [images], True
    else:
        items, single = list(images), False
    found = []
    for i, item in enumerate(items):
        if isinstance(item, Image.Image):
            found.append(Input(f"<image {i}>", to_rgb(item)))
            continue
        try:
            found.append(Input(str(item), load_image(locate(item) if locate else item, draft_size)))
        except BadImageError as err:
            found.append(Input(str(item), None, err.reason))
    return found, single
