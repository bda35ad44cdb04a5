"""scan.py: ImageFolder labels, unlabelled root files, extensions, hidden and non-image files, split layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from simimg.dataset.scan import is_image_name, scan_folder
from simimg.errors import SimimgError


def touch(root: Path, *paths: str) -> None:
    """Scanning looks at names only, so empty files stand in for images here."""
    for rel in paths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def found(root: Path) -> dict[str, str | None]:
    scan = scan_folder(root)
    assert scan.skipped == ()
    return {r.path: r.label for r in scan.records}


def test_class_folders_give_labels_and_root_files_none(tmp_path):
    touch(tmp_path, "cats/a.jpg", "cats/b.png", "dogs/c.jpeg", "loose.png", "dogs/puppies/d.jpg")
    assert found(tmp_path) == {
        "cats/a.jpg": "cats",
        "cats/b.png": "cats",
        "dogs/c.jpeg": "dogs",
        "dogs/puppies/d.jpg": "dogs",
        "loose.png": None,
    }
    assert scan_folder(tmp_path).labels == ["cats", "dogs"]


def test_extensions_are_case_insensitive(tmp_path):
    names = ["a.JPG", "b.Jpeg", "c.PNG", "d.Tiff", "e.tif", "f.GIF", "g.bmp", "h.WebP"]
    touch(tmp_path, *(f"x/{n}" for n in names))
    assert sorted(found(tmp_path)) == sorted(f"x/{n}" for n in names)


def test_hidden_and_non_image_files_are_ignored_silently(tmp_path):
    touch(
        tmp_path,
        "x/keep.jpg",
        "x/.hidden.jpg",
        "x/._keep.jpg",
        ".secret/y/a.png",
        "x/.thumbs/b.png",
        "x/notes.txt",
        "x/keep.jpg.txt",
        "x/jpg",
        "x/README",
        "x/data.json",
        "Thumbs.db",
    )
    assert found(tmp_path) == {"x/keep.jpg": "x"}


@pytest.mark.parametrize(
    "name, ok",
    [
        ("a.jpg", True),
        ("A.JPEG", True),
        (".a.jpg", False),
        ("a.jpgx", False),
        ("a.svg", False),
        ("a", False),
        ("a.tar.gz", False),
        ("a.b.tiff", True),
    ],
)
def test_is_image_name(name, ok):
    assert is_image_name(name) is ok


def test_train_val_layout_labels_by_the_class_below_the_split(tmp_path):
    touch(
        tmp_path,
        "train/ants/1.jpg",
        "train/bees/2.jpg",
        "val/ants/3.jpg",
        "val/bees/4.jpg",
        "test/bees/5.jpg",
        "train/6.jpg",
        ".ipynb_checkpoints/x.jpg",
    )
    assert found(tmp_path) == {
        "train/ants/1.jpg": "ants",
        "train/bees/2.jpg": "bees",
        "val/ants/3.jpg": "ants",
        "val/bees/4.jpg": "bees",
        "test/bees/5.jpg": "bees",
        "train/6.jpg": None,
    }


@pytest.mark.parametrize("split", ["val", "train", "test"])
def test_one_split_folder_of_class_folders_is_still_labelled_by_class(tmp_path, split):
    touch(tmp_path, f"{split}/ants/1.jpg", f"{split}/bees/2.jpg", f"{split}/3.jpg", ".ipynb_checkpoints/x/y.jpg")
    assert found(tmp_path) == {f"{split}/ants/1.jpg": "ants", f"{split}/bees/2.jpg": "bees", f"{split}/3.jpg": None}


def test_train_and_test_without_val_are_a_split_layout(tmp_path):
    touch(tmp_path, "train/ants/1.jpg", "test/bees/2.jpg")
    assert found(tmp_path) == {"train/ants/1.jpg": "ants", "test/bees/2.jpg": "bees"}


def test_a_lone_split_folder_of_images_is_a_class_folder(tmp_path):
    touch(tmp_path, "train/a.jpg", "train/.hidden/b.jpg")
    assert found(tmp_path) == {"train/a.jpg": "train"}


def test_train_and_val_beside_other_folders_are_plain_classes(tmp_path):
    touch(tmp_path, "train/a.jpg", "val/b.jpg", "other/c.jpg")
    assert found(tmp_path) == {"train/a.jpg": "train", "val/b.jpg": "val", "other/c.jpg": "other"}


def test_records_come_in_a_stable_order(tmp_path):
    touch(tmp_path, "b/2.jpg", "b/1.jpg", "a/9.jpg", "0.jpg")
    assert [r.path for r in scan_folder(tmp_path).records] == ["0.jpg", "a/9.jpg", "b/1.jpg", "b/2.jpg"]


def test_missing_folder_and_a_file_are_user_errors(tmp_path):
    touch(tmp_path, "file.jpg")
    for bad in (tmp_path / "nope", tmp_path / "file.jpg"):
        with pytest.raises(SimimgError, match="is not a folder"):
            scan_folder(bad)


def test_empty_folder_scans_to_nothing(tmp_path):
    touch(tmp_path, "x/readme.txt")
    scan = scan_folder(tmp_path)
    assert scan.records == () and scan.labels == []
