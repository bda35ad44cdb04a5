"""export.py: a kept model as ONNX (onnxruntime gives the same embeddings and logits) or as its bundle zip."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import simimg
from conftest import make_class_images, run_cli
from simimg.errors import SimimgError
from simimg.store.layout import IndexFolder
from simimg.store.model_store import load_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, str]:
    base = tmp_path_factory.mktemp("export")
    data = make_class_images(base / "toys", {"a": 5, "b": 5}, size=40)
    simimg.build_index(data, home=base / "home", weights="none", image_size=32, workers=0)
    report = simimg.train(data, "toys", base / "home", head_only=True)
    return data, base / "home", report.model


def test_onnx_gives_the_models_embeddings_and_logits(trained, tmp_path):
    data, home, model = trained
    written = simimg.export_model("toys", tmp_path / "m.onnx", home=home)
    assert written["model"] == model and written["outputs"] == ["embedding", "logits"]
    assert written["max_abs_difference"] < 1e-4
    graph = onnx.load(str(tmp_path / "m.onnx"))
    bundle = json.loads({p.key: p.value for p in graph.metadata_props}["simimg_bundle"])
    assert bundle["fingerprint"] == model and bundle["classes"] == ["a", "b"]
    loaded = load_model(IndexFolder.of(home, "toys"), model)
    service = simimg.open_index("toys", home, "cpu", precision="fp32")  # ONNX runs float32
    images = [service.load(p) for p in sorted(data.rglob("*.png"))[:4]]
    preprocess = loaded.bundle.preprocess
    batch = preprocess.normalize(torch.stack([preprocess.to_uint8(im) for im in images])).numpy()
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    embedding, logits = session.run(None, {"images": batch})
    np.testing.assert_allclose(embedding, service.embed(images), atol=1e-4)
    expected = [service.predict(im).label for im in images]
    assert [bundle["classes"][i] for i in logits.argmax(1)] == expected


def test_the_bundle_zip_and_the_cli(trained, tmp_path):
    _, home, model = trained
    proc = run_cli(
        "export",
        "--name",
        "toys",
        "--home",
        str(home),
        "--format",
        "bundle",
        "--out",
        str(tmp_path / "m.zip"),
        "--json",
    )
    assert json.loads(proc.stdout)["model"] == model
    with zipfile.ZipFile(tmp_path / "m.zip") as archive:
        assert {f"{model}/model.json", f"{model}/model.safetensors"} <= set(archive.namelist())
    with pytest.raises(SimimgError, match="unknown export format 'tflite'"):
        simimg.export_model("toys", tmp_path / "x", "tflite", home)
