"""Check a file a user uploaded before it reaches the model: size cap, pixel cap, then a real decode.

Every refusal is a `BadImageError` whose reason a person can act on; nothing an upload holds can raise
anything else, so the page shows one friendly message and keeps working.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

from simimg.dataset.images import decode_image
from simimg.errors import BadImageError, ImageTooLargeError

UPLOAD_TYPES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
DEFAULT_MAX_MB = 20
# Far more than any photo needs, far less than Pillow's own bomb limit: a 40-megapixel RGB image is ~120 MB.
MAX_UPLOAD_PIXELS = 40_000_000


def validate_upload(
    name: str,
    data: bytes,
    max_mb: float = DEFAULT_MAX_MB,
    max_pixels: int = MAX_UPLOAD_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """The upload as an upright RGB image, or BadImageError saying why not; `draft_size` as in decode_image."""
    if len(data) > max_mb * 1024 * 1024:
        raise ImageTooLargeError(
            f"{name} is {len(data) / 2**20:.1f} MB; the limit is {max_mb:g} MB. Upload a smaller copy of the image."
        )
    width, height = _declared_size(data)
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name} declares {width} x {height} pixels ({width * height / 1e6:.0f} "
            f"megapixels), over the {max_pixels / 1e6:.0f}-megapixel limit: this looks like a "
            "decompression bomb. Upload a resized copy."
        )
    try:
        return decode_image(data, draft_size)
    except BadImageError as err:
        raise type(err)(f"{name}: {err.reason}") from None  # keeps the kind: too large, not an image


def _declared_size(data: bytes) -> tuple[int, int]:
    """Width and height from the header alone, without decoding pixels; (0, 0) when the header is unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # not `with Image.open(...) as image`: Pillow types __enter__ with typing.Self, which is Any on 3.10
            opened = Image.open(io.BytesIO(data))
            with opened:
                return opened.size
    except Exception:  # noqa: BLE001 - decode_image turns any bad header into the precise reason
        return 0, 0
