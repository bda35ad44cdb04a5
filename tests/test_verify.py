"""verify.py: `simimg verify` names each damaged file and the images it affects; `--repair` mends what it can."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

import simimg
from conftest import Built, copy_built, run_main
from simimg.store.catalog import reading
from simimg.store.checksums import MANIFEST
from simimg.store.layout import IndexFolder


@pytest.fixture
def built(shapes_index: Built, tmp_path: Path) -> Built:
    return copy_built(shapes_index, tmp_path)


def verify(built: Built, *flags: str) -> tuple[int, dict]:
    code, out, err = run_main("verify", "--name", built.name, "--home", str(built.home), *flags, "--json")
    assert len(out.splitlines()) == 1, (out, err)
    return code, json.loads(out)


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(data)


def stored_row(folder: IndexFolder, image: str) -> tuple[Path, int, np.ndarray]:
    """The shard file, row and vector holding `image`'s vector."""
    with reading(folder.catalog) as catalog:
        (embedding, dim, shard, row, _, _) = next(r for r in catalog.vector_locations() if r[5] == image)
    path = catalog.vectors_dir / embedding / f"{shard:06d}.f32"
    return path, row, np.fromfile(path, np.float32).reshape(-1, dim)[row].copy()


def test_a_whole_index_passes_and_says_what_it_checked(built):
    code, report = verify(built)
    assert code == 0 and report["problems"] == [] and report["leftovers"] == []
    assert report["checked"] == {"vector_rows": 18, "faiss_files": 1, "models": 1}
    assert report["unrecorded"] == {"vector_rows": 0, "faiss_files": 0}


def test_a_flipped_bit_is_named_with_its_image_and_repair_embeds_it_again(built):
    folder = IndexFolder.of(built.home, built.name)
    image = "squares/squares_002.png"
    shard, row, want = stored_row(folder, image)
    flip_byte(shard, row * want.size * 4 + 17)
    flip_byte(folder.faiss(1), folder.faiss(1).stat().st_size - 64)
    code, report = verify(built)
    assert code == 1
    damaged = {p["kind"]: p for p in report["problems"]}
    assert damaged["vectors"]["file"] == str(shard) and damaged["vectors"]["images"] == [image]
    assert damaged["faiss"]["file"] == str(folder.faiss(1)) and len(damaged["faiss"]["images"]) == 18

    code, report = verify(built, "--repair")
    assert code == 0 and report["problems"] == [], report
    assert any("dropped 1 damaged vectors" in line for line in report["repaired"])
    _, _, again = stored_row(folder, image)
    np.testing.assert_allclose(again, want, atol=1e-6)  # embedded again from the original image
    result = simimg.open_index(built.name, built.home).query(simimg.load_image(built.data / image), k=1)
    assert result.neighbors[0].path == image and result.neighbors[0].score == pytest.approx(1.0, abs=1e-5)


def test_a_damaged_model_is_named_and_not_repaired(built):
    folder = IndexFolder.of(built.home, built.name)
    model = next(p for p in folder.models.iterdir() if (p / MANIFEST).is_file())
    weights = next(model.glob("*.safetensors"))
    flip_byte(weights, weights.stat().st_size // 2)
    code, report = verify(built, "--repair")
    assert code == 1 and [p["kind"] for p in report["problems"]] == ["model"]
    assert weights.name in report["problems"][0]["reason"] and "simimg use" in report["problems"][0]["reason"]
    assert len(report["problems"][0]["images"]) == 18  # it serves every image


def test_leftovers_of_killed_runs_are_listed_and_removed_by_repair(built):
    folder = IndexFolder.of(built.home, built.name)
    staged = folder.models / ".staging-0123abcd-999"
    staged.mkdir()
    (staged / "model.safetensors").write_bytes(b"half")
    temporary = folder.root / ".index-000001.faiss.999.tmp"
    temporary.write_bytes(b"half")
    code, report = verify(built)
    assert code == 0 and report["leftovers"] == sorted([str(staged), str(temporary)])
    code, report = verify(built, "--repair")
    assert code == 0 and report["leftovers"] == [] and not staged.exists() and not temporary.exists()


def test_an_index_written_before_checksums_is_not_called_damaged(built):
    folder = IndexFolder.of(built.home, built.name)
    db = sqlite3.connect(folder.catalog)
    db.executescript("DROP TABLE row_checksums; DROP TABLE version_checksums;")
    db.close()
    for manifest in folder.models.glob(f"*/{MANIFEST}"):
        manifest.unlink()
    code, report = verify(built)
    assert code == 0 and report["problems"] == []
    assert report["unrecorded"] == {"vector_rows": 18, "faiss_files": 1} and report["checked"]["models"] == 0


def test_a_missing_index_is_one_line(tmp_path):
    code, out, err = run_main("verify", "--name", "nothing", "--home", str(tmp_path))
    assert code == 2 and "no index named 'nothing'" in err and out == ""


def test_readers_serve_the_previous_version_while_the_latest_faiss_file_is_damaged(built, caplog):
    folder = IndexFolder.of(built.home, built.name)
    shutil.copy(built.data / "circles" / "circles_000.png", built.data / "circles" / "again.png")
    code, out, err = run_main("index", str(built.data), "--name", built.name, "--home", str(built.home), "--json")
    assert code == 0 and json.loads(out)["version"] == 2, err
    flip_byte(folder.faiss(2), folder.faiss(2).stat().st_size - 64)
    with caplog.at_level(logging.WARNING, logger="simimg.store.served"):
        service = simimg.open_index(built.name, built.home)
        assert service.snapshot.version == 1 and len(service.snapshot.ids) == 18
    assert "version 2 of 'shapes' does not match its checksum: serving version 1" in caplog.text
    assert not service.refresh()  # the damaged version is not read again on every query
    assert verify(built, "--repair")[0] == 0
    assert service.refresh() and service.snapshot.version == 3 and len(service.snapshot.ids) == 19
