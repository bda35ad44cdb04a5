"""catalog.py: the SQLite truth, with versions so readers see one published version while a writer prepares the next."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from simimg.catalog import Catalog, NewImage
from simimg.errors import SimimgError

DIM = 4


def image(path: str, label: str | None = "a", seed: int = 0) -> NewImage:
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return NewImage(path, label, size=10 + seed, mtime_ns=1000 + seed, sha256=f"sha-{path}-{seed}", vector=vector)


def publish(catalog: Catalog, version: int) -> None:
    with catalog.transaction():
        catalog.publish(version, "fp", "flat")


@pytest.fixture
def catalog(tmp_path):
    """Version 1 published with three rows: x.png (a), y.png (a), z.png (no label)."""
    cat = Catalog(tmp_path / "catalog.sqlite")
    with cat.transaction():
        cat.add([image("x.png", seed=1), image("y.png", seed=2), image("z.png", None, seed=3)], 1)
    publish(cat, 1)
    yield cat
    cat.close()


def test_a_new_catalog_has_nothing_published(tmp_path):
    cat = Catalog(tmp_path / "c.sqlite")
    assert cat.version == 0 and cat.snapshot() is None and cat.head() == {}


def test_published_rows_round_trip(catalog):
    snap = catalog.snapshot()
    assert (snap.version, snap.fingerprint, snap.index_kind) == (1, "fp", "flat")
    assert snap.paths == ["x.png", "y.png", "z.png"] and snap.labels == ["a", "a", None]
    assert list(snap.ids) == sorted(snap.ids) and len(set(snap.ids)) == 3
    ids, vectors = catalog.vectors(1)
    assert list(ids) == list(snap.ids) and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors[1], image("y.png", seed=2).vector)
    assert catalog.label_counts(1) == {"a": 2, "": 1}
    assert catalog.version_info(1) == ("fp", 3, "flat")
    row = catalog.head()["x.png"]
    assert (row.label, row.size, row.mtime_ns, row.sha256) == ("a", 11, 1001, "sha-x.png-1")


def test_readers_keep_seeing_the_published_version_while_a_writer_works(catalog, tmp_path):
    reader = Catalog(tmp_path / "catalog.sqlite", readonly=True)
    x_id = catalog.head()["x.png"].id
    with catalog.transaction():
        catalog.remove([x_id], 2)
        catalog.add([image("x.png", seed=9), image("w.png", "b", seed=4)], 2)
        assert reader.snapshot().paths == ["x.png", "y.png", "z.png"]
    assert reader.snapshot().paths == ["x.png", "y.png", "z.png"]
    assert catalog.count(1) == 3 and catalog.count(2) == 4 and catalog.pending_changes(2) == (2, 1)
    assert list(catalog.removed_ids(2)) == [x_id]
    publish(catalog, 2)
    snap = reader.snapshot()
    assert snap.version == 2 and sorted(snap.paths) == ["w.png", "x.png", "y.png", "z.png"]
    assert x_id not in snap.ids
    reader.close()


def test_publishing_forgets_rows_no_kept_version_can_see(catalog):
    x_id = catalog.head()["x.png"].id
    with catalog.transaction():
        catalog.remove([x_id], 2)
    publish(catalog, 2)
    assert catalog.db.execute("SELECT COUNT(*) FROM images WHERE id=?", (x_id,)).fetchone()[0] == 1
    publish(catalog, 3)
    assert catalog.db.execute("SELECT COUNT(*) FROM images WHERE id=?", (x_id,)).fetchone()[0] == 0
    assert catalog.db.execute("SELECT version FROM versions ORDER BY version").fetchall() == [(2,), (3,)]


def test_removing_a_pending_row_deletes_it(catalog):
    with catalog.transaction():
        catalog.add([image("new.png")], 2)
        new_id = catalog.head()["new.png"].id
        catalog.remove([new_id], 2)
    assert "new.png" not in catalog.head() and catalog.pending_changes(2) == (0, 0)


def test_a_path_is_live_at_most_once(catalog):
    with pytest.raises(sqlite3.IntegrityError):
        with catalog.transaction():
            catalog.add([image("x.png", seed=5)], 2)
    assert catalog.count(2) == 3 and catalog.pending_changes(2) == (0, 0)


def test_touch_keeps_the_vector_and_records_the_new_stat(catalog):
    row = catalog.head()["y.png"]
    catalog.touch(row.id, 99, 123)
    again = catalog.head()["y.png"]
    assert (again.id, again.size, again.mtime_ns, again.sha256) == (row.id, 99, 123, row.sha256)


def test_discard_pending_undoes_an_interrupted_run(catalog):
    with catalog.transaction():
        catalog.remove([catalog.head()["x.png"].id], 2)
        catalog.add([image("w.png")], 2)
    with catalog.transaction():
        assert catalog.discard_pending(2) == 1
    assert sorted(catalog.head()) == ["x.png", "y.png", "z.png"] and catalog.pending_changes(2) == (0, 0)


def test_retire_published_marks_every_row_for_re_embedding(catalog):
    with catalog.transaction():
        catalog.retire_published(2)
    assert catalog.head() == {} and catalog.count(1) == 3 and catalog.count(2) == 0


def test_meta_values(catalog):
    catalog.set_meta(data_root="/x", pending_fingerprint="abc")
    assert catalog.get_meta("data_root") == "/x" and catalog.get_meta("missing", "d") == "d"


def test_missing_or_unreadable_catalogs_are_user_errors(tmp_path):
    with pytest.raises(SimimgError, match="build it with `simimg index`"):
        Catalog(tmp_path / "none.sqlite", readonly=True)
    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(SimimgError, match="unreadable"):
        Catalog(tmp_path / "junk.sqlite")
