"""catalog.py and vectors.py: the SQLite truth with versions, and vectors per (image, embedding) in shard files."""

from __future__ import annotations

import sqlite3
import threading

import numpy as np
import pytest

import simimg.store.vectors
from simimg.errors import SimimgError
from simimg.store.catalog import Catalog, NewImage

DIM = 4
EMB = "emb-a"


def image(path: str, label: str | None = "a", seed: int = 0) -> NewImage:
    return NewImage(path, label, size=10 + seed, mtime_ns=1000 + seed, sha256=f"sha-{path}-{seed}")


def vec(*seeds: int) -> np.ndarray:
    return np.stack([np.random.default_rng(s).standard_normal(DIM).astype(np.float32) for s in seeds])


def publish(catalog: Catalog, version: int, model: str = "model-a", embedding: str = EMB) -> None:
    with catalog.transaction():
        catalog.publish(version, model, embedding, "flat")


@pytest.fixture
def catalog(tmp_path):
    """Version 1 published with three rows: x.png (a), y.png (a), z.png (no label), vectors of seeds 1, 2, 3."""
    cat = Catalog(tmp_path / "catalog.sqlite")
    with cat.transaction():
        cat.add([image("x.png", seed=1), image("y.png", seed=2), image("z.png", None, seed=3)], vec(1, 2, 3), EMB, 1)
    publish(cat, 1)
    yield cat
    cat.close()


def test_a_new_catalog_has_nothing_published(tmp_path):
    cat = Catalog(tmp_path / "c.sqlite")
    assert cat.version == 0 and cat.snapshot() is None and cat.head() == {} and cat.published() is None


def test_published_rows_round_trip(catalog):
    snap = catalog.snapshot()
    assert (snap.version, snap.model, snap.embedding, snap.index_kind) == (1, "model-a", EMB, "flat")
    assert snap.paths == ["x.png", "y.png", "z.png"] and snap.labels == ["a", "a", None]
    assert snap.sha256 == ["sha-x.png-1", "sha-y.png-2", "sha-z.png-3"]
    assert list(snap.ids) == sorted(snap.ids) and len(set(snap.ids)) == 3
    ids, vectors = catalog.vectors(1, EMB)
    assert list(ids) == list(snap.ids) and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, vec(1, 2, 3))
    np.testing.assert_array_equal(catalog.vectors_for_ids(EMB, ids[::-1]), vec(3, 2, 1))
    assert catalog.label_counts(1) == {"a": 2, "": 1}
    assert catalog.published() == catalog.published(1) and catalog.published(1).count == 3
    row = catalog.head()["x.png"]
    assert (row.label, row.size, row.mtime_ns, row.sha256) == ("a", 11, 1001, "sha-x.png-1")


def test_snapshot_with_vectors_reads_rows_and_vectors_of_one_version(catalog):
    snapshot, vectors = catalog.snapshot_with_vectors()
    assert snapshot.paths == ["x.png", "y.png", "z.png"]
    np.testing.assert_array_equal(vectors, vec(1, 2, 3))


def test_a_second_embedding_lives_beside_the_first(catalog):
    ids = catalog.snapshot().ids
    assert [r.path for r in catalog.missing_vectors(1, "emb-b")] == ["x.png", "y.png", "z.png"]
    with catalog.transaction():
        catalog.add_vectors("emb-b", ids[:2].tolist(), vec(7, 8))
    assert [r.path for r in catalog.missing_vectors(1, "emb-b")] == ["z.png"]
    np.testing.assert_array_equal(catalog.vectors(1, EMB)[1], vec(1, 2, 3))  # the first is untouched
    np.testing.assert_array_equal(catalog.vectors(1, "emb-b")[1], vec(7, 8))


def test_readers_keep_seeing_the_published_version_while_a_writer_works(catalog, tmp_path):
    reader = Catalog(tmp_path / "catalog.sqlite", readonly=True)
    x_id = catalog.head()["x.png"].id
    with catalog.transaction():
        catalog.remove([x_id], 2)
        catalog.add([image("x.png", seed=9), image("w.png", "b", seed=4)], vec(9, 4), EMB, 2)
        assert reader.snapshot().paths == ["x.png", "y.png", "z.png"]
    assert reader.snapshot().paths == ["x.png", "y.png", "z.png"]
    assert catalog.count(1) == 3 and catalog.count(2) == 4 and catalog.pending_changes(2) == (2, 1)
    assert list(catalog.removed_ids(2)) == [x_id]
    publish(catalog, 2)
    snap, vectors = reader.snapshot_with_vectors()
    assert snap.version == 2 and snap.paths == ["y.png", "z.png", "x.png", "w.png"]
    np.testing.assert_array_equal(vectors, vec(2, 3, 9, 4))
    assert x_id not in snap.ids
    reader.close()


def test_a_read_only_catalog_cannot_write(catalog, tmp_path):
    reader = Catalog(tmp_path / "catalog.sqlite", readonly=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.set_meta(x=1)
    reader.close()


def test_a_read_only_folder_reads_a_merged_catalog_and_refuses_unmerged_changes(catalog, tmp_path, monkeypatch):
    """Where the folder cannot be written, readers open the catalog immutable, which would miss a -wal file's pages:
    a catalog whose writer died before merging them is refused in one line instead of read as an older state."""
    import simimg.store.catalog as catalog_module

    catalog.close()  # merged: its -wal is gone
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    writer = sqlite3.connect(tmp_path / "catalog.sqlite", isolation_level=None)
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("CREATE TABLE later (x)")  # committed to the -wal, never merged: the writer is "killed" here
    for name in ("catalog.sqlite", "catalog.sqlite-wal"):
        (crashed / name).write_bytes((tmp_path / name).read_bytes())
    writer.close()
    monkeypatch.setattr(catalog_module, "writable", lambda folder: False)
    reader = Catalog(tmp_path / "catalog.sqlite", readonly=True)
    assert "x.png" in reader.head()
    reader.close()
    with pytest.raises(SimimgError, match=r"did not merge \(catalog.sqlite-wal, \d+ bytes\).*simimg index"):
        Catalog(crashed / "catalog.sqlite", readonly=True)


def test_publishing_forgets_rows_no_kept_version_can_see_and_their_vectors(catalog):
    x_id = catalog.head()["x.png"].id
    with catalog.transaction():
        catalog.remove([x_id], 2)
    publish(catalog, 2)
    assert catalog.db.execute("SELECT COUNT(*) FROM images WHERE id=?", (x_id,)).fetchone()[0] == 1
    publish(catalog, 3)
    assert catalog.db.execute("SELECT COUNT(*) FROM images WHERE id=?", (x_id,)).fetchone()[0] == 0
    assert catalog.db.execute("SELECT COUNT(*) FROM vectors WHERE image=?", (x_id,)).fetchone()[0] == 0
    assert catalog.db.execute("SELECT live, rows FROM shards").fetchall() == [(2, 3)]
    assert [v.version for v in catalog.kept_versions()] == [2, 3]


def test_removing_a_pending_row_deletes_it_and_its_vector(catalog):
    with catalog.transaction():
        (new_id,) = catalog.add([image("new.png")], vec(5), EMB, 2)
        catalog.remove([new_id], 2)
    assert "new.png" not in catalog.head() and catalog.pending_changes(2) == (0, 0)
    assert catalog.db.execute("SELECT COUNT(*) FROM vectors WHERE image=?", (new_id,)).fetchone()[0] == 0


def test_a_path_is_live_at_most_once(catalog):
    with pytest.raises(sqlite3.IntegrityError), catalog.transaction():
        catalog.add([image("x.png", seed=5)], vec(5), EMB, 2)
    assert catalog.count(2) == 3 and catalog.pending_changes(2) == (0, 0)


def test_a_rolled_back_append_leaves_bytes_that_the_next_append_overwrites(catalog):
    with pytest.raises(RuntimeError), catalog.transaction():
        catalog.add([image("w.png", seed=4)], vec(4), EMB, 2)
        raise RuntimeError("crash after the shard write, before the commit")
    shard = next((catalog.vectors_dir / EMB).glob("*.f32"))
    assert shard.stat().st_size == 4 * DIM * 4  # the uncommitted row is still there
    with catalog.transaction():
        catalog.add([image("v.png", seed=6)], vec(6), EMB, 2)
    assert shard.stat().st_size == 4 * DIM * 4
    np.testing.assert_array_equal(catalog.vectors(2, EMB)[1], vec(1, 2, 3, 6))


def test_shards_roll_over_and_sparse_ones_are_compacted(catalog, monkeypatch):
    monkeypatch.setattr(simimg.store.vectors, "SHARD_BYTES", 2 * DIM * 4)  # two rows per shard
    with catalog.transaction():
        catalog.add([image(f"n{i}.png", seed=10 + i) for i in range(4)], vec(10, 11, 12, 13), EMB, 2)
    publish(catalog, 2)
    assert catalog.db.execute("SELECT rows FROM shards ORDER BY id").fetchall() == [(3,), (2,), (2,)]
    before = catalog.vectors(2, EMB)
    with catalog.transaction():
        catalog.remove([catalog.head()[p].id for p in ("x.png", "y.png", "n1.png")], 3)
    publish(catalog, 3)
    publish(catalog, 4)
    with catalog.transaction():
        assert catalog.compact() >= 1
    assert catalog.clean_files() >= 1
    ids, vectors = catalog.vectors(4, EMB)
    keep = np.isin(before[0], ids)
    np.testing.assert_array_equal(vectors, before[1][keep])
    assert (
        len(list((catalog.vectors_dir / EMB).glob("*.f32")))
        == catalog.db.execute("SELECT COUNT(*) FROM shards").fetchone()[0]
    )


def test_dropping_an_embedding_removes_its_vectors_and_files(catalog):
    ids = catalog.snapshot().ids.tolist()
    with catalog.transaction():
        catalog.add_vectors("emb-b", ids, vec(7, 8, 9))
    assert (catalog.vectors_dir / "emb-b").is_dir()
    with catalog.transaction():
        assert catalog.drop_embeddings({EMB}) == ["emb-b"]
    catalog.clean_files()
    assert not (catalog.vectors_dir / "emb-b").exists()
    assert len(catalog.missing_vectors(1, "emb-b")) == 3 and not catalog.missing_vectors(1, EMB)


def test_a_reader_retries_when_compaction_removed_the_shard_it_read(catalog, tmp_path, monkeypatch):
    reader = Catalog(tmp_path / "catalog.sqlite", readonly=True)
    reader.snapshot_with_vectors()  # maps shard 1
    monkeypatch.setattr(simimg.store.vectors, "SHARD_BYTES", 3 * DIM * 4)
    with catalog.transaction():
        catalog.add([image("w.png", seed=4)], vec(4), EMB, 2)  # shard 1 is full: a second shard
        catalog.remove([catalog.head()[p].id for p in ("x.png", "y.png")], 2)
    publish(catalog, 2)
    publish(catalog, 3)
    with catalog.transaction():
        assert catalog.compact() == 1
    catalog.clean_files()
    snapshot, vectors = reader.snapshot_with_vectors()
    assert snapshot.paths == ["z.png", "w.png"]
    np.testing.assert_array_equal(vectors, vec(3, 4))
    reader.close()


def test_touch_keeps_the_vector_and_records_the_new_stat(catalog):
    row = catalog.head()["y.png"]
    catalog.touch(row.id, 99, 123)
    again = catalog.head()["y.png"]
    assert (again.id, again.size, again.mtime_ns, again.sha256) == (row.id, 99, 123, row.sha256)


def test_readers_in_threads_share_one_catalog_safely(catalog, tmp_path):
    reader = Catalog(tmp_path / "catalog.sqlite", readonly=True)
    lock, errors = threading.Lock(), []

    def read() -> None:
        for _ in range(50):
            with lock:
                try:
                    assert len(reader.snapshot_with_vectors()[1]) == 3
                except Exception as err:  # noqa: BLE001 - collected for the assertion below
                    errors.append(err)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    reader.close()


def test_meta_values(catalog):
    catalog.set_meta(data_root="/x", pending_model="abc")
    assert catalog.get_meta("data_root") == "/x" and catalog.get_meta("missing", "d") == "d"


def test_missing_unreadable_or_older_catalogs_are_user_errors(tmp_path):
    with pytest.raises(SimimgError, match="build it with `simimg index`"):
        Catalog(tmp_path / "none.sqlite", readonly=True)
    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(SimimgError, match="unreadable"):
        Catalog(tmp_path / "junk.sqlite")
    old = sqlite3.connect(tmp_path / "old.sqlite")
    old.executescript(
        "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT); CREATE TABLE images(id INTEGER, vector BLOB);"
    )
    old.close()
    with pytest.raises(SimimgError, match="simimg upgrade"):
        Catalog(tmp_path / "old.sqlite")
