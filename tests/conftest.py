"""Shared fixtures: small real images made in tmp_path, the shared datasets (skipped when absent), the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
# ../shared/datasets beside the checkout; a machine without it (a lent GPU box) points SIMIMG_DATASETS at a copy
SHARED_DATASETS = Path(os.environ.get("SIMIMG_DATASETS") or ROOT.parent / "shared" / "datasets")

torch.set_num_threads(min(2, os.cpu_count() or 1))


def make_class_images(root: Path, classes: dict[str, int], size: int = 96, seed: int = 0, ext: str = "png") -> Path:
    """A learnable synthetic ImageFolder: each class is a distinct shape and hue, with jitter and noise."""
    rng = np.random.default_rng(seed)
    for c, (label, count) in enumerate(classes.items()):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            folder.joinpath(f"{label}_{i:03d}.{ext}").parent.mkdir(parents=True, exist_ok=True)
            synthetic_image(c, rng, size).save(folder / f"{label}_{i:03d}.{ext}")
    return root


def synthetic_image(kind: int, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """Class `kind` draws its own shape in its own hue at a random place, over a noisy background."""
    background = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    hue = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (230, 200, 40), (200, 60, 220)][kind % 5]
    colour = tuple(int(np.clip(v + rng.integers(-25, 25), 0, 255)) for v in hue)
    r = int(size * rng.uniform(0.2, 0.35))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    shape = kind % 3
    if shape == 0:
        draw.ellipse(box, fill=colour)
    elif shape == 1:
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return image


@pytest.fixture(scope="session", autouse=True)
def converted_models_cache(tmp_path_factory) -> Iterator[Path]:
    """Converted trunks (openvino_trunk.py) go to a folder of this test run, not the user's ~/.cache; the CLI,
    app and server processes the tests start inherit it."""
    from simimg.models.openvino import CACHE_ENV

    folder = tmp_path_factory.mktemp("simimg-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(folder))
        yield folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Two classes of ten small PNGs each."""
    return make_class_images(tmp_path / "photos", {"circles": 10, "squares": 10})


@pytest.fixture
def cuda() -> torch.device:
    """The CUDA device, or a skip: for `gpu`-marked tests."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")


@pytest.fixture
def shared_dataset():
    """Path to a dataset under ../shared/datasets, or a skip that says why."""

    def get(name: str) -> Path:
        path = SHARED_DATASETS / name
        if not path.is_dir():
            pytest.skip(f"{path} is absent: the shared real-photo datasets live beside the checkout")
        return path

    return get


def run_cli(
    *args: str, env: dict | None = None, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run the real `simimg` command in a subprocess, as a user would."""
    full_env = {**os.environ, "SIMIMG_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "simimg.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"simimg {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def cli_json(*args: str, env: dict | None = None) -> object:
    proc = run_cli(*args, "--json", env=env)
    return json.loads(proc.stdout)
