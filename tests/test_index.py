"""indexing.py: one `simimg index` run, in process: awkward files indexed, broken ones reported, the model respected."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from conftest import make_class_images
from simimg.errors import SimimgError
from simimg.jobs.index import run_index
from simimg.jobs.index_config import IndexJob, read_index_job
from simimg.models.device import resolve_compute
from simimg.models.encoder import Encoder
from simimg.models.net import build_model
from simimg.store.ann import flat_contents, load_index
from simimg.store.catalog import Catalog, Snapshot
from simimg.store.layout import IndexFolder
from simimg.store.model_store import load_model, model_fingerprints, publish_model, read_model
from test_images import write_awkward, write_broken
from test_net import densenet121_state


def assert_consistent(home: Path, name: str) -> Snapshot:
    """FAISS and SQLite agree: the same ids, each once, each path once; the writer's head equals what readers see."""
    paths = IndexFolder.of(home, name)
    catalog = Catalog(paths.catalog, readonly=True)
    try:
        snap = catalog.snapshot()
        head = catalog.head()
        visible = catalog.count(snap.version)
        ids, vectors = catalog.vectors(snap.version, snap.embedding)
    finally:
        catalog.close()
    index = load_index(paths.faiss(snap.version))
    faiss_ids, faiss_vectors = flat_contents(index)
    assert index.ntotal == len(snap.ids) == visible
    assert sorted(faiss_ids.tolist()) == snap.ids.tolist() == ids.tolist()
    assert torch.allclose(torch.from_numpy(faiss_vectors[faiss_ids.argsort()]), torch.from_numpy(vectors))
    assert read_model(paths, snap.model).embedding == snap.embedding
    assert len(set(snap.ids.tolist())) == len(snap.ids) and len(set(snap.paths)) == len(snap.paths)
    assert sorted(head) == sorted(snap.paths)
    return snap


@pytest.fixture
def job(tmp_path) -> IndexJob:
    return IndexJob(
        data_dir=str(tmp_path / "photos"),
        name="photos",
        home=str(tmp_path / "home"),
        weights="none",
        image_size=32,
        batch_size=8,
        workers=0,
        chunk_size=4,
    )


def test_awkward_files_are_indexed_and_broken_ones_reported_by_path(job):
    root = Path(job.data_dir)
    make_class_images(root, {"good": 3}, size=40)
    awkward = write_awkward(root / "odd")
    broken = write_broken(root / "bad")
    seen: list[tuple[int, int]] = []
    report = run_index(job, progress=lambda done, total: seen.append((done, total)))
    assert (report.indexed, report.removed, report.total, report.version) == (3 + len(awkward), 0, 3 + len(awkward), 1)
    reasons = {s.path: s.reason for s in report.skipped}
    assert set(reasons) == {f"bad/{name}" for name in broken}
    assert all(phrase in reasons[f"bad/{name}"] for name, phrase in broken.items())
    assert seen[0] == (0, len(awkward) + len(broken) + 3) and seen[-1] == (seen[0][1], seen[0][1])
    snap = assert_consistent(Path(job.home), job.name)
    assert sorted(p for p, lab in zip(snap.paths, snap.labels) if lab == "odd") == [f"odd/{n}" for n in awkward]

    again = run_index(job)
    assert (again.indexed, again.removed, again.total, again.version) == (0, 0, report.total, 1)
    assert {s.path for s in again.skipped} == set(reasons)


def test_job_is_saved_beside_the_index(job):
    make_class_images(Path(job.data_dir), {"a": 2}, size=40)
    run_index(job)
    saved = json.loads((Path(job.home) / job.name / "index_job.json").read_text())
    resolved = replace(job, index_kind="auto")  # no kind given, none recorded: the saved job says what it chose
    assert saved == asdict(resolved) and read_index_job(IndexFolder.of(job.home, job.name)) == resolved
    folder = IndexFolder.of(job.home, job.name)
    (fingerprint,) = model_fingerprints(folder)
    assert read_model(folder, fingerprint).preprocess.crop_size == 32
    assert read_model(folder, fingerprint).kind == "pretrained"


@pytest.mark.slow
def test_switching_models_embeds_only_what_the_new_one_lacks(job, tmp_path):
    make_class_images(Path(job.data_dir), {"a": 3, "b": 2}, size=40)
    first = run_index(job)
    before = assert_consistent(Path(job.home), job.name)
    torch.save(densenet121_state(seed=1), tmp_path / "other.pth")
    other = build_model("densenet121", str(tmp_path / "other.pth"), 32)
    folder = IndexFolder.of(job.home, job.name)
    publish_model(folder, other.net, other.bundle)
    report = run_index(replace(job, weights=None, model=other.bundle.fingerprint[:6]))
    assert report.rebuilt and (report.indexed, report.total, report.version) == (first.total, first.total, 2)
    after = assert_consistent(Path(job.home), job.name)
    assert after.model == other.bundle.fingerprint != before.model and after.embedding != before.embedding
    assert after.ids.tolist() == before.ids.tolist()  # the same images, a new vector each
    make_class_images(Path(job.data_dir), {"c": 1}, size=40)  # a new file, then back to the first model
    back = run_index(replace(job, weights=None, model=before.model))
    assert (back.indexed, back.total, back.model) == (1, first.total + 1, before.model)
    assert assert_consistent(Path(job.home), job.name).embedding == before.embedding


@pytest.mark.slow
def test_an_interrupted_switch_leaves_the_published_version_serving(job, tmp_path, monkeypatch):
    make_class_images(Path(job.data_dir), {"a": 3, "b": 3}, size=40)
    run_index(job)
    before = assert_consistent(Path(job.home), job.name)
    torch.save(densenet121_state(seed=2), tmp_path / "other.pth")
    other = build_model("densenet121", str(tmp_path / "other.pth"), 32)
    publish_model(IndexFolder.of(job.home, job.name), other.net, other.bundle)
    import simimg.jobs.index

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(simimg.jobs.index, "_publish", crash)
    with pytest.raises(KeyboardInterrupt):
        run_index(replace(job, weights=None, model=other.bundle.fingerprint))
    after = assert_consistent(Path(job.home), job.name)
    assert (after.version, after.model, after.paths, after.ids.tolist()) == (
        before.version,
        before.model,
        before.paths,
        before.ids.tolist(),
    )
    monkeypatch.undo()
    resumed = run_index(replace(job, weights=None, model=other.bundle.fingerprint))
    assert resumed.indexed == 0 and resumed.model == other.bundle.fingerprint  # its vectors were committed


@pytest.mark.parametrize(
    "change",
    [
        {"image_size": 64},
        pytest.param({"arch": "resnet50"}, marks=pytest.mark.slow),
        pytest.param({"weights": "imagenet"}, marks=pytest.mark.slow),
    ],
)
def test_flags_that_disagree_with_the_index_model_are_refused(job, change):
    make_class_images(Path(job.data_dir), {"a": 2}, size=40)
    run_index(job)
    with pytest.raises(SimimgError, match="fingerprint mismatch: index 'photos' serves densenet121"):
        run_index(replace(job, **change))
    assert run_index(replace(job, weights=None, image_size=None, arch=None)).indexed == 0


def test_missing_or_empty_folders_are_user_errors_and_create_nothing(job):
    with pytest.raises(SimimgError, match="is not a folder"):
        run_index(job)
    (Path(job.data_dir) / "cls").mkdir(parents=True)
    (Path(job.data_dir) / "cls" / "notes.txt").write_text("no images here")
    with pytest.raises(SimimgError, match="no images found in"):
        run_index(job)
    assert not Path(job.home).exists()


def test_the_report_names_the_precision_and_the_job_keeps_it(job):
    make_class_images(Path(job.data_dir), {"a": 2}, size=40)
    report = run_index(replace(job, device="cpu", precision="fp32"))
    assert report.device == str(resolve_compute("cpu", "fp32"))  # "cpu (fp32, openvino)" where it is installed
    assert read_index_job(IndexFolder.of(job.home, job.name)).precision == "fp32"
    with pytest.raises(SimimgError, match="unknown precision 'half'"):
        run_index(replace(job, precision="half"))


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_indexing_agrees_with_float32_on_the_cpu(job, cuda, compile):
    """The CUDA path end to end (decode workers, pinned memory, bf16 autocast, optionally compiled)."""
    root = make_class_images(Path(job.data_dir), {"a": 6, "b": 6}, size=40)
    report = run_index(replace(job, device="cuda", workers=None, compile=compile))
    assert report.device.startswith("cuda (") and report.indexed == 12 and not report.skipped
    assert_consistent(Path(job.home), job.name)
    folder = IndexFolder.of(job.home, job.name)
    catalog = Catalog(folder.catalog, readonly=True)
    try:
        snap, vectors = catalog.snapshot_with_vectors()
    finally:
        catalog.close()
    encoder = Encoder(model=load_model(folder, snap.model), device="cpu", precision="fp32", runtime="torch")
    reference, _ = encoder.encode([root / path for path in snap.paths])
    assert (vectors * reference).sum(axis=1).min() >= 0.999
