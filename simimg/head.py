"""`simimg train --head-only`: a classifier in seconds, fitted on the embeddings the catalog already holds.

The trunk stays as it is, so every stored vector stays valid: the new model (kind "head") shares the serving
model's embedding, and serving it publishes a version over the same vectors without embedding anything. The head
is scikit-learn's logistic regression on the unit-length embeddings, class-weighted, its C chosen by
cross-validation, then carried as a torch linear layer that reads the normalised embedding.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from simimg.catalog import reading
from simimg.data import Split
from simimg.device import Compute, loader_workers
from simimg.embed import EmbedSettings, embed_files
from simimg.errors import SimimgError
from simimg.evaluation import classification_metrics
from simimg.layout import IndexFolder
from simimg.model import LoadedModel, ModelBundle, describe, with_classes
from simimg.model_store import load_model, publish_model
from simimg.plots import confusion_png
from simimg.training import Hooks, TrainConfig, TrainReport

log = logging.getLogger(__name__)

C_GRID = tuple(float(c) for c in np.logspace(-1, 3, 5))
MAX_FOLDS = 5


@dataclass(frozen=True)
class FittedHead:
    """A linear classifier over unit-length embeddings: logits = weight @ x + bias, one row per class."""

    weight: np.ndarray
    bias: np.ndarray
    c: float


def fit_head(x: np.ndarray, y: np.ndarray, num_classes: int, seed: int = 0) -> FittedHead:
    """Class-weighted logistic regression, C picked by stratified cross-validation when every class allows it."""
    folds = min(MAX_FOLDS, int(np.bincount(y, minlength=num_classes).min()))
    model = LogisticRegression(class_weight="balanced", max_iter=2000)
    if folds >= 2:
        search = GridSearchCV(model, {"C": C_GRID}, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                              scoring="neg_log_loss", n_jobs=1)
        model = search.fit(x, y).best_estimator_
    else:
        model.fit(x, y)
    weight, bias = model.coef_, model.intercept_
    if num_classes == 2:  # one row for class 1 against class 0: as two softmax rows the probabilities agree
        weight, bias = np.vstack([np.zeros_like(weight), weight]), np.concatenate([[0.0], bias])
    return FittedHead(weight.astype(np.float32), bias.astype(np.float32), float(model.C))


def train_head(config: TrainConfig, split: Split, folder: IndexFolder, compute: Compute,
               hooks: Hooks) -> TrainReport:
    """Fit a head on the serving model's stored embeddings of the split and keep it as a model version.

    `training.run_training` calls this under the training lock, and serves the result.
    """
    base = _serving_model(folder)
    vectors, skipped, counts = _embeddings_of(folder, base, split, config, compute)
    hooks.on_phase("training")
    train_rows = [i for i in range(len(split.train)) if i in vectors]
    val_rows = [i + len(split.train) for i in range(len(split.val)) if i + len(split.train) in vectors]
    labels = np.concatenate([split.labels(split.train), split.labels(split.val)])
    x = np.stack([vectors[i] for i in train_rows + val_rows])
    head = fit_head(x[:len(train_rows)], labels[train_rows], len(split.classes), config.seed)
    hooks.on_phase("validating")
    probs = _softmax(x[len(train_rows):] @ head.weight.T + head.bias)
    metrics = classification_metrics(labels[val_rows], probs, split.classes)
    hooks.on_phase("saving")
    bundle = _keep_head(folder, base, head, split, metrics, config, counts)
    log.info("head-only '%s': val accuracy %.3f (C=%g) from %d stored and %d new embeddings", config.name,
             metrics["accuracy"], head.c, counts["from_catalog"], counts["embedded"])
    return TrainReport(config.name, 0, metrics["accuracy"], [], 0.0, str(compute), False, False, skipped,
                       bundle.fingerprint, "head", None, {**counts, "C": head.c})


def _serving_model(folder: IndexFolder) -> LoadedModel:
    if not folder.catalog.exists():
        raise SimimgError(f"--head-only fits on an index's stored embeddings, and '{folder.name}' has none yet: "
                          f"run `simimg index DATA_DIR --name {folder.name}` first")
    with reading(folder.catalog) as catalog:
        published = catalog.published()
    if published is None:
        raise SimimgError(f"index '{folder.name}' has no finished version yet: run `simimg index` on it first")
    return load_model(folder, published.model)


def _embeddings_of(folder: IndexFolder, base: LoadedModel, split: Split, config: TrainConfig,
                   compute: Compute) -> tuple[dict[int, np.ndarray], list[dict], dict[str, int]]:
    """Vectors of every split image (train then val positions): from the catalog when it holds the file as it is
    now, else embedded here. Unreadable files are skipped and reported."""
    records = split.train + split.val
    root = split.root.resolve()
    files = [Path(os.path.normpath(root / r.path)) for r in records]
    stored = _stored_vectors(folder, base.bundle.embedding, files)
    missing = [i for i in range(len(files)) if i not in stored]
    skipped: list[dict] = [{"path": s.path, "reason": s.reason} for s in split.skipped]
    if missing:
        log.info("%d of %d images are not in the index as they are now: embedding them", len(missing), len(files))
        settings = EmbedSettings(compute, config.batch_size, loader_workers(config.workers, compute.device))
        for batch in embed_files(base.net, [files[i] for i in missing], base.bundle.preprocess, settings):
            stored.update({missing[p]: v for p, v in zip(batch.positions, batch.vectors)})
            skipped += [{"path": records[missing[p]].path, "reason": why} for p, why in batch.failures]
    counts = {"from_catalog": len(files) - len(missing), "embedded": len(missing)}
    return stored, skipped, counts


def _stored_vectors(folder: IndexFolder, embedding: str, files: list[Path]) -> dict[int, np.ndarray]:
    """{position in `files`: vector} for the files the published version holds unchanged (same size and mtime)."""
    with reading(folder.catalog) as catalog:
        root = Path(catalog.get_meta("data_root", "/"))
        published = catalog.published()
        if published is None or published.embedding != embedding:
            return {}
        rows = {os.path.normpath(root / r.path): r for r in catalog.iter_rows(published.version)}
        found: dict[int, int] = {}
        for i, f in enumerate(files):
            row = rows.get(str(f))
            if row is not None and _unchanged(f, row.size, row.mtime_ns):
                found[i] = row.id
        vectors = catalog.vectors_for_ids(embedding, np.array(list(found.values()), np.int64)) if found else []
    return {i: v for i, v in zip(found, vectors)}


def _unchanged(path: Path, size: int, mtime_ns: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (size, mtime_ns)


def _keep_head(folder: IndexFolder, base: LoadedModel, head: FittedHead, split: Split, metrics: dict,
               config: TrainConfig, counts: dict[str, int]) -> ModelBundle:
    """The base trunk with the fitted head, kept as a model version of kind 'head' with its confusion plot."""
    model = with_classes(base, split.classes, unit_head=True)
    model.net.head.weight.data = torch.from_numpy(head.weight)
    model.net.head.bias.data = torch.from_numpy(head.bias)
    info = {"weights": f"model:{base.bundle.fingerprint}", "training": {
        "config": asdict(config), "head": {"C": head.c, **counts}, "split": split.describe(),
        "metrics": {"val_accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}}}
    bundle = describe(model.net, base.bundle.arch, split.classes, base.bundle.preprocess,
                      f"head on {base.bundle.fingerprint}", "head", embedding=base.bundle.embedding, **info)
    extras = {"confusion.png": confusion_png(metrics["confusion_matrix"], split.classes),
              "train_job.json": json.dumps(asdict(config), indent=2).encode()}
    publish_model(folder, model.net, bundle, extras)
    return bundle


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)
