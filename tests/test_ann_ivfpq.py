"""compressed_index: IVF-PQ trained on a sample across the collection, built in parts, re-ranked exactly from the
stored vectors; and `simimg index --index-kind ivfpq` end to end through a SearchService."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from conftest import make_class_images, point_index_at, run_cli
from simimg import api
from simimg.jobs.index import run_index
from simimg.jobs.index_config import IndexJob, read_index_job
from simimg.store import ann_ivfpq
from simimg.store.ann import (
    FaissSearcher,
    RefinedSearcher,
    build_ann,
    index_kind_for,
    is_compressed,
    load_index,
    make_searcher,
    save_index,
    update_index,
)
from simimg.store.catalog import reading
from simimg.store.layout import IndexFolder, lists_file
from simimg.store.vectors import StoredVectors, append_rows, shard_path
from test_ann import clustered, recall

DIM = 64


def stored_in_shards(root: Path, vectors: np.ndarray, ids: np.ndarray, per_shard: int) -> StoredVectors:
    """`vectors` written as simimg's shard files, `per_shard` rows each, behind the id lookup a catalog gives."""
    positions = np.arange(len(ids))
    for shard, start in enumerate(range(0, len(ids), per_shard)):
        append_rows(shard_path(root / "emb", shard), 0, vectors[start : start + per_shard])
    return StoredVectors(root, "emb", vectors.shape[1], ids, positions // per_shard, positions % per_shard)


@pytest.mark.parametrize("dim, m", [(1024, 256), (1664, 416), (2048, 512), (1000, 250), (64, 16)])
def test_one_sub_quantizer_per_4_dims_that_divides_the_dimension(dim, m):
    assert ann_ivfpq.pq_bytes_for(dim) == m and dim % m == 0


def test_the_training_sample_is_drawn_across_the_whole_collection():
    ids = np.arange(1_000_000, dtype=np.int64)
    sample = ann_ivfpq.sample_ids(ids, nlist=1000)
    assert len(sample) == 40_000 and len(np.unique(sample)) == len(sample)  # faiss warns below 39 a list
    assert sample.max() > 900_000 and sample.min() < 100_000  # not the first rows: those are one folder


def test_re_rank_orders_candidates_by_their_exact_scores_and_pads_missing_ones():
    vectors = np.eye(4, dtype=np.float32)
    query = np.array([[0.1, 0.7, 0.2, 0.0]], np.float32)
    scores, ids = ann_ivfpq.rerank(query, np.array([[3, 0, -1, 1]]), lambda want: vectors[want], k=4)
    assert ids.tolist() == [[1, 0, 3, -1]]
    assert np.allclose(scores[0, :3], [0.7, 0.1, 0.0])


@pytest.mark.slow
def test_refined_search_finds_what_exact_search_finds_and_keeps_ids(tmp_path, monkeypatch):
    monkeypatch.setattr(ann_ivfpq, "PART_ROWS", 1000)  # several parts, merged
    vectors, queries = clustered(5000, dim=DIM), clustered(50, dim=DIM, seed=1)
    ids = np.arange(5000, dtype=np.int64) * 7 + 3
    stored = stored_in_shards(tmp_path, vectors, ids, per_shard=1500)
    index = ann_ivfpq.build(DIM, ids, stored)
    assert is_compressed(index) and index.ntotal == 5000
    assert index.code_size == DIM // 4  # 16 bytes a vector instead of 256
    _, truth = FaissSearcher(build_ann(ids, vectors, DIM, "flat")).search(queries, 10)
    _, approximate = FaissSearcher(index).search(queries, 10)
    _, found = make_searcher(index, torch.device("cpu"), stored).search(queries, 10)
    assert recall(found, truth) >= 0.95
    assert recall(found, truth) > recall(approximate, truth)  # the re-rank is what brings recall up


@pytest.mark.slow
def test_parts_merged_in_ram_or_on_disk_answer_like_one_index(tmp_path):
    vectors, queries = clustered(3000, dim=DIM), clustered(20, dim=DIM, seed=2)
    ids = np.arange(3000, dtype=np.int64)
    trained = ann_ivfpq.train(DIM, ids, lambda want: vectors[want])
    whole = ann_ivfpq.encode_part(trained, ids, vectors)
    merged = ann_ivfpq.merge(
        trained,
        [ann_ivfpq.encode_part(trained, ids[s], vectors[s]) for s in ann_ivfpq.part_ranges(3000, rows=700)],
    )
    assert merged.ntotal == whole.ntotal == 3000
    assert np.array_equal(whole.search(queries, 10)[1], merged.search(queries, 10)[1])
    parts = (ann_ivfpq.encode_part(trained, ids[s], vectors[s]) for s in ann_ivfpq.part_ranges(3000, 700))
    save_index(ann_ivfpq.merge_on_disk(trained, parts, tmp_path / "index.ivfdata"), tmp_path / "index.faiss")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["index.faiss", "index.ivfdata"]  # the parts are gone
    assert np.array_equal(whole.search(queries, 10)[1], load_index(tmp_path / "index.faiss").search(queries, 10)[1])


def test_lists_on_disk_update_into_a_new_file_print_nothing_and_move_with_their_folder(tmp_path, capfd):
    """An update merges the previous lists (less the removed ids) and the new part into a new file, as adding to
    and removing from an index in RAM does, and never writes to the previous file (the next version may link it).
    faiss' own on-disk merge and IO_FLAG_ONDISK_SAME_DIR printf to stdout; simimg's do not (`--json`)."""
    vectors, queries = clustered(2400, dim=16), clustered(20, dim=16, seed=4)
    ids = np.arange(2400, dtype=np.int64) * 3
    fetch = lambda want: vectors[want // 3]  # noqa: E731
    first, second = tmp_path / "a" / "index-000001.faiss", tmp_path / "a" / "index-000002.faiss"
    first.parent.mkdir()
    trained = ann_ivfpq.train(16, ids[:2000], fetch)
    in_ram = ann_ivfpq.merge(trained, [ann_ivfpq.encode_part(trained, ids[:2000], fetch(ids[:2000]))])
    part = ann_ivfpq.encode_part(trained, ids[:2000], fetch(ids[:2000]))
    save_index(ann_ivfpq.merge_on_disk(trained, [part], lists_file(first)), first)
    before = lists_file(first).read_bytes()
    removed = ids[::7][:200]
    update_index(in_ram, ids[2000:], fetch(ids[2000:]), removed)
    updated = ann_ivfpq.update_on_disk(load_index(first), ids[2000:], fetch, removed, lists_file(second))
    save_index(updated, second)
    assert lists_file(first).read_bytes() == before and updated.ntotal == in_ram.ntotal == 2400 - 200
    assert np.array_equal(in_ram.search(queries, 10)[1], load_index(second).search(queries, 10)[1])
    shutil.move(tmp_path / "a", tmp_path / "moved")
    moved = load_index(tmp_path / "moved" / second.name)
    assert ann_ivfpq.lists_on_disk(moved)
    assert np.array_equal(in_ram.search(queries, 10)[1], moved.search(queries, 10)[1])
    assert capfd.readouterr().out == ""


def test_an_index_in_ram_ignores_and_drops_a_stray_list_file(tmp_path):
    """A run that stopped after writing a version's list file, then published that version with its lists in RAM."""
    vectors = clustered(300, dim=DIM)
    index = ann_ivfpq.build(DIM, np.arange(300), lambda want: vectors[want])
    lists_file(tmp_path / "index-000001.faiss").write_bytes(b"left by a killed run")
    save_index(index, tmp_path / "index-000001.faiss")
    assert not lists_file(tmp_path / "index-000001.faiss").exists()
    lists_file(tmp_path / "index-000001.faiss").write_bytes(b"and again")
    assert load_index(tmp_path / "index-000001.faiss").ntotal == 300


def test_refined_search_honours_the_allowed_ids(tmp_path):
    vectors, queries = clustered(3000, dim=DIM), clustered(5, dim=DIM, seed=3)
    ids = np.arange(3000, dtype=np.int64)
    stored = stored_in_shards(tmp_path, vectors, ids, per_shard=3000)
    allowed = ids[::3]
    _, found = RefinedSearcher(FaissSearcher(ann_ivfpq.build(DIM, ids, stored)), stored).search(queries, 10, allowed)
    assert np.isin(found[found >= 0], allowed).all() and (found >= 0).sum() >= 40


def test_stored_vectors_name_unknown_ids_and_outlive_a_deleted_shard(tmp_path):
    vectors = clustered(100, dim=DIM)
    stored = stored_in_shards(tmp_path, vectors, np.arange(100, 200, dtype=np.int64), per_shard=40)
    with pytest.raises(KeyError, match="99"):
        stored(np.array([150, 99]))
    shard_path(tmp_path / "emb", 1).unlink()  # a writer compacted it away after this reader mapped it
    assert np.array_equal(stored(np.array([185, 145, 100])), vectors[[85, 45, 0]])


def test_asking_for_a_compressed_index_of_too_few_vectors_gives_exact_search():
    assert index_kind_for(ann_ivfpq.MIN_VECTORS - 1, "ivfpq") == "flat"
    assert index_kind_for(ann_ivfpq.MIN_VECTORS, "ivfpq") == "ivfpq"
    assert index_kind_for(2_000_000) == "ivfpq" and index_kind_for(500_000) == "ivf"


@pytest.mark.slow
def test_index_kind_ivfpq_end_to_end_is_kept_added_to_removed_from_and_served(tmp_path):
    photos = make_class_images(tmp_path / "photos", {"circles": 150, "squares": 150}, size=48)
    home = tmp_path / "home"
    options = dict(home=home, weights="none", image_size=32, batch_size=32)
    report = api.build_index(photos, "p", index_kind="ivfpq", **options)
    service = api.open_index("p", home)
    assert service.info()["index_kind"] == "ivfpq" and report.total == 300
    assert is_compressed(service.served.searcher.inner.index)
    query = photos / "circles" / "circles_005.png"
    assert service.search(query, k=3).neighbors[0].path == "circles/circles_005.png"
    make_class_images(tmp_path / "more", {"circles": 3}, size=48, seed=9)
    (tmp_path / "more" / "circles" / "circles_000.png").rename(photos / "circles" / "new.png")
    report = api.build_index(photos, "p", **options)  # no kind given: the index keeps the one it was asked for
    assert report.indexed == 1 and report.total == 301
    assert read_index_job(IndexFolder.of(home, "p")).index_kind == "ivfpq"
    assert service.refresh() and service.info()["index_kind"] == "ivfpq"
    assert service.search(photos / "circles" / "new.png", k=1).neighbors[0].path == "circles/new.png"
    gone = photos / "circles" / "circles_010.png"
    image = service.load(gone)
    gone.unlink()
    assert api.build_index(photos, "p", **options).total == 300 and service.refresh()
    assert "circles/circles_010.png" not in {n.path for n in service.search(image, k=20).neighbors}
    flat = run_index(IndexJob(data_dir=str(photos), name="p", home=str(home), index_kind="flat"))
    assert flat.total == 300 and service.refresh() and service.info()["index_kind"] == "flat"


@pytest.mark.slow
def test_an_index_that_doubled_is_trained_afresh_and_one_that_grew_a_little_is_updated(tmp_path):
    photos = make_class_images(tmp_path / "photos", {"circles": 150, "squares": 150}, size=40)
    home = tmp_path / "home"
    options = dict(home=home, weights="none", image_size=32, batch_size=64, index_kind="ivfpq")

    def lists() -> int:
        folder = IndexFolder.of(home, "p")
        with reading(folder.catalog) as catalog:
            version = catalog.published().version
        return faiss.extract_index_ivf(load_index(folder.faiss(version))).nlist

    api.build_index(photos, "p", **options)
    assert lists() == ann_ivfpq.lists_for(300)
    make_class_images(tmp_path / "more", {"circles": 150, "squares": 150}, size=40, seed=5)
    for image in (tmp_path / "more").rglob("*.png"):
        image.rename(photos / image.parent.name / f"more_{image.name}")
    assert api.build_index(photos, "p", **options).total == 600
    assert lists() == ann_ivfpq.lists_for(600) > 1.4 * ann_ivfpq.lists_for(300)
    (photos / "circles" / "more_circles_000.png").rename(tmp_path / "out.png")
    assert api.build_index(photos, "p", **options).total == 599 and lists() == ann_ivfpq.lists_for(600)
    service = api.open_index("p", home)
    assert (
        service.search(photos / "squares" / "more_squares_007.png", k=1).neighbors[0].path
        == "squares/more_squares_007.png"
    )


@pytest.mark.datasets
def test_on_real_photos_a_compressed_index_finds_what_exact_search_finds(shared_dataset, tmp_path):
    """cats_dogs/val (700 photos), random-init densenet121 at 64 px: every 7th photo queried against both kinds.
    At this size the re-rank sees every vector the 8 probed lists hold, so this checks the path on real
    embeddings, not the compression (benchmarks/scale.py measures that at 2M)."""
    data = shared_dataset("cats_dogs") / "val"
    api.build_index(data, "flat", tmp_path, index_kind="flat", weights="none", image_size=64)
    shutil.copytree(tmp_path / "flat", tmp_path / "ivfpq")  # the same stored vectors: the photos are embedded once
    point_index_at(tmp_path, "ivfpq", data)
    assert api.build_index(data, "ivfpq", tmp_path, index_kind="ivfpq").indexed == 0
    exact, compressed = api.open_index("flat", tmp_path), api.open_index("ivfpq", tmp_path)
    assert compressed.info()["index_kind"] == "ivfpq"
    queries = [exact.data_root / p for p in exact.snapshot.paths[::7]]
    found = [
        ({n.path for n in a.neighbors}, {n.path for n in b.neighbors})
        for a, b in zip(exact.search(queries, k=10), compressed.search(queries, k=10))
    ]
    assert np.mean([len(a & b) / 10 for a, b in found]) >= 0.95


@pytest.mark.slow
def test_lists_on_disk_publish_versions_that_search_as_in_ram_and_leave_with_them(tmp_path):
    """`simimg index --on-disk` over an index with lists in RAM (a copy: the photos are embedded once) moves them
    to disk and searches the same; each update writes a new list file (an image in, an image out), and the oldest
    version's files go once it is no longer kept; a damaged list file is found and built again; the folder opens
    elsewhere."""
    photos = make_class_images(tmp_path / "photos", {"circles": 150, "squares": 150}, size=40)
    home = tmp_path / "home"
    options = dict(home=home, weights="none", image_size=32, batch_size=64, index_kind="ivfpq")
    api.build_index(photos, "ram", on_disk=False, **options)
    shutil.copytree(home / "ram", home / "disk")
    point_index_at(home, "disk", photos)
    assert api.build_index(photos, "disk", on_disk=True, **options).indexed == 0
    folder = IndexFolder.of(home, "disk")
    queries = [photos / "circles" / "circles_003.png", photos / "squares" / "squares_100.png"]

    def neighbours(name: str, root: Path = home) -> list[list[str]]:
        return [[n.path for n in r.neighbors] for r in api.open_index(name, root).search(queries, k=10)]

    assert neighbours("disk") == neighbours("ram") and folder.list_files() == [folder.lists(2)]
    (photos / "circles" / "circles_010.png").unlink()
    (photos / "squares" / "squares_011.png").rename(photos / "circles" / "was_a_square.png")
    report = api.build_index(photos, "disk", **options)  # on disk as last asked
    assert (report.version, report.indexed, report.total) == (3, 1, 299) and read_index_job(folder).on_disk
    assert folder.list_files() == [folder.lists(2), folder.lists(3)]
    api.build_index(photos, "ram", **options)
    assert neighbours("disk") == neighbours("ram")
    (photos / "circles" / "circles_020.png").unlink()
    assert api.build_index(photos, "disk", **options).version == 4
    assert folder.list_files() == [folder.lists(3), folder.lists(4)] and folder.faiss_files()[0] == folder.faiss(3)
    # a bit flipped in the served list file: `verify` names it and every image it holds; `--repair` builds it again
    damaged = folder.lists(4)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(data)
    found = api.verify_index("disk", home)
    assert [(p.kind, p.file, len(p.images)) for p in found.problems] == [("lists", str(damaged), 298)]
    repaired = api.verify_index("disk", home, repair=True)
    assert repaired.problems == [] and any(str(damaged) in line for line in repaired.repaired), repaired
    assert api.verify_index("disk", home).problems == [] and neighbours("disk") == neighbours("ram")
    shutil.move(home, tmp_path / "moved")
    assert len(neighbours("disk", tmp_path / "moved")[0]) == 10


@pytest.mark.e2e
def test_index_and_query_with_lists_on_disk_print_only_their_json(tmp_path):
    """faiss printf's to stdout (fd 1) when it resizes or finds an on-disk list file; `--json` must stay clean."""
    photos = make_class_images(tmp_path / "photos", {"circles": 140, "squares": 140}, size=40)
    home = str(tmp_path / "home")
    index = ("index", str(photos), "--home", home, "--index-kind", "ivfpq", "--on-disk", "--weights", "none")
    for run in range(2):
        if run:  # the second run updates
            (photos / "circles" / "circles_000.png").rename(photos / "squares" / "moved.png")
        proc = run_cli(*index, "--image-size", "32", "--workers", "0", "--json")
        assert json.loads(proc.stdout)["total"] == 280 and len(proc.stdout.splitlines()) == 1, proc.stdout[-2000:]
    assert [p.name for p in IndexFolder.of(home, "photos").list_files()] == [
        "index-000001.ivfdata",
        "index-000002.ivfdata",
    ]
    proc = run_cli("query", str(photos / "squares" / "moved.png"), "--name", "photos", "--home", home, "--json")
    assert json.loads(proc.stdout)[0]["neighbors"][0]["path"] == "squares/moved.png"
