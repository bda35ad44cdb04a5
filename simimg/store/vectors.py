"""Embedding vectors on disk: append-only float32 shard files, one series per embedding, memory-mapped by readers.

HOME/NAME/vectors/<embedding>/<shard>.f32 holds rows of `dim` float32 values, nothing else. The catalog (SQLite)
records which shard and row hold each image's vector and how many rows of each shard are committed. A writer
appends and fsyncs before the catalog commits the rows that point there, so a crash leaves at most uncommitted
bytes past a shard's committed end, which the next append cuts off. Readers only read committed rows, which never
change; compaction writes live rows to a new shard before the old one is deleted.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SHARD_BYTES = 1 << 30  # a new shard file starts past 1 GiB: few files at 100M images, small rewrites on compaction
ROW_DTYPE = np.float32


def shard_path(directory: Path, shard: int) -> Path:
    return directory / f"{shard:06d}.f32"


def rows_per_shard(dim: int) -> int:
    return max(1, SHARD_BYTES // (dim * np.dtype(ROW_DTYPE).itemsize))


def append_rows(path: Path, committed_rows: int, vectors: np.ndarray) -> None:
    """Write `vectors` after the first `committed_rows` rows of `path` and fsync; bytes past them are dropped first."""
    vectors = np.ascontiguousarray(vectors, ROW_DTYPE)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = committed_rows * vectors.shape[1] * vectors.itemsize
    with open(path, "r+b" if path.exists() else "w+b") as f:
        f.truncate(start)
        f.seek(start)
        f.write(vectors.tobytes())
        f.flush()
        os.fsync(f.fileno())


def remove_stray_files(directory: Path, committed: dict[str, set[int]]) -> int:
    """Delete shard files (and whole embedding folders) the catalog does not know: left by a crash or a prune."""
    if not directory.is_dir():
        return 0
    removed = 0
    for sub in directory.iterdir():
        keep = committed.get(sub.name, set())
        for f in sub.glob("*.f32") if sub.is_dir() else ():
            if int(f.stem) not in keep:
                f.unlink(missing_ok=True)
                removed += 1
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
    if removed:
        log.info("removed %d shard files no catalog row points to", removed)
    return removed


class ShardReader:
    """Gathers rows from memory-mapped shards; maps are kept and grown as shards grow."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._maps: dict[tuple[str, int], np.memmap] = {}

    def gather(self, embedding: str, dim: int, shards: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Vectors at (shards[i], rows[i]), as one float32 array in that order. FileNotFoundError if one went."""
        out = np.empty((len(rows), dim), ROW_DTYPE)
        for shard in np.unique(shards):
            at = np.flatnonzero(shards == shard)
            want = rows[at]
            out[at] = self._map(embedding, int(shard), dim, int(want.max()) + 1)[want]
        return out

    def _map(self, embedding: str, shard: int, dim: int, need_rows: int) -> np.memmap:
        key = (embedding, shard)
        mapped = self._maps.get(key)
        if mapped is None or len(mapped) < need_rows:
            path = shard_path(self.root / embedding, shard)
            rows = os.stat(path).st_size // (dim * np.dtype(ROW_DTYPE).itemsize)
            if rows < need_rows:
                raise FileNotFoundError(f"{path} holds {rows} rows, the catalog points at row {need_rows - 1}")
            mapped = self._maps[key] = np.memmap(path, ROW_DTYPE, "r", shape=(rows, dim))
        return mapped

    def forget(self) -> None:
        self._maps.clear()


class StoredVectors:
    """One version's vectors by image id: what a compressed index is built from and re-ranks its candidates with.

    Every shard is mapped here, once: a compaction that later deletes a shard cannot take rows away from a reader
    still serving this version (a mapped file's pages outlive its name). Safe to share between threads.
    """

    def __init__(
        self, root: Path, embedding: str, dim: int, ids: np.ndarray, shards: np.ndarray, rows: np.ndarray
    ) -> None:
        order = np.argsort(ids, kind="stable")
        self.ids, self.shards, self.rows = ids[order], shards[order], rows[order]
        self.embedding, self.dim = embedding, dim
        self.reader = ShardReader(root)
        for shard in np.unique(self.shards):
            self.reader.gather(embedding, dim, np.array([shard]), np.array([self.rows[self.shards == shard].max()]))

    def __len__(self) -> int:
        return len(self.ids)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """The vectors of `ids`, in that order; KeyError names an id this version does not hold."""
        at = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        unknown = self.ids[at] != ids
        if unknown.any():
            raise KeyError(f"no stored vector for image id {int(np.asarray(ids)[unknown][0])}")
        return self.reader.gather(self.embedding, self.dim, self.shards[at], self.rows[at])
