"""Training data: the train/val split of a class folder, augmentation, class balance and loaders.

A split comes from `DATA_DIR/{train,val}/<class>/` when those folders exist, else from a stratified, seeded
split of `DATA_DIR/<class>/`. Loaders yield uint8 batches; normalisation happens on the device (see Preprocess).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from simimg.errors import SimimgError
from simimg.scan import IMAGE_EXTENSIONS, SPLIT_NAMES, Record, Scan, Skipped, scan_folder

log = logging.getLogger(__name__)

IMBALANCE_RATIO = 1.5


@dataclass(frozen=True)
class Split:
    """Which images train and which validate; `kind` is 'folders' (train/ and val/) or 'seeded'."""

    root: Path
    classes: tuple[str, ...]
    train: tuple[Record, ...]
    val: tuple[Record, ...]
    kind: str
    skipped: tuple[Skipped, ...] = ()

    def labels(self, records: Sequence[Record]) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[r.label] for r in records], dtype=np.int64)

    def files(self, records: Sequence[Record]) -> list[Path]:
        return [self.root / r.path for r in records]

    def describe(self) -> dict:
        """What the bundle records, so `simimg evaluate` can find the same validation images later."""
        return {"data_dir": str(self.root.resolve()), "kind": self.kind, "train": len(self.train),
                "val_paths": [r.path for r in self.val]}


@dataclass(frozen=True)
class TrainAugment:
    """Random resized crop, flip and mild colour jitter, to a uint8 tensor; a drop-in for Preprocess in FileDataset."""

    crop_size: int
    scale: tuple[float, float] = (0.25, 1.0)
    jitter: float = 0.2

    @property
    def resize_size(self) -> int:
        """JPEGs decode at a reduced scale no smaller than this (FileDataset's draft size)."""
        return round(self.crop_size * 256 / 224)

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        return self._compose(image)

    @cached_property
    def _compose(self) -> transforms.Compose:
        return transforms.Compose([
            transforms.RandomResizedCrop(self.crop_size, scale=self.scale, antialias=True),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(self.jitter, self.jitter, self.jitter),
            transforms.PILToTensor(),
        ])


def split_dataset(data_dir: str | Path, val_split: float = 0.2, seed: int = 0) -> Split:
    """The split to train on; a folder that cannot train a classifier raises SimimgError saying why."""
    if not 0.0 < val_split < 1.0:
        raise SimimgError(f"--val-split {val_split} must be between 0 and 1 (e.g. 0.2)")
    scan = scan_folder(data_dir)
    labelled = [r for r in scan.records if r.label is not None]
    if not labelled:
        raise SimimgError(f"no images in class folders under {scan.root} (looked for "
                          f"{', '.join(sorted(IMAGE_EXTENSIONS))}); put them in <folder>/<class>/<image>")
    if len(labelled) < len(scan.records):
        log.warning("ignoring %d images directly in %s: they have no class folder", len(scan.records) - len(labelled),
                    scan.root)
    if _is_split(labelled):
        split = _folder_split(scan, labelled)
    else:
        _check_classes(scan.root, labelled, minimum=2)
        split = _seeded_split(scan, labelled, val_split, seed)
    log.info("%s split of %s: %d classes, %d train, %d val", split.kind, split.root, len(split.classes),
             len(split.train), len(split.val))
    return split


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor | None:
    """Inverse-frequency loss weights (mean 1) when the largest class outnumbers the smallest by 1.5x, else None."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if counts.max() < IMBALANCE_RATIO * counts.min():
        return None
    weights = counts.sum() / (num_classes * counts)
    return torch.tensor(weights, dtype=torch.float32)


def _is_split(records: Sequence[Record]) -> bool:
    """scan_folder labels a train/val root's images by the folder below the split: 'train/<label>/...'."""
    def parts(r: Record) -> list[str]:
        return r.path.split("/")
    return all(len(parts(r)) > 2 and parts(r)[0] in SPLIT_NAMES and parts(r)[1] == r.label for r in records)


def _folder_split(scan: Scan, records: Sequence[Record]) -> Split:
    train = [r for r in records if r.path.startswith("train/")]
    val = [r for r in records if r.path.startswith("val/")]
    _check_classes(scan.root / "train", train, minimum=1)
    classes = tuple(sorted({r.label for r in train}))
    unknown = sorted({r.label for r in val} - set(classes))
    if unknown:
        raise SimimgError(f"{scan.root}/val has classes with no training images ({', '.join(unknown)}); "
                          f"add them under {scan.root}/train or remove them from val")
    if not val:
        raise SimimgError(f"{scan.root}/val holds no images: put validation images in val/<class>/")
    return Split(scan.root, classes, tuple(train), tuple(val), "folders", scan.skipped)


def _seeded_split(scan: Scan, records: Sequence[Record], val_split: float, seed: int) -> Split:
    """Per class, a seeded shuffle; round(n * val_split) images (at least one, never all) validate."""
    rng = np.random.default_rng(seed)
    classes = tuple(sorted({r.label for r in records}))
    train: list[Record] = []
    val: list[Record] = []
    for label in classes:
        members = sorted((r for r in records if r.label == label), key=lambda r: r.path)
        order = rng.permutation(len(members))
        n_val = min(max(1, round(len(members) * val_split)), len(members) - 1)
        val += [members[i] for i in sorted(order[:n_val])]
        train += [members[i] for i in sorted(order[n_val:])]
    return Split(scan.root, classes, tuple(train), tuple(val), "seeded", scan.skipped)


def _check_classes(folder: Path, records: Sequence[Record], minimum: int) -> None:
    """At least two classes, and every class folder holding at least `minimum` images."""
    counts: dict[str, int] = {p.name: 0 for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}
    for r in records:
        counts[r.label] = counts.get(r.label, 0) + 1
    short = sorted(label for label, n in counts.items() if n < minimum)
    if short:
        need = "no images" if minimum == 1 else f"fewer than {minimum} images (one must train, one validate)"
        raise SimimgError(f"class folder(s) {', '.join(short)} in {folder} have {need}: add images or remove "
                          "those folders")
    if len(counts) < 2:
        raise SimimgError(f"{folder} has {len(counts)} class folder(s); a classifier needs at least two: "
                          "put each class's images in its own folder, <folder>/<class>/<image>")
