"""The catalog: one SQLite file of images (path, label, size, mtime, content hash) and published versions, plus
the embedding vectors of every model the index keeps, in append-only shard files beside it (vectors.py).

Image rows carry the version that added them and the one that removed them, so a reader that reads one published
version sees exactly that version while a writer prepares the next. A vector belongs to an (image, embedding)
pair, so a new model's vectors can be written while readers keep using the old model's, and switching back to a
kept model re-embeds only the images it has no vector for. The FAISS files are derived and can always be rebuilt
from the catalog.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import overload

import numpy as np

from simimg.errors import SimimgError
from simimg.store.checksums import row_checksums
from simimg.store.vectors import ShardReader, StoredVectors, append_rows, remove_stray_files, rows_per_shard, shard_path

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# label edits (store/edits.py): a batch is one user action; undone batches stay, marked, for the record. Created on
# the first write to a catalog that lacks them (an index made before them reads as having no edits).
EDITS_SCHEMA = """
CREATE TABLE IF NOT EXISTS edit_batches(
    batch INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, created REAL NOT NULL, undone REAL);
CREATE TABLE IF NOT EXISTS edits(
    id INTEGER PRIMARY KEY AUTOINCREMENT, batch INTEGER NOT NULL, path TEXT NOT NULL, action TEXT NOT NULL,
    old_label TEXT, new_label TEXT, source TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS edits_path ON edits(path);
"""
# checksums (store/checksums.py): of each vector row, by where it lies (shard rows are written once), and of each
# published version's FAISS files. Created on the first write to a catalog that lacks them; rows and versions
# written before have none, and `simimg verify` says so.
CHECKSUM_SCHEMA = """
CREATE TABLE IF NOT EXISTS row_checksums(
    shard INTEGER NOT NULL, row INTEGER NOT NULL, crc INTEGER NOT NULL, PRIMARY KEY(shard, row)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS version_checksums(version INTEGER PRIMARY KEY, faiss INTEGER, lists INTEGER);
"""
SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions(
    version INTEGER PRIMARY KEY, model TEXT NOT NULL, embedding TEXT NOT NULL, count INTEGER NOT NULL,
    index_kind TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS images(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL, label TEXT, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL,
    added INTEGER NOT NULL, removed INTEGER);
CREATE UNIQUE INDEX IF NOT EXISTS images_live_path ON images(path) WHERE removed IS NULL;
CREATE INDEX IF NOT EXISTS images_added ON images(added);
CREATE INDEX IF NOT EXISTS images_removed ON images(removed);
CREATE TABLE IF NOT EXISTS embeddings(id INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL UNIQUE, dim INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS shards(
    id INTEGER PRIMARY KEY AUTOINCREMENT, embedding INTEGER NOT NULL, rows INTEGER NOT NULL, live INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS vectors(
    embedding INTEGER NOT NULL, image INTEGER NOT NULL, shard INTEGER NOT NULL, row INTEGER NOT NULL,
    PRIMARY KEY(embedding, image)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS vectors_image ON vectors(image);
"""
    + EDITS_SCHEMA
    + CHECKSUM_SCHEMA
)
VISIBLE = "added <= :v AND (removed IS NULL OR removed > :v)"
COMPACT_BELOW = 0.5  # rewrite a shard once fewer than half its rows are still pointed to


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


@dataclass(frozen=True)
class Published:
    """A published version: which model answers for it, with which embedding, over how many images."""

    version: int
    model: str
    embedding: str
    count: int
    index_kind: str


@dataclass(frozen=True)
class Snapshot:
    """What one published version holds: ids in order, with their paths, labels and content hashes."""

    version: int
    model: str
    embedding: str
    index_kind: str
    ids: np.ndarray
    paths: list[str]
    labels: list[str | None]
    sha256: list[str]


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None


def read_only_uri(path: Path) -> str:
    """A read-only connection's URI. In a folder nobody can write (a read-only file system, a mount of a colleague's
    home), SQLite cannot make the WAL index file (-shm) that even a reader needs, so the file is opened as
    immutable: no writer can be there to change it. An immutable reader does not see a -wal file's pages, so one
    left with pages by a writer that never closed (a crash) is refused rather than read as an older state."""
    if writable(path.parent):
        return f"file:{path}?mode=ro"
    wal = path.with_name(path.name + "-wal")
    unmerged = wal.stat().st_size if wal.is_file() else 0
    if unmerged:
        raise SimimgError(
            f"index catalog {path} holds changes its last writer did not merge ({wal.name}, {unmerged} "
            "bytes), which cannot be read while its folder cannot be written: run `simimg index` on it once where "
            "the folder is writable, or copy the index folder somewhere writable and read it there"
        )
    return f"file:{path}?mode=ro&immutable=1"


def writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


class Catalog:
    """One SQLite file per index (WAL: readers never block the writer, nor it them) and its vector shards."""

    def __init__(self, path: str | Path, readonly: bool = False, legacy: bool = False) -> None:
        """`legacy` opens an older catalog as it is, for `simimg upgrade` alone."""
        self.path = Path(path)
        self.vectors_dir = self.path.parent / "vectors"
        self.readonly = readonly
        self.shard_reader = ShardReader(self.vectors_dir)
        if readonly and not self.path.exists():
            raise SimimgError(f"no index catalog at {self.path}: build it with `simimg index`")
        try:
            if legacy:
                self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
                return
            if readonly:
                self.db = sqlite3.connect(
                    read_only_uri(self.path), uri=True, timeout=30, isolation_level=None, check_same_thread=False
                )
                if not _has_table(self.db, "meta"):  # a first run killed before it made its tables left the file
                    self.db.close()
                    raise SimimgError(
                        f"index '{self.path.parent.name}' has no finished version yet: run `simimg index` on it"
                    )
            else:
                self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                if not _has_table(self.db, "images"):  # a new catalog: tables and schema mark in one transaction
                    self.db.executescript(
                        f"BEGIN IMMEDIATE; {SCHEMA} INSERT OR REPLACE INTO meta VALUES "
                        f"('schema', '{SCHEMA_VERSION}'); COMMIT;"
                    )
                elif not (_has_table(self.db, "edits") and _has_table(self.db, "version_checksums")):
                    self.db.executescript(f"BEGIN IMMEDIATE; {EDITS_SCHEMA} {CHECKSUM_SCHEMA} COMMIT;")
            self._check_schema()
        except sqlite3.DatabaseError as err:
            raise SimimgError(
                f"index catalog {self.path} is unreadable ({err}); delete the index folder and rebuild"
            ) from None

    @staticmethod
    def initialised(path: Path) -> bool:
        """Whether `path` holds a catalog's tables: a first run killed right after creating the file leaves none."""
        if not path.is_file():
            return False
        db = sqlite3.connect(read_only_uri(path), uri=True, timeout=30)
        try:
            return _has_table(db, "meta")
        finally:
            db.close()

    def _check_schema(self) -> None:
        schema = self.get_meta("schema")
        if schema != str(SCHEMA_VERSION):
            raise SimimgError(
                f"index catalog {self.path} was written by another version of simimg (schema "
                f"{schema or 1}, this one reads {SCHEMA_VERSION}); run `simimg upgrade --name "
                f"{self.path.parent.name}` to convert it"
            )

    def close(self) -> None:
        self.db.close()

    def transaction(self) -> _Transaction:
        """`with catalog.transaction():` — BEGIN IMMEDIATE ... COMMIT, rolled back on error."""
        return _Transaction(self.db)

    # --- meta and versions ----------------------------------------------------------------------
    @overload
    def get_meta(self, key: str, default: str) -> str: ...
    @overload
    def get_meta(self, key: str, default: str | None = None) -> str | None: ...
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        except sqlite3.OperationalError:  # a catalog without a meta table is not one of ours
            return default
        return row[0] if row else default

    def set_meta(self, **values: object) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", [(k, str(v)) for k, v in values.items()]
        )

    @property
    def version(self) -> int:
        row = self.db.execute("SELECT MAX(version) FROM versions").fetchone()
        return row[0] or 0

    def published(self, version: int | None = None) -> Published | None:
        """The latest published version (or `version`), None before the first publish."""
        version = self.version if version is None else version
        row = self.db.execute(
            "SELECT version, model, embedding, count, index_kind FROM versions WHERE version=?", (version,)
        ).fetchone()
        return Published(*row) if row else None

    def kept_versions(self) -> list[Published]:
        rows = self.db.execute("SELECT version, model, embedding, count, index_kind FROM versions ORDER BY version")
        return [Published(*r) for r in rows]

    # --- the writer's view: the head, published plus pending ---------------------------------
    def head(self) -> dict[str, Row]:
        rows = self.db.execute("SELECT id, path, label, size, mtime_ns, sha256 FROM images WHERE removed IS NULL")
        return {r[1]: Row(*r) for r in rows}

    def add(self, images: Sequence[NewImage], vectors: np.ndarray, embedding: str, version: int) -> list[int]:
        """New image rows in the pending `version`, each with its vector; inside a transaction."""
        ids = [
            self.db.execute(
                "INSERT INTO images(path, label, size, mtime_ns, sha256, added) VALUES (?,?,?,?,?,?) RETURNING id",
                (im.path, im.label, im.size, im.mtime_ns, im.sha256, version),
            ).fetchone()[0]
            for im in images
        ]
        self.add_vectors(embedding, ids, vectors)
        return ids

    def add_vectors(self, embedding: str, ids: Sequence[int], vectors: np.ndarray) -> None:
        """Vectors of `embedding` for existing image rows; inside a transaction, so the rows commit with them."""
        if not len(ids):
            return
        emb = self._embedding_id(embedding, vectors.shape[1])
        shard, committed = self._open_shard(emb, vectors.shape[1])
        room = rows_per_shard(vectors.shape[1]) - committed
        if room < len(ids):  # fill this shard, the rest starts the next one
            self.add_vectors(embedding, ids[:room], vectors[:room])
            return self.add_vectors(embedding, ids[room:], vectors[room:])
        append_rows(shard_path(self.vectors_dir / embedding, shard), committed, vectors)
        self.db.executemany(
            "INSERT OR REPLACE INTO vectors(embedding, image, shard, row) VALUES (?,?,?,?)",
            [(emb, int(i), shard, committed + n) for n, i in enumerate(ids)],
        )
        self.db.executemany(
            "INSERT OR REPLACE INTO row_checksums(shard, row, crc) VALUES (?,?,?)",
            [(shard, committed + n, crc) for n, crc in enumerate(row_checksums(vectors))],
        )
        self.db.execute("UPDATE shards SET rows = rows + ?, live = live + ? WHERE id=?", (len(ids), len(ids), shard))

    def remove(self, ids: Iterable[int], version: int) -> None:
        """Rows added in the pending version simply go; published ones are marked removed in it."""
        ids = [int(i) for i in ids]
        added = {i: self.db.execute("SELECT added FROM images WHERE id=?", (i,)).fetchone() for i in ids}
        fresh = [i for i in ids if added[i] == (version,)]
        self._drop_vectors_of(fresh)
        self.db.executemany("DELETE FROM images WHERE id=?", [(i,) for i in fresh])
        self.db.executemany("UPDATE images SET removed=? WHERE id=? AND removed IS NULL", [(version, i) for i in ids])

    def relabel(self, changes: Iterable[tuple[int, str | None]], version: int) -> None:
        """New labels for head rows in the pending `version`: each gets a new row pointing at the same vectors (the
        old one leaves at `version`), so readers of the published version keep its labels."""
        for row_id, label in changes:
            old = self.db.execute("SELECT path, size, mtime_ns, sha256 FROM images WHERE id=?", (row_id,)).fetchone()
            vectors = self.db.execute("SELECT embedding, shard, row FROM vectors WHERE image=?", (row_id,)).fetchall()
            self.remove([row_id], version)  # first: a path is live once; a row new in `version` goes whole
            (new_id,) = self.db.execute(
                "INSERT INTO images(path, label, size, mtime_ns, sha256, added) VALUES (?,?,?,?,?,?) RETURNING id",
                (old[0], label, old[1], old[2], old[3], version),
            ).fetchone()
            self.db.executemany(
                "INSERT INTO vectors(embedding, image, shard, row) VALUES (?,?,?,?)",
                [(emb, new_id, shard, row) for emb, shard, row in vectors],
            )
            self.db.executemany("UPDATE shards SET live = live + 1 WHERE id=?", [(shard,) for _, shard, _ in vectors])

    def touch(self, row_id: int, size: int, mtime_ns: int) -> None:
        """Same content, new timestamp: remember it so the file is not hashed again next time."""
        self.db.execute("UPDATE images SET size=?, mtime_ns=? WHERE id=?", (size, mtime_ns, row_id))

    def missing_vectors(self, version: int, embedding: str) -> list[Row]:
        """Rows visible at `version` that have no vector of `embedding` yet (after a model change, or a crash)."""
        rows = self.db.execute(
            f"SELECT id, path, label, size, mtime_ns, sha256 FROM images WHERE {VISIBLE} AND id NOT IN "
            "(SELECT image FROM vectors WHERE embedding=(SELECT id FROM embeddings WHERE fingerprint=:e)) ORDER BY id",
            {"v": version, "e": embedding},
        )
        return [Row(*r) for r in rows]

    def count(self, version: int) -> int:
        count: int = self.db.execute(f"SELECT COUNT(*) FROM images WHERE {VISIBLE}", {"v": version}).fetchone()[0]
        return count

    def pending_changes(self, version: int) -> tuple[int, int]:
        added = self.db.execute("SELECT COUNT(*) FROM images WHERE added=?", (version,)).fetchone()[0]
        removed = self.db.execute("SELECT COUNT(*) FROM images WHERE removed=?", (version,)).fetchone()[0]
        return added, removed

    def removed_ids(self, version: int) -> np.ndarray:
        rows = self.db.execute("SELECT id FROM images WHERE removed=?", (version,)).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def vectors(self, version: int, embedding: str, where: str = VISIBLE) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, vectors float32 N x d) of the rows matching `where` at `version`, in id order."""
        rows = self.db.execute(
            f"SELECT i.id, v.shard, v.row FROM images i JOIN vectors v ON v.image = i.id AND "
            f"v.embedding = (SELECT id FROM embeddings WHERE fingerprint=:e) WHERE {where} ORDER BY i.id",
            {"v": version, "e": embedding},
        ).fetchall()
        return self._gather(embedding, rows)

    def vectors_for_ids(self, embedding: str, ids: np.ndarray) -> np.ndarray:
        """Vectors of `embedding` for these image ids, in the order given (an exact re-rank's candidates)."""
        emb = self.db.execute("SELECT id FROM embeddings WHERE fingerprint=?", (embedding,)).fetchone()
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(
            f"SELECT image, shard, row FROM vectors WHERE embedding=? AND image IN ({marks})",
            (emb[0] if emb else -1, *map(int, ids)),
        ).fetchall()
        found_ids, vectors = self._gather(embedding, rows)
        where = {int(i): n for n, i in enumerate(found_ids)}
        if len(where) != len(ids):
            raise SimimgError(f"the catalog has no {embedding} vector for some of ids {list(ids)[:5]}")
        return vectors[[where[int(i)] for i in ids]]

    def stored_vectors(self, version: int, embedding: str, where: str = VISIBLE) -> StoredVectors:
        """The vectors of `embedding` of the rows matching `where` (visible) at `version`, by id, memory-mapped
        (nothing read until asked for).

        SimimgError when a shard has gone meanwhile (a writer compacted after a newer version): read again.
        """
        rows = np.array(
            self.db.execute(
                f"SELECT i.id, v.shard, v.row FROM images i JOIN vectors v ON v.image = i.id AND "
                f"v.embedding = (SELECT id FROM embeddings WHERE fingerprint=:e) WHERE {where}",
                {"v": version, "e": embedding},
            ).fetchall(),
            dtype=np.int64,
        ).reshape(-1, 3)
        dim = self.db.execute("SELECT dim FROM embeddings WHERE fingerprint=?", (embedding,)).fetchone()
        try:
            return StoredVectors(self.vectors_dir, embedding, dim[0] if dim else 0, rows[:, 0], rows[:, 1], rows[:, 2])
        except FileNotFoundError as err:
            raise SimimgError(f"a vector shard of version {version} has gone ({err}); read the newer version") from None

    def _gather(self, embedding: str, rows: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        if not rows:
            return ids, np.empty((0, 0), np.float32)
        locations = np.array([(r[1], r[2]) for r in rows], dtype=np.int64)
        dim = self.db.execute("SELECT dim FROM embeddings WHERE fingerprint=?", (embedding,)).fetchone()[0]
        return ids, self.shard_reader.gather(embedding, dim, locations[:, 0], locations[:, 1])

    def publish(
        self,
        version: int,
        model: str,
        embedding: str,
        index_kind: str,
        checksums: tuple[int | None, int | None] = (None, None),
    ) -> None:
        """Make `version` the one readers see, with the checksums of its FAISS file and list file (None: it has
        none); forget rows and versions no kept version can see any more."""
        self.db.execute(
            "INSERT OR REPLACE INTO versions VALUES (?,?,?,?,?,?)",
            (version, model, embedding, self.count(version), index_kind, time.time()),
        )
        self.db.execute("INSERT OR REPLACE INTO version_checksums VALUES (?,?,?)", (version, *checksums))
        self.db.execute("DELETE FROM version_checksums WHERE version < ?", (version - 1,))
        gone = [
            r[0] for r in self.db.execute("SELECT id FROM images WHERE removed IS NOT NULL AND removed < ?", (version,))
        ]
        self._drop_vectors_of(gone)
        self.db.execute("DELETE FROM images WHERE removed IS NOT NULL AND removed < ?", (version,))
        self.db.execute("DELETE FROM versions WHERE version < ?", (version - 1,))

    def _drop_vectors_of(self, ids: list[int]) -> None:
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            marks = ",".join("?" * len(chunk))
            self.db.execute(
                f"UPDATE shards SET live = live - (SELECT COUNT(*) FROM vectors v WHERE v.shard = "
                f"shards.id AND v.image IN ({marks})) WHERE id IN (SELECT shard FROM vectors WHERE "
                f"image IN ({marks}))",
                chunk + chunk,
            )
            self.db.execute(f"DELETE FROM vectors WHERE image IN ({marks})", chunk)

    # --- housekeeping, by the writer -----------------------------------------------------------
    def drop_embeddings(self, keep: set[str]) -> list[str]:
        """Forget the vectors of every embedding not in `keep`; their files go with `clean_files`."""
        gone = [fp for (fp,) in self.db.execute("SELECT fingerprint FROM embeddings") if fp not in keep]
        for fp in gone:
            (emb,) = self.db.execute("SELECT id FROM embeddings WHERE fingerprint=?", (fp,)).fetchone()
            self.db.execute("DELETE FROM vectors WHERE embedding=?", (emb,))
            its_shards = "SELECT id FROM shards WHERE embedding=?"
            self.db.execute(f"DELETE FROM row_checksums WHERE shard IN ({its_shards})", (emb,))
            self.db.execute("DELETE FROM shards WHERE embedding=?", (emb,))
            self.db.execute("DELETE FROM embeddings WHERE id=?", (emb,))
        return gone

    def compact(self) -> int:
        """Rewrite shards that are mostly dead rows into the current shard of their embedding; returns how many."""
        sparse = self.db.execute(
            "SELECT s.id, e.fingerprint, e.dim FROM shards s JOIN embeddings e ON e.id = s.embedding "
            "WHERE s.live < ? * s.rows AND s.id < (SELECT MAX(id) FROM shards t WHERE t.embedding = s.embedding)",
            (COMPACT_BELOW,),
        ).fetchall()
        for shard, fp, dim in sparse:
            rows = self.db.execute(
                "SELECT image, shard, row FROM vectors WHERE shard=? ORDER BY image", (shard,)
            ).fetchall()
            ids, vectors = self._gather(fp, rows)
            if self.bad_rows(shard, [r[2] for r in rows], vectors.reshape(len(ids), dim)):
                log.warning("shard %d holds damaged rows: left as it is for `simimg verify --repair`", shard)
                continue
            self.db.execute("DELETE FROM vectors WHERE shard=?", (shard,))
            self.db.execute("DELETE FROM row_checksums WHERE shard=?", (shard,))
            self.db.execute("DELETE FROM shards WHERE id=?", (shard,))
            self.add_vectors(fp, ids.tolist(), vectors.reshape(len(ids), dim))
        return len(sparse)

    def bad_rows(self, shard: int, rows: Sequence[int], vectors: np.ndarray) -> list[int]:
        """Those of `rows` of `shard` whose bytes (`vectors`, in that order) differ from their recorded checksum;
        rows without one (written before checksums) pass."""
        recorded = dict(self.db.execute("SELECT row, crc FROM row_checksums WHERE shard=?", (shard,)).fetchall())
        return [row for row, crc in zip(rows, row_checksums(vectors)) if recorded.get(row, crc) != crc]

    def vector_locations(self) -> list[tuple[str, int, int, int, int | None, str]]:
        """Every stored vector row, shard by shard: (embedding, dim, shard, row, recorded checksum or None, path of
        an image it belongs to); a row shared by relabelled image rows comes once per path."""
        checksums = "c.crc" if _has_table(self.db, "row_checksums") else "NULL"
        join = "LEFT JOIN row_checksums c ON c.shard = v.shard AND c.row = v.row" if checksums == "c.crc" else ""
        return self.db.execute(
            f"SELECT DISTINCT e.fingerprint, e.dim, v.shard, v.row, {checksums}, i.path FROM vectors v "
            f"JOIN embeddings e ON e.id = v.embedding JOIN images i ON i.id = v.image {join} ORDER BY v.shard, v.row"
        ).fetchall()

    def version_checksums(self, version: int) -> tuple[int | None, int | None] | None:
        """The recorded checksums of a version's FAISS file and list file; None: none were recorded."""
        if not _has_table(self.db, "version_checksums"):
            return None
        row = self.db.execute("SELECT faiss, lists FROM version_checksums WHERE version=?", (version,)).fetchone()
        return None if row is None else (row[0], row[1])

    def forget_vectors_at(self, locations: Iterable[tuple[int, int]]) -> int:
        """Drop the vectors stored at these (shard, row) locations (damaged ones), so the next index run embeds
        their images again; inside a transaction. Returns how many image rows lost a vector."""
        lost = 0
        for shard, row in locations:
            gone = self.db.execute("DELETE FROM vectors WHERE shard=? AND row=?", (shard, row)).rowcount
            self.db.execute("DELETE FROM row_checksums WHERE shard=? AND row=?", (shard, row))
            self.db.execute("UPDATE shards SET live = MAX(live - ?, 0) WHERE id=?", (gone, shard))
            lost += gone
        return lost

    def clean_files(self) -> int:
        """Delete shard files no catalog row points to (call after a commit: committed rows are the truth)."""
        committed: dict[str, set[int]] = {}
        rows = self.db.execute("SELECT e.fingerprint, s.id FROM shards s JOIN embeddings e ON e.id = s.embedding")
        for fp, shard in rows:
            committed.setdefault(fp, set()).add(shard)
        self.shard_reader.forget()
        return remove_stray_files(self.vectors_dir, committed)

    def _embedding_id(self, fingerprint: str, dim: int) -> int:
        self.db.execute("INSERT OR IGNORE INTO embeddings(fingerprint, dim) VALUES (?, ?)", (fingerprint, dim))
        emb: int = self.db.execute("SELECT id FROM embeddings WHERE fingerprint=?", (fingerprint,)).fetchone()[0]
        return emb

    def _open_shard(self, emb: int, dim: int) -> tuple[int, int]:
        """(shard id, committed rows) of the embedding's current shard, starting a new one when it is full."""
        row = self.db.execute(
            "SELECT id, rows FROM shards WHERE embedding=? ORDER BY id DESC LIMIT 1", (emb,)
        ).fetchone()
        if row is None or row[1] >= rows_per_shard(dim):
            shard = self.db.execute(
                "INSERT INTO shards(embedding, rows, live) VALUES (?, 0, 0) RETURNING id", (emb,)
            ).fetchone()[0]
            return shard, 0
        shard, rows = row
        return shard, rows

    # --- the readers' view: one published version ---------------------------------------------
    def snapshot(self, version: int | None = None) -> Snapshot | None:
        """The latest published version (or a kept `version`) and its rows, read in one transaction so they agree."""
        with _Transaction(self.db, "BEGIN"):
            return self._snapshot(version)

    def snapshot_with_vectors(self) -> tuple[Snapshot, np.ndarray] | None:
        """The latest published version and the vectors of its rows (same order), as one consistent read.

        A writer may compact or prune shards after the read; the files a read points to then may be gone, and
        the read starts again from the newer version.
        """
        for _ in range(5):
            with _Transaction(self.db, "BEGIN"):
                snapshot = self._snapshot()
                if snapshot is None:
                    return None
                rows = self.db.execute(
                    f"SELECT i.id, v.shard, v.row FROM images i JOIN vectors v ON v.image = i.id AND v.embedding = "
                    f"(SELECT id FROM embeddings WHERE fingerprint=:e) WHERE {VISIBLE} ORDER BY i.id",
                    {"v": snapshot.version, "e": snapshot.embedding},
                ).fetchall()
                try:
                    _, vectors = self._gather(snapshot.embedding, rows)
                except FileNotFoundError:
                    self.shard_reader.forget()
                    continue
            return snapshot, vectors
        raise SimimgError(f"index catalog {self.path} kept changing while reading; try again")

    def _snapshot(self, version: int | None = None) -> Snapshot | None:
        published = self.published(version)
        if published is None:
            return None
        rows = self.db.execute(
            f"SELECT id, path, label, sha256 FROM images WHERE {VISIBLE} ORDER BY id", {"v": published.version}
        ).fetchall()
        return Snapshot(
            published.version,
            published.model,
            published.embedding,
            published.index_kind,
            np.array([r[0] for r in rows], dtype=np.int64),
            [r[1] for r in rows],
            [r[2] for r in rows],
            [r[3] for r in rows],
        )

    def label_counts(self, version: int) -> dict[str, int]:
        rows = self.db.execute(
            f"SELECT COALESCE(label, ''), COUNT(*) FROM images WHERE {VISIBLE} GROUP BY 1", {"v": version}
        )
        return {label: n for label, n in rows}

    def iter_rows(self, version: int) -> list[Row]:
        rows = self.db.execute(
            f"SELECT id, path, label, size, mtime_ns, sha256 FROM images WHERE {VISIBLE} ORDER BY id", {"v": version}
        )
        return [Row(*r) for r in rows]


@contextmanager
def reading(path: str | Path) -> Iterator[Catalog]:
    """A read-only catalog for the block: `with reading(folder.catalog) as catalog: ...`."""
    catalog = Catalog(path, readonly=True)
    try:
        yield catalog
    finally:
        catalog.close()


class _Transaction:
    def __init__(self, db: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> None:
        self.db, self.begin = db, begin

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute(self.begin)
        return self.db

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
