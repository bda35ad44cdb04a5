"""Reliability through the CLI: SIGKILL of the real command at random points then resume (e2e), readers during
re-indexes, bad input (`simimg.cli.main` in this process).

Every index here is tiny (32 px crops, random-init weights, batches of 4, chunks of 4) so a run has many
commit points to be killed between, and the whole file stays fast on two CPU cores.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, main_json, make_class_images, run_main, synthetic_image
from simimg.errors import SimimgError
from simimg.jobs.index import run_index
from simimg.jobs.index_config import IndexJob
from simimg.models.bundle import BUNDLE_JSON, BUNDLE_WEIGHTS, ModelBundle
from simimg.models.net import build_model, describe
from simimg.query.service import SearchService
from simimg.store.ann import flat_contents
from simimg.store.catalog import Catalog, reading
from simimg.store.layout import IndexFolder
from simimg.store.model_store import publish_model, read_model

CLASSES = {"circles": 12, "squares": 12, "triangles": 12}
N_IMAGES = sum(CLASSES.values())
FLAGS = ("--weights", "none", "--image-size", "32", "--batch-size", "4", "--chunk-size", "4", "--workers", "1")
KILL_SEED = 6
Rows = dict[str, tuple[str | None, np.ndarray]]


# --- helpers -------------------------------------------------------------------------------------------
def index_args(data: Path, home: Path, name: str) -> list[str]:
    return ["index", str(data), "--home", str(home), "--name", name, *FLAGS]


def use_args(model: str, home: Path, name: str) -> list[str]:
    return ["use", model, "--home", str(home), "--name", name]


def reference_index(data: Path, home: Path, name: str, model: str | None = None) -> Rows:
    """An uninterrupted run, in-process, of the same job the CLI runs."""
    run_index(
        IndexJob(
            str(data),
            name,
            str(home),
            weights=None if model else "none",
            image_size=None if model else 32,
            batch_size=4,
            workers=0,
            chunk_size=4,
            model=model,
        )
    )
    return consistent_state(home, name)


def consistent_state(home: Path, name: str) -> Rows:
    """The published rows, after checking that catalog, vector shards, FAISS file and model tell the same story."""
    paths = IndexFolder.of(home, name)
    catalog = Catalog(paths.catalog, readonly=True)
    try:
        snap = catalog.snapshot()
        ids, vectors = catalog.vectors(snap.version, snap.embedding)
        live_dupes = catalog.db.execute(
            "SELECT path FROM images WHERE removed IS NULL GROUP BY path HAVING COUNT(*) > 1"
        ).fetchall()
        count = catalog.published().count
    finally:
        catalog.close()
    assert live_dupes == []
    assert len(set(snap.ids.tolist())) == len(snap.ids) and len(set(snap.paths)) == len(snap.paths)
    assert np.array_equal(ids, snap.ids) and count == len(ids)
    assert snap.embedding == read_model(paths, snap.model).embedding
    index = faiss.read_index(str(paths.faiss(snap.version)))
    assert index.ntotal == len(ids)
    faiss_ids, faiss_vectors = flat_contents(index)
    order = np.argsort(faiss_ids)
    assert np.array_equal(faiss_ids[order], ids)
    assert np.allclose(faiss_vectors[order], vectors, atol=1e-6)
    return {p: (label, v) for p, label, v in zip(snap.paths, snap.labels, vectors)}


def assert_same_rows(got: Rows, want: Rows) -> None:
    assert sorted((p, label) for p, (label, _) in got.items()) == sorted((p, label) for p, (label, _) in want.items())
    for path, (_, vector) in want.items():
        assert np.allclose(got[path][1], vector, atol=1e-5), path


def catalog_progress(catalog: Path) -> tuple[int, int]:
    """(published version, embeddings committed for the pending one), read like any outside reader would: new
    image rows, or vectors of a new embedding when the run switches models."""
    try:
        db = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error:
        return 0, 0
    try:
        version, embedding = db.execute(
            "SELECT COALESCE(MAX(version), 0), (SELECT embedding FROM versions "
            "ORDER BY version DESC LIMIT 1) FROM versions"
        ).fetchone()
        added = db.execute("SELECT COUNT(*) FROM images WHERE added > ?", (version,)).fetchone()[0]
        switched = db.execute(
            "SELECT COUNT(*) FROM vectors WHERE embedding = (SELECT id FROM embeddings WHERE "
            "fingerprint != ? ORDER BY id DESC LIMIT 1)",
            (embedding or "",),
        ).fetchone()[0]
        return version, added if embedding is None else max(added, switched)
    except sqlite3.Error:
        return 0, 0
    finally:
        db.close()


def kill_during_index(
    data: Path, home: Path, name: str, after_rows: int, args: list[str] | None = None
) -> tuple[bool, int]:
    """Start `simimg index` (or `args`), SIGKILL it once `after_rows` pending embeddings are committed (0: as soon as
    it writes). Returns (whether it published before the kill landed, pending embeddings committed when it died).
    """
    catalog = IndexFolder.of(home, name).catalog
    before, _ = catalog_progress(catalog)
    proc = subprocess.Popen(
        [sys.executable, "-m", "simimg.cli", *(args or index_args(data, home, name))],
        cwd=ROOT,
        env={**os.environ, "SIMIMG_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while proc.poll() is None:
        if catalog.exists() and catalog_progress(catalog)[1] >= after_rows:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    version, committed = catalog_progress(catalog)
    return version > before, committed


def resume_after_kill(
    data: Path, home: Path, name: str, after_rows: int, to_embed: int, args: list[str] | None = None
) -> dict:
    """Kill a run, re-run the same command (in this process), and check that committed embeddings were not computed
    again."""
    finished, committed = kill_during_index(data, home, name, after_rows, args)
    report = main_json(*(args or index_args(data, home, name)))
    assert report["indexed"] == (0 if finished else to_embed - committed)
    return report


def kill_points(n: int, count: int) -> list[int]:
    """Seeded random commit counts to kill at, plus 'as soon as it writes' and 'everything committed'."""
    rng = np.random.default_rng(KILL_SEED)
    return [0, *sorted(int(k) for k in rng.integers(1, n, count)), n]


def copy_index(src: Path, home: Path, name: str) -> None:
    shutil.copytree(src, IndexFolder.of(home, name).root)


# --- shared data: the folder, its edited copy, a second model, and their uninterrupted indexes -----------------
def second_model() -> tuple[torch.nn.Module, ModelBundle]:
    """A model of another embedding for 32 px indexes, as a fine-tune leaves one: the random-init trunk, nudged."""
    net, bundle = build_model(None, "none", 32)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in net.trunk.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return net, describe(
        net, bundle.arch, (), bundle.preprocess, "random-init:seed=1+noise", "fine-tuned", weights="none"
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("reliability")
    data = make_class_images(base / "data", CLASSES, size=40)
    edited = base / "edited"
    shutil.copytree(data, edited)
    for gone in ("circles/circles_000.png", "circles/circles_001.png", "squares/squares_005.png"):
        (edited / gone).unlink()
    make_class_images(edited, {"stars": 5}, size=40, seed=1)
    rng = np.random.default_rng(2)
    for i in range(3):
        synthetic_image(0, rng, 40).save(edited / "circles" / f"circles_new_{i}.png")
    synthetic_image(1, rng, 40).save(edited / "squares" / "squares_003.png")  # same name, new content
    net, model2 = second_model()
    home = base / "refs"
    first = reference_index(data, home, "first")
    second = reference_index(edited, home, "edited")
    publish_model(IndexFolder.of(home, "model2"), net, model2)
    third = reference_index(data, home, "model2", model=model2.fingerprint)
    return {
        "data": data,
        "edited": edited,
        "model2": (net, model2),
        "home": home,
        "first": first,
        "edited_rows": second,
        "model2_rows": third,
    }


def install_model(model2: tuple, home: Path, name: str) -> str:
    """What `simimg train` leaves in an index folder: one more kept model. Returns its fingerprint."""
    net, bundle = model2
    publish_model(IndexFolder.of(home, name), net, bundle)
    return bundle.fingerprint


# --- crash safety -------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("after_rows", kill_points(N_IMAGES, 1))
def test_killed_initial_index_resumes_to_the_uninterrupted_result(world: dict, tmp_path: Path, after_rows: int) -> None:
    report = resume_after_kill(world["data"], tmp_path, "photos", after_rows, N_IMAGES)
    assert report["total"] == N_IMAGES and report["skipped"] == []
    assert_same_rows(consistent_state(tmp_path, "photos"), world["first"])


@pytest.mark.e2e
@pytest.mark.parametrize("after_rows", kill_points(9, 1)[1:])
def test_killed_incremental_update_resumes_to_the_uninterrupted_result(
    world: dict, tmp_path: Path, after_rows: int
) -> None:
    """5 stars and 3 circles added, 3 files deleted, 1 rewritten: 9 to embed."""
    copy_index(world["home"] / "first", tmp_path, "photos")
    resume_after_kill(world["edited"], tmp_path, "photos", after_rows, 9)
    assert_same_rows(consistent_state(tmp_path, "photos"), world["edited_rows"])


@pytest.mark.e2e
def test_killed_switch_to_a_new_model_never_mixes_models(world: dict, tmp_path: Path) -> None:
    copy_index(world["home"] / "first", tmp_path, "photos")
    model = install_model(world["model2"], tmp_path, "photos")
    after = kill_points(N_IMAGES, 1)[1]
    finished, committed = kill_during_index(
        world["data"], tmp_path, "photos", after, use_args(model, tmp_path, "photos")
    )
    if not finished:  # readers still get the first model's version, whole
        assert_same_rows(consistent_state(tmp_path, "photos"), world["first"])
    report = main_json(*use_args(model, tmp_path, "photos"))
    assert report["rebuilt"] and report["indexed"] == (0 if finished else N_IMAGES - committed)
    assert_same_rows(consistent_state(tmp_path, "photos"), world["model2_rows"])


@pytest.mark.e2e
def test_a_switch_after_a_killed_first_index_keeps_the_committed_rows(world: dict, tmp_path: Path) -> None:
    finished, committed = kill_during_index(world["data"], tmp_path, "photos", N_IMAGES // 2)
    assert not finished and committed >= N_IMAGES // 2
    model = install_model(world["model2"], tmp_path, "photos")
    report = run_index(
        IndexJob(str(world["data"]), "photos", str(tmp_path), batch_size=4, workers=0, chunk_size=4, model=model)
    )
    assert report.indexed == N_IMAGES and report.model == model  # every image needs the new model's vector
    assert_same_rows(consistent_state(tmp_path, "photos"), world["model2_rows"])


# --- broken models and indexes: a clear error, or a clean repair by the next `simimg index` -----------------
def in_process_index(data: Path, home: Path, name: str) -> None:
    run_index(IndexJob(str(data), name, str(home), batch_size=4, workers=0, chunk_size=4))


def flip_byte(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


FAISS_DAMAGE = {
    "missing": lambda p: p.unlink(),
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "garbage": lambda p: p.write_bytes(np.random.default_rng(0).bytes(p.stat().st_size)),
}


@pytest.mark.parametrize(
    "damage", [d if d == "truncated" else pytest.param(d, marks=pytest.mark.slow) for d in sorted(FAISS_DAMAGE)]
)
def test_a_damaged_faiss_file_is_an_error_for_readers_and_rebuilt_by_the_next_index(
    world: dict, tmp_path: Path, damage: str
) -> None:
    copy_index(world["home"] / "first", tmp_path, "photos")
    paths = IndexFolder.of(tmp_path, "photos")
    FAISS_DAMAGE[damage](paths.faiss(1))
    with pytest.raises(SimimgError, match="re-run `simimg index`"):
        SearchService(tmp_path, "photos", "cpu")
    in_process_index(world["data"], tmp_path, "photos")
    assert_same_rows(consistent_state(tmp_path, "photos"), world["first"])
    query = world["data"] / "circles" / "circles_004.png"
    assert (
        SearchService(tmp_path, "photos", "cpu").query_file(query, k=1).neighbors[0].path == "circles/circles_004.png"
    )


def test_a_leftover_faiss_file_of_an_unpublished_version_is_replaced(world: dict, tmp_path: Path) -> None:
    """A crash after save_index and before publish leaves index-(V+1).faiss that no catalog version vouches for."""
    copy_index(world["home"] / "first", tmp_path, "photos")
    IndexFolder.of(tmp_path, "photos").faiss(2).write_bytes(b"half a file")
    in_process_index(world["edited"], tmp_path, "photos")
    assert_same_rows(consistent_state(tmp_path, "photos"), world["edited_rows"])


BUNDLE_DAMAGE = {
    "weights missing": (BUNDLE_WEIGHTS, lambda p: p.unlink(), "unreadable weights"),
    "weights truncated": (BUNDLE_WEIGHTS, lambda p: p.write_bytes(p.read_bytes()[:5000]), "unreadable weights"),
    "weights bit-flipped": (BUNDLE_WEIGHTS, lambda p: flip_byte(p, 1000), "is corrupted: its weights' fingerprint"),
    "model.json missing": (BUNDLE_JSON, lambda p: p.unlink(), "keeps no model"),
    "model.json corrupt": (BUNDLE_JSON, lambda p: p.write_text(p.read_text()[:40]), "is corrupt"),
}


def serving_dir(home: Path, name: str) -> Path:
    folder = IndexFolder.of(home, name)
    with reading(folder.catalog) as catalog:
        return folder.model_dir(catalog.published().model)


@pytest.mark.parametrize("damage", sorted(BUNDLE_DAMAGE))
def test_a_damaged_model_is_a_clear_error_for_readers_and_writers(world: dict, tmp_path: Path, damage: str) -> None:
    """Never a silent answer from another model, and `simimg index` never quietly replaces a model it cannot read."""
    copy_index(world["home"] / "first", tmp_path, "photos")
    paths = IndexFolder.of(tmp_path, "photos")
    file, spoil, message = BUNDLE_DAMAGE[damage]
    spoil(serving_dir(tmp_path, "photos") / file)
    with pytest.raises(SimimgError, match=message):
        SearchService(tmp_path, "photos", "cpu")
    with pytest.raises(SimimgError, match=message):
        in_process_index(world["data"], tmp_path, "photos")
    assert catalog_progress(paths.catalog) == (1, 0)


def test_a_lost_serving_model_is_one_line_and_serving_a_kept_one_repairs_it(world: dict, tmp_path: Path) -> None:
    copy_index(world["home"] / "first", tmp_path, "photos")
    model = install_model(world["model2"], tmp_path, "photos")
    shutil.rmtree(serving_dir(tmp_path, "photos"))
    code, out, err = run_main(
        "query", str(world["data"] / "circles" / "circles_004.png"), "--home", str(tmp_path), "--name", "photos"
    )
    assert code == 2 and out == ""
    assert err.startswith("simimg: error: ") and err.count("\n") == 1
    assert "keeps no model" in err and "simimg models" in err
    main_json(*use_args(model, tmp_path, "photos"))
    assert_same_rows(consistent_state(tmp_path, "photos"), world["model2_rows"])


# --- readers during re-indexes -------------------------------------------------------------------------
def answer(service: SearchService, query: Path) -> tuple[int, list[str], list[float]]:
    """(version served, neighbour paths, scores); the one reader thread is the only one that refreshes."""
    result = service.query_file(query, k=8)
    return service.snapshot.version, [n.path for n in result.neighbors], [n.score for n in result.neighbors]


@pytest.mark.slow
def test_readers_see_one_whole_version_at_a_time_and_pick_up_new_ones(world: dict, tmp_path: Path) -> None:
    live = tmp_path / "live"
    shutil.copytree(world["data"], live)
    copy_index(world["home"] / "first", tmp_path, "photos")
    query = live / "circles" / "circles_004.png"
    edits = [
        lambda: make_class_images(live, {"stars": 4}, size=40, seed=3),
        lambda: (
            [(live / "squares" / f"squares_{i:03d}.png").unlink() for i in range(4)]
            + [make_class_images(live / "circles", {"more": 3}, size=40, seed=4)]
        ),
    ]
    reader = SearchService(tmp_path, "photos", "cpu")
    answers: list[tuple[int, list[str], list[float]]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def read_loop() -> None:
        try:
            while not stop.is_set():
                answers.append(answer(reader, query))
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            failures.append(err)

    expected = {1: (answer(SearchService(tmp_path, "photos", "cpu"), query), set(world["first"]))}
    thread = threading.Thread(target=read_loop)
    thread.start()
    try:
        for edit in edits:
            edit()
            main_json(*index_args(live, tmp_path, "photos"))
            fresh = SearchService(tmp_path, "photos", "cpu")
            expected[fresh.snapshot.version] = (answer(fresh, query), set(fresh.snapshot.paths))
        published_last = len(answers)
        while len(answers) < published_last + 2 and thread.is_alive():
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    assert failures == []
    assert sorted(expected) == [1, 2, 3] and answers[-1][0] == 3
    assert len({version for version, _, _ in answers}) >= 2
    for version, paths, scores in answers:
        (_, want_paths, want_scores), snapshot_paths = expected[version]
        assert set(paths) <= snapshot_paths
        assert paths == want_paths and np.allclose(scores, want_scores, atol=1e-5)
        assert len(paths) == 8 and scores == sorted(scores, reverse=True)


# --- bad files: one batch through the real CLI ------------------------------------------------------------
def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels: the shape of a decompression bomb, in 60 bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def awkward_images(folder: Path) -> list[str]:
    """Files that are odd but readable: every one must be indexed. Returns their paths relative to the root."""
    rng = np.random.default_rng(5)
    rgb = synthetic_image(2, rng, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    makers = {
        "cmyk.jpg": lambda p: rgb.convert("CMYK").save(p),
        "deep16.png": lambda p: Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257).save(p),
        "rgba.png": lambda p: rgb.convert("RGBA").save(p),
        "la.png": lambda p: rgb.convert("LA").save(p),
        "palette.png": lambda p: rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(p, transparency=0),
        "rotated.jpg": lambda p: rgb.resize((40, 20)).save(p, exif=exif),
        "one.png": lambda p: rgb.resize((1, 1)).save(p),
        "eight.png": lambda p: rgb.resize((8, 8)).save(p),
        "wide.png": lambda p: rgb.resize((4000, 40)).save(p),
        "png-named.jpg": lambda p: rgb.save(p, format="PNG"),
        "jpeg-named.PNG": lambda p: rgb.save(p, format="JPEG"),
        "café ☕ 写真.png": lambda p: rgb.save(p),
        "  many   spaces  .png": lambda p: rgb.save(p),
    }
    folder.mkdir(parents=True)
    for name, make in makers.items():
        make(folder / name)
    return [f"{folder.name}/{name}" for name in makers]


def broken_files(folder: Path, elsewhere: Path) -> dict[str, str]:
    """Files that cannot be indexed, each with the words its skip reason must contain."""
    folder.mkdir(parents=True)
    jpeg = folder / "truncated.jpg"
    synthetic_image(0, np.random.default_rng(6), 64).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[:400])
    (folder / "empty.png").write_bytes(b"")
    (folder / "noise.png").write_bytes(np.random.default_rng(7).bytes(3000))
    (folder / "notes.jpg").write_text("shopping list: milk, eggs\n" * 20)
    (folder / "bomb.png").write_bytes(png_header_only(30_000, 30_000))
    (folder / "dangling.png").symlink_to(elsewhere / "no-such-file.png")
    return {
        "bad/truncated.jpg": "truncated",
        "bad/empty.png": "empty file",
        "bad/noise.png": "unrecognised data",
        "bad/notes.jpg": "holds text",
        "bad/bomb.png": "decompression bomb",
        "bad/dangling.png": "broken symbolic link",
    }


def link_loop(root: Path, outside: Path) -> dict[str, str]:
    """Two folders outside the collection that link to each other, reached through a link from inside it;
    and a link from the collection back to its own root."""
    for a, b in (("x", "y"), ("y", "x")):
        (outside / a).mkdir(parents=True)
        (outside / a / f"to_{b}").symlink_to(outside / b, target_is_directory=True)
    synthetic_image(3, np.random.default_rng(8), 40).save(outside / "x" / "linked.png")
    (root / "linked").symlink_to(outside / "x", target_is_directory=True)
    (root / "linked_back").symlink_to(root, target_is_directory=True)  # inside: never followed, nothing twice
    return {"linked/to_y/to_x": "folder link loop"}


def test_a_batch_of_bad_files_is_reported_and_everything_else_is_indexed(tmp_path: Path) -> None:
    data = make_class_images(tmp_path / "data", {"good": 6}, size=40)
    readable = [f"good/good_{i:03d}.png" for i in range(6)] + awkward_images(data / "awkward") + ["linked/linked.png"]
    expected_skips = {**broken_files(data / "bad", tmp_path), **link_loop(data, tmp_path / "outside")}
    report = main_json(*index_args(data, tmp_path / "home", "messy"))
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert sorted(skipped) == sorted(expected_skips), skipped
    for path, words in expected_skips.items():
        assert words in skipped[path], (path, skipped[path])
    assert report["indexed"] == report["total"] == len(readable)
    rows = consistent_state(tmp_path / "home", "messy")
    assert sorted(rows) == sorted(readable)
    assert all(np.isfinite(v).all() and abs(np.linalg.norm(v) - 1) < 1e-4 for _, v in rows.values())


def test_an_unreadable_file_is_skipped_and_the_rest_indexed(tmp_path: Path) -> None:
    data = make_class_images(tmp_path / "data", {"good": 2}, size=40)
    locked = data / "good" / "locked.png"
    synthetic_image(1, np.random.default_rng(9), 40).save(locked)
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as root: a file without read permission can still be read")
        report = main_json(*index_args(data, tmp_path / "home", "locked"))
    finally:
        locked.chmod(0o644)
    assert [(s["path"], s["reason"]) for s in report["skipped"]] == [
        ("good/locked.png", "permission denied: the file cannot be read")
    ]
    assert sorted(consistent_state(tmp_path / "home", "locked")) == ["good/good_000.png", "good/good_001.png"]
