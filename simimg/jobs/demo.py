"""A small demo collection drawn on the spot, so the app works on a fresh machine with no data and no network.

Three classes of colourful generated scenes, indexed with a randomly initialised backbone (no download); the
colours and shapes differ enough per class that even untrained features put each image near its own kind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from simimg.jobs.index import run_index
from simimg.jobs.index_config import IndexJob, IndexReport
from simimg.progress import Progress
from simimg.store.layout import resolve_home

log = logging.getLogger(__name__)

DEMO_CLASSES = ("sunsets", "forests", "oceans")


@dataclass(frozen=True)
class DemoJob:
    """What the demo writes and indexes; the index run saves its own IndexJob beside the index."""

    data_dir: str = "data/demo"
    name: str = "demo"
    home: str | None = None
    per_class: int = 12
    size: int = 96
    image_size: int = 64
    seed: int = 0


def build_demo(job: DemoJob = DemoJob(), progress: Progress | None = None) -> IndexReport:
    """Write the demo images (idempotent: same seed, same pixels) and index them."""
    written = write_demo_images(Path(job.data_dir), job.per_class, job.size, job.seed)
    log.info("demo collection: %d images in %s", written, job.data_dir)
    index_job = IndexJob(
        data_dir=job.data_dir,
        name=job.name,
        home=str(resolve_home(job.home)),
        weights="none",
        image_size=job.image_size,
        workers=0,
    )
    return run_index(index_job, progress=progress)


def write_demo_images(folder: Path, per_class: int, size: int, seed: int = 0) -> int:
    """folder/<class>/<class>_NNN.png for each demo class; returns how many files it wrote."""
    rng = np.random.default_rng(seed)
    for label in DEMO_CLASSES:
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            SCENES[label](rng, size).save(folder / label / f"{label}_{i:03d}.png")
    return per_class * len(DEMO_CLASSES)


def _gradient(
    rng: np.random.Generator, size: int, top: tuple[int, int, int], bottom: tuple[int, int, int]
) -> Image.Image:
    """A vertical colour gradient with a little jitter in both ends and some grain."""
    t = np.linspace(0, 1, size)[:, None, None]
    a = np.clip(np.array(top) + rng.integers(-20, 20, 3), 0, 255)
    b = np.clip(np.array(bottom) + rng.integers(-20, 20, 3), 0, 255)
    pixels = (1 - t) * a + t * b + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(np.broadcast_to(pixels, (size, size, 3)), 0, 255).astype(np.uint8))


def _sunset(rng: np.random.Generator, size: int) -> Image.Image:
    image = _gradient(rng, size, (250, 120, 40), (120, 30, 90))
    draw = ImageDraw.Draw(image)
    r, cx, cy = size * rng.uniform(0.12, 0.22), size * rng.uniform(0.25, 0.75), size * rng.uniform(0.35, 0.65)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(255, 230, 120))
    draw.rectangle((0, int(size * rng.uniform(0.7, 0.85)), size, size), fill=(40, 20, 40))
    return image.filter(ImageFilter.GaussianBlur(0.6))


def _forest(rng: np.random.Generator, size: int) -> Image.Image:
    image = _gradient(rng, size, (170, 215, 235), (60, 120, 50))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 9))):
        x, h = size * rng.uniform(0, 1), size * rng.uniform(0.3, 0.6)
        base, w = size * rng.uniform(0.8, 1.0), h * 0.35
        green = (int(rng.integers(20, 60)), int(rng.integers(90, 150)), int(rng.integers(30, 60)))
        draw.polygon([(x, base - h), (x - w, base), (x + w, base)], fill=green)
    return image.filter(ImageFilter.GaussianBlur(0.6))


def _ocean(rng: np.random.Generator, size: int) -> Image.Image:
    image = _gradient(rng, size, (150, 200, 245), (10, 60, 140))
    draw = ImageDraw.Draw(image)
    horizon = size * rng.uniform(0.3, 0.5)
    phase, step = rng.uniform(0, 6.3), max(3, size // 12)
    for y in np.arange(horizon, size, step):
        xs = np.arange(0, size + 4, 4)
        points = [(float(x), float(y + 2 * np.sin(x / 6 + phase + y))) for x in xs]
        draw.line(points, fill=(220, 240, 255), width=1)
    return image.filter(ImageFilter.GaussianBlur(0.6))


SCENES: dict[str, Callable[[np.random.Generator, int], Image.Image]] = {
    "sunsets": _sunset,
    "forests": _forest,
    "oceans": _ocean,
}
