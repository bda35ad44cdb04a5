"""Evaluation: the metric functions on hand-made cases, then train -> evaluate -> index -> query -> evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import main_json, make_class_images, run_main
from simimg.analysis.metrics import classification_metrics, most_confused, retrieval_metrics
from simimg.errors import SimimgError
from simimg.jobs.evaluate import run_evaluation
from simimg.jobs.index import run_index
from simimg.jobs.index_config import IndexJob
from simimg.query.service import SearchService


@pytest.fixture(autouse=True)
def one_thread():
    """Two cores shared by many jobs: oversubscription makes torch crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_classification_metrics_by_hand() -> None:
    labels = np.array([0, 0, 1, 1, 2])
    probs = np.eye(3)[[0, 1, 1, 1, 0]]
    m = classification_metrics(labels, probs, ("a", "b", "c"))
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3) and m["per_class"]["c"]["f1"] == 0.0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_most_confused_lists_the_confidently_wrong_first() -> None:
    labels = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.95, 0.05], [0.2, 0.8]])
    rows = most_confused(["p0", "p1", "p2", "p3"], labels, probs, ("a", "b"))
    assert [r["path"] for r in rows] == ["p2", "p3", "p1"]
    assert rows[0] == {"path": "p2", "label": "b", "predicted": "a", "probability": 0.95}


def test_retrieval_metrics_by_hand() -> None:
    gallery = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    gallery_labels = np.array([0, 0, 1, 1])
    perfect = retrieval_metrics(gallery, gallery_labels, gallery, gallery_labels, exclude=np.arange(4), k=2)
    assert perfect == {"p_at_1": 1.0, "p_at_2": 0.5, "map": 1.0}
    query = np.array([[0.6, 0.8]], np.float32)  # ranks 3 (1), 2 (1), 1 (0), 0 (0) for label 0: hits at 3 and 4
    mixed = retrieval_metrics(query, np.array([0]), gallery, gallery_labels, k=2)
    assert mixed["p_at_1"] == 0.0 and mixed["p_at_2"] == 0.0
    assert mixed["map"] == pytest.approx((1 / 3 + 2 / 4) / 2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`simimg train ... --no-index --json`, in this process: 4 epochs from scratch at 32 px."""
    root = tmp_path_factory.mktemp("evaluate")
    data = make_class_images(root / "toys", {"circle": 14, "square": 14, "triangle": 14}, size=40)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, out, err = run_main(
            "train",
            str(data),
            "--home",
            str(root / "home"),
            "--weights",
            "none",
            "--epochs",
            "4",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--workers",
            "0",
            "--val-split",
            "0.25",
            "--no-index",
            "--json",
        )
    finally:
        torch.set_num_threads(before)
    assert code == 0 and len(out.splitlines()) == 1, err[-3000:]
    return {"data": data, "home": root / "home", "report": json.loads(out), "stderr": err}


def test_train_json_is_one_object_with_progress_on_stderr(trained: dict) -> None:
    report = trained["report"]
    assert {"name", "best_epoch", "val_accuracy", "history", "seconds", "device"} <= set(report)
    assert report["name"] == "toys" and len(report["history"]) == 4
    assert report["kind"] == "fine-tuned" and len(report["model"]) == 16 and report["index"] is None
    assert "epoch   4 scratch" in trained["stderr"] and "img/s" in trained["stderr"]


def test_evaluate_then_serve_then_query_then_evaluate_again(trained: dict) -> None:
    home, model = str(trained["home"]), trained["report"]["model"]
    with pytest.raises(SimimgError, match="no finished version"):  # --no-index: nothing serves it yet
        run_evaluation("toys", home, workers=0)
    before = run_evaluation("toys", home, workers=0, model=model[:8])  # no index: the training images are the gallery
    assert before["retrieval"]["gallery"] == "train split" and before["retrieval"]["gallery_size"] == 30
    assert before["images"] == 12 and before["accuracy"] == pytest.approx(trained["report"]["val_accuracy"], abs=1e-6)
    assert before["model"] == model

    served = main_json("use", model[:8], "--name", "toys", "--home", home)
    assert (served["model"], served["version"], served["indexed"], served["total"]) == (model, 1, 42, 42)
    assert main_json("models", "--name", "toys", "--home", home)[0]["serving"]
    result = SearchService(home, "toys", "cpu").query_file(trained["data"] / "circle" / "circle_000.png", k=5)
    assert result.prediction is not None and result.neighbors[0].path == "circle/circle_000.png"
    assert sum(t["probability"] for t in result.prediction.top) == pytest.approx(1.0, abs=1e-5)

    after = main_json("evaluate", "--name", "toys", "--home", home, "--workers", "0")
    required = {"classes", "accuracy", "macro_f1", "per_class", "confusion_matrix", "retrieval", "most_confused"}
    assert required <= set(after)
    assert after["classes"] == ["circle", "square", "triangle"] and after["accuracy"] == before["accuracy"]
    assert after["retrieval"]["gallery"] == "index" and after["retrieval"]["gallery_size"] == 42
    assert sum(map(sum, after["confusion_matrix"])) == 12 == sum(c["support"] for c in after["per_class"].values())
    assert 0.0 <= after["macro_f1"] <= 1.0
    assert all(0.0 <= after["retrieval"][k] <= 1.0 for k in ("p_at_1", "p_at_10", "map"))
    wrong = round((1 - after["accuracy"]) * 12)
    assert len(after["most_confused"]) == wrong
    classes = after["classes"]
    cells = [[0] * len(classes) for _ in classes]
    for row in after["predictions"]:  # every evaluated image, so each confusion cell can show its images
        cells[classes.index(row["label"])][classes.index(row["predicted"])] += 1
    assert cells == after["confusion_matrix"]


def test_evaluate_needs_a_trained_model(tmp_path: Path) -> None:
    data = make_class_images(tmp_path / "d", {"a": 3, "b": 3}, size=32)
    run_index(IndexJob(data_dir=str(data), name="plain", home=str(tmp_path), weights="none", image_size=32, workers=0))
    with pytest.raises(SimimgError, match="no trained classifier"):
        run_evaluation("plain", str(tmp_path), str(data))
