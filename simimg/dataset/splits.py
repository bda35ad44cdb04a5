"""Training data: the train/val split of a class folder, augmentation, class balance and loaders.

A split comes from `DATA_DIR/{train,val}/<class>/` when those folders exist, from a stratified, seeded split of
`DATA_DIR/train/<class>/` when there is no val/, else from one of `DATA_DIR/<class>/`. Loaders yield uint8 batches;
normalisation happens on the device (see Preprocess).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from simimg.dataset.corrections import Corrections
from simimg.dataset.scan import (
    IMAGE_EXTENSIONS,
    SPLIT_NAMES,
    UNLABELED_FOLDERS,
    Record,
    Scan,
    Skipped,
    scan_folder,
    visible_subfolders,
)
from simimg.errors import SimimgError

log = logging.getLogger(__name__)

IMBALANCE_RATIO = 1.5
VAL_SPLIT = 0.2


@dataclass(frozen=True)
class Split:
    """Which images train and which validate; `kind` is 'folders' (train/ and val/) or 'seeded'.

    `seeded_from` names the split folder a seeded split was drawn from ('train' when there is no val/), else ''.
    """

    root: Path
    classes: tuple[str, ...]
    train: tuple[Record, ...]
    val: tuple[Record, ...]
    kind: str
    skipped: tuple[Skipped, ...] = ()
    seeded_from: str = ""

    def labels(self, records: Sequence[Record]) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[_label(r)] for r in records], dtype=np.int64)

    def files(self, records: Sequence[Record]) -> list[Path]:
        return [self.root / r.path for r in records]

    def describe(self) -> dict[str, Any]:
        """What the bundle records, so `simimg evaluate` can find the same validation images later."""
        return {
            "data_dir": str(self.root.resolve()),
            "kind": self.kind,
            "seeded_from": self.seeded_from,
            "train": len(self.train),
            "val_paths": [r.path for r in self.val],
        }

    def source(self, val_split: float | None = None) -> str:
        """Where the validation images come from, in words for the Train page and the log (with the share if given)."""
        if self.kind == "folders":
            return "train/ and val/ folders"
        share = f" {round(100 * (1 - val_split))}/{round(100 * val_split)}" if val_split else ""
        of = f" of {self.seeded_from}/, as there is no val/ folder" if self.seeded_from else ""
        return f"a seeded{share} split{of}"


@dataclass(frozen=True)
class ClassCount:
    """One class's images that open as images, per side of the split, and the paths of those that do not."""

    label: str
    train: int
    val: int
    unreadable: tuple[str, ...]


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
        tensor: torch.Tensor = self._compose(image)
        return tensor

    @cached_property
    def _compose(self) -> transforms.Compose:
        return transforms.Compose(
            [
                transforms.RandomResizedCrop(self.crop_size, scale=self.scale, antialias=True),
                transforms.RandomHorizontalFlip(),
                transforms.ColorJitter(self.jitter, self.jitter, self.jitter),
                transforms.PILToTensor(),
            ]
        )


def split_dataset(
    data_dir: str | Path, val_split: float = VAL_SPLIT, seed: int = 0, corrections: Corrections | None = None
) -> Split:
    """The split to train on; a folder that cannot train a classifier raises SimimgError saying why.

    `train/` and `val/` are used as they are. `train/` without `val/` gets the seeded, stratified split a plain class
    folder gets, drawn from train/ alone (`seeded_from` 'train'; test/ is never used). `val/` (or `test/`) without
    `train/` has nothing to train on: SimimgError. `corrections` (the index's label edits) relabel and exclude
    images first; the unlabeled pool is never trained or validated on.
    """
    if not 0.0 < val_split < 1.0:
        raise SimimgError(f"--val-split {val_split} must be between 0 and 1 (e.g. 0.2)")
    scan = scan_folder(data_dir)
    records = corrections.apply(scan.records) if corrections else scan.records
    labelled = [r for r in records if r.label is not None]
    if not labelled:
        raise SimimgError(
            f"no images in class folders under {scan.root} (looked for "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}); put them in <folder>/<class>/<image>"
        )
    if len(labelled) < len(records):
        log.info("leaving out %d unlabeled images of %s", len(records) - len(labelled), scan.root)
    if _is_split([r for r in scan.records if r.label is not None]):  # the folders' layout, before any relabel
        split = _folder_split(scan, labelled, val_split, seed)
    else:
        _check_classes(scan.root, labelled, minimum=2)
        split = _seeded_split(scan, labelled, val_split, seed)
    log.info(
        "%s of %s: %d classes, %d train, %d val",
        split.source(val_split),
        split.root,
        len(split.classes),
        len(split.train),
        len(split.val),
    )
    return split


def class_counts(split: Split) -> list[ClassCount]:
    """Per class, the images training will learn from: a file whose header does not open as an image is set apart.

    Only headers are read (cheap, for a preview before training); a truncated image still counts, and the loader
    reports it when training reads it.
    """
    bad = [r for r in split.train + split.val if not opens_as_image(split.root / r.path)]
    bad_paths = {r.path for r in bad}
    train = Counter(r.label for r in split.train if r.path not in bad_paths)
    val = Counter(r.label for r in split.val if r.path not in bad_paths)
    return [ClassCount(c, train[c], val[c], tuple(r.path for r in bad if r.label == c)) for c in split.classes]


def opens_as_image(path: Path) -> bool:
    """Whether Pillow recognises the file from its header (no pixels are decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path):
                return True
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError, EOFError):  # Unidentified is an OSError
        return False


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor | None:
    """Inverse-frequency loss weights (mean 1) when the largest class outnumbers the smallest by 1.5x, else None."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if counts.max() < IMBALANCE_RATIO * counts.min():
        return None
    weights = counts.sum() / (num_classes * counts)
    return torch.tensor(weights, dtype=torch.float32)


def _label(record: Record) -> str:
    """The class of a record in a split: split_dataset keeps only the records in a class folder."""
    assert record.label is not None, record.path
    return record.label


def _is_split(records: Sequence[Record]) -> bool:
    """scan_folder labels a train/val root's images by the folder below the split: 'train/<label>/...'."""

    def parts(r: Record) -> list[str]:
        return r.path.split("/")

    return all(len(parts(r)) > 2 and parts(r)[0] in SPLIT_NAMES and parts(r)[1] == r.label for r in records)


def _folder_split(scan: Scan, records: Sequence[Record], val_split: float, seed: int) -> Split:
    """train/ and val/ as they are; train/ alone is split like a class folder; no train/ images cannot train."""
    train = [r for r in records if r.path.startswith("train/")]
    val = [r for r in records if r.path.startswith("val/")]
    if not train:
        present = ", ".join(sorted({f"{r.path.split('/')[0]}/" for r in records}))
        raise SimimgError(
            f"{scan.root} holds {present} but no train/ folder of images, so there is nothing to train "
            f"on: put training images in {scan.root}/train/<class>/<image> (val/ stays for validation). "
            "To search these images without training, build an index of the folder instead"
        )
    if not val and not (scan.root / "val").is_dir():
        _check_classes(scan.root / "train", train, minimum=2)
        log.info("%s has no val/ folder: validating on a seeded split of train/", scan.root)
        return _seeded_split(scan, train, val_split, seed, seeded_from="train")
    _check_classes(scan.root / "train", train, minimum=1)
    classes = tuple(sorted({_label(r) for r in train}))
    unknown = sorted({_label(r) for r in val} - set(classes))
    if unknown:
        raise SimimgError(
            f"{scan.root}/val has classes with no training images ({', '.join(unknown)}); "
            f"add them under {scan.root}/train or remove them from val"
        )
    if not val:
        raise SimimgError(
            f"{scan.root}/val holds no images: put validation images in val/<class>/, or remove the "
            "empty val/ folder to validate on a seeded split of train/"
        )
    return Split(scan.root, classes, tuple(train), tuple(val), "folders", scan.skipped)


def _seeded_split(scan: Scan, records: Sequence[Record], val_split: float, seed: int, seeded_from: str = "") -> Split:
    """Per class, a seeded shuffle; round(n * val_split) images (at least one, never all) validate."""
    rng = np.random.default_rng(seed)
    classes = tuple(sorted({_label(r) for r in records}))
    train: list[Record] = []
    val: list[Record] = []
    for label in classes:
        members = sorted((r for r in records if r.label == label), key=lambda r: r.path)
        order = rng.permutation(len(members))
        n_val = min(max(1, round(len(members) * val_split)), len(members) - 1)
        val += [members[i] for i in sorted(order[:n_val])]
        train += [members[i] for i in sorted(order[n_val:])]
    return Split(scan.root, classes, tuple(train), tuple(val), "seeded", scan.skipped, seeded_from)


def _check_classes(folder: Path, records: Sequence[Record], minimum: int) -> None:
    """At least two classes, and every class folder holding at least `minimum` images."""
    counts: dict[str, int] = {p.name: 0 for p in visible_subfolders(folder) if p.name not in UNLABELED_FOLDERS}
    for r in records:
        counts[_label(r)] = counts.get(_label(r), 0) + 1
    short = sorted(label for label, n in counts.items() if n < minimum)
    if short:
        need = "no images" if minimum == 1 else f"fewer than {minimum} images (one must train, one validate)"
        raise SimimgError(
            f"class folder(s) {', '.join(short)} in {folder} have {need}: add images or remove those folders"
        )
    if len(counts) < 2:
        raise SimimgError(
            f"{folder} has {len(counts)} class folder(s); a classifier needs at least two: "
            "put each class's images in its own folder, <folder>/<class>/<image>"
        )
