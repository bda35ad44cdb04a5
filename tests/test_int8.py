"""`--precision int8` (simimg/jobs/int8.py, simimg/models/int8.py): NNCF quantization on the collection, the gate
against float32, the fallback, and the query path serving the int8 trunk once the gate passed.

Real OpenVINO and NNCF throughout, on 32 px images: a sane quantization passes and a bad one (calibrated on one
constant image, or with its activation ranges forced 50x too narrow) is refused.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
from PIL import Image

import simimg
import simimg.models.int8
from simimg.jobs.index import run_index
from simimg.jobs.index_config import IndexJob
from simimg.jobs.int8 import gate_quantization
from simimg.models.device import cpu_has_int8_units
from simimg.models.int8 import decode_sample, entry, quantize, sample_key, split_sample
from simimg.models.net import build_model
from simimg.models.openvino import CACHE_ENV, converted

SIZE = 32
CLUSTERS, PER_CLUSTER = 4, 11  # top-10 of an image: the other 10 of its cluster, far closer than any other image


def clustered_collection(root: Path) -> Path:
    """Near-copies of 4 different pictures: neighbour lists a sound int8 must keep, even on random-init features."""
    rng = np.random.default_rng(0)
    for c in range(CLUSTERS):
        base = rng.integers(0, 256, (4, 4, 3)).astype(np.float32)
        picture = np.asarray(Image.fromarray(base.astype(np.uint8)).resize((48, 48), Image.BILINEAR), np.float32)
        (root / f"c{c}").mkdir(parents=True)
        for i in range(PER_CLUSTER):
            noisy = np.clip(picture + rng.normal(0, 2, picture.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / f"c{c}" / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    return clustered_collection(tmp_path_factory.mktemp("int8") / "data")


@pytest.fixture(scope="module")
def sample(collection):
    """The model, its float32 trunk, and the decoded calibration and held-back images of the collection."""
    model = build_model("densenet121", "none", SIZE)
    paths = sorted(str(p.relative_to(collection)) for p in collection.rglob("*.png"))
    calibration, held = split_sample(paths)
    preprocess = model.bundle.preprocess
    images = decode_sample(collection, calibration, preprocess)[0], decode_sample(collection, held, preprocess)[0]
    return model, converted(model.net.trunk, preprocess), *images


@pytest.fixture(scope="module")
def sane(sample) -> ov.Model:
    """The trunk quantized on the calibration images, as `--precision int8` quantizes it (once for the module)."""
    _, reference, calibration, _ = sample
    return quantize(reference, calibration)


def narrowed(quantized: ov.Model, factor: float) -> ov.Model:
    """A copy of `quantized` whose activation FakeQuantize ranges are `factor` times theirs: a forced bad scale."""
    broken = quantized.clone()
    for op in broken.get_ops():
        if op.get_type_name() != "FakeQuantize":
            continue
        for port in (1, 2):  # input_low, input_high
            data = np.asarray(op.input_value(port).get_node().get_data())
            op.input(port).replace_source_output(ov.opset13.constant((data * factor).astype(data.dtype)).output(0))
    return broken


def test_the_sample_is_split_disjoint_and_keyed_by_its_files(collection):
    paths = sorted(str(p.relative_to(collection)) for p in collection.rglob("*.png"))
    calibration, held = split_sample(paths)
    assert not set(calibration) & set(held)
    assert (len(held), len(calibration)) == (11, 33)
    assert split_sample(list(reversed(paths))) == (calibration, held)
    key = sample_key(collection, calibration + held)
    os.utime(collection / held[0], ns=(1, 1))
    assert sample_key(collection, calibration + held) != key  # a changed file: a new cache entry
    model = build_model("densenet121", "none", SIZE)
    other = build_model("densenet121", "none", 64)
    assert entry(model.net.trunk, model.bundle.preprocess, key) != entry(other.net.trunk, other.bundle.preprocess, key)


@pytest.mark.slow
def test_the_gate_passes_a_sane_quantization(sample, sane):
    model, reference, calibration, held = sample
    figures = gate_quantization(model.net, reference, sane, calibration, held)
    assert figures.passed, figures.describe()
    assert (figures.queries, figures.gallery) == (11, 44)


@pytest.mark.slow
def test_the_gate_refuses_a_forced_bad_scale(sample, sane):
    model, reference, calibration, held = sample
    broken = narrowed(sane, 0.02)
    figures = gate_quantization(model.net, reference, broken, calibration, held)
    assert not figures.passed
    assert figures.min_cosine < 0.99, figures.describe()


@pytest.fixture(scope="module")
def one_constant_image(sample) -> ov.Model:
    """NNCF's real quantization of the trunk, calibrated on one constant image (once for the module)."""
    _, reference, calibration, _ = sample
    return quantize(reference, np.full_like(calibration[:1], 128))


@pytest.mark.slow
def test_the_gate_refuses_a_quantization_calibrated_on_one_constant_image(sample, one_constant_image):
    model, reference, calibration, held = sample
    figures = gate_quantization(model.net, reference, one_constant_image, calibration, held)
    assert not figures.passed, figures.describe()


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    """A cache of this test's own: a kept quantization (refused or not) is reused for the same model and sample."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.slow
def test_a_refused_gate_falls_back_with_its_figures(
    collection, tmp_path, monkeypatch, caplog, own_cache, one_constant_image
):
    """The index's own quantization replaced by a bad one of the same trunk (the module's, calibrated on one
    constant image, with its ranges then forced too narrow)."""

    def bad_quantize(model: ov.Model, images: np.ndarray) -> ov.Model:
        return narrowed(one_constant_image, 0.02)

    monkeypatch.setattr(simimg.models.int8, "quantize", bad_quantize)
    monkeypatch.setattr(simimg.jobs.int8, "quantize", bad_quantize)
    job = IndexJob(str(collection), "bad", str(tmp_path), weights="none", image_size=SIZE, precision="int8")
    with caplog.at_level(logging.WARNING):
        report = run_index(job)
    assert report.device == "cpu (fp32, openvino)" or report.device == "cpu (bf16, openvino)"
    assert report.int8_gate is not None and not report.int8_gate["passed"]
    assert "int8 refused by its gate (top-10 agreement" in caplog.text
    info = simimg.index_info("bad", tmp_path)
    assert info["precision"] in ("fp32", "bf16")
    assert info["int8_gate"]["passed"] is False
    assert info["int8_gate"]["min_cosine"] == report.int8_gate["min_cosine"]
    service = simimg.open_index("bad", tmp_path, precision="int8")
    assert service.served.compute is not None and service.served.compute.precision != "int8"


@pytest.mark.slow
def test_a_passed_gate_indexes_and_serves_in_int8(collection, tmp_path, own_cache, monkeypatch):
    job = IndexJob(str(collection), "good", str(tmp_path), weights="none", image_size=SIZE, precision="int8")
    report = run_index(job)
    assert report.device == "cpu (int8, openvino)", report.int8_gate
    assert report.int8_gate is not None and report.int8_gate["passed"]
    folder = entry(*_trunk_of(tmp_path, "good"), report.int8_gate["sample"])
    assert json.loads((folder / "gate.json").read_text())["top10_agreement"] == report.int8_gate["top10_agreement"]
    info = simimg.index_info("good", tmp_path)
    assert info["precision"] == "int8" and info["int8_gate"]["passed"]
    for precision in ("int8", "auto"):
        service = simimg.open_index("good", tmp_path, precision=precision)
        expected = "int8" if precision == "int8" or cpu_has_int8_units() else service.compute.precision
        assert service.served.compute.precision == expected
        assert service.info()["device"] == f"cpu ({expected}, openvino)"
        result = service.search(collection / "c2" / "05.png", k=PER_CLUSTER)
        assert "c2/05.png" in [n.path for n in result.neighbors] and result.neighbors[0].score > 0.999
        assert {n.path.split("/")[0] for n in result.neighbors} == {"c2"}
    again = run_index(job)  # the kept quantization: no second one
    assert again.int8_gate == report.int8_gate and again.device == "cpu (int8, openvino)"
    # a head-only fit keeps the trunk, so its quantization, but the gate is judged again for the new classifier (it
    # kept the first model's figures, classifier agreement None, and served the new head in int8 unchecked)
    monkeypatch.setattr(simimg.jobs.int8, "quantize", lambda *_: pytest.fail("quantized a second time"))
    simimg.train(collection, "good", tmp_path, head_only=True)
    headed = run_index(replace(job, weights=None))  # the model it serves now
    assert headed.int8_gate["sample"] == report.int8_gate["sample"] and headed.int8_gate["model"] == headed.model
    assert report.int8_gate["classifier_agreement"] is None and headed.int8_gate["classifier_agreement"] is not None


def _trunk_of(home: Path, name: str):
    service = simimg.open_index(name, home, precision="fp32")
    return service.model.net.trunk, service.model.bundle.preprocess


TELEMETRY_PROBE = """
import json, multiprocessing, sys
import openvino as ov
import openvino_telemetry
sent = []
for name in ("send_event", "start_session", "end_session", "send_error"):
    setattr(openvino_telemetry.Telemetry, name, lambda self, *a, _n=name, **k: sent.append(_n))
forks = []
multiprocessing.Process.start = lambda self: forks.append(1)
if sys.argv[1] == "simimg":
    from simimg.models.int8 import import_nncf as load
else:
    def load():
        import nncf
        return nncf
nncf = load()
x = ov.opset13.parameter([1, 3, 8, 8], ov.Type.f32)
w = ov.opset13.constant(__import__("numpy").ones((4, 3, 3, 3), "float32"))
conv = ov.opset13.convolution(x, w, [1, 1], [0, 0], [0, 0], [1, 1])
model = ov.Model([ov.opset13.relu(conv)], [x])
data = [__import__("numpy").random.rand(1, 3, 8, 8).astype("float32") for _ in range(3)]
nncf.quantize(model, nncf.Dataset(data), subset_size=3)
print(json.dumps({"sent": sent, "forks": len(forks)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("importer", ["simimg", "plain"])
def test_nncf_sends_no_telemetry(importer, tmp_path):
    """In a process without pytest (NNCF silences itself under pytest), simimg's NNCF reports nothing and forks
    nothing; a plain `import nncf` does both (so the probe can fail)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NNCF_CI", "NNCF_DEV", "CI")}
    env |= {"HOME": str(tmp_path), "PYTHONPATH": str(Path(simimg.__file__).parents[1])}
    run = subprocess.run(
        [sys.executable, "-c", TELEMETRY_PROBE, importer], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    if importer == "simimg":
        assert seen == {"sent": [], "forks": 0}
    else:
        assert seen["sent"]
