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
UNLABELED_FOLDERS = frozenset({"unlabeled", "_unlabeled"})  # beside the class (or split) folders: the unlabeled pool


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


def scan_folder(root: str | Path, unlabeled: str | Path | None = None) -> Scan:
    """Walk `root` once, following links but never a loop; files in `root` itself get no label.

    A root holding only split folders (train/, val/, test/) is read as a split dataset when they hold class folders
    (or are train/ and val/ together): the class is the folder below the split, so `val/` alone is still labelled.
    The unlabeled pool gets no label: an `unlabeled/` (or `_unlabeled/`) folder beside the class or split folders,
    and every image under `unlabeled`, a folder elsewhere, whose records carry absolute paths (`root / path` reads
    them all the same).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SimimgError(f"{root} is not a folder: point simimg at a folder of images (root/<class>/<image>)")
    records: list[Record] = []
    skipped: list[Skipped] = []
    depth = label_depth(root)
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
            records.append(Record(rel.as_posix(), folder_label(rel.parts, depth)))
    if unlabeled is not None:
        records += _outside_pool(Path(unlabeled).expanduser(), real_root, skipped)
    log.info("scanned %s: %d images, %d skipped", root, len(records), len(skipped))
    return Scan(root, tuple(records), tuple(skipped))


def folder_label(parts: tuple[str, ...], depth: int) -> str | None:
    """The class folder's name; None for files above it and for the unlabeled pool."""
    if len(parts) <= depth or parts[0] in UNLABELED_FOLDERS or parts[depth - 1] in UNLABELED_FOLDERS:
        return None
    return parts[depth - 1]


def _outside_pool(folder: Path, real_root: Path, skipped: list[Skipped]) -> list[Record]:
    """The images of an unlabeled folder passed on its own, by absolute path; those inside the collection are
    already scanned, under their own path."""
    if folder.resolve().is_relative_to(real_root):
        raise SimimgError(f"--unlabeled {folder} is inside the collection: name it unlabeled/ there instead")
    pool = scan_folder(folder)
    base = folder.resolve()
    skipped += [Skipped((base / s.path).as_posix(), s.reason) for s in pool.skipped]
    return [Record((base / r.path).as_posix(), None) for r in pool.records]


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


def label_depth(root: Path) -> int:
    """How deep the class folder sits: 2 under split folders (root/train/<class>/...), else 1."""
    return 2 if _is_split_root(root) else 1


def _is_split_root(root: Path) -> bool:
    """Nothing but split folders, which hold class folders; train/ with val/ counts even without (as it always did)."""
    splits = [p for p in visible_subfolders(root) if p.name not in UNLABELED_FOLDERS]
    names = {p.name for p in splits}
    if not names or not names <= SPLIT_NAMES:
        return False
    return {"train", "val"} <= names or any(visible_subfolders(p) for p in splits)


def _log_walk_error(err: OSError) -> None:
    log.warning("cannot read folder %s: %s", err.filename, err.strerror)
