"""`simimg evaluate`: how well a trained model classifies its validation images, and how well it retrieves them.

The model is the one NAME's published version serves, or any kept model named by its fingerprint. Retrieval is
measured on the model's own embeddings: each validation image queries the index of NAME when that index holds
this model's embedding of the same folder (the query itself left out), else the training images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from simimg.analysis.metrics import classification_metrics, most_confused, prediction_rows, retrieval_metrics
from simimg.dataset.preprocess import Preprocess
from simimg.dataset.scan import Record
from simimg.dataset.splits import Split, split_dataset
from simimg.errors import SimimgError
from simimg.jobs.labels_config import corrections_for
from simimg.models.device import Compute, loader_workers, resolve_compute
from simimg.models.encoder import FileItem, Trunk, infer, make_loader, prepare_net, read_ahead
from simimg.models.net import LoadedModel, Net
from simimg.progress import Progress
from simimg.store.catalog import reading
from simimg.store.layout import IndexFolder
from simimg.store.model_store import load_model, resolve_fingerprint, serving_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Predictions:
    """Model outputs for the files a loader read, in its order; `positions` index the loader's file list."""

    positions: np.ndarray
    embeddings: np.ndarray
    logits: torch.Tensor
    failures: list[tuple[int, str]]


def run_evaluation(
    name: str,
    home: str | None,
    data_dir: str | None = None,
    device: str = "auto",
    progress: Progress | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    model: str | None = None,
    precision: str = "auto",
) -> dict[str, Any]:
    """The `simimg evaluate --json` object for the serving (or the named kept) model of index NAME."""
    paths = IndexFolder.of(home, name)
    fingerprint = resolve_fingerprint(paths, model) if model else serving_model(paths)
    loaded = load_model(paths, fingerprint)
    if not loaded.bundle.has_classifier:
        raise SimimgError(
            f"model {fingerprint} of '{name}' has no trained classifier: run "
            f"`simimg train DATA_DIR --name {name}` (add --head-only for one in seconds)"
        )
    split = evaluation_split(loaded, data_dir, home, name)
    compute = resolve_compute(device, precision)
    trunk = prepare_net(loaded.net, compute, loaded.bundle.preprocess)
    workers = loader_workers(workers, compute.device)

    def predict(records: Sequence[Record], report: Progress | None) -> Predictions:
        loader = make_loader(split.files(records), loaded.bundle.preprocess, batch_size, workers, compute.device)
        return predict_loader(loaded.net, loader, loaded.bundle.preprocess, compute, report, trunk)

    val = predict(split.val, progress)
    labels = split.labels(split.val)[val.positions]
    probs = torch.softmax(val.logits, dim=1).numpy()
    val_paths = [split.val[p].path for p in val.positions]
    result = {
        "name": name,
        "model": fingerprint,
        "data_dir": str(split.root),
        "images": len(val.positions),
        **classification_metrics(labels, probs, split.classes),
        "retrieval": _retrieval(paths, loaded, split, val, labels, lambda: predict(split.train, None)),
        "most_confused": most_confused(val_paths, labels, probs, split.classes),
        "predictions": prediction_rows(val_paths, labels, probs, split.classes),
        "skipped": [{"path": split.val[i].path, "reason": why} for i, why in val.failures],
    }
    return result


def evaluation_split(
    model: LoadedModel, data_dir: str | None, home: str | None = None, name: str | None = None
) -> Split:
    """DATA_DIR/val when it exists, else the validation images the bundle recorded when it was trained; labelled
    as index NAME's edits have them, when it is an index of that folder."""
    recorded = model.bundle.info.get("training", {}).get("split", {})
    root = data_dir or recorded.get("data_dir")
    if not root:
        raise SimimgError("this model records no training folder: give DATA_DIR (with train/ and val/ folders)")
    split = split_dataset(root, corrections=corrections_for(home, name, root) if name else None)
    if split.kind == "seeded":
        val_paths = set(recorded.get("val_paths", ()))
        everything = split.train + split.val
        val = tuple(r for r in everything if r.path in val_paths)
        if not val:
            raise SimimgError(
                f"none of the validation images this model recorded are in {split.root}; "
                "evaluate on the folder it was trained on, or on one with train/ and val/ folders"
            )
        split = Split(
            split.root,
            split.classes,
            tuple(r for r in everything if r.path not in val_paths),
            val,
            "recorded",
            split.skipped,
        )
    unknown = sorted(set(split.classes) - set(model.bundle.classes))
    if unknown:
        raise SimimgError(
            f"{split.root} has classes the model was not trained on ({', '.join(unknown)}); "
            f"it knows {', '.join(model.bundle.classes)}"
        )
    return Split(split.root, model.bundle.classes, split.train, split.val, split.kind, split.skipped)


def predict_loader(
    net: Net,
    loader: DataLoader[FileItem],
    preprocess: Preprocess,
    compute: Compute,
    progress: Progress | None = None,
    trunk: Trunk | None = None,
) -> Predictions:
    """Embeddings and logits (CPU float32) for every readable file of `loader`; failures are listed, not raised.

    `trunk` is `prepare_net`'s embedding function; training's validation passes none (its weights keep changing).
    """
    net.eval()
    positions: list[int] = []
    embeddings: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    failures: list[tuple[int, str]] = []
    assert isinstance(loader.dataset, Sized), "make_loader's FileDataset has a length"
    total, done = len(loader.dataset), 0
    for batch_positions, batch, _, batch_failures in read_ahead(loader, loader.num_workers):
        if batch_positions:
            emb, out = infer(net, batch, preprocess, compute, with_logits=net.head is not None, trunk=trunk)
            positions += batch_positions
            embeddings.append(emb.cpu())
            logits.append(out.cpu() if out is not None else torch.empty(len(batch_positions), 0))
        failures += batch_failures
        done += len(batch_positions) + len(batch_failures)
        if progress:
            progress(done, total)
    if not positions:
        raise SimimgError("none of the images could be read; see the skipped files")
    return Predictions(np.array(positions), torch.cat(embeddings).numpy(), torch.cat(logits), failures)


def _retrieval(
    paths: IndexFolder,
    model: LoadedModel,
    split: Split,
    val: Predictions,
    labels: np.ndarray,
    train_embeddings: Callable[[], Predictions],
) -> dict[str, Any]:
    """Against the index when it holds this model's vectors of this folder, else against the training images."""
    gallery = _index_gallery(paths, model, split)
    queries = [split.val[p].path for p in val.positions]
    if gallery is not None:
        vectors, gallery_paths, gallery_labels = gallery
        where = {p: i for i, p in enumerate(gallery_paths)}
        exclude = np.array([where.get(p, -1) for p in queries])
        source = "index"
    else:
        train = train_embeddings()
        vectors, gallery_labels = train.embeddings, split.labels(split.train)[train.positions]
        exclude, source = None, "train split"
    metrics = retrieval_metrics(val.embeddings, labels, vectors, gallery_labels, exclude)
    return {**metrics, "gallery": source, "gallery_size": len(vectors)}


def _index_gallery(
    paths: IndexFolder, model: LoadedModel, split: Split
) -> tuple[np.ndarray, list[str], np.ndarray] | None:
    """(vectors, paths, label ids) of the published index, if it was built by this model from `split.root`."""
    if not paths.catalog.exists():
        return None
    with reading(paths.catalog) as catalog:
        same_root = Path(catalog.get_meta("data_root", "")).resolve() == split.root.resolve()
        read = catalog.snapshot_with_vectors() if same_root else None
    if read is None or read[0].embedding != model.bundle.embedding:
        log.info(
            "index '%s' does not hold this model's embedding of %s: retrieval uses the training images",
            paths.name,
            split.root,
        )
        return None
    snapshot, vectors = read
    index: dict[str | None, int] = {c: i for i, c in enumerate(split.classes)}
    keep = np.array([label in index for label in snapshot.labels], dtype=bool)
    labels = np.array([index.get(label, -1) for label in snapshot.labels], dtype=np.int64)
    return vectors[keep], [p for p, k in zip(snapshot.paths, keep) if k], labels[keep]
