"""head.py: `simimg train --head-only` fits a classifier on the stored embeddings, keeps it, and serves it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import simimg
from conftest import copy_built, make_class_images
from simimg.errors import SimimgError
from simimg.jobs.index import run_index
from simimg.jobs.index_config import IndexJob
from simimg.jobs.train import run_training
from simimg.jobs.train_config import TrainConfig
from simimg.progress import Hooks
from simimg.query.service import SearchService
from simimg.store.catalog import reading
from simimg.store.layout import IndexFolder
from simimg.store.model_store import list_models, read_model

CLASSES = {"circles": 8, "squares": 8, "triangles": 8}


@pytest.fixture
def indexed(split_index, tmp_path: Path) -> tuple[Path, Path]:
    """(folder with train/ (3 x 8) and val/ (3 x 3), home) with an index of the whole folder: this test's copy of
    the session's."""
    copy = copy_built(split_index, tmp_path / "base")
    return copy.data, copy.home


def test_head_only_uses_the_stored_vectors_keeps_a_head_model_and_serves_it(indexed):
    data, home = indexed
    phases: list[str] = []
    report = run_training(TrainConfig(str(data), "shapes", str(home), head_only=True), Hooks(on_phase=phases.append))
    assert report.kind == "head" and report.head["from_catalog"] == 33 and report.head["embedded"] == 0
    assert report.val_accuracy > 0.5 and report.history == [] and report.skipped == []
    assert phases == ["loading", "training", "validating", "saving", "indexing"]
    assert (report.index.version, report.index.indexed, report.index.model) == (2, 0, report.model)
    folder = IndexFolder.of(home, "shapes")
    head, base = read_model(folder, report.model), next(m for m in list_models(folder, report.model) if not m.serving)
    assert head.kind == "head" and head.unit_head and head.embedding == base.embedding
    assert head.classes == tuple(sorted(CLASSES)) and head.val_accuracy == report.val_accuracy
    assert (folder.model_dir(report.model) / "confusion.png").is_file()
    assert run_index(IndexJob(str(data), "shapes", str(home))).indexed == 0  # the vectors stay valid
    result = SearchService(home, "shapes", "cpu").search(data / "val" / "squares" / "squares_001.png", k=1)
    assert result.prediction is not None and result.prediction.label in CLASSES


def test_head_only_refuses_a_folder_the_index_does_not_hold_before_embedding_anything(indexed, tmp_path, monkeypatch):
    data, home = indexed
    other = tmp_path / "other"
    shutil.copytree(data, other)  # same pictures, other paths: none of them is in the index
    folder = IndexFolder.of(home, "shapes")
    before = ([m.fingerprint for m in list_models(folder, None)], folder.catalog.read_bytes())
    monkeypatch.setattr("simimg.jobs.train_head.embed_files", lambda *a, **k: pytest.fail("embedded before refusing"))
    phases: list[str] = []
    with pytest.raises(SimimgError) as refused:
        simimg.train(other, "shapes", home, head_only=True, hooks=Hooks(on_phase=phases.append))
    message = str(refused.value)
    assert message.startswith(
        f"33 of the 33 images in {other.resolve()} are not in index 'shapes' (new, changed, "
        f"or from another folder; the index holds {data.resolve()})"
    )
    assert f"index that folder first (`simimg index {other.resolve()} --name other`" in message
    assert "train a full model (without --head-only)" in message and "--embed-missing" in message
    assert phases == ["loading"]
    assert ([m.fingerprint for m in list_models(folder, None)], folder.catalog.read_bytes()) == before


def test_head_only_embeds_images_the_index_does_not_hold_when_asked(indexed, tmp_path):
    data, home = indexed
    other = tmp_path / "other"
    shutil.copytree(data, other)
    (other / "val" / "circles" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    phases, progress = [], []
    hooks = Hooks(on_phase=phases.append, progress=lambda done, total: progress.append((done, total)))
    report = simimg.train(other, "shapes", home, head_only=True, embed_missing=True, index=False, hooks=hooks)
    assert report.head["from_catalog"] == 0 and report.head["embedded"] == 34 and report.index is None
    assert [s["path"] for s in report.skipped] == ["val/circles/broken.png"]
    assert phases == ["loading", "embedding", "training", "validating", "saving"]
    assert progress[-1] == (34, 34) and {total for _, total in progress} == {34}
    folder = IndexFolder.of(home, "shapes")
    with reading(folder.catalog) as catalog:
        assert catalog.published().model != report.model  # --no-index: kept, not served
    assert json.loads((folder.model_dir(report.model) / "train_job.json").read_text())["embed_missing"] is True


@pytest.mark.slow
def test_head_only_refuses_new_files_of_its_own_collection_until_indexed_and_ignores_unreadable_ones(indexed):
    data, home = indexed
    (data / "train" / "circles" / "broken.png").write_bytes(b"not a png")  # the index skips it too
    phases: list[str] = []
    report = run_training(
        TrainConfig(str(data), "shapes", str(home), head_only=True, index=False), Hooks(on_phase=phases.append)
    )
    assert (report.head["from_catalog"], report.head["embedded"]) == (33, 0) and "embedding" not in phases
    assert [s["path"] for s in report.skipped] == ["train/circles/broken.png"]
    shutil.copy(data / "train" / "squares" / "squares_000.png", data / "train" / "circles" / "late.png")
    with pytest.raises(
        SimimgError,
        match=r"^1 of the 35 images in .* are not in index 'shapes' .*: update the index "
        rf"first \(`simimg index {data.resolve()} --name shapes`\)",
    ):
        run_training(TrainConfig(str(data), "shapes", str(home), head_only=True))
    run_index(IndexJob(str(data), "shapes", str(home)))
    assert run_training(TrainConfig(str(data), "shapes", str(home), head_only=True)).head["from_catalog"] == 34


def test_head_only_needs_an_index(tmp_path):
    data = make_class_images(tmp_path / "d", {"a": 3, "b": 3}, size=32)
    with pytest.raises(SimimgError, match="run `simimg index DATA_DIR --name d` first"):
        run_training(TrainConfig(str(data), "d", str(tmp_path / "home"), head_only=True))
