"""What every benchmark shares: arguments, generated JPEGs, timing, hardware notes, a table and one JSON line.

Every figure is a ratio against a baseline measured in the same run, repeated and interleaved, because the
machines these run on are often shared: absolute rates move with the load, ratios much less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from simimg.dataset.splits import Split
    from simimg.store.layout import IndexFolder

PHOTO_SIZE = (500, 375)
SPLITS = ("train", "val")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; medians are reported")
    p.add_argument("--json", action="store_true", help="end with one JSON line holding every figure")
    return p


def make_jpegs(folder: Path, count: int, size: tuple[int, int] = PHOTO_SIZE, classes: int = 2, seed: int = 0) -> Path:
    """`count` photo-like JPEGs (smooth shapes, mild noise, quality 90) in `classes` class folders. Larger than
    PHOTO_SIZE (phone photos), the shapes are drawn at PHOTO_SIZE and upscaled, then get noise of their own."""
    rng = np.random.default_rng(seed)
    w, h = size
    draw_w = min(w, PHOTO_SIZE[0])
    draw_h = round(h * draw_w / w)
    yy, xx = np.mgrid[0:draw_h, 0:draw_w].astype(np.float32) * (w / draw_w)
    for i in range(count):
        fx, fy, phase = [*rng.uniform(0.005, 0.04, 2).tolist(), rng.uniform(0, 6.3)]
        base = 127 + 90 * np.sin(xx * fx + phase)[..., None] * np.cos(yy * fy)[..., None] * rng.uniform(0.3, 1, 3)
        if (draw_w, draw_h) == (w, h):
            pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        else:
            smooth = np.asarray(Image.fromarray(base.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC))
            noise = rng.integers(-6, 7, (h, w, 3), dtype=np.int16)  # a phone photo's mild sensor noise
            pixels = np.clip(smooth + noise, 0, 255).astype(np.uint8)
        target = folder / f"class{i % classes}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(target / f"img{i:06d}.jpg", quality=90)
    return folder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device | None = None) -> float:
    """Wall time of fn(), with queued GPU work finished before and after."""
    if device is not None:
        sync(device)
    start = time.perf_counter()
    fn()
    if device is not None:
        sync(device)
    return time.perf_counter() - start


@contextmanager
def runtime(name: str) -> Iterator[None]:
    """Jobs and services made inside resolve their runtime to `name`, as a user's $SIMIMG_RUNTIME would."""
    from simimg.models.device import RUNTIME_ENV

    before = os.environ.get(RUNTIME_ENV)
    os.environ[RUNTIME_ENV] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ[RUNTIME_ENV]
        else:
            os.environ[RUNTIME_ENV] = before


def status_mib(field: str, pid: int | str = "self") -> float:
    """A memory figure of a process from /proc/PID/status, in MiB: VmRSS (resident now) or VmHWM (its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


GATE_FIGURES = ("top10_agreement", "min_cosine", "classifier_agreement", "passed", "queries", "calibration")


def gate_figures(gate: dict | None) -> dict | None:
    """The int8 gate's figures a benchmark reports, from `jobs.int8.measure`'s record (None: not measured)."""
    return None if gate is None else {key: gate.get(key) for key in GATE_FIGURES}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def hardware(device: torch.device) -> dict:
    """What ran it, and how busy the machine was (other processes share the cores)."""
    info = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def finish(title: str, rows: Sequence[dict], summary: dict, as_json: bool) -> None:
    """Print a table of `rows` (one dict per line, same keys), then the summary as the last line when asked."""
    print(f"## {title}")
    if rows:
        keys = list(rows[0])
        print(" | ".join(keys))
        for row in rows:
            print(" | ".join(_fmt(row.get(k)) for k in keys))
    if not as_json:
        for key, value in summary.items():
            if not isinstance(value, (list, dict)):
                print(f"{key}: {_fmt(value)}")
    if as_json:
        print(json.dumps(summary))


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class EmbeddingLike:
    """Unit vectors shaped like pooled CNN features: shared positive mean + cluster + sub-cluster + noise.

    Clusters have Zipf sizes; cluster and sub-cluster centres live in a rank-64 subspace. With these scales a
    random pair has cosine ~0.4, a pair from one cluster ~0.75 and a query's nearest neighbour ~0.9, close to
    what ImageNet DenseNet features of photos show. Not uniform noise, on which every ANN index looks bad and
    nothing like real use. `draw` can be called chunk by chunk: the collection need never be in RAM at once.
    """

    CHUNK = 50_000
    SUBCLUSTERS = 10

    def __init__(self, dim: int, clusters: int, rank: int = 64, seed: int = 0) -> None:
        self.rng = rng = np.random.default_rng(seed)
        self.dim, self.clusters, rank = dim, clusters, min(rank, dim)
        basis = np.linalg.qr(rng.normal(size=(dim, rank)))[0].T.astype(np.float32)
        self.mean = _unit_rows(np.abs(rng.normal(size=dim)))
        self.centers = _unit_rows(rng.normal(size=(clusters, rank)) @ basis)
        self.subs = _unit_rows(rng.normal(size=(clusters, self.SUBCLUSTERS, rank)) @ basis) * np.float32(0.6)
        weights = 1.0 / np.arange(1, clusters + 1)
        self.p = weights / weights.sum()

    def draw(self, count: int) -> np.ndarray:
        out = np.empty((count, self.dim), np.float32)
        for start in range(0, count, self.CHUNK):
            m = min(self.CHUNK, count - start)
            c = self.rng.choice(self.clusters, m, p=self.p)
            x = self.mean + self.centers[c] + self.subs[c, self.rng.integers(self.SUBCLUSTERS, size=m)]
            x += _unit_rows(self.rng.standard_normal((m, self.dim), dtype=np.float32)) * np.float32(0.5)
            out[start : start + m] = _unit_rows(x)
        return out


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# --- problems injected into a copy of a labelled folder (audit_recall.py, label_repair.py) -------------------
@dataclass
class Injected:
    """What was done to the copy, by path relative to it."""

    flips: dict[str, str] = field(default_factory=dict)  # moved image -> its true class
    exact: list[tuple[str, str, bool]] = field(default_factory=list)  # (original, copy, crosses splits)
    near: list[tuple[str, str]] = field(default_factory=list)  # (train original, val re-encoding)


def copy_dataset(data: str | None, copy: Path, images: int, per_class: int, seed: int) -> None:
    """DATA's train/ and val/ class folders (at most `per_class` images each, a seeded pick), or generated JPEGs."""
    if data is None:
        for i, split in enumerate(SPLITS):
            make_jpegs(copy / split, images, size=(160, 120), seed=seed + i)
        return
    rng = np.random.default_rng(seed)
    for split in SPLITS:
        folders = (
            sorted(d for d in (Path(data) / split).iterdir() if d.is_dir()) if (Path(data) / split).is_dir() else []
        )
        if not folders:
            raise SystemExit(f"{data} has no {split}/ class folders: the injected leaks need train/ and val/")
        for folder in folders:
            files = sorted(f for f in folder.iterdir() if f.is_file())
            if per_class:
                files = [files[i] for i in sorted(rng.permutation(len(files))[:per_class])]
            (copy / split / folder.name).mkdir(parents=True)
            for f in files:
                shutil.copy2(f, copy / split / folder.name / f.name)


def inject(copy: Path, flips: int, exact: int, near: int, rng: np.random.Generator) -> Injected:
    """Label flips, cross-class exact copies and cross-split near-duplicates, on distinct images of the copy."""
    files = sorted(str(f.relative_to(copy)) for f in copy.glob("*/*/*") if f.is_file())
    classes = sorted({f.split("/")[1] for f in files})
    train = [f for f in files if f.startswith("train/")]
    near_sources = [train[i] for i in rng.permutation(len(train))[:near]]
    rest = [f for f in files if f not in set(near_sources)]
    picked = [rest[i] for i in rng.permutation(len(rest))[: flips + exact]]
    truth = Injected()
    for i, source in enumerate(near_sources):
        target = f"val/{source.split('/')[1]}/near_{i:03d}.jpg"
        with Image.open(copy / source) as image:
            rgb = image.convert("RGB")
            rgb.resize((rgb.width * 3 // 4, rgb.height * 3 // 4), Image.Resampling.BILINEAR).save(
                copy / target, quality=75
            )
        truth.near.append((source, target))
    for i, source in enumerate(picked[flips:]):
        split, label, name = source.split("/")
        other_split = SPLITS[1 - SPLITS.index(split)] if i % 2 else split
        target = f"{other_split}/{_other(label, classes, rng)}/exact_{i:03d}{Path(name).suffix}"
        shutil.copy2(copy / source, copy / target)
        truth.exact.append((source, target, other_split != split))
    for source in picked[:flips]:
        split, label, name = source.split("/")
        target = f"{split}/{_other(label, classes, rng)}/flip_{name}"
        (copy / source).rename(copy / target)
        truth.flips[target] = label
    return truth


def _other(label: str, classes: list[str], rng: np.random.Generator) -> str:
    return str(rng.choice([c for c in classes if c != label]))


# --- an indexed folder's split and its stored vectors (head_only.py, active_labeling.py) ----------------------
def indexed_split(folder: str | Path, index: IndexFolder) -> tuple[Split, np.ndarray, np.ndarray]:
    """The folder's split as `simimg train` makes it (folder labels, no edits), with the vectors the catalog holds
    for its train and val images (rows in the split's order; images the index does not hold are left out).
    simimg is imported here, not at the top: scripts that never call this start without it."""
    from simimg.dataset.splits import split_dataset
    from simimg.store.catalog import reading

    split = split_dataset(folder)
    with reading(index.catalog) as catalog:
        read = catalog.snapshot_with_vectors()
    assert read is not None, "the index was just built"
    snapshot, vectors = read
    row = {path: n for n, path in enumerate(snapshot.paths)}
    train = tuple(r for r in split.train if r.path in row)
    val = tuple(r for r in split.val if r.path in row)
    x, vx = (np.stack([vectors[row[r.path]] for r in rs]).astype(np.float32) for rs in (train, val))
    return replace(split, train=train, val=val), x, vx
