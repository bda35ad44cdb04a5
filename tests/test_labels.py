"""Label edits as versioned data (jobs/labels.py, store/edits.py, dataset/corrections.py), the unlabeled pool,
and the export of a corrected collection: through the public API and `simimg labels`, on real indexes."""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

import simimg
from conftest import ROOT, Built, copy_built, main_json, make_class_images, run_main
from simimg.dataset.corrections import Corrections, Edit
from simimg.dataset.scan import Record
from simimg.errors import SimimgError


@pytest.fixture
def shapes(shapes_index: Built, tmp_path: Path) -> Built:
    """This test's own copy of the session's 'shapes' (3 classes x 6, no classifier)."""
    return copy_built(shapes_index, tmp_path)


def labels_now(built: Built) -> dict[str, str | None]:
    """What a reader of the published version sees: path -> label."""
    return dict(simimg.open_index(built.name, built.home).browse(per_page=10_000).items)


def test_corrections_fold_keeps_the_latest_edit_of_each_slot():
    edits = [
        Edit("a.png", "set", "cats", "dogs", batch=1),
        Edit("a.png", "exclude", "dogs", "dogs", batch=2),
        Edit("a.png", "set", "dogs", "birds", batch=3),  # labelled again: back in
        Edit("b.png", "exclude", "cats", "cats", batch=3),
        Edit("c.png", "dismiss", "cats", "cats", batch=4),
    ]
    folded = Corrections.fold(edits)
    assert folded.labels == {"a.png": "birds"} and folded.excluded == {"b.png"} and folded.dismissed == {"c.png"}
    records = (Record("a.png", "cats"), Record("b.png", "cats"), Record("c.png", "cats"), Record("d.png", None))
    assert folded.apply(records) == (Record("a.png", "birds"), Record("c.png", "cats"), Record("d.png", None))
    for bad in ("", "a/b", ".hidden", "unlabeled"):
        with pytest.raises(SimimgError, match=r"class name|unlabeled pool"):
            Edit("a.png", "set", "cats", bad)


def test_set_relabels_over_the_same_vectors_and_undo_restores(shapes: Built):
    before = labels_now(shapes)
    vectors_before = simimg.open_index(shapes.name, shapes.home).vectors()
    report = simimg.set_labels(
        shapes.name, ["circles/circles_000.png", str(shapes.data / "circles/circles_001.png")], "squares", shapes.home
    )
    assert (report.action, report.edits, report.relabelled, report.version) == ("set", 2, 2, 2)
    after = labels_now(shapes)
    assert after["circles/circles_000.png"] == after["circles/circles_001.png"] == "squares"
    assert {p: c for p, c in after.items() if not p.startswith("circles/circles_00")} == {
        p: c for p, c in before.items() if not p.startswith("circles/circles_00")
    }
    vectors_after = simimg.open_index(shapes.name, shapes.home).vectors()
    by_path = [dict(zip(snapshot.paths, vectors)) for snapshot, vectors in (vectors_before, vectors_after)]
    assert all(np.array_equal(by_path[0][p], by_path[1][p]) for p in before)  # nothing re-embedded
    edits = simimg.label_edits(shapes.name, shapes.home)
    assert [(e["path"], e["action"], e["old_label"], e["new_label"], e["source"], e["batch"]) for e in edits] == [
        ("circles/circles_000.png", "set", "circles", "squares", "user", 1),
        ("circles/circles_001.png", "set", "circles", "squares", "user", 1),
    ]
    assert (shapes.data / "circles/circles_000.png").exists()  # files never move
    undone = simimg.undo_labels(shapes.name, shapes.home)
    assert (undone.action, undone.batch, undone.version) == ("undo", 1, 3)
    assert labels_now(shapes) == before and simimg.label_edits(shapes.name, shapes.home) == []
    with pytest.raises(SimimgError, match="no label edit to undo"):
        simimg.undo_labels(shapes.name, shapes.home)


@pytest.mark.slow
def test_exclude_leaves_the_index_keeps_the_file_and_keep_one_excludes_the_rest(shapes: Built):
    report = simimg.exclude_images(shapes.name, ["squares/squares_002.png"], shapes.home)
    assert (report.excluded, simimg.index_info(shapes.name, shapes.home)["total"]) == (1, 17)
    assert "squares/squares_002.png" not in labels_now(shapes) and (shapes.data / "squares/squares_002.png").exists()
    again = simimg.build_index(shapes.data, shapes.name, shapes.home)  # a re-scan keeps it out
    assert (again.total, again.excluded, again.removed, again.indexed) == (17, 1, 0, 0)
    kept = simimg.keep_one(
        shapes.name,
        "triangles/triangles_000.png",
        ["triangles/triangles_000.png", "triangles/triangles_001.png"],
        shapes.home,
    )
    assert kept.excluded == 2 and "triangles/triangles_001.png" not in labels_now(shapes)
    simimg.set_labels(shapes.name, ["squares/squares_002.png"], "circles", shapes.home)  # labelled again: back in
    assert labels_now(shapes)["squares/squares_002.png"] == "circles"
    simimg.undo_labels(shapes.name, shapes.home)
    simimg.undo_labels(shapes.name, shapes.home)
    simimg.undo_labels(shapes.name, shapes.home)  # the exclusion undone: the image is embedded again and searchable
    assert simimg.index_info(shapes.name, shapes.home)["total"] == 18
    hit = simimg.open_index(shapes.name, shapes.home).search(shapes.data / "squares/squares_002.png", k=1)
    assert hit.neighbors[0].path == "squares/squares_002.png"


@pytest.mark.slow
def test_a_rescan_keeps_an_edit_on_a_changed_file_and_drops_it_when_the_file_is_gone(shapes: Built):
    simimg.set_labels(shapes.name, ["circles/circles_002.png", "circles/circles_003.png"], "ovals", shapes.home)
    changed = shapes.data / "circles/circles_002.png"
    make_class_images(shapes.base / "other", {"x": 1}, size=48, seed=7)
    os.replace(shapes.base / "other/x/x_000.png", changed)  # new bytes under the same path
    (shapes.data / "circles/circles_003.png").unlink()
    report = simimg.build_index(shapes.data, shapes.name, shapes.home)
    assert (report.indexed, report.removed, report.total) == (1, 1, 17)
    assert labels_now(shapes)["circles/circles_002.png"] == "ovals"  # the edit follows the path
    assert [e["path"] for e in simimg.label_edits(shapes.name, shapes.home)] == ["circles/circles_002.png"]


@pytest.mark.slow
def test_the_unlabeled_pool_is_searchable_never_trained_on_and_can_be_labelled(shapes: Built, tmp_path: Path):
    make_class_images(shapes.data / "unlabeled", {"pool": 2}, size=48, seed=3)
    outside = make_class_images(tmp_path / "elsewhere", {"more": 2}, size=48, seed=4)
    report = simimg.build_index(shapes.data, shapes.name, shapes.home, unlabeled=str(outside))
    assert report.indexed == 4 and report.total == 22
    labels = labels_now(shapes)
    pool = sorted((p for p, label in labels.items() if label is None), key=os.path.isabs)
    assert pool[:2] == ["unlabeled/pool/pool_000.png", "unlabeled/pool/pool_001.png"]
    assert pool[2:] == [str((outside / f"more/more_00{i}.png").resolve()) for i in range(2)]
    assert simimg.build_index(shapes.data, shapes.name, shapes.home).total == 22  # the outside pool is remembered
    simimg.train(shapes.data, shapes.name, shapes.home, head_only=True)
    assert simimg.index_info(shapes.name, shapes.home)["classes"] == ["circles", "squares", "triangles"]
    simimg.set_labels(shapes.name, [pool[0], pool[2]], "blobs", shapes.home, source="prediction")
    simimg.train(shapes.data, shapes.name, shapes.home, head_only=True)
    assert simimg.index_info(shapes.name, shapes.home)["classes"] == ["blobs", "circles", "squares", "triangles"]
    assert [e["source"] for e in simimg.label_edits(shapes.name, shapes.home)] == ["prediction", "prediction"]


@pytest.mark.slow
def test_dismissed_findings_are_marked_seen_and_accepted_suggestions_become_edits(split_index: Built, tmp_path: Path):
    built = copy_built(split_index, tmp_path)
    flipped = [f"train/circles/circles_00{i}.png" for i in range(3)]
    simimg.set_labels(built.name, flipped, "triangles", built.home)  # the audit reads the labels as edited
    first = simimg.audit(built.data, built.name, built.home)
    issue = first.label_issues[0]
    assert issue["path"] in flipped and (issue["label"], issue["suggested"]) == ("triangles", "circles")
    simimg.dismiss_findings(built.name, [issue["path"]], built.home)
    second = simimg.audit(built.data, built.name, built.home)
    assert [i["path"] for i in second.label_issues if i["seen"]] == [issue["path"]] and second.summary["seen"] >= 1
    assert second.summary["label_issues"] == sum(not i["seen"] for i in second.label_issues)
    with pytest.raises(SimimgError, match="no label suggestion left"):
        simimg.accept_suggestions(built.name, home=built.home)
    simimg.undo_labels(built.name, built.home)  # the dismissal
    accepted = simimg.accept_suggestions(built.name, top=1, home=built.home)
    edit = simimg.label_edits(built.name, built.home)[-1]
    assert accepted.edits == 1 and (edit["path"], edit["new_label"], edit["source"]) == (
        issue["path"],
        "circles",
        "audit",
    )
    assert labels_now(built)[issue["path"]] == "circles"


@pytest.mark.slow
def test_export_writes_the_corrected_tree_or_a_table_and_a_move_can_be_undone(shapes: Built, tmp_path: Path):
    simimg.set_labels(shapes.name, ["circles/circles_000.png"], "squares", shapes.home)
    simimg.exclude_images(shapes.name, ["triangles/triangles_000.png"], shapes.home)
    tree = simimg.export_labels(shapes.name, tmp_path / "tree", home=shapes.home)
    files = sorted(p.relative_to(tmp_path / "tree").as_posix() for p in (tmp_path / "tree").rglob("*.png"))
    assert tree["images"] == 17 and len(files) == 17
    assert "squares/circles_000.png" in files and not any("triangles_000" in f for f in files)
    simimg.export_labels(shapes.name, tmp_path / "labels.csv", "csv", home=shapes.home)
    rows = {r["path"]: r for r in csv.DictReader((tmp_path / "labels.csv").open())}
    assert rows["circles/circles_000.png"] == {
        "path": "circles/circles_000.png",
        "label": "squares",
        "folder_label": "circles",
        "edited_by": "user",
    }
    simimg.export_labels(shapes.name, tmp_path / "labels.parquet", "parquet", home=shapes.home)
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "labels.parquet").num_rows == 17
    moved = simimg.export_labels(shapes.name, tmp_path / "moved", move=True, home=shapes.home)
    assert moved["moved"] and not (shapes.data / "circles/circles_000.png").exists()
    assert (tmp_path / "moved/squares/circles_000.png").exists()
    assert simimg.undo_moves(tmp_path / "moved" / "moves.jsonl") == 17
    assert (shapes.data / "circles/circles_000.png").exists()


def test_labels_cli_json_list_and_one_line_errors(shapes: Built):
    common = ["--name", shapes.name, "--home", str(shapes.home)]
    report = main_json("labels", "set", *common, "--to", "squares", "circles/circles_004.png")
    assert (report["action"], report["edits"], report["relabelled"]) == ("set", 1, 1)
    listed = main_json("labels", "list", *common)
    assert [set(e) for e in listed] == [{"path", "action", "old_label", "new_label", "source", "batch", "created"}]
    for args, message in [
        (["set", *common, "--to", "squares", "nope.png"], "holds no image 'nope.png'"),
        (["set", *common, "--to", "a/b", "circles/circles_004.png"], "is not a class name"),
        (["accept", *common], "has no audit to accept"),
    ]:
        code, out, err = run_main("labels", *args)
        assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
    assert main_json("labels", "undo", *common)["batch"] == 1


@pytest.mark.e2e
def test_a_batch_killed_mid_way_is_never_half_applied(shapes: Built):
    """SIGKILL as soon as the batch is recorded: readers see all old labels or all new ones, and the next run
    publishes the whole batch."""
    paths = [f"circles/circles_00{i}.png" for i in range(6)]
    before = labels_now(shapes)
    command = [sys.executable, "-m", "simimg.cli", "labels", "set", "--name", shapes.name]
    command += ["--home", str(shapes.home), "--to", "squares", *paths]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    catalog = shapes.home / shapes.name / "catalog.sqlite"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not _batches(catalog):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    now = labels_now(shapes)
    assert now in (before, {**before, **dict.fromkeys(paths, "squares")})  # never a mix
    assert _batches(catalog) == [6]  # the batch is there whole
    simimg.build_index(shapes.data, shapes.name, shapes.home)
    assert labels_now(shapes) == {**before, **dict.fromkeys(paths, "squares")}


def _batches(catalog: Path) -> list[int]:
    """Edits per recorded batch, read as any reader would."""
    try:
        with closing(sqlite3.connect(f"file:{catalog}?mode=ro", uri=True)) as db:
            return [n for (n,) in db.execute("SELECT COUNT(*) FROM edits GROUP BY batch ORDER BY batch")]
    except sqlite3.OperationalError:  # no edits table yet
        return []
