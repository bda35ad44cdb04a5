"""openvino.py: the trunk converted to OpenVINO agrees with torch's float32, leaves the model and other
threads alone, and is kept in (and read back from) its cache folder."""

from __future__ import annotations

import logging
import os
import threading

import pytest
import torch
from torch import nn

from simimg.models import openvino
from simimg.models.device import native_bf16, resolve_compute
from simimg.models.encoder import infer
from simimg.models.net import build_model
from simimg.models.openvino import CACHE_ENV, COMPILED, MODEL_XML, compile_trunk, trunk_key

pytestmark = pytest.mark.skipif(not openvino.available(), reason="openvino is not installed")

SIZE = 32
PRECISIONS = [
    "fp32",
    pytest.param(
        "bf16",
        marks=pytest.mark.skipif(
            not native_bf16(torch.device("cpu")), reason="OpenVINO runs bf16 only on CPUs with bf16 units"
        ),
    ),
]


def with_batch_norm_statistics(net: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine terms far from their defaults, so the converted batch norms are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                for tensor, low, high in (
                    (m.running_mean, -0.3, 0.3),
                    (m.running_var, 0.5, 2.0),
                    (m.weight, 0.5, 1.5),
                    (m.bias, -0.2, 0.2),
                ):
                    tensor.copy_(torch.rand(tensor.shape, generator=g) * (high - low) + low)
    return net.eval()


def pixels(n: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def torch_fp32(net: nn.Module, preprocess, batch: torch.Tensor) -> torch.Tensor:
    """The reference: the model as it is, on torch, in float32 (what vectors were before OpenVINO)."""
    return infer(net, batch, preprocess, resolve_compute("cpu", "fp32", runtime="torch"))[0]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(  # densenet169/201/161 are built alike
    "arch",
    ["densenet121", pytest.param("resnet50", marks=pytest.mark.slow), pytest.param("vgg16", marks=pytest.mark.slow)],
)
def test_the_converted_trunk_agrees_with_torch_float32(arch, precision):
    model = build_model(arch, "none", SIZE)
    net, preprocess = with_batch_norm_statistics(model.net), model.bundle.preprocess
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trunk = compile_trunk(net.trunk, preprocess, precision)
    batch = pixels(6)
    got = infer(net, batch, preprocess, resolve_compute("cpu", precision), trunk=trunk)[0]
    cosine = nn.functional.cosine_similarity(torch_fp32(net, preprocess, batch), got)
    assert got.dtype == torch.float32 and got.shape == (6, net.dim)
    assert cosine.min() >= (0.99999 if precision == "fp32" else 0.999), cosine
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the model itself is untouched


@pytest.mark.slow
def test_a_vector_does_not_depend_on_its_batch():
    """A batch runs in sub-batches on several streams (a remainder included), a single image on one: same rows,
    in the same order."""
    model = build_model("densenet121", "none", SIZE)
    trunk = compile_trunk(
        model.net.trunk, model.bundle.preprocess, "bf16" if native_bf16(torch.device("cpu")) else "fp32", threads=2
    )
    batch = pixels(openvino.MIN_STREAMED_BATCH + openvino.SUB_BATCH + 1)
    one_by_one = torch.cat([trunk(batch[i : i + 1]) for i in range(len(batch))])
    torch.testing.assert_close(trunk(batch), one_by_one, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(trunk(batch[:3]), one_by_one[:3], atol=1e-4, rtol=1e-4)
    assert trunk(batch[:0]).shape == (0, model.net.dim)


@pytest.mark.slow
def test_threads_share_one_compiled_trunk():
    """The app's sessions and a server's threads call one trunk at once, with single images and batches: each gets
    its own infer request and queue of requests."""
    model = build_model("densenet121", "none", SIZE)
    trunk = compile_trunk(model.net.trunk, model.bundle.preprocess, "fp32", threads=2)
    batches = [pixels(2 if s % 2 else openvino.MIN_STREAMED_BATCH + 1, seed=s) for s in range(4)]
    alone = [trunk(b) for b in batches]
    together: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        for _ in range(3):
            together[i] = trunk(batches[i])

    workers = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for i, want in enumerate(alone):
        torch.testing.assert_close(together[i], want)


@pytest.mark.slow
def test_converting_leaves_training_in_other_threads_alone():
    """A model loads (and converts) while another thread trains: torch.fx tracing once broke that thread's step."""
    net = build_model("densenet121", "none", SIZE).net.train()
    errors: list[BaseException] = []
    stop = threading.Event()

    def train_steps() -> None:
        try:
            while not stop.is_set():
                net.embed(torch.randn(2, 3, SIZE, SIZE)).sum().backward()
        except BaseException as err:  # noqa: BLE001 - what a training thread would have died of
            errors.append(err)

    worker = threading.Thread(target=train_steps)
    worker.start()
    try:
        for _ in range(2):
            model = build_model("densenet121", "none", SIZE)
            compile_trunk(model.net.trunk, model.bundle.preprocess, "fp32")
    finally:
        stop.set()
        worker.join()
    assert errors == [] and net.training


def test_the_converted_model_is_kept_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    model = build_model("densenet121", "none", SIZE)
    net, preprocess = model.net.eval(), model.bundle.preprocess
    first = compile_trunk(net.trunk, preprocess, "fp32")
    kept = list((tmp_path / "cache").glob(f"openvino-*/{trunk_key(net.trunk, preprocess)}/{MODEL_XML}"))
    assert len(kept) == 1 and kept[0].with_suffix(".bin").stat().st_size > 3 * sum(
        p.numel() for p in net.trunk.parameters()
    )  # float32 weights (4 bytes), not fp16 (2)
    assert [p.name for p in kept[0].parent.parent.iterdir()] == [kept[0].parent.name]  # no staging folder left

    def no_conversion(*args):
        raise AssertionError("converted again although the cache holds the model")

    monkeypatch.setattr(openvino, "convert", no_conversion)
    again = compile_trunk(net.trunk, preprocess, "fp32")
    torch.testing.assert_close(again(pixels(3)), first(pixels(3)))


def test_compiled_blobs_are_kept_beside_the_model_and_a_damaged_one_is_compiled_again(tmp_path, monkeypatch):
    """Issue 21, item 3: a warm machine pays no compilation either; only the hint a call needs is compiled."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    model = build_model("densenet121", "none", SIZE)
    net, preprocess = model.net.eval(), model.bundle.preprocess
    want = compile_trunk(net.trunk, preprocess, "fp32")(pixels(3))  # one stream: LATENCY alone
    blobs = list((tmp_path / "cache").glob(f"openvino-*/{trunk_key(net.trunk, preprocess)}/{COMPILED}/*.blob"))
    assert len(blobs) == 1
    again = compile_trunk(net.trunk, preprocess, "fp32")
    torch.testing.assert_close(again(pixels(3)), want)
    assert again._compiled["LATENCY"].get_property("LOADED_FROM_CACHE") and "THROUGHPUT" not in again._compiled
    blobs[0].write_bytes(b"not a blob")
    damaged = compile_trunk(net.trunk, preprocess, "fp32")
    torch.testing.assert_close(damaged(pixels(3)), want)
    assert not damaged._compiled["LATENCY"].get_property("LOADED_FROM_CACHE")


def test_the_key_names_the_weights_and_the_preprocessing():
    model = build_model("densenet121", "none", SIZE)
    trunk, preprocess = model.net.trunk, model.bundle.preprocess
    key = trunk_key(trunk, preprocess)
    assert trunk_key(build_model("densenet121", "none", SIZE).net.trunk, preprocess) == key  # same seed, same key
    assert trunk_key(trunk, build_model("densenet121", "none", SIZE + 8).bundle.preprocess) != key
    with torch.no_grad():
        next(trunk.parameters())[0, 0, 0, 0] += 1e-3
    assert trunk_key(trunk, preprocess) != key


@pytest.mark.slow
def test_a_damaged_cache_is_converted_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    model = build_model("densenet121", "none", SIZE)
    net, preprocess = model.net.eval(), model.bundle.preprocess
    want = compile_trunk(net.trunk, preprocess, "fp32")(pixels(2))
    xml = next((tmp_path / "cache").glob(f"openvino-*/*/{MODEL_XML}"))
    xml.write_text("<net>truncated")
    with caplog.at_level(logging.WARNING, logger="simimg.models.openvino"):
        got = compile_trunk(net.trunk, preprocess, "fp32")(pixels(2))
    torch.testing.assert_close(got, want)
    assert "does not read" in caplog.text and xml.read_text().startswith("<?xml")


@pytest.mark.slow
def test_an_unwritable_cache_only_costs_a_conversion(tmp_path, monkeypatch, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would go")
    monkeypatch.setenv(CACHE_ENV, str(blocked))
    model = build_model("densenet121", "none", SIZE)
    with caplog.at_level(logging.WARNING, logger="simimg.models.openvino"):
        trunk = compile_trunk(model.net.trunk, model.bundle.preprocess, "fp32")
    assert trunk(pixels(1)).shape == (1, model.net.dim) and "could not keep the converted model" in caplog.text


@pytest.mark.slow
def test_the_cache_keeps_the_most_recently_used(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(openvino, "KEEP_CONVERTED", 2)
    preprocess = build_model("densenet121", "none", SIZE).bundle.preprocess
    trunks = []
    for i in range(3):
        trunk = build_model("densenet121", "none", SIZE).net.trunk
        with torch.no_grad():
            next(trunk.parameters()).add_(i)
        trunks.append(trunk)
    compile_trunk(trunks[0], preprocess, "fp32")
    compile_trunk(trunks[1], preprocess, "fp32")
    folder = next((tmp_path / "cache").glob("openvino-*"))
    os.utime(folder / trunk_key(trunks[1], preprocess), (1, 1))  # trunk 1 unused for the longest
    compile_trunk(trunks[2], preprocess, "fp32")
    kept = {p.name for p in folder.iterdir()}
    assert kept == {trunk_key(trunks[0], preprocess), trunk_key(trunks[2], preprocess)}


@pytest.mark.slow
def test_converting_sends_no_telemetry(monkeypatch):
    """`ov.convert_model` reports usage to Intel unless the user opted out; simimg converts without it."""
    telemetry = pytest.importorskip("openvino_telemetry")
    sent: list[tuple] = []
    monkeypatch.setattr(telemetry.Telemetry, "send_event", lambda self, *args, **kwargs: sent.append(args))
    monkeypatch.setattr(telemetry.Telemetry, "send_error", lambda self, *args, **kwargs: sent.append(args))
    model = build_model("densenet121", "none", SIZE)
    openvino.convert(model.net.trunk, model.bundle.preprocess)
    assert sent == []
