"""Shared fixtures: small real images made in tmp_path, the shared datasets (skipped when absent), the CLI in this
process and in a subprocess, and what many test files need built once per session (an index, a trained head).

Session fixtures are read-only: a test that changes an index or its collection copies it first (`copy_built`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
# ../shared/datasets beside the checkout; a machine without it (a lent GPU box) points SIMIMG_DATASETS at a copy
SHARED_DATASETS = Path(os.environ.get("SIMIMG_DATASETS") or ROOT.parent / "shared" / "datasets")

# two cores: two torch threads for one pytest process, one each for `pytest -n 2`'s workers (more oversubscribes them)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))
# Bytecode caches on, whatever PYTHONDONTWRITEBYTECODE says (this machine exports it): without them every test module's
# asserts are rewritten in every pytest process (3.3 s of each 14.4 s collection) and the processes the tests start
# compile simimg anew (~0.4 s of each cold `simimg` command); `bytecode_caches` passes it on to those processes
sys.dont_write_bytecode = False


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


# The longest modules first: `pytest -n 2 --dist loadscope --no-loadscope-reorder` (scripts/dev.sh test) hands a worker
# one whole module at a time in collection order, so these start at once and the short ones fill in at the end.
LONGEST_FIRST = ("test_browser.py", "test_benchmarks.py", "test_app.py", "test_engine_ray.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: the rest keep their order


def pytest_configure(config: pytest.Config) -> None:
    """Two xdist workers on two cores: every process of the run (the workers, and the CLI, app, server, Ray and
    benchmark processes they start) runs torch, numpy, faiss and OpenVINO on one OpenMP thread. Set here, in the
    controller before it starts the workers, so their own thread pools are made with one thread too; a value the
    caller exported wins. Measured from one fresh clone, the full suite: 11 min 45 s and 1,077 CPU-s on two
    threads, 10 min 44 s and 962 CPU-s on one (training's crash sweep 76 -> 60 s). Results do not depend on it:
    what needs threads sets them (the server's --threads, a Ray actor's CPUS_PER_ACTOR)."""
    if getattr(config.option, "numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def offline() -> Iterator[None]:
    """No weights are ever downloaded by a test: `--weights imagenet` reads TORCH_HOME or fails with the offline
    message, here and in the CLI, app and server processes the tests start."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SIMIMG_OFFLINE", "1")
        yield


@pytest.fixture(scope="session", autouse=True)
def passive_openmp() -> Iterator[None]:
    """The processes the tests start (the CLI, the app, the server, Ray workers, benchmarks) share the cores with the
    other xdist worker: idle OpenMP threads sleep instead of spinning for the cores. Measured at load average 7:
    test_cli's stdout test and two benchmark runs took 152 s (93 s of CPU) spinning, 113 s (64 s) sleeping. Results
    do not depend on it. (Set for the workers themselves, it made nearly every test 1.8x slower: 19 min 26 s.)"""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_WAIT_POLICY", "PASSIVE")
        yield


@pytest.fixture(scope="session", autouse=True)
def bytecode_caches() -> Iterator[None]:
    """The processes the tests start (the CLI, the app, the server, benchmarks) keep their bytecode caches too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
        yield


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
    """Run the real `simimg` command in a subprocess, as a user would: for the e2e tests of what only a process
    shows (its stdout, its exit code, a kill); everything else calls `run_main`."""
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


# --- the CLI in this process ----------------------------------------------------------------------------------
def run_main(*args: str) -> tuple[int, str, str]:
    """`simimg ARGS` through `simimg.cli.main` in this process: (exit code, stdout, stderr). The same argparse, JSON
    and error handling as the command, without a new Python and torch import per call; usable in any fixture."""
    from simimg.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as stop:  # argparse's own usage errors
            code = stop.code
    return code, out.getvalue(), err.getvalue()


def main_json(*args: str) -> object:
    """`simimg ARGS --json` in this process: exit code 0 and exactly one line of JSON on stdout."""
    code, out, err = run_main(*args, "--json")
    assert code == 0, f"simimg {' '.join(args)} exited {code}:\n{err[-3000:]}"
    assert len(out.splitlines()) == 1, out[-3000:]
    return json.loads(out)


# --- ports ----------------------------------------------------------------------------------------------------
def free_tcp_port() -> int:
    """A local TCP port nothing listens on: the OS's choice, so parallel workers never pick the same one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """`free_tcp_port`, as a fixture: call it for each port a test needs."""
    return free_tcp_port


# --- an index built once per session --------------------------------------------------------------------------
SHAPES = {"circles": 6, "squares": 6, "triangles": 6}


@dataclass(frozen=True)
class Built:
    """An indexed collection laid out as the app expects: base/data/NAME (class folders), base/indexes/NAME."""

    base: Path
    name: str = "shapes"

    @property
    def data(self) -> Path:
        return self.base / "data" / self.name

    @property
    def home(self) -> Path:
        return self.base / "indexes"


def build_collection(
    base: Path, classes: dict[str, int] = SHAPES, name: str = "shapes", size: int = 48, image_size: int = 32
) -> Built:
    """Make the images and index them in this process (random-init densenet121, `image_size` px crops)."""
    import simimg

    built = Built(base, name)
    make_class_images(built.data, classes, size=size)
    simimg.build_index(built.data, name, built.home, weights="none", image_size=image_size, workers=0)
    return built


def point_index_at(home: Path, name: str, data: Path) -> None:
    """Make an index copied to home/name hold the collection `data` (the folder its catalog and index_job.json
    name), as if it had been built from it there under that name."""
    with contextlib.closing(sqlite3.connect(home / name / "catalog.sqlite")) as db, db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'data_root'", (str(data.resolve()),))
    job = home / name / "index_job.json"
    if job.exists():
        saved = json.loads(job.read_text())
        job.write_text(json.dumps({**saved, "data_dir": str(data), "name": name, "home": str(home)}))


def copy_built(built: Built, base: Path) -> Built:
    """A copy of a built collection and its index under `base`, the index pointed at the copied folder: for tests
    that change either (the session's copy is shared by every test)."""
    shutil.copytree(built.base, base, symlinks=True, dirs_exist_ok=True)
    copy = Built(base, built.name)
    point_index_at(copy.home, copy.name, copy.data)
    return copy


@pytest.fixture(scope="session")
def shapes_index(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """'shapes': 3 classes x 6 PNGs of 48 px, indexed at 32 px with random-init weights, no classifier. Read-only:
    copy it (`copy_built`) to change anything."""
    return build_collection(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def split_index(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """'shapes' with its own split: train/ (3 classes x 8) and val/ (3 x 3) PNGs of 40 px, indexed whole at 32 px
    with random-init weights, no classifier. Read-only."""
    base = tmp_path_factory.mktemp("split")
    built = Built(base)
    classes = {"circles": 8, "squares": 8, "triangles": 8}
    make_class_images(built.data / "train", classes, size=40)
    make_class_images(built.data / "val", {c: 3 for c in classes}, size=40, seed=1)
    import simimg

    simimg.build_index(built.data, built.name, built.home, weights="none", image_size=32, workers=0)
    return built


TWO_SHAPES = {"circles": 6, "squares": 6}


@pytest.fixture(scope="session")
def pair_index(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """'shapes' of 2 classes x 6 PNGs of 40 px, indexed at 64 px (2 x 2 feature maps, so grad-cam has something to
    draw) with random-init weights, no classifier. Read-only."""
    return build_collection(tmp_path_factory.mktemp("pair"), TWO_SHAPES, size=40, image_size=64)


@pytest.fixture(scope="session")
def pair_head(pair_index: Built, tmp_path_factory: pytest.TempPathFactory) -> tuple[Built, str]:
    """(collection, model fingerprint): a copy of `pair_index` with a classifier fitted on its stored embeddings
    (`--head-only`) and served. Read-only."""
    import simimg

    built = copy_built(pair_index, tmp_path_factory.mktemp("pair-head") / "base")
    report = simimg.train(built.data, built.name, built.home, head_only=True)
    return built, report.model
