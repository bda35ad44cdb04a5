"""`simimg train --head-only`: a classifier in seconds, fitted on the embeddings the catalog already holds.

The trunk stays as it is, so every stored vector stays valid: the new model (kind "head") shares the serving
model's embedding, and serving it publishes a version over the same vectors without embedding anything. The head
is class-weighted logistic regression on the unit-length embeddings (scikit-learn's objective, its C chosen by
cross-validation, fitted fast: analysis/classifier.py), then carried as a torch linear layer that reads the
normalised embedding.

Every image of the folder must be held by the index as it is now: a folder with images the index does not hold
(new, changed, or another collection's) is refused before anything is embedded, unless `embed_missing` asks for
them to be embedded here with the serving model (and not added). Files no decoder can read do not count: the
index skips them too, so indexing again could never make them held.

`held_vectors`, `split_vectors` (a split's vectors: stored ones read from the catalog, the rest embedded on the
fly) and `collection_folder` serve the dataset audit too.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simimg.analysis.classifier import FittedHead, fit_head
from simimg.analysis.metrics import classification_metrics
from simimg.analysis.plots import confusion_png
from simimg.dataset.splits import Split
from simimg.errors import SimimgError
from simimg.jobs.index_config import read_index_job
from simimg.jobs.train_config import TrainConfig, TrainReport
from simimg.models.bundle import ModelBundle
from simimg.models.device import Compute, loader_workers
from simimg.models.encoder import EmbedSettings, FileDataset, embed_files
from simimg.models.net import LoadedModel, describe, with_classes
from simimg.progress import Hooks
from simimg.store.catalog import reading
from simimg.store.layout import IndexFolder
from simimg.store.model_store import load_model, publish_model, serving_model

log = logging.getLogger(__name__)


def train_head(config: TrainConfig, split: Split, folder: IndexFolder, compute: Compute, hooks: Hooks) -> TrainReport:
    """Fit a head on the serving model's stored embeddings of the split and keep it as a model version.

    `training.run_training` calls this under the training lock, and serves the result. Images the index does not
    hold are refused (`refuse_unheld`) before anything is embedded, unless `config.embed_missing`.
    """
    base = stored_model(folder)
    held = held_vectors(folder, base, split)
    if not config.embed_missing:
        held = refuse_unheld(folder, split, held, base)
    if held.missing:
        hooks.on_phase("embedding")
    settings = EmbedSettings(compute, config.batch_size, loader_workers(config.workers, compute.device))
    found = split_vectors(held, base, split, settings, hooks.progress)
    vectors = found.vectors
    hooks.on_phase("training")
    train_rows = [i for i in range(len(split.train)) if i in vectors]
    val_rows = [i + len(split.train) for i in range(len(split.val)) if i + len(split.train) in vectors]
    labels = np.concatenate([split.labels(split.train), split.labels(split.val)])
    x = np.stack([vectors[i] for i in train_rows + val_rows])
    head = fit_head(x[: len(train_rows)], labels[train_rows], len(split.classes), config.seed)
    hooks.on_phase("validating")
    probs = head.probabilities(x[len(train_rows) :])
    metrics = classification_metrics(labels[val_rows], probs, split.classes)
    hooks.on_phase("saving")
    bundle = _keep_head(folder, base, head, split, metrics, config, found.counts)
    log.info(
        "head-only '%s': val accuracy %.3f (C=%g) from %d stored and %d new embeddings",
        config.name,
        metrics["accuracy"],
        head.c,
        found.counts["from_catalog"],
        found.counts["embedded"],
    )
    return TrainReport(
        config.name,
        0,
        metrics["accuracy"],
        [],
        0.0,
        str(compute),
        False,
        False,
        found.skipped,
        bundle.fingerprint,
        "head",
        None,
        {**found.counts, "C": head.c},
    )


def stored_model(folder: IndexFolder) -> LoadedModel:
    """The serving model of an index whose stored embeddings a job works on (head-only training, the audit)."""
    if not folder.catalog.exists():
        raise SimimgError(
            f"this works on an index's stored embeddings, and there is no index '{folder.name}' yet: run "
            f"`simimg index DATA_DIR --name {folder.name}` first"
        )
    return load_model(folder, serving_model(folder))


def collection_folder(folder: IndexFolder) -> Path | None:
    """The folder the index holds (the catalog's data_root, else index_job.json's data_dir); None if unrecorded."""
    with reading(folder.catalog) as catalog:
        root = catalog.get_meta("data_root")
    if root is None:
        job = read_index_job(folder)
        root = job.data_dir if job is not None else None
    return None if root is None else Path(root).resolve()


@dataclass(frozen=True)
class HeldVectors:
    """What the published version holds of a split, by position (train, then val): (vector, sha256) of each file
    it holds unchanged, the positions of the others still to embed, and files already known to be unreadable."""

    files: list[Path]
    stored: dict[int, tuple[np.ndarray, str]]
    missing: list[int]
    unreadable: dict[int, str] = field(default_factory=dict)


def held_vectors(folder: IndexFolder, base: LoadedModel, split: Split) -> HeldVectors:
    """A catalog lookup only (no image is read): which split files the index holds as they are now."""
    root = split.root.resolve()
    files = [Path(os.path.normpath(root / r.path)) for r in split.train + split.val]
    stored = _stored_vectors(folder, base.bundle.embedding, files)
    return HeldVectors(files, stored, [i for i in range(len(files)) if i not in stored])


def refuse_unheld(folder: IndexFolder, split: Split, held: HeldVectors, base: LoadedModel) -> HeldVectors:
    """Raise SimimgError if the index does not hold a readable image of the split; else `held` with its unheld
    files marked unreadable. Reads the unheld files only until the first one that decodes, so the count in the
    message leaves out the unreadable files met before it (all of them, when it is the last one)."""
    dataset = FileDataset(held.files, base.bundle.preprocess)
    unreadable: dict[int, str] = {}
    for i in held.missing:
        _, image, why = dataset[i]
        if image is not None:
            missing = len(held.missing) - len(unreadable)
            raise SimimgError(_unheld_message(folder, split.root.resolve(), missing, len(held.files)))
        unreadable[i] = why
    return replace(held, missing=[], unreadable={**held.unreadable, **unreadable})


def _unheld_message(folder: IndexFolder, root: Path, missing: int, total: int) -> str:
    collection = collection_folder(folder)
    inside = collection is not None and root.is_relative_to(collection)
    first = (
        f"update the index first (`simimg index {collection} --name {folder.name}`)"
        if inside
        else f"index that folder first (`simimg index {root} --name {root.name}`, then train with --name {root.name})"
    )
    return (
        f"{missing:,} of the {total:,} images in {root} are not in index '{folder.name}' (new, changed, or from "
        f"another folder; the index holds {collection or 'a folder it did not record'}), and --head-only fits on the "
        f"embeddings the index holds: {first}, train a full model (without --head-only), or pass "
        f"--embed-missing to embed them with the serving model (not added to the index)"
    )


@dataclass(frozen=True)
class SplitVectors:
    """A model's embedding and the content hash of each readable split image, by position (train, then val)."""

    vectors: dict[int, np.ndarray]
    hashes: dict[int, str]
    skipped: list[dict[str, Any]]
    counts: dict[str, int]


def split_vectors(
    held: HeldVectors,
    base: LoadedModel,
    split: Split,
    settings: EmbedSettings,
    progress: Callable[[int, int], None] | None = None,
) -> SplitVectors:
    """Vectors of every split image: the held ones from the catalog, `held.missing` embedded here with `base`
    (and not added), reporting (done, len(held.missing)). Unreadable files are skipped and reported."""
    records = split.train + split.val
    vectors = {i: vector for i, (vector, _) in held.stored.items()}
    hashes = {i: sha for i, (_, sha) in held.stored.items()}
    missing = held.missing
    skipped: list[dict[str, Any]] = [{"path": s.path, "reason": s.reason} for s in split.skipped]
    skipped += [{"path": records[i].path, "reason": why} for i, why in held.unreadable.items()]
    if missing:
        log.info("%d of %d images are not in the index as they are now: embedding them", len(missing), len(held.files))
        done = 0
        for batch in embed_files(base.net, [held.files[i] for i in missing], base.bundle.preprocess, settings):
            for p, vector, sha in zip(batch.positions, batch.vectors, batch.hashes):
                vectors[missing[p]], hashes[missing[p]] = vector, sha
            skipped += [{"path": records[missing[p]].path, "reason": why} for p, why in batch.failures]
            done += len(batch.positions) + len(batch.failures)
            if progress is not None:
                progress(done, len(missing))
    counts = {"from_catalog": len(held.stored), "embedded": len(missing)}
    return SplitVectors(vectors, hashes, skipped, counts)


def _stored_vectors(folder: IndexFolder, embedding: str, files: list[Path]) -> dict[int, tuple[np.ndarray, str]]:
    """{position in `files`: (vector, sha256)} for the files the published version holds unchanged (same size
    and mtime), read as one consistent snapshot."""
    with reading(folder.catalog) as catalog:
        read = catalog.snapshot_with_vectors()
        if read is None or read[0].embedding != embedding:
            return {}
        snapshot, vectors = read
        root = Path(catalog.get_meta("data_root", "/"))
        stamps = {r.id: (r.size, r.mtime_ns) for r in catalog.iter_rows(snapshot.version)}
    where = {os.path.normpath(root / p): n for n, p in enumerate(snapshot.paths)}
    found: dict[int, tuple[np.ndarray, str]] = {}
    for i, f in enumerate(files):
        n = where.get(str(f))
        if n is None:
            continue
        stamp = stamps.get(int(snapshot.ids[n]))
        if stamp is not None and _unchanged(f, *stamp):
            found[i] = (vectors[n], snapshot.sha256[n])
    return found


def _unchanged(path: Path, size: int, mtime_ns: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (size, mtime_ns)


def _keep_head(
    folder: IndexFolder,
    base: LoadedModel,
    head: FittedHead,
    split: Split,
    metrics: dict[str, Any],
    config: TrainConfig,
    counts: dict[str, int],
) -> ModelBundle:
    """The base trunk with the fitted head, kept as a model version of kind 'head' with its confusion plot."""
    model = with_classes(base, split.classes, unit_head=True)
    linear = model.net.head
    assert linear is not None, "with_classes gives a net with classes its head"
    linear.weight.data = torch.from_numpy(head.weight)
    linear.bias.data = torch.from_numpy(head.bias)
    training = {
        "config": asdict(config),
        "head": {"C": head.c, **counts},
        "split": split.describe(),
        "metrics": {"val_accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]},
    }
    info = {
        "weights": f"model:{base.bundle.fingerprint}",
        "random_features": base.bundle.random_features,
        "training": training,
    }
    bundle = describe(
        model.net,
        base.bundle.arch,
        split.classes,
        base.bundle.preprocess,
        f"head on {base.bundle.fingerprint}",
        "head",
        embedding=base.bundle.embedding,
        **info,
    )
    extras = {
        "confusion.png": confusion_png(metrics["confusion_matrix"], split.classes),
        "train_job.json": json.dumps(asdict(config), indent=2).encode(),
    }
    publish_model(folder, model.net, bundle, extras)
    return bundle
