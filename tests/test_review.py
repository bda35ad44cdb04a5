"""review.py and the Review queues: uncertain images first, least typical first, and the queues over an index."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import simimg
from conftest import Built, copy_built, main_json, make_class_images, run_main
from simimg.analysis.review import least_certain_first, least_typical_first, margins, typicality
from simimg.errors import SimimgError


def test_margins_are_top_one_minus_top_two_whatever_the_column_order():
    p = np.array([[0.1, 0.6, 0.3], [0.34, 0.33, 0.33], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(margins(p), [0.3, 0.01, 1.0])
    assert least_certain_first(p).tolist() == [1, 0, 2]


def test_ties_keep_row_order_so_the_queue_is_repeatable():
    p = np.array([[0.5, 0.5], [0.9, 0.1], [0.5, 0.5]])
    assert least_certain_first(p).tolist() == [0, 2, 1]


def test_the_image_furthest_from_its_class_mean_comes_first():
    rng = np.random.default_rng(0)
    v = np.array([1.0, 0, 0]) + rng.normal(0, 0.05, (6, 3))
    v[4] = [0, 1.0, 0]  # off on its own
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    assert least_typical_first(v)[0] == 4
    assert typicality(v)[4] < typicality(v)[np.arange(6) != 4].min()


@pytest.fixture
def shapes(shapes_index: Built, tmp_path: Path) -> Built:
    """This test's own copy of the session's 'shapes' (3 classes x 6, no classifier)."""
    return copy_built(shapes_index, tmp_path)


def write_audit(built: Built, label_issues: list[dict], duplicates: list[dict]) -> None:
    """An audit report as `simimg audit` keeps it, with findings chosen by the test."""
    report = {"label_issues": label_issues, "duplicates": duplicates, "outliers": [], "summary": {}}
    (built.home / built.name / "audit.json").write_text(json.dumps(report))


def test_the_issue_queue_keeps_the_audits_order_and_drops_what_was_settled_since(shapes: Built):
    issue = [
        {"path": f"circles/circles_00{i}.png", "label": "circles", "suggested": "squares", "score": i / 10}
        for i in range(4)
    ]
    write_audit(shapes, issue, [])
    queue = simimg.review_queue(shapes.name, "issues", home=shapes.home)
    assert [(i.path, i.label, i.suggested, i.score) for i in queue] == [
        (i["path"], "circles", "squares", i["score"]) for i in issue
    ]
    simimg.dismiss_findings(shapes.name, [issue[0]["path"]], shapes.home)
    simimg.set_labels(shapes.name, [issue[1]["path"]], "triangles", shapes.home)
    simimg.exclude_images(shapes.name, [issue[2]["path"]], shapes.home)
    assert [i.path for i in simimg.review_queue(shapes.name, "issues", home=shapes.home)] == [issue[3]["path"]]
    assert simimg.review_queue(shapes.name, "issues", home=shapes.home, limit=0) == []


def test_the_duplicate_queue_tags_each_group_and_drops_groups_that_were_resolved(shapes: Built):
    shutil.copy(shapes.data / "circles/circles_000.png", shapes.data / "squares/copy.png")
    simimg.build_index(shapes.data, shapes.name, shapes.home)
    report = simimg.audit(shapes.data, shapes.name, shapes.home, workers=0)
    exact = [d for d in report.duplicates if d["kind"] == "exact"]
    assert [sorted(d["paths"]) for d in exact] == [["circles/circles_000.png", "squares/copy.png"]]
    queue = simimg.review_queue(shapes.name, "duplicates", home=shapes.home)
    group = report.duplicates.index(exact[0])
    assert {(i.path, i.label) for i in queue if i.group == group} == {
        ("circles/circles_000.png", "circles"),
        ("squares/copy.png", "squares"),
    }
    simimg.keep_one(shapes.name, "circles/circles_000.png", exact[0]["paths"], shapes.home)
    assert [i for i in simimg.review_queue(shapes.name, "duplicates", home=shapes.home) if i.group == group] == []


def test_the_unlabeled_queue_puts_the_least_certain_first_and_shrinks_as_the_user_labels(shapes: Built):
    make_class_images(shapes.data / "unlabeled", {"circles": 2, "squares": 2, "triangles": 2}, size=48, seed=5)
    simimg.build_index(shapes.data, shapes.name, shapes.home)
    queue = simimg.review_queue(shapes.name, "unlabeled", home=shapes.home)
    assert sorted(i.path for i in queue) == sorted(
        f"unlabeled/{c}/{c}_00{n}.png" for c in ("circles", "squares", "triangles") for n in range(2)
    )
    assert all(i.label is None and i.suggested in {"circles", "squares", "triangles"} for i in queue)
    assert all(1 / 3 <= i.probability <= 1 for i in queue)
    assert [i.score for i in queue] == sorted(i.score for i in queue)  # margins, smallest first
    first = queue[0]
    simimg.apply_labels(shapes.name, {first.path: first.suggested, queue[1].path: "triangles"}, shapes.home)
    after = simimg.review_queue(shapes.name, "unlabeled", home=shapes.home)
    assert {i.path for i in after} == {i.path for i in queue[2:]}
    assert (
        simimg.label_edits(shapes.name, shapes.home)[0]["batch"]
        == simimg.label_edits(shapes.name, shapes.home)[1]["batch"]
    )
    simimg.undo_labels(shapes.name, shapes.home)  # one batch, one undo
    assert len(simimg.review_queue(shapes.name, "unlabeled", home=shapes.home)) == len(queue)
    common = ["--name", shapes.name, "--home", str(shapes.home)]
    listed = main_json("labels", "queue", *common, "--queue", "unlabeled", "--limit", "2")
    assert listed == [i.to_dict() for i in queue[:2]]
    code, out, _ = run_main("labels", "queue", *common, "--queue", "unlabeled")
    assert code == 0 and out.splitlines()[0].endswith(queue[0].path) and out.splitlines()[-1] == "6 to review"
    code, _, err = run_main("labels", "queue", *common, "--queue", "class", "--class", "dogs")
    assert code == 2 and "one of the index's classes" in err


def test_the_class_queue_orders_one_class_least_typical_first(shapes: Built):
    queue = simimg.review_queue(shapes.name, "class", "squares", home=shapes.home)
    snapshot, vectors = simimg.open_index(shapes.name, shapes.home).vectors()
    mine = [i for i, label in enumerate(snapshot.labels) if label == "squares"]
    expected = np.array(snapshot.paths)[mine][np.argsort(typicality(vectors[mine]), kind="stable")]
    assert [i.path for i in queue] == expected.tolist()
    assert all(i.label == "squares" and i.suggested != "squares" for i in queue)
    with pytest.raises(SimimgError, match=r"one of the index's classes \(circles, squares, triangles\)"):
        simimg.review_queue(shapes.name, "class", "dogs", home=shapes.home)
    with pytest.raises(SimimgError, match="unknown review queue"):
        simimg.review_queue(shapes.name, "everything", home=shapes.home)
    with pytest.raises(SimimgError, match="no audit to review"):
        simimg.review_queue(shapes.name, "issues", home=shapes.home)
