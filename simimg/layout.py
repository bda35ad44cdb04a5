"""Where an index's files live: HOME/NAME/{model.json, model.safetensors, catalog.sqlite, index-V.faiss, ...}."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from simimg.errors import SimimgError

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
    """The files of one named index; the folder doubles as its model bundle folder."""

    root: Path

    @classmethod
    def of(cls, home: str | Path | None, name: str) -> "IndexFolder":
        return cls(resolve_home(home) / check_name(name))

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.sqlite"

    @property
    def lock(self) -> Path:
        return self.root / "writer.lock"

    @property
    def index_job(self) -> Path:
        return self.root / "index_job.json"

    @property
    def train_job(self) -> Path:
        return self.root / "train_job.json"

    def faiss(self, version: int) -> Path:
        return self.root / f"index-{version:06d}.faiss"

    def faiss_files(self) -> list[Path]:
        return sorted(self.root.glob("index-*.faiss"))


def list_indexes(home: str | Path | None = None) -> list[IndexFolder]:
    """Named indexes under HOME that hold a catalog or a model, newest first."""
    home = resolve_home(home)
    if not home.is_dir():
        return []
    found = [IndexFolder(p) for p in home.iterdir() if p.is_dir() and NAME_PATTERN.match(p.name)
             and ((p / "catalog.sqlite").exists() or (p / "model.json").exists())]
    return sorted(found, key=_last_modified, reverse=True)


def _last_modified(paths: IndexFolder) -> float:
    return max((f.stat().st_mtime for f in paths.root.iterdir() if f.is_file()), default=0.0)
