"""api.py: the public names, and the README's Python example run as a user would run it."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import simimg
from conftest import ROOT, make_class_images
from simimg.errors import SimimgError
from test_net import write_densenet121_checkpoint


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## The Python API", 1)[1].split("\n## ", 1)[0]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, re.S))  # each block goes on from the last


@pytest.mark.e2e
def test_the_readme_example_runs(tmp_path: Path):
    """In a fresh process, from a folder holding data/pets; ImageNet weights come from a file the test writes."""
    make_class_images(tmp_path / "data" / "pets", {"cats": 6, "dogs": 6}, size=64, ext="jpg")
    for folder, prefix in (("cats", "cat"), ("dogs", "dog")):
        for old in sorted((tmp_path / "data" / "pets" / folder).iterdir()):
            old.rename(old.with_name(f"{prefix}_{old.stem.rsplit('_', 1)[1]}.jpg"))
    (tmp_path / "data" / "pets" / "notes.txt").write_text("not a picture")
    write_densenet121_checkpoint(tmp_path / "torch_home", seed=4)
    env = {
        "PATH": "/usr/bin:/bin",
        "TORCH_HOME": str(tmp_path / "torch_home"),
        "SIMIMG_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "2",
    }
    proc = subprocess.run(
        [sys.executable, "-c", readme_example()], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "12 images, 0 skipped"
    assert lines[1].split()[0] in ("cats", "dogs") and "('cats/cat_000.jpg', 1.0)" in lines[1]
    assert lines[3] == "(1, 1024) [('data/pets/notes.txt', 'not an image: the file holds text')]"
    assert "head" in lines[4] and "serving" in lines[4] and "pretrained" in lines[5]
    assert lines[6].startswith("{'nearest': ")  # the second block: what the app shows, from a notebook
    info = ast.literal_eval(lines[7])
    assert info["labels"] == {"cats": 6, "dogs": 6} and info["kind"] == "head" and info["version"] == 2


def test_what_an_index_holds_is_read_without_a_model(tmp_path: Path):
    data = make_class_images(tmp_path / "data" / "shapes", {"a": 3, "b": 3}, size=40)
    home = tmp_path / "home"
    assert simimg.list_indexes(home) == []
    report = simimg.build_index(data, home=home, weights="none", image_size=32, workers=0)
    assert simimg.list_indexes(home) == ["shapes"]
    assert simimg.serving_model("shapes", home) == report.model
    assert simimg.collection_folder("shapes", home) == data.resolve()
    info = simimg.index_info("shapes", home)
    assert (info["total"], info["labels"], info["model"], info["version"]) == (6, {"a": 3, "b": 3}, report.model, 1)
    service = simimg.open_index("shapes", home, device="cpu")
    assert service.info() == {**info, "device": service.info()["device"]}  # one summary, two readers
    service.close()
    assert (
        simimg.export_path("shapes", report.model, "onnx", home)
        == home / "shapes" / "exports" / report.model / "model.onnx"
    )
    source, counts = simimg.class_counts(data)
    assert source and [(c.label, c.train + c.val) for c in counts] == [("a", 3), ("b", 3)]
    with pytest.raises(SimimgError, match="no index named 'nope'"):
        simimg.serving_model("nope", home)


def test_the_public_names_and_a_light_import():
    assert set(simimg.__all__) >= {"build_index", "open_index", "train", "evaluate", "Encoder", "SimimgError"}
    code = (
        "import sys, simimg; heavy = [m for m in ('torch', 'faiss', 'sklearn', 'matplotlib', 'streamlit') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_importing_the_library_changes_nothing_process_wide():
    """No plotting backend chosen, no allocator tuning: only the entry points opt in."""
    code = (
        "import matplotlib; before = matplotlib.get_backend(); import simimg.api, simimg.jobs.train, "
        "simimg.analysis.plots, simimg.memory; info = simimg.memory.reuse_freed_memory.cache_info(); "
        "print(before == matplotlib.get_backend(), info.hits + info.misses)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split() == ["True", "0"], out.stderr[-2000:]


def test_options_are_checked_by_name(tmp_path: Path):
    with pytest.raises(SimimgError, match=r"unknown option.*epoch.*choose from"):
        simimg.build_index(tmp_path, epoch=3)


def test_encoder_takes_paths_and_images_and_matches_the_index(shapes_index):
    index = simimg.open_index("shapes", shapes_index.home, "cpu")  # random-init weights, 32 px
    encoder = simimg.Encoder(weights="none", image_size=32, device="cpu")
    paths = [shapes_index.data / "circles" / "circles_000.png", shapes_index.data / "squares" / "squares_001.png"]
    vectors, skipped = encoder.encode([paths[0], Image.open(paths[1])])
    assert vectors.shape == (2, 1024) and skipped == []
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(vectors, index.embed([index.load(p) for p in paths]), atol=1e-5)
