"""The SQLite catalog: id -> file, label, size, mtime, content hash and vector, with published versions.

Rows carry the version that added them and the one that removed them, so a reader that reads one published
version sees exactly that version while a writer prepares the next. Vectors live here too: the FAISS index is a
derived file that can always be rebuilt from the catalog.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from simimg.errors import SimimgError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions(
    version INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL, count INTEGER NOT NULL,
    index_kind TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS images(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL, label TEXT, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL, vector BLOB NOT NULL,
    added INTEGER NOT NULL, removed INTEGER);
CREATE UNIQUE INDEX IF NOT EXISTS images_live_path ON images(path) WHERE removed IS NULL;
CREATE INDEX IF NOT EXISTS images_added ON images(added);
CREATE INDEX IF NOT EXISTS images_removed ON images(removed);
"""
VISIBLE = "added <= :v AND (removed IS NULL OR removed > :v)"


@dataclass(frozen=True)
class Row:
    id: int
    path: str
    label: str | None
    size: int
    mtime_ns: int
    sha256: str


@dataclass(frozen=True)
class NewImage:
    path: str
    label: str | None
    size: int
    mtime_ns: int
    sha256: str
    vector: np.ndarray


@dataclass(frozen=True)
class Snapshot:
    """What one published version holds: ids in order, with their paths and labels."""

    version: int
    fingerprint: str
    index_kind: str
    ids: np.ndarray
    paths: list[str]
    labels: list[str | None]


class Catalog:
    """One SQLite file per index; WAL mode so readers never block the writer, nor it them."""

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly and not self.path.exists():
            raise SimimgError(f"no index catalog at {self.path}: build it with `simimg index`")
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            if not readonly:
                self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:
            raise SimimgError(f"index catalog {self.path} is unreadable ({err}); delete the index folder and rebuild") from None

    def close(self) -> None:
        self.db.close()

    def transaction(self) -> "sqlite3.Connection":
        """`with catalog.transaction():` — BEGIN IMMEDIATE ... COMMIT, rolled back on error."""
        return _Transaction(self.db)

    # --- meta -------------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, **values: object) -> None:
        self.db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                            [(k, str(v)) for k, v in values.items()])

    @property
    def version(self) -> int:
        row = self.db.execute("SELECT MAX(version) FROM versions").fetchone()
        return row[0] or 0

    def version_info(self, version: int) -> tuple[str, int, str] | None:
        """(fingerprint, count, index_kind) of a published version."""
        return self.db.execute("SELECT fingerprint, count, index_kind FROM versions WHERE version=?",
                               (version,)).fetchone()

    # --- the writer's view: the head, published plus pending ---------------------------------
    def head(self) -> dict[str, Row]:
        rows = self.db.execute("SELECT id, path, label, size, mtime_ns, sha256 FROM images WHERE removed IS NULL")
        return {r[1]: Row(*r) for r in rows}

    def add(self, images: Iterable[NewImage], version: int) -> None:
        self.db.executemany(
            "INSERT INTO images(path, label, size, mtime_ns, sha256, vector, added) VALUES (?,?,?,?,?,?,?)",
            [(im.path, im.label, im.size, im.mtime_ns, im.sha256,
              np.ascontiguousarray(im.vector, np.float32).tobytes(), version) for im in images])

    def remove(self, ids: Iterable[int], version: int) -> None:
        """Rows added in the pending version simply go; published ones are marked removed in it."""
        ids = [(int(i), version) for i in ids]
        self.db.executemany("DELETE FROM images WHERE id=? AND added=?", ids)
        self.db.executemany("UPDATE images SET removed=? WHERE id=? AND removed IS NULL",
                            [(v, i) for i, v in ids])

    def touch(self, row_id: int, size: int, mtime_ns: int) -> None:
        """Same content, new timestamp: remember it so the file is not hashed again next time."""
        self.db.execute("UPDATE images SET size=?, mtime_ns=? WHERE id=?", (size, mtime_ns, row_id))

    def discard_pending(self, version: int) -> int:
        """Undo an interrupted run that cannot be resumed (its model changed)."""
        n = self.db.execute("DELETE FROM images WHERE added=?", (version,)).rowcount
        self.db.execute("UPDATE images SET removed=NULL WHERE removed=?", (version,))
        return n

    def retire_published(self, version: int) -> None:
        """Mark every published row removed in `version` (the model changed: all must be re-embedded)."""
        self.db.execute("UPDATE images SET removed=:v WHERE removed IS NULL AND added < :v", {"v": version})

    def count(self, version: int) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM images WHERE {VISIBLE}", {"v": version}).fetchone()[0]

    def pending_changes(self, version: int) -> tuple[int, int]:
        added = self.db.execute("SELECT COUNT(*) FROM images WHERE added=?", (version,)).fetchone()[0]
        removed = self.db.execute("SELECT COUNT(*) FROM images WHERE removed=?", (version,)).fetchone()[0]
        return added, removed

    def vectors(self, version: int, where: str = VISIBLE) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, vectors float32 N x d) of the rows matching `where` at `version`."""
        rows = self.db.execute(f"SELECT id, vector FROM images WHERE {where} ORDER BY id", {"v": version}).fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        if not rows:
            return ids, np.empty((0, 0), np.float32)
        return ids, np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])

    def removed_ids(self, version: int) -> np.ndarray:
        rows = self.db.execute("SELECT id FROM images WHERE removed=?", (version,)).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def publish(self, version: int, fingerprint: str, index_kind: str) -> None:
        """Make `version` the one readers see; forget rows no published version can see any more."""
        self.db.execute("INSERT OR REPLACE INTO versions VALUES (?,?,?,?,?)",
                        (version, fingerprint, self.count(version), index_kind, time.time()))
        self.db.execute("DELETE FROM images WHERE removed IS NOT NULL AND removed < ?", (version,))
        self.db.execute("DELETE FROM versions WHERE version < ?", (version - 1,))

    # --- the readers' view: one published version ---------------------------------------------
    def snapshot(self) -> Snapshot | None:
        """The latest published version and its rows, read in one transaction so they agree."""
        with _Transaction(self.db, "BEGIN"):
            version = self.version
            info = self.version_info(version)
            if info is None:
                return None
            rows = self.db.execute(f"SELECT id, path, label FROM images WHERE {VISIBLE} ORDER BY id",
                                   {"v": version}).fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        return Snapshot(version, info[0], info[2], ids, [r[1] for r in rows], [r[2] for r in rows])

    def label_counts(self, version: int) -> dict[str, int]:
        rows = self.db.execute(f"SELECT COALESCE(label, ''), COUNT(*) FROM images WHERE {VISIBLE} GROUP BY 1",
                               {"v": version})
        return {label: n for label, n in rows}

    def iter_rows(self, version: int) -> Iterator[Row]:
        rows = self.db.execute(f"SELECT id, path, label, size, mtime_ns, sha256 FROM images WHERE {VISIBLE} "
                               "ORDER BY id", {"v": version})
        return (Row(*r) for r in rows)


class _Transaction:
    def __init__(self, db: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> None:
        self.db, self.begin = db, begin

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute(self.begin)
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
