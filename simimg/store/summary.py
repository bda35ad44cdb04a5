"""What a published version holds, in one dict: `simimg info`, `simimg.index_info` and `SearchService.info`.

Built from the catalog's snapshot and the model's model.json alone, so a listing loads no network and no FAISS.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from simimg.errors import SimimgError
from simimg.models.bundle import ModelBundle
from simimg.store.catalog import Snapshot, reading
from simimg.store.layout import IndexFolder
from simimg.store.model_store import read_model
from simimg.store.precision import precision_info


def summarize(name: str, snapshot: Snapshot, bundle: ModelBundle, data_root: Path) -> dict[str, Any]:
    """Counts per label, the model that answers and the version: what a person reads about an index."""
    counts = Counter(label or "" for label in snapshot.labels)
    return {
        "name": name,
        "total": len(snapshot.ids),
        "labels": dict(sorted(counts.items())),
        "arch": bundle.arch,
        "dim": bundle.dim,
        "model": bundle.fingerprint,
        "embedding": bundle.embedding,
        "kind": bundle.kind,
        "source": bundle.source,
        "image_size": bundle.preprocess.crop_size,
        "classifier": bundle.has_classifier,
        "classes": list(bundle.classes),
        "val_accuracy": bundle.val_accuracy,
        "untrained": bundle.random_features,
        "version": snapshot.version,
        "index_kind": snapshot.index_kind,
        "data_root": str(data_root),
    }


def read_summary(folder: IndexFolder) -> dict[str, Any]:
    """`summarize` of the index's published version, read from disk; a user error when there is none yet."""
    if not folder.catalog.exists():
        raise SimimgError(
            f"no index named '{folder.name}' in {folder.root.parent}: build it with "
            f"`simimg index DATA_DIR --name {folder.name}`"
        )
    with reading(folder.catalog) as catalog:
        snapshot = catalog.snapshot()
        data_root = Path(catalog.get_meta("data_root", "."))
        recorded = precision_info(catalog, snapshot.model) if snapshot is not None else {}
    if snapshot is None:
        raise SimimgError(f"index '{folder.name}' has no finished version yet: run `simimg index` on it")
    return {**summarize(folder.name, snapshot, read_model(folder, snapshot.model), data_root), **recorded}
