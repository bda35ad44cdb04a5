"""Compressed (IVF-PQ) indexes for large collections, with an exact re-rank from the stored vectors.

At 4 KB per densenet121 vector a flat or IVF-Flat index needs the whole collection in RAM. IVF-PQ keeps
`pq_bytes_for(dim)` bytes per vector (256 at 1024 dims, 1/16 of float32) plus its 8-byte id; its approximate
scores pick `candidates_for(k)` candidates whose float32 vectors, memory-mapped from the vector shards, give the
exact order. On embedding-like vectors PQ's own order is poor, so the re-rank does the work: at 2M x 1024 and
24 lists probed, 2,500 candidates give recall@10 0.979 where 1,500 give 0.966, and 128-byte codes only 0.86.
Building never holds the collection in RAM either: the quantizers train on a random sample drawn across all
shards, then the vectors are encoded part by part (each part an independent job a cluster could run) and the
parts merged with faiss' `merge_from`, or, for an index larger than RAM, list by list into one list file per
version that readers map (`merge_on_disk`). Figures: benchmarks/README.md ("Compressed indexes"),
docs/SCALING.md.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import cast

import faiss
import numpy as np

from simimg.fsutil import atomic_target

log = logging.getLogger(__name__)

PQ_DIMS_PER_BYTE = 4  # one 8-bit sub-quantizer per 4 dimensions; 8 (128 bytes) cost 0.09 of recall@10 at 2M
TRAIN_SAMPLES_PER_LIST = 40  # coarse k-means: faiss warns below 39 a list; 57k vectors at 2M
MIN_TRAIN_SAMPLES = 256 * 39  # each PQ sub-quantizer has 256 centroids
MIN_VECTORS = 256  # fewer cannot train them at all
PART_ROWS = 65_536  # vectors encoded per part: 256 MiB of float32 at 1024 dims (two in flight at most)
REFINE_CANDIDATES = 2_500  # re-ranked per query at least (10 MB of float32 at 1024 dims, ~2 us each)
REFINE_FACTOR = 20  # and per wanted neighbour, for large k
NPROBE = 24  # at 2M: recall@10 0.966 with 1,500 candidates, 0.979 with 2,500 (benchmarks/README.md)
ID_BYTES = 8  # each vector's id, beside its code in the lists
DISK_SHARE = 1 / 8  # "auto" keeps the lists on disk once they would take more than this share of physical memory

VectorFetch = Callable[[np.ndarray], np.ndarray]  # image ids -> their float32 vectors, in that order
Part = tuple[np.ndarray, np.ndarray]  # (ids, their vectors)
# the trained index and the parts in, each part encoded, in order: here (encode_here) or on Ray tasks (ray_engine)
PartEncoder = Callable[[faiss.Index, Iterator[Part]], Iterable[faiss.Index]]


def pq_bytes_for(dim: int) -> int:
    """About dim/4 sub-quantizers, rounded to one that divides `dim` (faiss needs equal sub-vectors)."""
    target = max(1, dim // PQ_DIMS_PER_BYTE)
    return min((m for m in range(1, dim + 1) if dim % m == 0), key=lambda m: (abs(m - target), m))


def lists_for(n: int) -> int:
    """sqrt(N) inverted lists: fewer than IVF-Flat's 4 sqrt(N), as PQ codes make each scanned vector cheap while
    coarse training cost grows with the number of lists (2M vectors: 1,414 lists)."""
    return max(1, min(int(math.sqrt(n)), n // TRAIN_SAMPLES_PER_LIST))


def empty_index(dim: int, n: int) -> faiss.IndexIVFPQ:
    """An untrained IVF-PQ index sized for `n` vectors, inner product over unit vectors."""
    nlist, m = lists_for(n), pq_bytes_for(dim)
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = min(nlist, NPROBE)
    return index


def sample_ids(ids: np.ndarray, nlist: int, seed: int = 0) -> np.ndarray:
    """Training ids drawn at random across the whole collection (not its first rows: those are one folder)."""
    want = min(len(ids), max(MIN_TRAIN_SAMPLES, nlist * TRAIN_SAMPLES_PER_LIST))
    return np.sort(np.random.default_rng(seed).choice(ids, size=want, replace=False))


def train(dim: int, ids: np.ndarray, fetch: VectorFetch) -> faiss.Index:
    """Train the coarse and product quantizers on a sample of `ids`; the result holds no vectors."""
    index = empty_index(dim, len(ids))
    sample = fetch(sample_ids(ids, index.nlist))
    log.info("training IVF%d,PQ%d on %d of %d vectors", index.nlist, index.pq.M, len(sample), len(ids))
    index.train(np.ascontiguousarray(sample, np.float32))
    return index


def encode_part(trained: faiss.Index, ids: np.ndarray, vectors: np.ndarray) -> faiss.Index:
    """One part: a copy of the trained, empty index holding `vectors` under `ids`. Pure, so any worker can run it."""
    part = faiss.clone_index(trained)
    part.reset()
    part.add_with_ids(np.ascontiguousarray(vectors, np.float32), ids.astype(np.int64))
    return part


def encode_here(trained: faiss.Index, parts: Iterator[Part]) -> Iterator[faiss.Index]:
    """Each part in this process, one after the other (faiss spreads each over the cores)."""
    return (encode_part(trained, ids, vectors) for ids, vectors in parts)


def merge(trained: faiss.Index, parts: Iterable[faiss.Index]) -> faiss.Index:
    """All parts in one index (faiss `merge_from` moves each part's lists; ids are kept)."""
    merged = faiss.clone_index(trained)
    merged.reset()
    for part in parts:
        merged.merge_from(part, 0)
    return merged


def part_ranges(n: int, rows: int = PART_ROWS) -> Iterator[slice]:
    return (slice(start, min(n, start + rows)) for start in range(0, n, rows))


def merge_on_disk(
    trained: faiss.Index,
    parts: Iterable[faiss.Index],
    lists: Path,
    previous: faiss.Index | None = None,
    drop: np.ndarray | None = None,
) -> faiss.Index:
    """For an index larger than RAM: `previous`'s lists (less the ids in `drop`) and every part's, merged list by
    list into one new file, `lists`, that the returned index reads through a read-only memory map.

    Each part is written to a staging folder beside `lists` and read back memory-mapped, so no more than one part
    is in RAM. `lists` appears whole or not at all, and no published list file is ever written to: a version's
    file may be hard-linked into the next (faiss' own merge_ondisk printf's to stdout, which `--json` forbids).
    """
    staging = lists.with_name(f".{lists.name}.parts")
    staging.mkdir(parents=True, exist_ok=True)
    try:
        files = []
        for n, part in enumerate(parts):
            files.append(staging / f"part-{n:05d}.faiss")
            faiss.write_index(part, str(files[-1]))
        mapped = [faiss.read_index(str(f), faiss.IO_FLAG_MMAP) for f in files]  # kept alive while their lists are read
        sources = [_lists(i) for i in ([previous] if previous is not None else []) + mapped]
        with atomic_target(lists) as tmp:
            sizes = _write_lists(sources, tmp, np.sort(drop) if drop is not None else np.empty(0, np.int64))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    merged = trained_copy(trained)
    attach_lists(merged, lists, sizes)
    return merged


def _write_lists(sources: list[faiss.InvertedLists], path: Path, drop: np.ndarray) -> np.ndarray:
    """The sources' lists one after the other, each as faiss' OnDiskInvertedLists lays it out (codes, then ids);
    the number of entries of each list."""
    nlist, code_size = sources[0].nlist, sources[0].code_size
    sizes = np.zeros(nlist, np.uint64)
    with open(path, "wb") as f:
        for lst in range(nlist):
            ids, codes = _list_contents(sources, lst, code_size)
            keep = ~np.isin(ids, drop, assume_unique=True) if len(drop) else slice(None)
            f.write(codes[keep].tobytes())
            f.write(ids[keep].tobytes())
            sizes[lst] = len(ids[keep])
        if not f.tell():
            f.write(bytes(ID_BYTES))  # an empty file cannot be memory-mapped
    return sizes


def _list_contents(sources: list[faiss.InvertedLists], lst: int, code_size: int) -> tuple[np.ndarray, np.ndarray]:
    ids, codes = [np.empty(0, np.int64)], [np.empty((0, code_size), np.uint8)]
    for src in sources:
        size = src.list_size(lst)
        if size:
            ids.append(faiss.rev_swig_ptr(src.get_ids(lst), size))
            codes.append(faiss.rev_swig_ptr(src.get_codes(lst), size * code_size).reshape(size, code_size))
    return np.concatenate(ids).astype(np.int64), np.concatenate(codes)


def attach_lists(index: faiss.Index, lists: Path, sizes: np.ndarray) -> None:
    """Give `index` (trained, empty) the lists file `lists`, holding `sizes[i]` entries in list i, read-only."""
    ivf = faiss.extract_index_ivf(index)
    on_disk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(lists))
    on_disk.set_all_lists_sizes(faiss.swig_ptr(np.ascontiguousarray(sizes, np.uint64)))
    _map(on_disk, lists)
    ivf.replace_invlists(on_disk, True)
    _hand_over(on_disk)
    index.ntotal = ivf.ntotal = int(sizes.sum())


def read_with_lists(path: Path, lists: Path) -> faiss.Index | None:
    """The index saved at `path` with its lists mapped from `lists`, wherever the folder now is; None when the
    file holds its lists itself. Never through faiss' IO_FLAG_ONDISK_SAME_DIR, which printf's on every load."""
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        return None  # lists in RAM ("could not load ArrayInvertedLists"): a list file beside it is a stray
    if not lists_on_disk(index):
        return None
    _map(cast(faiss.OnDiskInvertedLists, faiss.downcast_InvertedLists(_lists(index))), lists)
    return index


def _map(on_disk: faiss.OnDiskInvertedLists, lists: Path) -> None:
    on_disk.filename = str(lists)
    on_disk.read_only = True
    size = lists.stat().st_size
    if on_disk.totsize and size < on_disk.totsize:  # a short file would fault (SIGBUS) when a query reads past it
        raise RuntimeError(f"{lists} holds {size} bytes of {on_disk.totsize}")
    on_disk.totsize = size
    on_disk.do_mmap()


def lists_on_disk(index: faiss.Index) -> bool:
    try:
        lists = _lists(index)
    except RuntimeError:
        return False  # not an IVF index
    return isinstance(faiss.downcast_InvertedLists(lists), faiss.OnDiskInvertedLists)


def _lists(index: faiss.Index) -> faiss.InvertedLists:
    lists = faiss.extract_index_ivf(index).invlists
    assert lists is not None, "an IVF index has inverted lists"
    return lists


def _hand_over(lists: faiss.InvertedLists) -> None:
    """The index it was given to deletes it, not Python (SWIG's `this`, untyped in faiss' stubs)."""
    lists.this.disown()  # type: ignore[attr-defined]


def trained_copy(index: faiss.Index) -> faiss.Index:
    """An empty copy of an IVF index, quantizers trained, lists in RAM. faiss cannot clone on-disk lists, so the
    index's own lists are set aside while it is cloned: only for a writer's own index, never a shared one."""
    ivf = faiss.extract_index_ivf(index)
    lists, own, ntotal = _lists(index), ivf.own_invlists, index.ntotal
    ivf.own_invlists = False
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(empty, True)
    _hand_over(empty)
    index.ntotal = ivf.ntotal = 0
    try:
        return faiss.clone_index(index)
    finally:
        ivf.replace_invlists(lists, own)
        index.ntotal = ivf.ntotal = ntotal


def wants_disk(n: int, dim: int, asked: bool | None, memory: int) -> bool:
    """Lists on disk when asked, or ("auto", None) once they would take more than DISK_SHARE of `memory` bytes."""
    return asked if asked is not None else n * (pq_bytes_for(dim) + ID_BYTES) > memory * DISK_SHARE


def stream_parts(ids: np.ndarray, fetch: VectorFetch) -> Iterator[Part]:
    """`ids` and their vectors, PART_ROWS at a time: the collection is never in RAM at once."""
    return ((ids[s], fetch(ids[s])) for s in part_ranges(len(ids)))


def update_on_disk(
    previous: faiss.Index,
    ids: np.ndarray,
    fetch: VectorFetch,
    remove: np.ndarray,
    lists: Path,
    encode: PartEncoder = encode_here,
) -> faiss.Index:
    """`previous` less `remove`, plus `ids` encoded with its quantizers, its lists merged into a new file `lists`:
    `previous`'s own lists (perhaps another version's file, perhaps hard-linked) are only read."""
    trained = trained_copy(previous)
    return merge_on_disk(trained, encode(trained, stream_parts(ids, fetch)), lists, previous, remove)


def build(
    dim: int, ids: np.ndarray, fetch: VectorFetch, on_disk: Path | None = None, encode: PartEncoder = encode_here
) -> faiss.Index:
    """Train on a sample, encode part by part with `encode`, merge (in RAM, or into the list file `on_disk`): peak
    memory is the training sample, the parts in flight (two here) and, in RAM, the codes."""
    trained = train(dim, ids, fetch)
    parts = encode(trained, stream_parts(ids, fetch))
    index = merge(trained, parts) if on_disk is None else merge_on_disk(trained, parts, on_disk)
    log.info("built IVF-PQ index of %d vectors, %d bytes each", index.ntotal, faiss.extract_index_ivf(index).code_size)
    return index


def candidates_for(k: int) -> int:
    return max(REFINE_CANDIDATES, k * REFINE_FACTOR)


def rerank(queries: np.ndarray, candidates: np.ndarray, fetch: VectorFetch, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best of each row of `candidates` (ids, -1 for none) by exact inner product with its query."""
    valid = candidates >= 0
    exact = np.full(candidates.shape, -np.inf, np.float32)
    unique, where = np.unique(candidates[valid], return_inverse=True)  # each stored vector read once
    if len(unique):
        # unique x queries, without BLAS: right after a faiss search its OpenMP threads still spin, and OpenBLAS'
        # own threads wait on them (8.8 ms against 0.4 for einsum's single thread, 1,500 rows on 2 busy cores)
        scores = np.einsum("ij,kj->ik", fetch(unique), queries)
        rows = np.repeat(np.arange(len(queries)), valid.sum(axis=1))
        exact[valid] = scores[where, rows]
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(exact, order, axis=1)
    ids = np.take_along_axis(candidates, order, axis=1)
    ids[np.isinf(scores)] = -1
    return scores, ids
