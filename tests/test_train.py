"""Training: a short run learns and is served, the model version round-trips, cancel and --resume, the recipe,
queries that never fail while a model trains, model-info, bad folders."""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from conftest import make_class_images, run_main
from simimg.errors import SimimgError
from simimg.jobs.index import run_index
from simimg.jobs.index_config import IndexJob
from simimg.jobs.train import lr_factor, recipe_for, run_training
from simimg.jobs.train_config import TrainConfig
from simimg.models.device import resolve_compute
from simimg.models.info import model_info
from simimg.progress import EpochStats, Hooks
from simimg.query.service import SearchService
from simimg.store.layout import IndexFolder, list_indexes
from simimg.store.model_store import list_models, load_model, read_model

CLASSES = {"circle": 16, "square": 16, "triangle": 8}  # imbalanced: the loss is class-weighted


@pytest.fixture(autouse=True)
def one_thread():
    """Two cores shared by many jobs: more than one OpenMP thread each makes every job crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_class_images(tmp_path_factory.mktemp("train") / "toys", CLASSES, size=40)


def small(data: Path, home: Path, **changes) -> TrainConfig:
    config = TrainConfig(
        str(data), "toys", str(home), weights="none", epochs=5, batch_size=8, image_size=32, val_split=0.25, workers=0
    )
    return replace(config, **changes)


@pytest.fixture(scope="module")
def trained(toys: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.set_num_threads(1)
    config = small(toys, tmp_path_factory.mktemp("home"))
    epochs: list[EpochStats] = []
    batches: list[tuple[int, int]] = []
    phases: list[str] = []
    hooks = Hooks(
        on_epoch=epochs.append, progress=lambda done, total: batches.append((done, total)), on_phase=phases.append
    )
    report = run_training(config, hooks)
    return {
        "config": config,
        "report": report,
        "epochs": epochs,
        "batches": batches,
        "phases": phases,
        "paths": IndexFolder.of(config.home, config.name),
    }


def test_a_short_run_learns_the_synthetic_task(trained: dict) -> None:
    report = trained["report"]
    assert report.val_accuracy >= 0.75, report.history  # chance is 1/3
    assert not report.cancelled and report.device == str(resolve_compute("cpu", training=True)) == "cpu (fp32)"
    assert report.history == trained["epochs"] and [h.epoch for h in report.history] == [1, 2, 3, 4, 5]
    assert {h.phase for h in report.history} == {"scratch"}
    best = min(report.history, key=lambda h: h.val_loss)
    assert report.best_epoch == best.epoch and report.val_accuracy == best.val_accuracy
    assert trained["batches"][:3] == [(1, 3), (2, 3), (3, 3)]  # 30 training images, batches of 8, the last dropped
    phases = trained["phases"]
    assert (
        phases[0] == "loading" and phases[1:3] == ["training", "validating"] and phases[-2:] == ["saving", "indexing"]
    )


def test_a_finished_run_is_served_by_a_new_index_version(trained: dict) -> None:
    report, paths = trained["report"], trained["paths"]
    assert report.index is not None and report.index.model == report.model and report.index.version == 1
    assert report.index.total == sum(CLASSES.values()) and report.index.indexed == report.index.total
    service = SearchService(paths.root.parent, "toys", "cpu")
    found = service.search(Path(trained["config"].data_dir) / "circle" / "circle_000.png", k=1)
    assert found.prediction is not None and found.neighbors[0].path == "circle/circle_000.png"
    (entry,) = list_models(paths, serving=report.model)
    assert entry.kind == "fine-tuned" and entry.serving and entry.val_accuracy == report.val_accuracy


def test_the_model_version_carries_the_training_record(trained: dict) -> None:
    paths, report = trained["paths"], trained["report"]
    bundle = read_model(paths, report.model)
    model_dir = paths.model_dir(report.model)
    assert bundle.classes == tuple(CLASSES) and bundle.preprocess.crop_size == 32 and bundle.kind == "fine-tuned"
    training = bundle.info["training"]
    assert training["best_epoch"] == report.best_epoch
    assert training["metrics"]["val_accuracy"] == report.val_accuracy
    assert [h["epoch"] for h in training["history"]] == [1, 2, 3, 4, 5]
    assert len(training["split"]["val_paths"]) == 10 and training["config"]["weights"] == "none"
    assert training["class_weights"] == pytest.approx([30 / (3 * 12), 30 / (3 * 12), 30 / (3 * 6)])
    assert json.loads((model_dir / "train_job.json").read_text()) == asdict(trained["config"])
    for picture in ("curves.png", "confusion.png"):
        assert (model_dir / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cancel_keeps_the_best_model_unserved_and_resume_continues(toys: Path, tmp_path: Path) -> None:
    config = small(toys, tmp_path, epochs=3)
    folder = IndexFolder.of(tmp_path, "toys")
    finished: list[EpochStats] = []
    first = run_training(config, Hooks(on_epoch=finished.append, should_stop=lambda: len(finished) == 2))
    assert first.cancelled and [h.epoch for h in first.history] == [1, 2] and first.index is None
    assert read_model(folder, first.model).info["training"]["best_epoch"] == first.best_epoch
    assert not folder.catalog.exists()  # nothing was served

    # the model round-trips: the weights training kept give the same logits as the model rebuilt from disk
    kept, reloaded = load_model(folder, first.model).net, load_model(folder, first.model).net
    kept.load_state_dict(torch.load(folder.checkpoint, weights_only=True)["best_model"])
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(kept(x), reloaded(x))

    resumed = run_training(replace(config, resume=True, index=False))
    assert not resumed.cancelled and [h.epoch for h in resumed.history] == [1, 2, 3]
    assert resumed.history[:2] == first.history and resumed.index is None
    assert not folder.checkpoint.exists()  # a finished run needs none


def test_cancel_before_an_epoch_ends_keeps_no_model(toys: Path, tmp_path: Path) -> None:
    report = run_training(small(toys, tmp_path), Hooks(should_stop=lambda: True))
    assert report.cancelled and report.best_epoch == 0 and report.history == [] and report.model == ""
    assert not IndexFolder.of(tmp_path, "toys").models.exists() and list_indexes(tmp_path) == []


@pytest.mark.slow
def test_queries_never_fail_while_a_model_trains_and_takes_over(toys: Path, tmp_path: Path) -> None:
    """The issue's user story: query an index every moment while `simimg train` runs on it, warm and cold."""
    run_index(IndexJob(str(toys), "toys", str(tmp_path), weights="none", image_size=32, workers=0))
    warm = SearchService(tmp_path, "toys", "cpu")
    query = toys / "square" / "square_003.png"
    done, seen, errors = threading.Event(), [], []

    def keep_querying() -> None:
        while not done.is_set():
            for service in (warm, None):
                try:
                    service = service or SearchService(tmp_path, "toys", "cpu")
                    result = service.search(query, k=3)
                    seen.append((service.snapshot.version, result.prediction is not None))
                    assert result.neighbors[0].path == "square/square_003.png"
                except Exception as err:  # noqa: BLE001 - every failure is a finding
                    errors.append(repr(err))

    reader = threading.Thread(target=keep_querying)
    reader.start()
    try:
        report = run_training(small(toys, tmp_path, epochs=2))
    finally:
        done.set()
        reader.join()
    assert not errors, errors[:3]
    assert report.index.version == 2 and seen[0] == (1, False)
    assert len(seen) > 10 and all(has == (v == 2) for v, has in seen)
    assert warm.search(query, k=1).prediction is not None  # the warm service took the new model over


def test_resume_without_a_checkpoint_says_so(toys: Path, tmp_path: Path) -> None:
    with pytest.raises(SimimgError, match="nothing to resume"):
        run_training(small(toys, tmp_path, resume=True))


@pytest.mark.slow
def test_frozen_warm_up_changes_only_the_head(trained: dict, toys: Path, tmp_path: Path) -> None:
    """Transfer from an earlier simimg model: one frozen epoch keeps its backbone, so its fingerprint too."""
    source = trained["paths"]  # an index folder as --weights: the model it serves
    report = run_training(small(toys, tmp_path, weights=str(source.root), epochs=1, freeze_epochs=1, index=False))
    assert [h.phase for h in report.history] == ["frozen"]
    new, old = read_model(IndexFolder.of(tmp_path, "toys"), report.model), read_model(source, trained["report"].model)
    assert new.embedding == old.embedding and new.fingerprint != old.fingerprint


@pytest.mark.slow
def test_early_stopping_counts_only_annealed_epochs_and_keeps_the_best(
    trained: dict, toys: Path, tmp_path: Path
) -> None:
    """A frozen backbone and a vanishing learning rate: validation loss never improves after epoch 1.

    The learning rate falls below half its peak after epoch 3 of 6, so patience 2 runs out at epoch 5, not 3.
    """
    config = small(
        toys, tmp_path, weights=str(trained["paths"].root), epochs=6, freeze_epochs=6, lr=1e-12, patience=2, index=False
    )
    report = run_training(config)
    assert report.stopped_early and [h.epoch for h in report.history] == [1, 2, 3, 4, 5]
    assert report.best_epoch == 1
    assert read_model(IndexFolder.of(tmp_path, "toys"), report.model).info["training"]["best_epoch"] == 1


def test_recipe_defaults_depend_on_the_start() -> None:
    scratch = recipe_for(TrainConfig("d", "n", "h", weights="none"))
    pretrained = recipe_for(TrainConfig("d", "n", "h"))
    assert (scratch.epochs, scratch.lr, scratch.freeze_epochs) == (80, 2e-3, 0)
    assert pretrained.freeze_epochs > 0 and pretrained.backbone_lr_factor < 1
    assert recipe_for(TrainConfig("d", "n", "h", epochs=7, lr=0.1)).epochs == 7
    with pytest.raises(SimimgError, match="--epochs"):
        recipe_for(TrainConfig("d", "n", "h", epochs=0))


def test_learning_rate_warms_up_then_decays_to_zero() -> None:
    factors = [lr_factor(step, 100, 10) for step in range(101)]
    assert factors[0] == pytest.approx(0.04) and factors[10] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(factors[:11]))
    assert all(a >= b for a, b in itertools.pairwise(factors[10:])) and factors[-1] == pytest.approx(0.0)


def test_model_info_counts_densenet121() -> None:
    info = model_info("densenet121", image_size=224, device="cpu")
    assert info["parameters"] == 7_978_856 and info["embedding_dim"] == 1024  # torchvision's published figures
    assert info["gmacs"] == pytest.approx(2.83, abs=0.05)
    assert info["peak_training_memory_mib"] is None


def test_cli_rejects_a_bad_data_dir_in_one_line(tmp_path: Path) -> None:
    """Every kind of bad folder is in test_data; here, that the CLI turns one into a single line and exit 2."""
    data = make_class_images(tmp_path / "d", {"a": 3, "b": 0}, size=16)
    code, out, err = run_main("train", str(data), "--home", str(tmp_path / "home"), "--weights", "none")
    assert code == 2 and out == ""
    assert err.startswith("simimg: error: ") and err.count("\n") == 1


@pytest.mark.gpu
def test_cuda_training_step_and_peak_memory(toys: Path, tmp_path: Path, cuda) -> None:
    report = run_training(small(toys, tmp_path, epochs=1, device="cuda", memory_efficient=True))
    assert report.device.startswith("cuda") and len(report.history) == 1
    assert model_info("densenet121", 224, "cuda", batch_size=8)["peak_training_memory_mib"] > 0
