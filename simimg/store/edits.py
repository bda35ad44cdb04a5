"""Label edits kept in the catalog, batch by batch: the data behind `simimg labels` (dataset/corrections.py folds them).

A batch is written in one transaction, so it is there whole or not at all; publishing it is the index job's part
(the next version applies every edit in force). Undoing marks the latest live batch undone; its rows stay, as the
record of what was done.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from simimg.dataset.corrections import Corrections, Edit
from simimg.store.catalog import Catalog


def read_edits(catalog: Catalog) -> list[Edit]:
    """Every edit of the batches not undone, in the order they were made; none in a catalog older than edits."""
    if not _has_edits(catalog):
        return []
    rows = catalog.db.execute(
        "SELECT e.path, e.action, e.old_label, e.new_label, e.source, e.batch, e.created FROM edits e "
        "JOIN edit_batches b ON b.batch = e.batch WHERE b.undone IS NULL ORDER BY e.id"
    )
    return [Edit(*row) for row in rows]


def read_corrections(catalog: Catalog) -> Corrections:
    return Corrections.fold(read_edits(catalog))


def record_batch(catalog: Catalog, edits: Sequence[Edit], source: str) -> int:
    """Write `edits` as one new batch (inside the caller's transaction); returns its number."""
    now = time.time()
    (batch,) = catalog.db.execute(
        "INSERT INTO edit_batches(source, created) VALUES (?, ?) RETURNING batch", (source, now)
    ).fetchone()
    catalog.db.executemany(
        "INSERT INTO edits(batch, path, action, old_label, new_label, source, created) VALUES (?,?,?,?,?,?,?)",
        [(batch, e.path, e.action, e.old_label, e.new_label, e.source, now) for e in edits],
    )
    return int(batch)


def undo_batch(catalog: Catalog) -> tuple[int, list[Edit]] | None:
    """Mark the latest live batch undone (inside the caller's transaction): (batch, its edits), or None."""
    if not _has_edits(catalog):
        return None
    row = catalog.db.execute("SELECT MAX(batch) FROM edit_batches WHERE undone IS NULL").fetchone()
    if row[0] is None:
        return None
    batch = int(row[0])
    edits = [e for e in read_edits(catalog) if e.batch == batch]
    catalog.db.execute("UPDATE edit_batches SET undone = ? WHERE batch = ?", (time.time(), batch))
    return batch, edits


def forget_paths(catalog: Catalog, paths: Iterable[str]) -> int:
    """Drop the edits of files that are gone (inside the caller's transaction); returns how many."""
    paths = list(paths)
    if not paths or not _has_edits(catalog):
        return 0
    gone = 0
    for start in range(0, len(paths), 900):
        chunk = paths[start : start + 900]
        marks = ",".join("?" * len(chunk))
        gone += catalog.db.execute(f"DELETE FROM edits WHERE path IN ({marks})", chunk).rowcount
    return gone


def _has_edits(catalog: Catalog) -> bool:
    row = catalog.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='edits'").fetchone()
    return row is not None
