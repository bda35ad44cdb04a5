"""roots: folder inputs are accepted only under ./data and $SIMIMG_DATA_ROOTS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from simimg.dataset.roots import data_roots, list_collections, resolve_data_dir
from simimg.errors import SimimgError


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for folder in ("data/pets/cats", "data/.hidden", "extra/birds/owls", "secret/keys"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "data" / "escape").symlink_to(tmp_path / "secret")
    return tmp_path


def test_roots_are_data_then_the_environment(layout: Path):
    assert data_roots("") == [layout / "data"]
    roots = data_roots(os.pathsep.join([str(layout / "extra"), "", "data"]))
    assert roots == [layout / "data", layout / "extra"]


def test_folders_under_a_root_resolve(layout: Path):
    roots = data_roots(str(layout / "extra"))
    assert resolve_data_dir("data/pets", roots) == layout / "data" / "pets"
    assert resolve_data_dir("pets", roots) == layout / "data" / "pets"
    assert resolve_data_dir("birds", roots) == layout / "extra" / "birds"
    assert resolve_data_dir(str(layout / "extra" / "birds"), roots) == layout / "extra" / "birds"
    assert list_collections(roots) == [layout / "data" / "pets", layout / "extra" / "birds"]


@pytest.mark.parametrize(
    "typed", ["secret", "data/../secret", "data/pets/../../secret", "data/escape", "/etc", "data/missing", "  "]
)
def test_anything_else_is_refused_with_what_to_do(layout: Path, typed: str):
    with pytest.raises(SimimgError, match=r"data roots|choose a folder"):
        resolve_data_dir(typed, data_roots(""))


@pytest.mark.parametrize("typed", ["data/missing", "missing", "pets/cats/nope"])
def test_a_missing_folder_under_a_root_is_told_apart_from_one_outside(layout: Path, typed: str):
    with pytest.raises(SimimgError, match=f"there is no folder '{typed}' under the allowed data roots"):
        resolve_data_dir(typed, data_roots(""))


@pytest.mark.parametrize("typed", ["/etc", "data/escape", "data/../secret"])
def test_a_folder_outside_the_roots_says_so(layout: Path, typed: str):
    with pytest.raises(SimimgError, match="is outside the allowed data roots"):
        resolve_data_dir(typed, data_roots(""))
