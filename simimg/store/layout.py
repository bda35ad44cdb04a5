"""Where an index's files live: HOME/NAME/{catalog.sqlite, vectors/, models/<fingerprint>/, index-V.faiss, ...}."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from simimg.errors import SimimgError

LISTS_SUFFIX = ".ivfdata"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def resolve_home(home: str | Path | None = None) -> Path:
    """--home, else $SIMIMG_HOME, else ./indexes."""
    return Path(home or os.environ.get("SIMIMG_HOME") or "indexes").expanduser()


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise SimimgError(f"index name {name!r} is not allowed: use letters, digits, '.', '_' and '-' (no slashes)")
    return name


@dataclass(frozen=True)
class IndexFolder:
    """The files of one named index: its catalog, vectors, FAISS files, every model it keeps, its job records."""

    root: Path

    @classmethod
    def of(cls, home: str | Path | None, name: str) -> IndexFolder:
        return cls(resolve_home(home) / check_name(name))

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.sqlite"

    @property
    def vectors(self) -> Path:
        return self.root / "vectors"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def model_dir(self, fingerprint: str) -> Path:
        return self.models / fingerprint

    def export_dir(self, fingerprint: str) -> Path:
        """Files written from a kept model for use elsewhere (ONNX, zipped bundle); they go with the model."""
        return self.root / "exports" / fingerprint

    @property
    def lock(self) -> Path:
        """Held by whoever writes the catalog, vectors or FAISS files (`simimg index`, the end of `simimg train`)."""
        return self.root / "writer.lock"

    @property
    def train_lock(self) -> Path:
        """Held for a whole training run: one at a time per index, while readers and index runs go on."""
        return self.root / "train.lock"

    @property
    def checkpoint(self) -> Path:
        return self.root / "train_checkpoint.pt"

    @property
    def runs(self) -> Path:
        """Where `simimg index --engine ray` keeps a run's manifest and Parquet shards until it is published."""
        return self.root / "runs"

    @property
    def index_job(self) -> Path:
        return self.root / "index_job.json"

    @property
    def audit(self) -> Path:
        """The last `simimg audit` report of a folder with this index's model (auditing.py)."""
        return self.root / "audit.json"

    def faiss(self, version: int) -> Path:
        return self.root / f"index-{version:06d}.faiss"

    def faiss_files(self) -> list[Path]:
        return sorted(self.root.glob("index-*.faiss"))

    def lists(self, version: int) -> Path:
        """The inverted lists of a version whose compressed index keeps them on disk (`--on-disk`)."""
        return lists_file(self.faiss(version))

    def list_files(self) -> list[Path]:
        return sorted(self.root.glob(f"index-*{LISTS_SUFFIX}"))


def lists_file(faiss_file: Path) -> Path:
    """Where a FAISS file's on-disk lists live: beside it, same name, so a folder moves as a whole."""
    return faiss_file.with_suffix(LISTS_SUFFIX)


def list_indexes(home: str | Path | None = None) -> list[IndexFolder]:
    """Named indexes under HOME that hold a catalog, newest first; a folder left by a failed first run is not one."""
    home = resolve_home(home)
    if not home.is_dir():
        return []
    found = [
        IndexFolder(p)
        for p in home.iterdir()
        if p.is_dir() and NAME_PATTERN.match(p.name) and (p / "catalog.sqlite").exists()
    ]
    return sorted(found, key=_last_modified, reverse=True)


def _last_modified(folder: IndexFolder) -> float:
    """When the index last changed: its catalog and FAISS files (a writer's temporary files come and go)."""
    times = []
    for path in (folder.catalog, folder.catalog.with_name("catalog.sqlite-wal"), *folder.faiss_files()):
        try:
            times.append(path.stat().st_mtime)
        except OSError:
            continue
    return max(times, default=0.0)
