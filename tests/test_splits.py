"""Training data: split detection, the stratified seeded split, folder checks, class weights, augmentation, loaders."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_class_images
from simimg.dataset.images import load_image
from simimg.dataset.splits import TrainAugment, class_counts, class_weights, opens_as_image, split_dataset
from simimg.errors import SimimgError
from simimg.models.encoder import make_loader


def test_seeded_split_is_stratified_disjoint_and_repeatable(tmp_path: Path) -> None:
    data = make_class_images(tmp_path / "d", {"a": 10, "b": 20}, size=16)
    split = split_dataset(data, val_split=0.2, seed=3)
    assert split.kind == "seeded" and split.classes == ("a", "b")
    assert Counter(r.label for r in split.val) == {"a": 2, "b": 4}
    assert Counter(r.label for r in split.train) == {"a": 8, "b": 16}
    assert not {r.path for r in split.train} & {r.path for r in split.val}
    assert split_dataset(data, val_split=0.2, seed=3) == split
    assert {r.path for r in split_dataset(data, val_split=0.2, seed=4).val} != {r.path for r in split.val}
    assert list(split.labels(split.val)) == [0, 0, 1, 1, 1, 1]


def test_small_classes_still_train_and_validate(tmp_path: Path) -> None:
    split = split_dataset(make_class_images(tmp_path / "d", {"a": 2, "b": 3}, size=16), val_split=0.9)
    assert Counter(r.label for r in split.val) == {"a": 1, "b": 2}
    assert Counter(r.label for r in split.train) == {"a": 1, "b": 1}


def test_train_and_val_folders_are_used_as_they_are(tmp_path: Path) -> None:
    make_class_images(tmp_path / "d" / "train", {"ants": 4, "bees": 3}, size=16)
    make_class_images(tmp_path / "d" / "val", {"ants": 2, "bees": 1}, size=16, seed=1)
    split = split_dataset(tmp_path / "d", val_split=0.5)
    assert split.kind == "folders" and split.classes == ("ants", "bees")
    assert all(r.path.startswith("train/") for r in split.train) and len(split.train) == 7
    assert all(r.path.startswith("val/") for r in split.val) and len(split.val) == 3
    assert split.files(split.val[:1]) == [tmp_path / "d" / split.val[0].path]
    assert split.describe()["val_paths"] == [r.path for r in split.val]


def test_train_without_val_is_a_seeded_split_of_train(tmp_path: Path) -> None:
    make_class_images(tmp_path / "d" / "train", {"ants": 5, "bees": 10}, size=16)
    make_class_images(tmp_path / "d" / "test", {"ants": 2}, size=16)
    split = split_dataset(tmp_path / "d", val_split=0.2, seed=1)
    assert (split.kind, split.seeded_from, split.classes) == ("seeded", "train", ("ants", "bees"))
    assert Counter(r.label for r in split.val) == {"ants": 1, "bees": 2}
    assert Counter(r.label for r in split.train) == {"ants": 4, "bees": 8}
    assert all(r.path.startswith("train/") for r in split.train + split.val)
    assert split.describe()["seeded_from"] == "train" and split.describe()["val_paths"] == [r.path for r in split.val]
    assert split.source(0.2) == "a seeded 80/20 split of train/, as there is no val/ folder"
    assert split_dataset(tmp_path / "d", val_split=0.2, seed=1) == split


def test_train_without_val_still_needs_two_images_a_class(tmp_path: Path) -> None:
    make_class_images(tmp_path / "d" / "train", {"ants": 1, "bees": 3}, size=16)
    with pytest.raises(SimimgError, match=r"ants in .*train have fewer than 2"):
        split_dataset(tmp_path / "d")


@pytest.mark.parametrize("splits", [("val",), ("val", "test")])
def test_val_without_train_says_there_is_nothing_to_train_on(tmp_path: Path, splits: tuple[str, ...]) -> None:
    for name in splits:
        make_class_images(tmp_path / "d" / name, {"ants": 2, "bees": 2}, size=16)
    with pytest.raises(SimimgError, match=r"holds .*val/.* but no train/ folder .*: put training images in .*/train/"):
        split_dataset(tmp_path / "d")


def test_an_empty_val_folder_is_not_taken_for_a_missing_one(tmp_path: Path) -> None:
    make_class_images(tmp_path / "d" / "train", {"ants": 3, "bees": 3}, size=16)
    (tmp_path / "d" / "val" / "ants").mkdir(parents=True)
    with pytest.raises(SimimgError, match="val holds no images"):
        split_dataset(tmp_path / "d")


def test_class_counts_set_apart_files_that_do_not_open_as_images(tmp_path: Path) -> None:
    data = make_class_images(tmp_path / "d", {"a": 4, "b": 4}, size=16, ext="jpg")
    (data / "a" / "notes.jpg").write_text("not a picture, just text with a .jpg name\n")
    (data / "b" / "empty.png").write_bytes(b"")
    split = split_dataset(data, val_split=0.25)
    counts = {c.label: c for c in class_counts(split)}
    assert [(c.train + c.val, c.unreadable) for c in counts.values()] == [(4, ("a/notes.jpg",)), (4, ("b/empty.png",))]
    assert sum(c.train + c.val for c in counts.values()) == len(split.train) + len(split.val) - 2


def test_opening_as_an_image_reads_the_header_only(tmp_path: Path) -> None:
    good = make_class_images(tmp_path / "d", {"a": 1}, size=64) / "a" / "a_000.png"
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:100])
    assert opens_as_image(good) and opens_as_image(truncated)
    assert not opens_as_image(tmp_path / "missing.jpg")


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"only": 4}, "needs at least two"),
        ({"a": 4, "b": 0}, "b in"),
        ({"a": 4, "b": 1}, "fewer than 2 images"),
        ({}, "no images in class folders"),
    ],
)
def test_folders_that_cannot_train_a_classifier_say_why(tmp_path: Path, layout: dict, message: str) -> None:
    data = make_class_images(tmp_path / "d", layout, size=16)
    data.mkdir(exist_ok=True)
    with pytest.raises(SimimgError, match=message):
        split_dataset(data)


def test_images_without_a_class_folder_are_not_a_dataset(tmp_path: Path) -> None:
    make_class_images(tmp_path, {"d": 3}, size=16)
    with pytest.raises(SimimgError, match="no images in class folders"):
        split_dataset(tmp_path / "d")


def test_split_folders_are_checked_too(tmp_path: Path) -> None:
    make_class_images(tmp_path / "d" / "train", {"ants": 3, "bees": 3}, size=16)
    make_class_images(tmp_path / "d" / "val", {"ants": 1, "wasps": 1}, size=16)
    with pytest.raises(SimimgError, match="wasps"):
        split_dataset(tmp_path / "d")
    (tmp_path / "d" / "train" / "empty").mkdir()
    with pytest.raises(SimimgError, match="empty"):
        split_dataset(tmp_path / "d")


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_val_split_must_be_a_fraction(tmp_path: Path, fraction: float) -> None:
    with pytest.raises(SimimgError, match="--val-split"):
        split_dataset(make_class_images(tmp_path / "d", {"a": 3, "b": 3}, size=16), val_split=fraction)


def test_class_weights_only_when_imbalanced() -> None:
    assert class_weights(np.array([0, 0, 0, 1, 1, 1, 1]), 2) is None
    weights = class_weights(np.array([0] * 30 + [1] * 10), 2)
    assert weights is not None
    assert torch.allclose(weights, torch.tensor([40 / 60, 40 / 20]))


def test_augmentation_gives_a_uint8_crop_and_travels_to_workers(tmp_path: Path) -> None:
    data = make_class_images(tmp_path / "d", {"a": 1}, size=48)
    augment = pickle.loads(pickle.dumps(TrainAugment(32)))
    image = load_image(next(data.glob("a/*.png")))
    crops = [augment.to_uint8(image) for _ in range(4)]
    assert all(c.dtype == torch.uint8 and c.shape == (3, 32, 32) for c in crops)
    assert any(not torch.equal(crops[0], c) for c in crops[1:])


def test_a_broken_file_is_reported_by_the_loader_not_raised(tmp_path: Path) -> None:
    data = make_class_images(tmp_path / "d", {"a": 3}, size=32)
    broken = data / "a" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    files = sorted((data / "a").iterdir())
    loader = make_loader(files, TrainAugment(16), batch_size=8, workers=0, device=torch.device("cpu"))
    positions, batch, _, failures = next(iter(loader))
    assert batch.shape == (3, 3, 16, 16)
    assert [files[i].name for i, _ in failures] == ["broken.png"]
    assert sorted(positions + [i for i, _ in failures]) == [0, 1, 2, 3]
