"""search.py: a warm SearchService answers queries by file or PIL image, with label and score filters, predictions."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_class_images, synthetic_image
from simimg.errors import BadImageError, SimimgError
from simimg.jobs.index import run_index
from simimg.jobs.index_config import IndexJob
from simimg.jobs.train import run_training
from simimg.jobs.train_config import TrainConfig
from simimg.query.service import QueryResult, SearchService, neighbors_from, predict
from simimg.store.catalog import Snapshot

CLASSES = {"circles": 4, "squares": 4, "triangles": 3}


def photo_like_jpeg(path: Path) -> None:
    """A 512 x 384 JPEG: big enough that decoding uses a reduced-scale draft."""
    y, x = np.mgrid[0:384, 0:512]
    pixels = np.stack([x % 256, (2 * y) % 256, ((x + y) // 3) % 256], -1)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(data root, home) of an index 'shapes': three labelled classes, and an unlabelled PNG and large JPEG."""
    root = make_class_images(tmp_path_factory.mktemp("data") / "shapes", CLASSES, size=48)
    synthetic_image(1, np.random.default_rng(5), 48).save(root / "loose.png")
    photo_like_jpeg(root / "loose.jpg")
    home = tmp_path_factory.mktemp("home")
    run_index(IndexJob(str(root), "shapes", str(home), weights="none", image_size=32, workers=0))
    return root, home


@pytest.fixture(scope="module")
def service(built) -> SearchService:
    return SearchService(built[1], "shapes", "cpu")


def test_every_indexed_image_finds_itself_first(built, service):
    root, _ = built
    assert len(service.snapshot.paths) == sum(CLASSES.values()) + 2
    for path in service.snapshot.paths:
        top = service.query_file(root / path, k=3).neighbors[0]
        assert top.path == path and top.score >= 0.999


def test_a_large_jpeg_is_decoded_for_queries_as_it_was_for_the_index(built, service):
    top = service.query_file(built[0] / "loose.jpg", k=1).neighbors[0]
    assert top.path == "loose.jpg" and top.label is None and top.score >= 0.999999


def test_an_uploaded_copy_of_an_indexed_jpeg_is_decoded_as_the_index_did(built, service):
    from simimg.dataset.uploads import validate_upload

    data = (built[0] / "loose.jpg").read_bytes()
    image = validate_upload("loose.jpg", data, draft_size=service.draft_size)
    assert image.size == service.load(built[0] / "loose.jpg").size
    top = service.query(image, k=1).neighbors[0]
    assert top.path == "loose.jpg" and top.score >= 0.999999


@pytest.mark.gpu
def test_a_cuda_service_answers_from_an_index_embedded_on_the_cpu(built, service, cuda):
    gpu = SearchService(built[1], "shapes", "cuda")
    assert gpu.info()["device"].startswith("cuda (")
    for path in service.snapshot.paths:
        top = gpu.query_file(built[0] / path, k=3).neighbors[0]
        assert top.path == path and top.score >= 0.999  # bf16 on the GPU against the CPU's vectors


def test_label_filter_returns_only_that_label(built, service):
    query = built[0] / "circles" / "circles_000.png"
    result = service.query_file(query, k=50, label="squares")
    assert [n.label for n in result.neighbors] == ["squares"] * CLASSES["squares"]
    assert service.query_file(query, k=5, label="no-such-label").neighbors == []


def test_k_larger_than_the_index_returns_each_image_once_best_first(built, service):
    neighbors = service.query_file(built[0] / "squares" / "squares_001.png", k=1000).neighbors
    assert sorted(n.path for n in neighbors) == sorted(service.snapshot.paths)
    scores = [n.score for n in neighbors]
    assert scores == sorted(scores, reverse=True)


def test_min_score_drops_weaker_neighbors(built, service):
    query = built[0] / "triangles" / "triangles_002.png"
    everything = service.query_file(query, k=100).neighbors
    middle = len(everything) // 2
    threshold = (everything[middle - 1].score + everything[middle].score) / 2
    kept = service.query_file(query, k=100, min_score=threshold).neighbors
    assert kept == [n for n in everything if n.score >= threshold] and 0 < len(kept) < len(everything)


def test_a_pil_image_query_equals_the_file_query(built, service):
    path = built[0] / "squares" / "squares_002.png"
    by_file = service.query_file(path, k=4)
    by_image = service.query(Image.open(path), k=4, query=str(path))
    assert by_image == by_file and by_file.prediction is None


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK"])
def test_a_pil_image_in_any_mode_is_queried_as_rgb(built, service, mode):
    path = built[0] / "squares" / "squares_003.png"
    as_rgb = service.query(Image.open(path).convert(mode).convert("RGB"), k=3)
    assert service.query(Image.open(path).convert(mode), k=3) == as_rgb


def test_info_counts_each_label(service):
    info = service.info()
    assert info["labels"] == {**CLASSES, "": 2}
    assert info["total"] == sum(CLASSES.values()) + 2 and info["dim"] == 1024 and info["arch"] == "densenet121"
    assert info["model"] == service.model.bundle.fingerprint and info["classifier"] is False
    assert info["embedding"] == service.model.bundle.embedding and info["kind"] == "pretrained"


@pytest.mark.slow
def test_a_warm_service_follows_a_new_model_version_and_predicts(built, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(built[1] / "shapes", home / "shapes")
    service = SearchService(home, "shapes", "cpu")
    query = built[0] / "circles" / "circles_001.png"
    assert service.query_file(query, k=2).prediction is None
    report = run_training(TrainConfig(str(built[0]), "shapes", str(home), head_only=True, val_split=0.25))
    result = service.query_file(query, k=2)  # the same service: no restart
    assert service.model.bundle.fingerprint == report.model and service.snapshot.version == 2
    top = result.prediction.top
    assert result.prediction.label == top[0]["label"] and {t["label"] for t in top} == set(CLASSES)
    assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
    assert abs(sum(t["probability"] for t in top) - 1) < 1e-5 and result.neighbors[0].path == "circles/circles_001.png"
    assert service.predict(query) == result.prediction


def test_search_takes_paths_and_images_and_reports_bad_files_in_a_list(built, service, tmp_path):
    good = built[0] / "squares" / "squares_001.png"
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    single = service.search(good, k=2)
    assert isinstance(single, QueryResult) and single.neighbors[0].path == "squares/squares_001.png"
    many = service.search([good, tmp_path / "bad.png", Image.open(good)], k=2)
    assert [r.query for r in many] == [str(good), str(tmp_path / "bad.png"), "<image 2>"]
    assert many[0] == single and many[2].neighbors == single.neighbors
    assert many[1].error and "not an image" in many[1].error and many[1].neighbors == []
    with pytest.raises(BadImageError, match=r"cannot query .*bad\.png: not an image"):
        service.search(tmp_path / "bad.png")
    with pytest.raises(SimimgError, match=r"no classifier.*--head-only"):
        service.predict(good)


def test_unknown_or_invalid_names_are_user_errors(built):
    with pytest.raises(SimimgError, match=r"no index named 'nope'.*simimg index DATA_DIR --name nope"):
        SearchService(built[1], "nope", "cpu")
    with pytest.raises(SimimgError, match="is not allowed"):
        SearchService(built[1], "../shapes", "cpu")


def test_predict_ranks_classes_by_probability():
    p = predict(torch.tensor([0.0, 2.0, 1.0]), ("a", "b", "c"), top=2)
    assert p.label == "b" and [t["label"] for t in p.top] == ["b", "c"]
    assert p.probability == pytest.approx(float(torch.softmax(torch.tensor([0.0, 2.0, 1.0]), 0)[1]))


def test_neighbors_from_drops_padding_unknown_ids_and_weak_scores():
    snap = Snapshot(
        1, "fp", "emb", "flat", np.array([3, 7, 9]), ["a.png", "b.png", "c.png"], ["x", None, "y"], ["h1", "h2", "h3"]
    )
    found = neighbors_from(np.array([0.9, 0.8, 0.5, 0.4]), np.array([7, 5, 9, -1]), snap, min_score=0.6)
    assert [(n.path, n.label, n.score) for n in found] == [("b.png", None, 0.9)]


def test_a_shown_score_used_as_min_score_keeps_that_neighbor():
    snap = Snapshot(1, "fp", "emb", "flat", np.array([3]), ["a.png"], ["x"], ["h"])
    shown = neighbors_from(np.array([0.87654321]), np.array([3]), snap, min_score=None)[0].score
    assert [n.path for n in neighbors_from(np.array([0.87654321]), np.array([3]), snap, min_score=shown)] == ["a.png"]


# --- the collection as a whole: what the app's Browse and Inspect pages show, public for notebooks ----------
def test_browse_pages_through_a_label_or_everything(service):
    everything = service.browse(page=1, per_page=4)
    assert (everything.total, everything.pages, len(everything.items)) == (sum(CLASSES.values()) + 2, 4, 4)
    last = service.browse(page=99, per_page=4)  # past the end: the last page
    assert last.page == 4 and len(last.items) == (sum(CLASSES.values()) + 2) - 12
    squares = service.browse("squares", per_page=3)
    assert squares.total == 4 and all(label == "squares" for _, label in squares.items)
    unlabelled = service.browse("", per_page=10)  # the loose files: "" is how info() counts them
    assert sorted(p for p, _ in unlabelled.items) == ["loose.jpg", "loose.png"]


def test_near_duplicates_use_the_collections_own_threshold_unless_given(built, tmp_path):
    root = tmp_path / "shapes"
    shutil.copytree(built[0], root)
    shutil.copy(root / "squares" / "squares_000.png", root / "squares" / "copy.png")  # an exact copy
    run_index(IndexJob(str(root), "dups", str(tmp_path / "home"), weights="none", image_size=32, workers=0))
    service = SearchService(tmp_path / "home", "dups", "cpu")
    pairs, threshold = service.near_duplicates()
    assert 0.5 < threshold < 1.0
    assert ("squares/copy.png", "squares/squares_000.png") in {tuple(sorted((p.a, p.b))) for p in pairs}
    assert all(p.score >= threshold for p in pairs)
    everything, given = service.near_duplicates(threshold=-1.0, limit=1000)
    assert given == -1.0 and len(everything) > len(pairs)


def test_score_landmarks_and_map_describe_the_published_vectors(service):
    marks = service.score_landmarks()
    assert set(marks) == {"nearest", "neighbour_10", "random_pair"}
    assert 1.0 >= marks["nearest"] >= marks["neighbour_10"] and -1.0 <= marks["random_pair"] <= 1.0
    columns = service.map_2d("pca", limit=5)
    assert set(columns) == {"x", "y", "label", "path"} and len(columns["path"]) == 5
    assert set(columns["path"]) <= set(service.snapshot.paths)
    snapshot, vectors = service.vectors()
    assert vectors.shape == (len(snapshot.paths), service.info()["dim"])
