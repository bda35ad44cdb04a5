"""FAISS indexes over normalised vectors (inner product = cosine): build, update, save, load, search.

Exact Flat search for small collections, IVF above FLAT_LIMIT vectors, compressed IVF-PQ with an exact re-rank
(ann_ivfpq.py) above COMPRESS_LIMIT. GPU search when faiss has GPUs, otherwise torch's matmul + top-k on
CUDA, otherwise faiss on the CPU. The choice is made in `make_searcher`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Protocol, cast

import faiss
import numpy as np
import torch

from simimg.choices import INDEX_KINDS
from simimg.errors import SimimgError
from simimg.fsutil import atomic_target
from simimg.store import ann_ivfpq
from simimg.store.ann_ivfpq import PartEncoder, VectorFetch, encode_here
from simimg.store.layout import lists_file

log = logging.getLogger(__name__)

# Exact search up to here: one flat query costs ~1-2 ms per 1,000 vectors on one core (30 ms at 20k), while IVF at
# 20k answers in 0.3 ms with recall@10 0.985 (benchmarks/README.md).
FLAT_LIMIT = 20_000
# IVF-Flat holds 4 KB per 1024-d vector in RAM (4 GB here); past it IVF-PQ holds 264 bytes and re-ranks from disk.
COMPRESS_LIMIT = 1_000_000
IVF_TRAIN_SAMPLES_PER_LIST = 40
IVF_MIN_NPROBE = 32
# below these the lists (or PQ's 256 centroids per sub-quantizer) cannot be trained: exact search instead
MIN_VECTORS = {"flat": 0, "ivf": 16 * IVF_TRAIN_SAMPLES_PER_LIST, "ivfpq": ann_ivfpq.MIN_VECTORS}
IVF_NPROBE_FRACTION = 1 / 128
# an IVF index is trained afresh once its size asks for this many times the lists it has (about twice the vectors
# it was trained for, as lists grow with sqrt(N)): rebuilding at each doubling costs O(N) over the index's life
RETRAIN_GROWTH = 1.4


class VectorSearcher(Protocol):
    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each n x k, best first; id -1 pads when fewer than k match."""
        ...


def check_kind(asked: str) -> str:
    if asked not in ("auto", *INDEX_KINDS):
        raise SimimgError(f"unknown index kind {asked!r}: use auto or one of {', '.join(INDEX_KINDS)}")
    return asked


def index_kind_for(n: int, asked: str = "auto") -> str:
    """The kind asked for, or for "auto" the one that suits `n` vectors."""
    if check_kind(asked) != "auto":
        if n < MIN_VECTORS[asked]:
            log.warning(
                "%d vectors are too few for an %s index (%d at least): exact search instead",
                n,
                asked,
                MIN_VECTORS[asked],
            )
            return "flat"
        return asked
    return "flat" if n < FLAT_LIMIT else "ivf" if n < COMPRESS_LIMIT else "ivfpq"


def build_from_stored(
    ids: np.ndarray,
    fetch: VectorFetch,
    dim: int,
    kind: str,
    encode: PartEncoder = encode_here,
    lists: Path | None = None,
) -> faiss.Index:
    """A fresh index over the stored vectors of `ids`; IVF-PQ never loads them all at once, `encode`s its parts
    where the indexing engine runs them, and keeps its lists in the file `lists` when one is given."""
    if kind == "ivfpq":
        return ann_ivfpq.build(dim, ids, fetch, on_disk=lists, encode=encode)
    return build_ann(ids, fetch(ids) if len(ids) else np.empty((0, dim), np.float32), dim, kind)


def build_ann(ids: np.ndarray, vectors: np.ndarray, dim: int, kind: str | None = None) -> faiss.Index:
    """A fresh index over `vectors` (float32, N x dim, unit length) carrying the catalog's `ids`."""
    kind = kind or index_kind_for(len(ids))
    if kind == "ivfpq":
        order = np.argsort(ids)
        return ann_ivfpq.build(dim, ids, lambda wanted: vectors[order[np.searchsorted(ids[order], wanted)]])
    index: faiss.Index
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif kind == "ivf":
        nlist = ivf_lists_for(len(ids))
        index = ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.nprobe = nprobe_for(nlist)
        sample = vectors[np.random.default_rng(0).permutation(len(vectors))[: nlist * IVF_TRAIN_SAMPLES_PER_LIST]]
        ivf.train(np.ascontiguousarray(sample))
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, np.float32), ids.astype(np.int64))
    log.info("built %s index of %d vectors", kind, index.ntotal)
    return index


def ivf_lists_for(n: int) -> int:
    """About 4 sqrt(N) inverted lists (the usual balance of coarse and fine cost), each with >= 39 training points."""
    return max(16, min(int(4 * math.sqrt(n)), n // 39))


def nprobe_for(nlist: int) -> int:
    """32 lists, or 1/128 of them on very large indexes: recall@10 >= 0.98 from 20k to 1M vectors (benchmarks/)."""
    return min(nlist, max(IVF_MIN_NPROBE, math.ceil(nlist * IVF_NPROBE_FRACTION)))


def outgrown(index: faiss.Index, n: int) -> bool:
    """Whether an IVF (or compressed) index was trained for far fewer than the `n` vectors it is to hold: its lists
    keep the count it was trained with, so they grow long and every query scans more of them."""
    if not _is_ivf(index):
        return False
    want = ann_ivfpq.lists_for(n) if is_compressed(index) else ivf_lists_for(n)
    return want > RETRAIN_GROWTH * faiss.extract_index_ivf(index).nlist


def update_index(
    index: faiss.Index, add_ids: np.ndarray, add_vectors: np.ndarray, remove_ids: np.ndarray
) -> faiss.Index:
    """Apply one version's changes in memory; the file on disk is replaced only by `save_index`."""
    if len(remove_ids):
        index.remove_ids(faiss.IDSelectorBatch(remove_ids.astype(np.int64)))
    if len(add_ids):
        index.add_with_ids(np.ascontiguousarray(add_vectors, np.float32), add_ids.astype(np.int64))
    return index


def save_index(index: faiss.Index, path: str | Path) -> None:
    """Write beside the target, then rename: readers never see a partial file. An index whose lists are on disk
    must have them in `lists_file(path)` already (ann_ivfpq.merge_on_disk); one that holds them drops a stray list
    file of that name (left by a run that stopped before publishing)."""
    if not ann_ivfpq.lists_on_disk(index):
        lists_file(Path(path)).unlink(missing_ok=True)
    with atomic_target(path) as tmp:
        faiss.write_index(index, str(tmp))


def load_index(path: str | Path) -> faiss.Index:
    """The index saved at `path`, its lists memory-mapped from the list file beside it when it has one."""
    lists = lists_file(Path(path))
    try:
        on_disk = ann_ivfpq.read_with_lists(Path(path), lists) if lists.exists() else None
        return on_disk if on_disk is not None else faiss.read_index(str(path))
    except (RuntimeError, OSError) as err:
        raise SimimgError(
            f"FAISS index {path} is unreadable ({str(err).splitlines()[0]}); re-run `simimg index` to rebuild it"
        ) from None


def make_searcher(index: faiss.Index, device: torch.device, stored: VectorFetch | None = None) -> VectorSearcher:
    """One place decides where search runs: faiss GPU, else torch on CUDA for Flat, else faiss CPU. A compressed
    index is searched by faiss on the CPU (faiss' GPU IVF-PQ takes at most 96 bytes a code, simimg's have 256;
    the re-rank reads the shards on the CPU anyway) and wrapped in its exact re-rank over `stored`."""
    if is_compressed(index):
        if stored is None:
            raise ValueError("a compressed index needs its stored vectors to re-rank with")
        return RefinedSearcher(FaissSearcher(index), stored)
    if device.type == "cuda" and faiss.get_num_gpus() > 0:
        log.info("searching on the GPU with faiss")
        return FaissSearcher(faiss.index_cpu_to_all_gpus(index))
    if device.type == "cuda":
        log.info("faiss has no GPU support here: exact search with torch on %s", device)
        return TorchFlatSearcher.from_index(index, device)
    return FaissSearcher(index)


def is_compressed(index: faiss.Index) -> bool:
    return _is_ivf(index) and isinstance(faiss.downcast_index(faiss.extract_index_ivf(index)), faiss.IndexIVFPQ)


class RefinedSearcher:
    """Approximate candidates from a compressed index, ordered exactly by their stored float32 vectors."""

    def __init__(self, inner: FaissSearcher, stored: VectorFetch) -> None:
        self.inner, self.stored = inner, stored

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, np.float32)
        _, candidates = self.inner.search(queries, ann_ivfpq.candidates_for(k), allowed)
        return ann_ivfpq.rerank(queries, candidates, self.stored, k)


class FaissSearcher:
    def __init__(self, index: faiss.Index) -> None:
        self.index = index

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, np.float32)
        k = max(1, min(k, self.index.ntotal)) if self.index.ntotal else 1
        params: faiss.SearchParameters | None = None
        if allowed is not None:
            selector = faiss.IDSelectorBatch(allowed.astype(np.int64))
            # faiss wraps each SearchParameters class to take its fields as keywords (and keep the selector alive);
            # its stubs declare the bare SWIG constructors, which take none
            if _is_ivf(self.index):
                nprobe = faiss.extract_index_ivf(self.index).nprobe
                params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)  # type: ignore[call-arg]
            else:
                params = faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]
        scores, ids = self.index.search(queries, k, params=params)
        return scores, ids


class TorchFlatSearcher:
    """Exact inner-product search as one fp16 matmul and top-k on the GPU; agrees with IndexFlatIP."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, device: torch.device) -> None:
        self.ids = torch.from_numpy(ids.astype(np.int64)).to(device)
        self.vectors = torch.from_numpy(np.ascontiguousarray(vectors, np.float32)).to(device, torch.float16)
        self.device = device

    @classmethod
    def from_index(cls, index: faiss.Index, device: torch.device) -> TorchFlatSearcher:
        """From a Flat or an IVF index: on a GPU, exact search over all vectors beats IVF on the CPU."""
        # a Flat index is an IDMap2 over IndexFlatIP (build_index); faiss returns indexes downcast to their class
        ids, vectors = ivf_contents(index) if _is_ivf(index) else flat_contents(cast(faiss.IndexIDMap2, index))
        return cls(ids, vectors, device)

    @torch.inference_mode()
    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(np.ascontiguousarray(queries, np.float32)).to(self.device, torch.float16)
        scores = (q @ self.vectors.T).float()
        if allowed is not None:
            mask = torch.isin(self.ids, torch.from_numpy(allowed.astype(np.int64)).to(self.device))
            scores[:, ~mask] = -torch.inf
        k = max(1, min(k, len(self.ids)))
        top, pos = scores.topk(k, dim=1)
        ids = self.ids[pos]
        ids[torch.isinf(top)] = -1
        return top.cpu().numpy(), ids.cpu().numpy()


def flat_contents(index: faiss.IndexIDMap2) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) stored in an IDMap2-over-Flat index, without copying through reconstruct()."""
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    inner = cast(faiss.IndexFlat, faiss.downcast_index(index.index))
    vectors = faiss.rev_swig_ptr(inner.get_xb(), inner.ntotal * inner.d).reshape(inner.ntotal, inner.d).copy()
    return ids, vectors


def ivf_contents(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) stored in an IVF-Flat index, list by list."""
    ivf = faiss.extract_index_ivf(index)
    invlists, ids, vectors = ivf.invlists, [], []
    assert invlists is not None, "an IVF index has inverted lists"
    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        if size:
            ids.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy())
            codes = faiss.rev_swig_ptr(invlists.get_codes(lst), size * invlists.code_size).copy()
            vectors.append(codes.view(np.float32).reshape(size, ivf.d))
    if not ids:
        return np.empty(0, np.int64), np.empty((0, ivf.d), np.float32)
    return np.concatenate(ids).astype(np.int64), np.concatenate(vectors)


def _is_ivf(index: faiss.Index) -> bool:
    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False
