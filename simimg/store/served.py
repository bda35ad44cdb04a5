"""What a reader of one published version searches with: its FAISS searcher, and catalog rows from FAISS ids.

The warm query service and `simimg predict` read a version the same way, through these.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from simimg.errors import SimimgError
from simimg.store.ann import VectorSearcher, is_compressed, load_index, make_searcher
from simimg.store.catalog import Catalog, Snapshot
from simimg.store.checksums import file_checksum
from simimg.store.layout import IndexFolder

log = logging.getLogger(__name__)


def open_searcher(folder: IndexFolder, catalog: Catalog, snapshot: Snapshot, device: torch.device) -> VectorSearcher:
    """`snapshot`'s FAISS file as a searcher on `device` (ann.make_searcher); a compressed index re-ranks from the
    stored vectors, read through `catalog` while it searches. A SimimgError when the file is gone or disagrees
    with the snapshot (a writer may have published and pruned since the snapshot was read)."""
    index = load_index(folder.faiss(snapshot.version))
    if index.ntotal != len(snapshot.ids):
        raise SimimgError(
            f"index '{folder.name}' is inconsistent (FAISS {index.ntotal} vectors, "
            f"catalog {len(snapshot.ids)}); re-run `simimg index` to repair it"
        )
    stored = catalog.stored_vectors(snapshot.version, snapshot.embedding) if is_compressed(index) else None
    return make_searcher(index, device, stored)


def faiss_whole(folder: IndexFolder, catalog: Catalog, version: int) -> bool:
    """Whether a version's FAISS file matches the checksum recorded when it was published (or none was recorded)."""
    recorded = catalog.version_checksums(version)
    return recorded is None or recorded[0] is None or file_checksum(folder.faiss(version)) == recorded[0]


def whole_snapshot(folder: IndexFolder, catalog: Catalog, snapshot: Snapshot) -> Snapshot:
    """`snapshot` when its FAISS file is whole (`faiss_whole`), else the previous kept version when its file is: a
    damaged file is never served. SimimgError when neither is whole."""
    if faiss_whole(folder, catalog, snapshot.version):
        return snapshot
    previous = catalog.snapshot(snapshot.version - 1)
    if previous is not None and faiss_whole(folder, catalog, previous.version):
        log.warning(
            "the FAISS file of version %d of '%s' does not match its checksum: serving version %d; "
            "`simimg verify --name %s --repair` mends it",
            snapshot.version,
            folder.name,
            previous.version,
            folder.name,
        )
        return previous
    raise SimimgError(
        f"the FAISS file of version {snapshot.version} of index '{folder.name}' is damaged and no earlier version is "
        f"whole: re-run `simimg index` (or `simimg verify --name {folder.name} --repair`) to rebuild it"
    )


def positions_of(snapshot: Snapshot, ids: np.ndarray) -> np.ndarray:
    """Each FAISS id's position in `snapshot` (its path, label, hash), or -1 for padding and unknown ids."""
    if not len(snapshot.ids):
        return np.full(np.shape(ids), -1, np.int64)
    found = np.minimum(np.searchsorted(snapshot.ids, ids), len(snapshot.ids) - 1)
    return np.where((snapshot.ids[found] == ids) & (ids >= 0), found, -1)
