"""`simimg explain`: grad-cam maps of a class or of a similarity, at the image's own size, on models trained here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import simimg
from conftest import TWO_SHAPES, main_json, make_class_images, run_main, synthetic_image
from simimg.dataset.preprocess import Preprocess
from simimg.errors import SimimgError
from simimg.models.heatmaps import Explanation, informative, is_flat, to_image_frame
from simimg.query.service import SELF_MATCH_SCORE, Neighbor, QueryResult, SearchService

CLASSES = TWO_SHAPES


@pytest.fixture
def indexed(pair_index) -> tuple[Path, Path]:
    """(a folder of two classes of 40 px images, home) with an index of it made with random-init densenet121
    features at 64 px (2 x 2 maps): the session's, read-only."""
    return pair_index.data, pair_index.home


@pytest.fixture
def with_head(pair_head) -> tuple[Path, Path]:
    """The same, with a classifier fitted on the stored embeddings (`simimg train --head-only`) and served."""
    return pair_head[0].data, pair_head[0].home


def query(tmp_path: Path, size: tuple[int, int] = (70, 45)) -> Path:
    """A new image, not square and of neither the index's nor the model's size."""
    path = tmp_path / "query.png"
    synthetic_image(1, np.random.default_rng(5), 60).resize(size).save(path)
    return path


def test_to_image_frame_puts_the_crop_back_where_it_came_from():
    crop = np.ones((32, 32), np.float32)
    frame = to_image_frame(crop, (74, 37), Preprocess.for_image_size(32))  # resized to 74x37 -> 74 x 37 / 37 x 37
    assert frame.shape == (37, 74) and frame.max() == pytest.approx(1.0)
    assert frame[:, :8].max() == 0 and frame[:, -8:].max() == 0 and frame[18, 37] == pytest.approx(1.0)


@pytest.mark.slow
def test_explain_the_predicted_class_of_a_head_trained_here(with_head, tmp_path):
    _, home = with_head
    image, out = query(tmp_path), tmp_path / "maps" / "cam.png"
    result = simimg.explain(image, "shapes", home, out=out)
    assert isinstance(result, Explanation) and result.kind == "class" and result.target in CLASSES
    assert result.size == (70, 45) and result.heatmap.shape == (45, 70) and 0 < result.score <= 1
    assert result.heatmap.min() >= 0 and result.heatmap.max() == pytest.approx(1, abs=0.02)
    assert result.layer == "trunk.features" and result.heatmap[:, 0].max() == 0  # the crop's left, never seen
    assert result.informative and result.to_dict()["informative"] is True
    with Image.open(out) as png:
        assert png.size == (70, 45) and png.mode == "RGB"
    other = next(c for c in CLASSES if c != result.target)
    chosen = simimg.explain(image, "shapes", home, label=other, method="gradcam++")
    assert (chosen.target, chosen.method) == (other, "gradcam++") and chosen.score == pytest.approx(
        1 - result.score, abs=1e-5
    )
    with pytest.raises(SimimgError, match="unknown class 'dogs'"):
        simimg.explain(image, "shapes", home, label="dogs")


@pytest.mark.slow
def test_a_model_without_a_classifier_explains_similarity(indexed, tmp_path):
    data, home = indexed
    image = query(tmp_path)
    with pytest.raises(SimimgError, match="no classifier"):
        simimg.explain(image, "shapes", home)
    result = simimg.explain(image, "shapes", home, neighbor="squares/squares_001.png")  # a gallery path
    assert (result.kind, result.target, result.size) == ("similarity", "squares/squares_001.png", (70, 45))
    assert -1 <= result.score <= 1 and result.heatmap.max() == pytest.approx(1, abs=0.02)
    itself = simimg.explain(
        data / "circles" / "circles_000.png", "shapes", home, neighbor=data / "circles" / "circles_000.png"
    )
    assert itself.score == pytest.approx(1.0, abs=1e-4) and itself.size == (40, 40)
    assert result.informative and not itself.informative and itself.heatmap.max() == 0  # the cosine's maximum


def peak(size: int = 8, amplitude: float = 1.0) -> np.ndarray:
    """A map with one bump in a corner, as a model that looks at one place gives."""
    y, x = np.mgrid[:size, :size]
    return (amplitude * np.exp(-((y - 2) ** 2 + (x - 2) ** 2) / 4.0)).astype(np.float32)


@pytest.mark.parametrize(
    "values, span, flat",
    [
        (np.zeros((7, 7), np.float32), 0.5, True),  # every region lowers the score: relu leaves nothing
        (np.full((7, 7), 0.3, np.float32), 0.5, True),  # uniform
        (np.zeros((1, 1), np.float32), 1e-6, True),  # a one-cell feature map (32 px into a densenet)
        (np.where(np.eye(4, dtype=bool), np.nan, peak(4)), 0.5, True),  # NaN anywhere
        (np.full((3, 3), np.inf, np.float32), 1e-6, True),
        (np.empty((0, 0), np.float32), 0.5, True),
        (peak(), 0.5, False),
        (peak(amplitude=1e-3), 1e-6, False),
    ],
)
def test_is_flat_on_synthetic_maps(values, span, flat):
    assert is_flat(values, span) is flat


def test_informative_needs_both_a_real_signal_and_a_drawn_map():
    noise = (2.5e-8 + 1e-9 * np.random.default_rng(0).standard_normal((4, 4))).astype(np.float32)
    assert informative(peak(), peak(amplitude=1e-3))
    assert not informative(peak(), noise)  # the library scales even rounding noise up to [0, 1]
    assert not informative(np.zeros((8, 8), np.float32), peak(amplitude=1e-3))  # all relu'd away: blue everywhere
    assert not informative(peak(), np.full((4, 4), np.nan, np.float32))


def test_a_gallery_query_never_explains_its_likeness_to_itself(indexed):
    data, home = indexed
    service = SearchService(home, "shapes")
    own = data / "circles" / "circles_000.png"
    result = service.query_file(own, k=6)
    assert result.neighbors[0].path == "circles/circles_000.png"  # what the Search page used to explain first
    targets = service.explain_targets(result, own)
    assert len(targets) == 5 and all(n.path != "circles/circles_000.png" for n in targets)
    assert targets == service.explain_targets(result, "circles/circles_000.png")  # as results name it
    first = service.explain(service.load(own), targets[0].path)
    assert first.target == targets[0].path and first.score < SELF_MATCH_SCORE and first.informative
    copy = service.query(service.load(own), k=6)  # an upload of the same file: no path, its cosine says it
    assert [n.path for n in service.explain_targets(copy)] == [n.path for n in targets]
    bf16 = QueryResult("", None, [Neighbor("circles/circles_000.png", "circles", 0.999)])  # indexed elsewhere
    assert service.explain_targets(bf16, own) == [] and service.explain_targets(bf16) == bf16.neighbors


@pytest.mark.slow
def test_explain_a_resnet_fine_tuned_here_from_the_cli(tmp_path):
    data = make_class_images(tmp_path / "shapes", CLASSES, size=40)
    home = tmp_path / "home"
    simimg.train(
        data, "shapes", home, arch="resnet50", weights="none", epochs=1, image_size=64, batch_size=8, workers=0
    )
    out = tmp_path / "cam.png"
    payload = main_json(
        "explain", str(query(tmp_path, (33, 61))), "--name", "shapes", "--home", str(home), "--out", str(out)
    )
    assert payload["kind"] == "class" and payload["size"] == [33, 61] and payload["layer"] == "trunk.layer4"
    assert payload["out"] == str(out) and Image.open(out).size == (33, 61)
    (tmp_path / "bad.png").write_bytes(b"nope")
    code, _, err = run_main(
        "explain", str(tmp_path / "bad.png"), "--name", "shapes", "--home", str(home), "--out", str(tmp_path / "x.png")
    )
    assert code != 0 and "cannot explain" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()
