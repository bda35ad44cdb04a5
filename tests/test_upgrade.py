"""upgrade.py: an index in simimg 0.1's layout (root model.json, vectors inside SQLite) converts in place."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from conftest import main_json, make_class_images, run_main
from simimg.dataset.scan import scan_folder
from simimg.errors import SimimgError
from simimg.jobs.index import run_index
from simimg.jobs.index_config import IndexJob
from simimg.jobs.upgrade import needs_upgrade, upgrade
from simimg.models.encoder import Encoder
from simimg.models.net import build_model, with_classes
from simimg.query.service import SearchService
from simimg.store.ann import build_ann, save_index
from simimg.store.catalog import reading
from simimg.store.layout import IndexFolder
from simimg.store.model_store import model_fingerprints, read_model

V1_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE versions(version INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL, count INTEGER NOT NULL,
    index_kind TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE images(id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL, label TEXT, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, vector BLOB NOT NULL, added INTEGER NOT NULL, removed INTEGER);
CREATE UNIQUE INDEX images_live_path ON images(path) WHERE removed IS NULL;
"""


def write_v1_index(data: Path, home: Path, name: str) -> dict[str, np.ndarray]:
    """What simimg 0.1 left on disk for a trained model over `data`; returns each path's vector."""
    folder = IndexFolder.of(home, name)
    folder.root.mkdir(parents=True)
    loaded = with_classes(build_model(None, "none", 32), ("a", "b"))
    embedding = loaded.bundle.embedding  # 0.1 called the trunk's fingerprint just "fingerprint"
    save_file({k: v.contiguous() for k, v in loaded.net.state_dict().items()}, str(folder.root / "model.safetensors"))
    (folder.root / "model.json").write_text(
        json.dumps(
            {
                "format": 1,
                "arch": "densenet121",
                "classes": ["a", "b"],
                "preprocess": loaded.bundle.preprocess.to_dict(),
                "source": "trained from random-init:seed=0",
                "fingerprint": embedding,
                "embedding_dim": 1024,
                "weights": "none",
                "training": {"metrics": {"val_accuracy": 0.75}},
            }
        )
    )
    (folder.root / "curves.png").write_bytes(b"\x89PNG curves")
    records = scan_folder(data).records
    vectors, skipped = Encoder(model=loaded, device="cpu").encode([data / r.path for r in records])
    assert not skipped
    db = sqlite3.connect(folder.catalog)
    db.executescript(V1_SCHEMA)
    for i, (r, v) in enumerate(zip(records, vectors), 1):
        st = (data / r.path).stat()
        db.execute(
            "INSERT INTO images VALUES (?,?,?,?,?,?,?,1,NULL)",
            (i, r.path, r.label, st.st_size, st.st_mtime_ns, f"sha{i}", v.tobytes()),
        )
    db.execute("INSERT INTO versions VALUES (1, ?, ?, 'flat', ?)", (embedding, len(records), time.time()))
    db.execute("INSERT INTO meta VALUES ('data_root', ?)", (str(data.resolve()),))
    db.commit()
    db.close()
    save_index(build_ann(np.arange(1, len(records) + 1), vectors, 1024, "flat"), folder.faiss(1))
    (folder.index_job).write_text(json.dumps({"data_dir": str(data), "name": name, "home": str(home)}))
    return {r.path: v for r, v in zip(records, vectors)}


@pytest.fixture
def v1(tmp_path: Path) -> tuple[Path, Path, dict]:
    data = make_class_images(tmp_path / "photos", {"a": 4, "b": 4}, size=40)
    return data, tmp_path / "home", write_v1_index(data, tmp_path / "home", "photos")


def test_readers_ask_for_the_upgrade_in_one_line(v1):
    data, home, _ = v1
    with pytest.raises(SimimgError, match=r"run `simimg upgrade --name photos`"):
        SearchService(home, "photos", "cpu")
    code, out, err = run_main("query", str(data / "a" / "a_000.png"), "--name", "photos", "--home", str(home))
    assert code == 2 and out == "" and err.count("\n") == 1 and "simimg upgrade" in err


def test_upgrade_keeps_every_vector_the_model_and_its_pictures(v1):
    data, home, vectors = v1
    folder = IndexFolder.of(home, "photos")
    assert needs_upgrade(folder)
    assert main_json("upgrade", "--name", "photos", "--home", str(home)) == {"name": "photos", "upgraded": True}
    assert not needs_upgrade(folder) and not (folder.root / "model.json").exists()
    (fingerprint,) = model_fingerprints(folder)
    bundle = read_model(folder, fingerprint)
    assert bundle.kind == "fine-tuned" and bundle.classes == ("a", "b") and bundle.val_accuracy == 0.75
    assert (folder.model_dir(fingerprint) / "curves.png").read_bytes() == b"\x89PNG curves"
    service = SearchService(home, "photos", "cpu")
    assert service.snapshot.model == fingerprint and service.snapshot.version == 1
    result = service.search(data / "b" / "b_002.png", k=3)
    assert result.neighbors[0].path == "b/b_002.png" and result.prediction.label in ("a", "b")
    with reading(folder.catalog) as catalog:
        _, stored = catalog.vectors(1, bundle.embedding)
    for path, vector in zip(service.snapshot.paths, stored):
        np.testing.assert_array_equal(vector, vectors[path])
    assert run_index(IndexJob(str(data), "photos", str(home))).indexed == 0
    assert upgrade(folder) is False


@pytest.mark.slow
def test_a_writer_upgrades_by_itself(v1):
    data, home, _ = v1
    (data / "a" / "a_000.png").unlink()
    report = run_index(IndexJob(str(data), "photos", str(home)))
    assert (report.indexed, report.removed, report.total, report.version) == (0, 1, 7, 2)
