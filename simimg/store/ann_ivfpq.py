"""Compressed (IVF-PQ) indexes for large collections, with an exact re-rank from the stored vectors.

At 4 KB per densenet121 vector a flat or IVF-Flat index needs the whole collection in RAM. IVF-PQ keeps
`pq_bytes_for(dim)` bytes per vector (256 at 1024 dims, 1/16 of float32) plus its 8-byte id; its approximate
scores pick `candidates_for(k)` candidates whose float32 vectors, memory-mapped from the vector shards, give the
exact order. On embedding-like vectors PQ's own order is poor, so the re-rank does the work: at 2M x 1024,
1,500 candidates give recall@10 0.95 where 1,000 give 0.94, and 128-byte codes only 0.86. Building never holds
the collection in RAM either: the quantizers train on a random sample drawn across all shards, then the vectors
are encoded part by part (each part an independent job a cluster could run) and the parts merged with faiss'
`merge_from`. Figures: benchmarks/README.md ("Compressed indexes"), docs/SCALING.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger(__name__)

PQ_DIMS_PER_BYTE = 4  # one 8-bit sub-quantizer per 4 dimensions; 8 (128 bytes) cost 0.09 of recall@10 at 2M
TRAIN_SAMPLES_PER_LIST = 30  # coarse k-means (faiss warns below 39): 42k vectors, ~20 s of training at 2M; not tuned
MIN_TRAIN_SAMPLES = 256 * 39  # each PQ sub-quantizer has 256 centroids
MIN_VECTORS = 256  # fewer cannot train them at all
PART_ROWS = 262_144  # vectors encoded per part: 1 GiB of float32 at 1024 dims
REFINE_CANDIDATES = 1_500  # re-ranked per query at least (6 MB of float32 at 1024 dims, ~4 us each)
REFINE_FACTOR = 20  # and per wanted neighbour, for large k
NPROBE = 8  # at 2M, 8 -> 16 lists adds 0.01 of recall and 2.5 ms; candidates buy recall cheaper
LISTS_FILE = "lists.ivfdata"  # an on-disk index's codes and ids

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


def merge_on_disk(trained: faiss.Index, parts: Iterable[faiss.Index], folder: Path) -> faiss.Index:
    """For an index larger than RAM: each part written to `folder`, then all their lists merged into one file,
    folder/LISTS_FILE, that the returned index reads through a memory map (faiss.contrib.ondisk.merge_ondisk).
    Write the index into the same folder; read it back with faiss.IO_FLAG_ONDISK_SAME_DIR."""
    from faiss.contrib.ondisk import merge_ondisk

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for n, part in enumerate(parts):
        files.append(folder / f"part-{n:05d}.faiss")
        faiss.write_index(part, str(files[-1]))
        del part
    merged = faiss.clone_index(trained)
    merged.reset()
    merge_ondisk(merged, [str(f) for f in files], str(folder / LISTS_FILE))
    for f in files:
        f.unlink()
    return merged


def build(
    dim: int, ids: np.ndarray, fetch: VectorFetch, on_disk: Path | None = None, encode: PartEncoder = encode_here
) -> faiss.Index:
    """Train on a sample, encode part by part with `encode`, merge (in RAM, or into `on_disk`'s list file): peak
    memory is the parts in flight plus the codes (one part here)."""
    trained = train(dim, ids, fetch)
    parts = encode(trained, ((ids[s], fetch(ids[s])) for s in part_ranges(len(ids))))
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
        vectors = fetch(unique)
        for i, at in enumerate(np.split(where, np.cumsum(valid.sum(axis=1))[:-1])):
            exact[i, valid[i]] = vectors[at] @ queries[i]
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(exact, order, axis=1)
    ids = np.take_along_axis(candidates, order, axis=1)
    ids[np.isinf(scores)] = -1
    return scores, ids
