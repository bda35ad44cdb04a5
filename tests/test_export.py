"""export.py: a kept model as ONNX (onnxruntime gives the same embeddings and logits) or as its bundle zip."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import simimg
from conftest import main_json
from simimg.errors import SimimgError
from simimg.store.layout import IndexFolder
from simimg.store.model_store import load_model


@pytest.fixture
def trained(pair_head) -> tuple[Path, Path, str]:
    """(data, home, model): the session's 'shapes' (circles, squares) with a head-only classifier, served."""
    built, model = pair_head
    return built.data, built.home, model


@pytest.mark.slow
def test_onnx_gives_the_models_embeddings_and_logits(trained, tmp_path):
    import onnx  # with onnxruntime, 0.7 s to import: here, not at every collection
    import onnxruntime

    data, home, model = trained
    written = simimg.export_model("shapes", tmp_path / "m.onnx", home=home)
    assert written["model"] == model and written["outputs"] == ["embedding", "logits"]
    assert written["max_abs_difference"] < 1e-4
    graph = onnx.load(str(tmp_path / "m.onnx"))
    bundle = json.loads({p.key: p.value for p in graph.metadata_props}["simimg_bundle"])
    assert bundle["fingerprint"] == model and bundle["classes"] == ["circles", "squares"]
    loaded = load_model(IndexFolder.of(home, "shapes"), model)
    service = simimg.open_index("shapes", home, "cpu", precision="fp32")  # ONNX runs float32
    images = [service.load(p) for p in sorted(data.rglob("*.png"))[:4]]
    preprocess = loaded.bundle.preprocess
    batch = preprocess.normalize(torch.stack([preprocess.to_uint8(im) for im in images])).numpy()
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    embedding, logits = session.run(None, {"images": batch})
    np.testing.assert_allclose(embedding, service.embed(images), atol=1e-4)
    expected = [service.predict(im).label for im in images]
    assert [bundle["classes"][i] for i in logits.argmax(1)] == expected


def test_the_bundle_zip_and_the_cli(shapes_index, tmp_path):
    """The serving model of the session's index 'shapes' (random init, no classifier): a kept model like any."""
    home = shapes_index.home
    (model,) = [m["fingerprint"] for m in main_json("models", "--name", "shapes", "--home", str(home)) if m["serving"]]
    written = main_json(
        "export", "--name", "shapes", "--home", str(home), "--format", "bundle", "--out", str(tmp_path / "m.zip")
    )
    assert written["model"] == model
    with zipfile.ZipFile(tmp_path / "m.zip") as archive:
        assert {f"{model}/model.json", f"{model}/model.safetensors"} <= set(archive.namelist())
    with pytest.raises(SimimgError, match="unknown export format 'tflite'"):
        simimg.export_model("shapes", tmp_path / "x", "tflite", home)
