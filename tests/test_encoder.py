"""embed.py: files in, L2-normalised float32 embeddings out, in batches, with bad files reported beside them."""

from __future__ import annotations

import functools
import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_class_images
from simimg.models.device import native_bf16, resolve_compute
from simimg.models.encoder import EmbedSettings, Encoder, FileDataset, collate, embed_files, infer, read_ahead
from simimg.models.net import LoadedModel, build_model, with_classes
from test_images import write_broken

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return build_model("densenet121", "none", IMAGE_SIZE)


@pytest.fixture
def mixed(tmp_path) -> tuple[list[Path], dict[int, str]]:
    """Six good images and every broken kind, interleaved; returns the paths and position -> reason phrase."""
    good = sorted(make_class_images(tmp_path / "good", {"a": 3, "b": 3}, size=40).rglob("*.png"))
    phrases = write_broken(tmp_path / "bad")
    bad = [tmp_path / "bad" / name for name in phrases]
    paths = [p for pair in zip(good, bad) for p in pair]
    return paths, {i: phrases[p.name] for i, p in enumerate(paths) if p.parent.name == "bad"}


def test_dataset_reads_each_file_once_for_hash_and_pixels(model, mixed):
    paths, bad = mixed
    dataset = FileDataset(paths, model.bundle.preprocess)
    for i, path in enumerate(paths):
        pos, tensor, text = dataset[i]
        assert pos == i
        if i in bad:
            assert tensor is None and bad[i] in text
        else:
            assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == (3, IMAGE_SIZE, IMAGE_SIZE)
            assert text == hashlib.sha256(path.read_bytes()).hexdigest()


def test_missing_file_is_a_failure_not_an_exception(model, tmp_path):
    position, tensor, reason = FileDataset([tmp_path / "gone.jpg"], model.bundle.preprocess)[0]
    assert (position, tensor) == (0, None) and reason.startswith("file not found")


def test_collate_stacks_the_good_and_passes_failures_through():
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    positions, batch, hashes, failures = collate([(0, image, "h0"), (1, None, "bad"), (2, image + 1, "h2")])
    assert positions == [0, 2] and hashes == ["h0", "h2"] and failures == [(1, "bad")]
    assert tuple(batch.shape) == (2, 3, 4, 4) and batch[1].max() == 1
    positions, batch, hashes, failures = collate([(5, None, "x")])
    assert positions == [] and len(batch) == 0 and failures == [(5, "x")]


def counted(read: list[int], n: int, then: Exception | None = None):
    """Yields 0..n-1, noting each in `read` as it is produced; then raises `then`, if given."""
    for i in range(n):
        read.append(i)
        yield i
    if then:
        raise then


def test_read_ahead_keeps_order_reads_one_ahead_and_passes_errors_on():
    read: list[int] = []
    got = read_ahead(counted(read, 4, OSError("disk gone")), workers=0)
    assert next(got) == 0
    for _ in range(100):  # the next batch is read in another thread while the caller holds this one
        if read == [0, 1]:
            break
        time.sleep(0.01)
    assert read == [0, 1]
    assert [next(got) for _ in range(3)] == [1, 2, 3]
    with pytest.raises(OSError, match="disk gone"):
        next(got)


def test_read_ahead_stops_reading_when_the_caller_stops():
    read: list[int] = []
    got = read_ahead(counted(read, 100), workers=0)
    assert next(got) == 0
    got.close()
    assert len(read) <= 2 and not any(t.name.startswith("simimg-read-ahead") for t in threading.enumerate())


def test_infer_gives_unit_float32_vectors_and_logits_only_with_a_head(model):
    batch = torch.randint(0, 256, (3, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    compute = resolve_compute("cpu")
    net = model.net.eval()
    vectors, logits = infer(net, batch, model.bundle.preprocess, compute, with_logits=True)
    assert vectors.dtype == torch.float32 and tuple(vectors.shape) == (3, 1024) and logits is None
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(3))
    headed = with_classes(build_model("densenet121", "none", IMAGE_SIZE), ("x", "y"))
    again, logits = infer(headed.net.eval(), batch, model.bundle.preprocess, compute, with_logits=True)
    assert tuple(logits.shape) == (3, 2)
    torch.testing.assert_close(again, vectors)


@pytest.mark.parametrize("workers", [0, 2])
def test_embed_files_covers_every_position_once(model, mixed, workers):
    paths, bad = mixed
    settings = EmbedSettings(resolve_compute("cpu"), batch_size=4, workers=workers)
    batches = list(embed_files(model.net, paths, model.bundle.preprocess, settings))
    assert len(batches) == 3
    positions = [p for b in batches for p in b.positions]
    failures = dict(f for b in batches for f in b.failures)
    assert sorted(positions + list(failures)) == list(range(len(paths)))
    assert set(failures) == set(bad) and all(bad[i] in failures[i] for i in bad)
    vectors = np.concatenate([b.vectors for b in batches])
    assert vectors.dtype == np.float32 and vectors.shape == (len(positions), 1024)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_vector_does_not_depend_on_its_batch_or_path(model, mixed, tmp_path, precision):
    paths = [p for p in mixed[0] if p.parent.parent.name == "good"]
    copy = tmp_path / "copy.png"
    copy.write_bytes(paths[0].read_bytes())
    settings = EmbedSettings(resolve_compute("cpu", precision), batch_size=8, workers=0)
    together = next(embed_files(model.net, [*paths, copy], model.bundle.preprocess, settings)).vectors
    alone = next(embed_files(model.net, paths[:1], model.bundle.preprocess, settings)).vectors
    np.testing.assert_allclose(together[0], alone[0], atol=1e-5)
    np.testing.assert_allclose(together[-1], together[0], atol=1e-6)
    assert np.abs(together[1] - together[0]).max() > 1e-3


@functools.cache
def reference(paths: tuple[Path, ...], image_size: int) -> tuple[LoadedModel, np.ndarray]:
    """One model (random init, seed 0) and its torch float32 vectors of `paths` on the CPU: the reference every
    precision is compared with, computed once per set of images."""
    torch.manual_seed(0)
    model = build_model("densenet121", "none", image_size)
    fp32, _ = Encoder(model=model, device="cpu", precision="fp32", runtime="torch").encode(list(paths))
    return model, fp32


def agreement(paths: list[Path], image_size: int, device: str = "cpu", precision: str = "bf16") -> tuple[float, float]:
    """(lowest per-image cosine of `precision` vectors on `device`, on its default runtime (OpenVINO on the CPU), to
    torch float32 ones on the CPU (the reference), share of queries whose top-10 neighbours among the other images
    are the same set in both), for one model (random init, seed 0)."""
    model, fp32 = reference(tuple(paths), image_size)
    bf16, _ = Encoder(model=model, device=device, precision=precision).encode(paths)

    def top10(v: np.ndarray) -> list[set]:
        similarity = v @ v.T
        np.fill_diagonal(similarity, -np.inf)
        return [set(row) for row in np.argsort(-similarity, axis=1)[:, :10]]

    same = np.mean([a == b for a, b in zip(top10(fp32), top10(bf16))])
    return float((fp32 * bf16).sum(axis=1).min()), float(same)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_vectors_are_interchangeable_with_float32(tmp_path, request, device):
    """Why the embedding fingerprint leaves the precision and the runtime out: an index built in one serves queries
    in the other (on the CPU: OpenVINO's bf16; on CUDA: torch's bf16 there; both against torch float32 on the CPU)."""
    if device == "cuda":
        request.getfixturevalue("cuda")  # skips without a CUDA device
    paths = sorted(make_class_images(tmp_path, {"a": 20, "b": 20, "c": 20}, size=96).rglob("*.png"))
    cosine, same_top10 = agreement(paths, 64, device)
    assert cosine >= 0.999 and same_top10 >= 0.95, (cosine, same_top10)


@pytest.mark.datasets
@pytest.mark.parametrize(
    "precision",
    [
        pytest.param(
            "bf16",
            marks=pytest.mark.skipif(
                not native_bf16(torch.device("cpu")),
                reason="bf16 is the CPU's default runtime (OpenVINO) only on CPUs with bf16 units; elsewhere torch "
                "emulates it (minutes at 224 px), and the test above compares that with float32",
            ),
        ),
        "fp32",
    ],
)
def test_cpu_vectors_are_interchangeable_with_torch_float32_on_hymenoptera(shared_dataset, precision):
    """The same on real photos at the real size (hymenoptera/val, 153 images, 224 px), for both precisions of the
    CPU's default runtime."""
    paths = sorted(p for p in (shared_dataset("hymenoptera") / "val").rglob("*") if p.suffix.lower() == ".jpg")
    cosine, same_top10 = agreement(paths, 224, precision=precision)
    assert len(paths) == 153 and cosine >= 0.999 and same_top10 >= 0.95, (cosine, same_top10)
