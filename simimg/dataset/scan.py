"""Find the images under a folder in ImageFolder layout: root/<class>/<file>, or root/<split>/<class>/<file>."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from simimg.errors import SimimgError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
SPLIT_NAMES = frozenset({"train", "val", "test"})


@dataclass(frozen=True)
class Record:
    """One image file: its path relative to the scanned root (POSIX) and its class, if any."""

    path: str
    label: str | None


@dataclass(frozen=True)
class Skipped:
    """A file that was passed over, with the reason a user can act on."""

    path: str
    reason: str


@dataclass(frozen=True)
class Scan:
    root: Path
    records: tuple[Record, ...]
    skipped: tuple[Skipped, ...]

    @property
    def labels(self) -> list[str]:
        return sorted({r.label for r in self.records if r.label is not None})


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def scan_folder(root: str | Path) -> Scan:
    """Walk `root` once, following links but never a loop; files in `root` itself get no label.

    A root holding only split folders (train/, val/, test/) is read as a split dataset when they hold class folders
    (or are train/ and val/ together): the class is the folder below the split, so `val/` alone is still labelled.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SimimgError(f"{root} is not a folder: point simimg at a folder of images (root/<class>/<image>)")
    records: list[Record] = []
    skipped: list[Skipped] = []
    depth = 2 if _is_split_root(root) else 1
    real_root = root.resolve()
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=_log_walk_error):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            skipped.append(Skipped(rel_dir, "folder link loop: this folder was already scanned"))
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = _subfolders_to_walk(Path(dirpath), dirnames, real_root)
        for name in sorted(filenames):
            if not is_image_name(name):
                continue
            full = Path(dirpath) / name
            rel = full.relative_to(root)
            if not full.exists():
                skipped.append(Skipped(rel.as_posix(), "broken symbolic link"))
                continue
            parts = rel.parts
            label = parts[depth - 1] if len(parts) > depth else None
            records.append(Record(rel.as_posix(), label))
    log.info("scanned %s: %d images, %d skipped", root, len(records), len(skipped))
    return Scan(root, tuple(records), tuple(skipped))


def visible_subfolders(folder: Path) -> list[Path]:
    """Subfolders (links followed) other than hidden ones such as .ipynb_checkpoints; none when unreadable."""
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as err:
        log.warning("cannot read folder %s: %s", folder, err.strerror or err)
        return []


def _subfolders_to_walk(parent: Path, names: list[str], real_root: Path) -> list[str]:
    """Skip hidden folders, and links back into the collection, whose images are found by their real path."""
    keep = []
    for name in sorted(names):
        path = parent / name
        if name.startswith("."):
            continue
        if path.is_symlink() and path.resolve().is_relative_to(real_root):
            log.info("not following %s: it links back into the collection", path)
            continue
        keep.append(name)
    return keep


def _is_split_root(root: Path) -> bool:
    """Nothing but split folders, which hold class folders; train/ with val/ counts even without (as it always did)."""
    splits = visible_subfolders(root)
    names = {p.name for p in splits}
    if not names or not names <= SPLIT_NAMES:
        return False
    return {"train", "val"} <= names or any(visible_subfolders(p) for p in splits)


def _log_walk_error(err: OSError) -> None:
    log.warning("cannot read folder %s: %s", err.filename, err.strerror)
