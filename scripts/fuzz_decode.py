"""Coverage-guided fuzzing of image decoding (atheris, libFuzzer): `decode_image` and `validate_upload`.

    python scripts/fuzz_decode.py --seconds 600                 # ten minutes, a fresh seed corpus
    python scripts/fuzz_decode.py --seconds 60 --corpus DIR     # keep and grow a corpus between runs

Every input must give an RGB image within the pixel cap or a `BadImageError` with a reason; anything else is a
crash, which libFuzzer writes to `crash-*` files in --artifacts with the input that caused it. Inputs that take
longer than --timeout seconds, or a process over --rss-mb of memory, count as crashes too. The seed corpus is a
small real file of each format Pillow opens for simimg (jpg, png, gif, webp, tiff, bmp; palette with transparency,
16-bit, float, EXIF-rotated), generated at the start. Needs `pip install atheris` (not in the dev extra: it is
run on demand, not by the test suite).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

UPLOAD_PIXEL_CAP = 1_000_000


def seed_files() -> dict[str, bytes]:
    """One small real file per format and awkward mode."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    palette = rgb.convert("P")
    files = {
        "seed.jpg": _encode(rgb, "JPEG", quality=80, exif=exif.tobytes()),
        "seed.png": _encode(rgb.convert("RGBA"), "PNG"),
        "seed.gif": _encode(palette, "GIF", transparency=0),
        "seed.webp": _encode(rgb, "WEBP"),
        "seed.tif": _encode(rgb, "TIFF"),
        "seed.bmp": _encode(rgb, "BMP"),
        "seed16.tif": _encode(Image.fromarray(rng.integers(0, 65535, (8, 8), dtype=np.uint16)), "TIFF"),
        "seedf.tif": _encode(Image.fromarray(rng.random((8, 8), dtype=np.float32)), "TIFF"),
    }
    return files


def _encode(image: object, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)  # type: ignore[attr-defined]
    return buffer.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=600, help="how long to fuzz (default %(default)s)")
    p.add_argument("--corpus", type=Path, help="corpus folder, kept and grown (default: a fresh temporary one)")
    p.add_argument("--artifacts", type=Path, default=Path("."), help="where crash-* files go (default: here)")
    p.add_argument("--timeout", type=int, default=10, help="seconds one input may take (default %(default)s)")
    p.add_argument("--rss-mb", type=int, default=2048, help="memory limit of the process (default %(default)s)")
    args = p.parse_args()
    import atheris

    warnings.simplefilter("ignore")  # Pillow's notes on the damage it reads past are not findings
    with atheris.instrument_imports():  # Pillow's Python plugins too: nothing imported it before this
        import PIL.Image  # noqa: F401

        from simimg.dataset.images import decode_image
        from simimg.dataset.uploads import validate_upload
        from simimg.errors import BadImageError

    def one_input(data: bytes) -> None:
        for decode in (decode_image, lambda d: validate_upload("fuzz", d, max_pixels=UPLOAD_PIXEL_CAP)):
            try:
                image = decode(data)
            except BadImageError as err:
                assert err.reason.strip(), "a refusal without a reason"
                continue
            assert image.mode == "RGB", image.mode

    with tempfile.TemporaryDirectory() as fresh:
        corpus = args.corpus or Path(fresh)
        corpus.mkdir(parents=True, exist_ok=True)
        for name, data in seed_files().items():
            (corpus / name).write_bytes(data)
        args.artifacts.mkdir(parents=True, exist_ok=True)
        flags = [
            f"-max_total_time={args.seconds}",
            f"-timeout={args.timeout}",
            f"-rss_limit_mb={args.rss_mb}",
            f"-artifact_prefix={args.artifacts}/",
            "-print_final_stats=1",
        ]
        atheris.Setup([sys.argv[0], *flags, str(corpus)], one_input)
        atheris.Fuzz()


if __name__ == "__main__":
    main()
