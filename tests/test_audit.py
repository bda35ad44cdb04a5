"""The dataset audit: findings.py's pure findings on hand-made arrays, and `simimg audit` on generated images with
injected duplicates (the API, audit.json and the CLI's JSON contract)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import simimg
from conftest import copy_built, main_json, point_index_at, run_main
from simimg.analysis.findings import (
    class_balance,
    crosses,
    exact_duplicates,
    label_issues,
    near_duplicates,
    out_of_fold_probabilities,
    outliers,
)
from simimg.analysis.neighbours import near_duplicate_threshold
from simimg.errors import SimimgError
from simimg.jobs.audit_config import read_audit
from simimg.jobs.index import run_index
from simimg.jobs.index_config import IndexJob
from simimg.store.layout import IndexFolder

CLASSES = {"circles": 8, "squares": 8, "triangles": 8}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_exact_duplicates_groups_equal_hashes_in_order_of_appearance():
    groups = exact_duplicates(["a", "b", "a", "c", "b", "a"])
    assert [(g.positions, g.kind, g.score) for g in groups] == [((0, 2, 5), "exact", 1.0), ((1, 4), "exact", 1.0)]
    assert exact_duplicates(["a", "b"]) == []


@pytest.mark.parametrize("spread", [0.01, 1.0])  # random-init features (every pair near 0.99), trained ones
def test_near_duplicates_adapts_its_threshold_to_the_spread(spread):
    rng = np.random.default_rng(0)
    base = rng.normal(size=64)
    x = unit(base + spread * rng.normal(size=(60, 64)))
    x[7] = unit(x[3:4] + spread * 0.01 * rng.normal(size=(1, 64)))[0]  # a re-encoded copy of image 3
    hashes = [f"h{i}" for i in range(60)]
    pairs, threshold = near_duplicates(x, hashes)
    assert [(d.positions, d.kind) for d in pairs] == [((3, 7), "near")]
    nn = np.sort(x @ x.T - 2 * np.eye(60), axis=1)[:, -1]
    assert np.median(nn) < threshold < 1.0  # far above the typical nearest neighbour, whatever the spread
    hashes[9] = hashes[3]  # an exact copy is exact_duplicates' finding, and does not pair up here
    x[9] = x[3]
    assert [d.positions for d in near_duplicates(x, hashes)[0]] == [(3, 7)]


def test_near_duplicate_threshold_follows_the_median_nearest_neighbour_distance():
    assert near_duplicate_threshold(np.array([0.99, 0.98, 0.97])) == pytest.approx(1 - 0.13 * 0.02)
    assert near_duplicate_threshold(np.array([])) == 1.0


def clusters(rng: np.random.Generator, per_class: int = 30, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    centres = np.eye(classes, 16) * 3
    x = np.concatenate([rng.normal(c, 0.6, (per_class, 16)) for c in centres])
    return unit(x), np.repeat(np.arange(classes), per_class)


@pytest.mark.slow
def test_label_issues_finds_flipped_labels_with_the_class_they_look_like():
    rng = np.random.default_rng(0)
    x, y = clusters(rng)
    flipped = [2, 35, 70]
    noisy = y.copy()
    noisy[flipped] = [1, 2, 0]
    probs = out_of_fold_probabilities(x, noisy, 3, seed=0)
    assert probs.shape == (90, 3) and np.allclose(probs.sum(1), 1)
    issues = label_issues(noisy, probs)
    assert sorted(i.position for i in issues) == flipped
    assert all(i.suggested == y[i.position] and 0 <= i.score < 0.5 for i in issues)
    assert label_issues(y, out_of_fold_probabilities(x, y, 3)) == []


def test_out_of_fold_probabilities_needs_two_images_per_class():
    x, y = clusters(np.random.default_rng(0), per_class=4)
    with pytest.raises(SimimgError, match="at least 2 images in every class"):
        out_of_fold_probabilities(x[:9], y[:9], 3)


def test_outliers_flags_points_far_from_everything_else():
    rng = np.random.default_rng(0)
    x, _ = clusters(rng)
    strays = unit(rng.normal(size=(2, 16)) * np.r_[np.zeros(3), np.ones(13)])  # off every class's axis
    found = outliers(np.concatenate([x, strays]))
    assert {o.position for o in found} == {90, 91}
    assert found == sorted(found, key=lambda o: o.score) and all(0 <= o.score < 1 for o in found)
    assert outliers(x[:2]) == []


def test_class_balance_and_crosses():
    balance = class_balance(np.array([0] * 20 + [1] * 10 + [2]), ("a", "b", "c"))
    assert balance == {"counts": {"a": 20, "b": 10, "c": 1}, "ratio": 20.0, "imbalanced": True, "rare": ["c"]}
    assert not class_balance(np.array([0, 0, 1, 1]), ("a", "b"))["imbalanced"]
    assert crosses([0, 2], ["a", "a", "b"], ["train", "val", "val"]) == (True, True)
    assert crosses([0, 1], ["a", "a", "b"], ["train", "val", "val"]) == (False, True)
    assert crosses([1, 2], ["a", "a", "b"], ["train", "val", "val"]) == (True, False)


@pytest.fixture(scope="module")
def dirty_index(split_index, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a train/val folder with three exact copies injected: cross-class, cross-split, both; an index of it): the
    session's train/val collection, copied, with the copies added and indexed."""
    copy = copy_built(split_index, tmp_path_factory.mktemp("audit") / "base")
    data, home = copy.data, copy.home
    for source, target in [
        ("train/circles/circles_000.png", "train/squares/copy_a.png"),
        ("train/circles/circles_001.png", "val/circles/copy_b.png"),
        ("train/squares/squares_002.png", "val/triangles/copy_c.png"),
    ]:
        shutil.copy(data / source, data / target)
    assert run_index(IndexJob(str(data), "shapes", str(home))).indexed == 3
    return data, home


@pytest.fixture
def dirty(dirty_index: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """This test's copy of the module's folder and index (an audit keeps its report in the index folder)."""
    data, home = tmp_path / "shapes", tmp_path / "home"
    shutil.copytree(dirty_index[0], data)
    shutil.copytree(dirty_index[1], home)
    point_index_at(home, "shapes", data)
    return data, home


INJECTED = {
    ("train/circles/circles_000.png", "train/squares/copy_a.png"): (True, False),
    ("train/circles/circles_001.png", "val/circles/copy_b.png"): (False, True),
    ("train/squares/squares_002.png", "val/triangles/copy_c.png"): (True, True),
}


def test_audit_finds_every_injected_exact_duplicate_and_keeps_its_report(dirty):
    data, home = dirty
    shutil.copy(data / "val/squares/squares_000.png", data / "train/triangles/late.png")  # not in the index
    phases, progress = [], []
    report = simimg.audit(
        data,
        "shapes",
        home,
        workers=0,
        on_phase=phases.append,
        progress=lambda done, total: progress.append((done, total)),
    )
    assert phases == ["reading", "embedding", "fitting", "saving"] and progress == [(1, 1)]
    exact = {tuple(d["paths"]): (d["cross_class"], d["cross_split"]) for d in report.duplicates if d["kind"] == "exact"}
    assert exact == {**INJECTED, ("train/triangles/late.png", "val/squares/squares_000.png"): (True, True)}
    s = report.summary
    assert (s["images"], s["from_catalog"], s["embedded"], s["split"]) == (37, 36, 1, "folders")
    assert s["exact_duplicates"] == 4 and s["cross_class"] >= 3 and s["cross_split"] >= 3
    assert 0 < s["near_threshold"] < 1 and s["classes"] == sorted(CLASSES) and s["skipped"] == []
    assert s["imbalance"]["counts"] == {"circles": 12, "squares": 12, "triangles": 13}
    for issue in report.label_issues:
        assert set(issue) == {"path", "label", "suggested", "score", "seen"} and issue["label"] != issue["suggested"]
        assert issue["seen"] is False  # nothing dismissed (tests/test_labels.py dismisses)
    assert read_audit(IndexFolder.of(home, "shapes")) == report


@pytest.mark.slow
def test_audit_skips_a_bad_image_and_reports_it(dirty):
    data, home = dirty
    (data / "train/circles/broken.png").write_bytes(b"not a png")
    report = simimg.audit(data, "shapes", home, workers=0)
    assert [s["path"] for s in report.summary["skipped"]] == ["train/circles/broken.png"]
    assert len([d for d in report.duplicates if d["kind"] == "exact"]) == 3


@pytest.mark.slow
def test_audit_of_a_held_folder_reports_no_embedding_phase_and_a_folder_inside_the_collection_is_audited(dirty):
    data, home = dirty
    phases, progress = [], []
    simimg.audit(data, "shapes", home, workers=0, on_phase=phases.append, progress=lambda *a: progress.append(a))
    assert phases == ["reading", "fitting", "saving"] and progress == []
    inside = simimg.audit(data / "train", "shapes", home, workers=0)  # train/<class>/: a seeded split of it
    assert (inside.summary["images"], inside.summary["embedded"]) == (25, 0)
    assert read_audit(IndexFolder.of(home, "shapes")) == inside


@pytest.mark.slow
def test_audit_of_another_collection_is_refused_and_keeps_the_last_report(dirty, tmp_path, monkeypatch):
    data, home = dirty
    kept = simimg.audit(data, "shapes", home, workers=0)
    other = tmp_path / "other"
    shutil.copytree(data, other)
    monkeypatch.setattr("simimg.jobs.audit.split_vectors", lambda *a, **k: pytest.fail("embedded before refusing"))
    with pytest.raises(SimimgError) as refused:
        simimg.audit(other, "shapes", home, workers=0)
    assert str(refused.value) == (
        f"{other.resolve()} is not index 'shapes''s collection folder ({data.resolve()}) or inside it, and an audit "
        f"is kept with the index it judges: build an index of that folder first (`simimg index {other.resolve()} "
        f"--name other`) and audit it with that index (`simimg audit {other.resolve()} --name other`)"
    )
    assert read_audit(IndexFolder.of(home, "shapes")) == kept
    code, out, err = run_main("audit", str(other), "--name", "shapes", "--home", str(home))
    assert code == 2 and out == "" and err.strip() == f"simimg: error: {refused.value}"


@pytest.mark.slow
def test_audit_cli_json_contract_and_errors(dirty, tmp_path):
    data, home = dirty
    out = main_json("audit", str(data), "--name", "shapes", "--home", str(home), "--workers", "0", "--folds", "3")
    assert set(out) == {"label_issues", "duplicates", "outliers", "summary"}
    for d in out["duplicates"]:
        assert set(d) == {"paths", "kind", "score", "labels", "cross_class", "cross_split", "seen"}
        assert d["kind"] in ("exact", "near") and len(d["labels"]) == len(d["paths"]) >= 2
    assert all(set(o) == {"path", "score", "seen"} for o in out["outliers"])
    assert out["summary"]["seen"] == 0
    assert out["summary"]["job"]["folds"] == 3
    code, text, _ = run_main("audit", str(data), "--name", "shapes", "--home", str(home), "--workers", "0")
    assert code == 0 and "exact duplicates 3" in text and "copy_c.png" in text
    code, _, err = run_main("audit", str(data), "--name", "nothing", "--home", str(home))
    assert code != 0 and "simimg index" in err and "Traceback" not in err
